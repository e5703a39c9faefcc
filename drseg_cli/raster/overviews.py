"""Class-mask overviews computed here, bit for bit as GDAL's COG driver computes them.

GDAL 3.10's MODE resampling of a Byte band clears a 256-entry histogram for every output
pixel: two thirds of a mask's COG conversion (0.37 of 0.55 CPU s for a 4096² mask). This
module computes the same overviews with a few vectorised passes per level and hands them to
the COG driver through a VRT whose band lists them (``<Overview>``); the driver then copies
them instead of resampling, and the file it writes is byte-identical (tests/test_host_speed.py
compares them on odd sizes with nodata).

What is reproduced (GDAL 3.10, ``gcore/overview.cpp`` ``GDALResampleChunk_ModeT`` for Byte and
the COG driver's levels; checked against GDAL on 158 random sizes and masks):

- levels: factor 2, 4, 8, … while the previous level is wider or taller than the COG block;
  a level is ``max(1, floor(size / factor))`` on each axis;
- each level is computed from the previous one (not from full resolution);
- destination pixel j of a level reads source pixels ``[floor(j·r + 1e-8),
  ceil((j+1)·r − 1e-8))`` with ``r = source / destination`` (at least one pixel): 1 to 3 per
  axis when a size is odd;
- the value is the one whose running count first exceeds the best so far in row-major scan
  order (so ties go to the value that reached the tied count first); nodata is skipped; a
  window of nodata only is nodata.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import xml.sax.saxutils
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import rasterio
import rasterio.errors
import rasterio.shutil
from rasterio.windows import Window

from drseg_cli.atomic import temp_path_for

#: Bytes of the file's rows read at once when its overviews are computed from the file.
CHUNK_BYTES = 32 * 1024**2


def cog_overview_shapes(height: int, width: int, block: int) -> list[tuple[int, int]]:
    """``(height, width)`` of each overview level the COG driver makes (``OVERVIEWS=AUTO``)."""
    shapes: list[tuple[int, int]] = []
    factor, prev = 1, (height, width)
    while max(prev) > block:
        factor *= 2
        prev = (max(1, height // factor), max(1, width // factor))
        shapes.append(prev)
    return shapes


def _windows(n_src: int, n_dst: int) -> tuple[np.ndarray, np.ndarray]:
    """First source index and length of each destination pixel's window on one axis."""
    ratio = n_src / n_dst
    j = np.arange(n_dst, dtype=np.float64)
    start = np.floor(j * ratio + 1e-8).astype(np.int64)
    end = np.ceil((j + 1) * ratio - 1e-8).astype(np.int64)
    end = np.minimum(np.where(end == start, end + 1, end), n_src)
    return start, end - start


def mode_downsample(
    src: np.ndarray,
    ys: tuple[np.ndarray, np.ndarray],
    xs: tuple[np.ndarray, np.ndarray],
    nodata: int,
) -> np.ndarray:
    """GDAL's MODE of uint8 ``src`` over the windows ``ys`` × ``xs`` (starts relative to
    ``src``, lengths), nodata skipped."""
    (y0, ly), (x0, lx) = ys, xs
    h, w = len(y0), len(x0)
    candidates: list[tuple[np.ndarray, np.ndarray]] = []
    for dy in range(int(ly.max())):
        picked = src[np.minimum(y0 + dy, src.shape[0] - 1)]
        for dx in range(int(lx.max())):
            value = _take_cols(picked, np.minimum(x0 + dx, src.shape[1] - 1))
            ok = value != nodata
            if dy >= ly.min():  # windows shorter than dy + 1 rows
                ok &= (dy < ly)[:, None]
            if dx >= lx.min():
                ok &= (dx < lx)[None, :]
            candidates.append((value, ok))
    # Select without masked stores (slow on noisy masks): x += pick * (new - x), in uint8.
    best = np.full((h, w), nodata, np.uint8)
    best_count = np.zeros((h, w), np.uint8)
    count = np.empty((h, w), np.uint8)
    same = np.empty((h, w), bool)
    step = np.empty((h, w), np.uint8)
    for p, (value, ok) in enumerate(candidates):
        np.copyto(count, ok)  # running count of this pixel's value, in scan order
        for q_value, q_ok in candidates[:p]:
            np.equal(q_value, value, out=same)
            same &= q_ok  # nodata never counts (it has ok False, and so do its equals)
            count += same
        np.greater(count, best_count, out=same)
        np.subtract(value, best, out=step)
        step *= same
        best += step
        np.maximum(best_count, count, out=best_count)
    return best


def _take_cols(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``rows[:, cols]``, as a strided slice when the columns are evenly spaced."""
    if len(cols) > 1:
        step = int(cols[1] - cols[0])
        if step > 0 and (np.diff(cols) == step).all():
            return rows[:, int(cols[0]) : int(cols[-1]) + 1 : step]
    return rows[:, cols]


def _open_level(path: Path, shape: tuple[int, int], nodata: int) -> rasterio.io.DatasetWriter:
    """A new level file: pixels only (the VRT listing it carries the grid)."""
    height, width = shape
    profile = dict(
        driver="GTiff", width=width, height=height, count=1, dtype="uint8",
        nodata=nodata, tiled=True, blockxsize=256, blockysize=256, compress="packbits",
        BIGTIFF="IF_SAFER",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        return rasterio.open(path, "w", **profile)


@contextlib.contextmanager
def with_mode_overviews(path: Path, block: int, nodata: int) -> Iterator[Path]:
    """A VRT of the single-band uint8 GeoTIFF ``path`` listing its MODE overviews (computed
    here, as GDAL would for a COG of ``block`` px blocks, by a ``ModePyramid`` fed the file's
    rows chunk by chunk); temporary files removed after."""
    with rasterio.open(path) as ds:
        pyramid = ModePyramid(path, ds.height, ds.width, block, nodata)
        rows = max(1, CHUNK_BYTES // max(1, ds.width))
        try:
            for y0 in range(0, ds.height, rows):
                h = min(rows, ds.height - y0)
                pyramid.add_rows(y0, ds.read(1, window=Window(0, y0, ds.width, h)))
        except BaseException:
            pyramid.discard()
            raise
    with pyramid.vrt() as vrt:
        yield vrt


def level_paths(path: Path, count: int) -> list[Path]:
    """Temporary files of ``count`` overview levels of ``path``."""
    return [temp_path_for(path.with_name(f"{path.stem}.ovr{i}.tif")) for i in range(count)]


def _unlink(paths: list[Path]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            p.unlink()


@contextlib.contextmanager
def _overview_vrt(path: Path, levels: list[Path]) -> Iterator[Path]:
    """A VRT of ``path`` whose band lists the GeoTIFFs ``levels`` as its overviews."""
    vrt = temp_path_for(path.with_suffix(".vrt"))
    try:
        rasterio.shutil.copy(path, vrt, driver="VRT")
        entries = "".join(
            '<Overview><SourceFilename relativeToVRT="0">'
            f"{xml.sax.saxutils.escape(os.fspath(p))}</SourceFilename>"
            "<SourceBand>1</SourceBand></Overview>"
            for p in levels
        )
        text = vrt.read_text(encoding="utf-8")
        if text.count("</VRTRasterBand>") != 1:
            raise ValueError(f"{path}: expected one band")
        vrt.write_text(text.replace("</VRTRasterBand>", entries + "</VRTRasterBand>"), "utf-8")
        yield vrt
    finally:
        _unlink([vrt])


class _Level:
    """One overview level built from its source's rows as they arrive, top to bottom."""

    def __init__(self, source: tuple[int, int], shape: tuple[int, int], nodata: int, path: Path):
        self.ys, self.xs = _windows(source[0], shape[0]), _windows(source[1], shape[1])
        self.ends = self.ys[0] + self.ys[1]  # non-decreasing: rows are final in order
        self.height, self.nodata = shape[0], nodata
        self.rows = np.empty((0, source[1]), np.uint8)  # source rows still needed
        self.rows_top = 0  # source row of self.rows[0]
        self.done = 0  # level rows written
        self.dst = _open_level(path, shape, nodata)

    def add(self, rows: np.ndarray) -> np.ndarray:
        """Take the next source rows; return the level rows they completed (maybe none)."""
        self.rows = np.concatenate([self.rows, rows])  # a copy: the caller may reuse ``rows``
        available = self.rows_top + len(self.rows)
        i0, i1 = self.done, int(np.searchsorted(self.ends, available, side="right"))
        if i1 <= i0:
            return np.empty((0, len(self.xs[0])), np.uint8)
        top = int(self.ys[0][i0])
        block = self.rows[top - self.rows_top :]
        windows = (self.ys[0][i0:i1] - top, self.ys[1][i0:i1])
        out = mode_downsample(block, windows, self.xs, self.nodata)
        self.dst.write(out[None], window=Window(0, i0, out.shape[1], out.shape[0]))
        self.done = i1
        keep = int(self.ys[0][i1]) if i1 < self.height else available
        self.rows = self.rows[keep - self.rows_top :]
        self.rows_top = keep
        return out

    def close(self) -> None:
        self.dst.close()


class ModePyramid:
    """The COG's MODE overviews of a single-band uint8 raster, built while its rows are
    written: each level takes its source's rows as they become final, so at commit no
    overview is left to compute and nothing is read back. Rows must come top to bottom
    without gaps; otherwise ``vrt`` computes the levels from the file
    (``with_mode_overviews``). Same levels, windows and ties: the same bytes."""

    def __init__(self, path: Path, height: int, width: int, block: int, nodata: int) -> None:
        self.path, self.block, self.nodata = path, block, nodata
        shapes = cog_overview_shapes(height, width, block)
        self.paths = level_paths(path, len(shapes))
        sources = [(height, width), *shapes][: len(shapes)]
        self.levels: list[_Level] = []
        try:
            for source, shape, p in zip(sources, shapes, self.paths, strict=True):
                self.levels.append(_Level(source, shape, nodata, p))
        except BaseException:
            self.discard()
            raise
        self.height, self.next_row, self.in_order = height, 0, True

    def add_rows(self, y0: int, rows: np.ndarray) -> None:
        """Rows ``[y0, y0 + len(rows))`` of the raster (uint8 ``[h, W]``)."""
        if not self.in_order:
            return
        if y0 != self.next_row:
            self.in_order = False  # out of order: computed from the file at commit
            self.discard()
            return
        self.next_row += len(rows)
        for level in self.levels:
            rows = level.add(rows)
            if not len(rows):
                break

    @contextlib.contextmanager
    def vrt(self) -> Iterator[Path]:
        """The VRT the COG driver copies (call after the raster file is closed)."""
        complete = self.in_order and self.next_row == self.height
        complete = complete and all(lv.done == lv.height for lv in self.levels)
        for level in self.levels:
            level.close()
        try:
            if not complete:
                self.discard()
                with with_mode_overviews(self.path, self.block, self.nodata) as vrt:
                    yield vrt
            else:
                with _overview_vrt(self.path, self.paths) as vrt:
                    yield vrt
        finally:
            self.discard()

    def discard(self) -> None:
        """Close and delete the level files (safe to call twice)."""
        for level in self.levels:
            with contextlib.suppress(Exception):
                level.close()
        self.levels = []
        _unlink(self.paths)
