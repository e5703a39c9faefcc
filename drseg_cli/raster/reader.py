"""Open and validate an input raster; read tiles as RGB in [0, 1] with their validity mask.

Everything that decides how pixels become model input lives here: band choice (R,G,B by
colour interpretation, else the first three; one band is replicated), one scene-wide
percentile stretch for non-8-bit data (never per tile: per-tile stretch makes seams), and the
validity mask from nodata, NaN, internal masks and alpha bands.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from drseg_cli.errors import InputError, UsageError, first_line
from drseg_cli.raster.gdal_env import remote_gdal_options
from drseg_cli.raster.remote import RasterSource, as_input

log = logging.getLogger(__name__)

#: Longest side of the decimated read used to compute the scene-wide stretch.
STRETCH_SAMPLE_PX = 1024
SUPPORTED_KINDS = {"u", "i", "f"}  # unsigned, signed, float; complex is rejected


@dataclass(frozen=True)
class Stretch:
    """Per-band linear scaling ``(v - low) / (high - low)`` clipped to [0, 1]."""

    low: tuple[float, ...]
    high: tuple[float, ...]

    def apply(self, data: np.ndarray) -> np.ndarray:
        low = np.asarray(self.low, np.float32)[:, None, None]
        span = np.maximum(np.asarray(self.high, np.float32)[:, None, None] - low, 1e-12)
        return np.clip((data.astype(np.float32) - low) / span, 0.0, 1.0)


@dataclass(frozen=True)
class SceneInfo:
    """What a run needs to know about an input, read once when it is opened."""

    path: Path | RasterSource
    width: int
    height: int
    count: int
    dtype: str
    crs: rasterio.crs.CRS | None
    transform: rasterio.Affine
    nodata: float | None
    bands: tuple[int, int, int]  # 1-based band indexes used as R, G, B
    alpha_band: int | None
    res: tuple[float, float]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """Log a warning about a file once per process, however often the file is opened."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


def forget_warnings() -> None:
    """Start a new run: warnings already given may be given again."""
    _WARNED.clear()


def _default_bands(ds: rasterio.DatasetReader, path: Path | RasterSource) -> tuple[int, int, int]:
    interp = list(ds.colorinterp)
    wanted = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
    if all(ci in interp for ci in wanted):
        return tuple(interp.index(ci) + 1 for ci in wanted)  # type: ignore[return-value]
    data_bands = [i + 1 for i, ci in enumerate(interp) if ci != ColorInterp.alpha]
    if len(data_bands) >= 3:
        return (data_bands[0], data_bands[1], data_bands[2])
    if len(data_bands) == 1:
        warn_once(f"{path}: single-band image, replicated to R, G and B")
        return (data_bands[0],) * 3  # type: ignore[return-value]
    raise UsageError(
        f"{path}: has {len(data_bands)} image bands; pass --bands with three band numbers"
    )


def _check_bands(
    bands: Sequence[int], count: int, path: Path | RasterSource
) -> tuple[int, int, int]:
    if len(bands) == 1:
        bands = list(bands) * 3
    if len(bands) != 3:
        raise UsageError(f"--bands: give 1 or 3 band numbers, got {len(bands)}")
    for b in bands:
        if not 1 <= b <= count:
            raise InputError(f"{path}: --bands asks for band {b} but the file has {count} band(s)")
    return (bands[0], bands[1], bands[2])


def _alpha_band(ds: rasterio.DatasetReader) -> int | None:
    for i, ci in enumerate(ds.colorinterp):
        if ci == ColorInterp.alpha:
            return i + 1
    return None


def inspect_raster(
    path: Path | RasterSource, bands: Sequence[int] | None = None, allow_no_crs: bool = False
) -> SceneInfo:
    """Validate ``path`` as a usable input and describe it; raise a one-line InputError if not.

    A ``RasterSource`` (URL, ``/vsi…``, STAC asset) is not checked as a local file: GDAL's
    own error names what is wrong (e.g. HTTP 404).
    """
    path = as_input(path)
    if not isinstance(path, RasterSource):
        if not path.exists():
            raise InputError(f"{path}: file not found")
        if path.is_dir():
            raise InputError(f"{path}: is a directory, not a raster file")
    with contextlib.ExitStack() as stack:
        try:
            ds = stack.enter_context(open_raster(path))
        except (RasterioIOError, ValueError) as exc:  # ValueError: undecodable header bytes
            raise InputError(f"{path}: not a raster GDAL can read ({first_line(exc)})") from None
        if ds.width == 0 or ds.height == 0:
            raise InputError(f"{path}: raster has zero size ({ds.width}x{ds.height})")
        kinds = {np.dtype(d).kind for d in ds.dtypes}
        if not kinds <= SUPPORTED_KINDS:
            raise InputError(f"{path}: unsupported data type {ds.dtypes[0]} (complex data)")
        georeferenced = ds.crs is not None and not ds.transform.is_identity
        if not georeferenced and not allow_no_crs:
            what = "CRS" if ds.crs is None else "geotransform"
            raise InputError(
                f"{path}: has no {what}, outputs could not be placed on a map; "
                "pass --allow-no-crs to segment it in pixel coordinates"
            )
        chosen = _check_bands(bands, ds.count, path) if bands else _default_bands(ds, path)
        return SceneInfo(
            path=path,
            width=ds.width,
            height=ds.height,
            count=ds.count,
            dtype=ds.dtypes[chosen[0] - 1],
            crs=ds.crs,
            transform=ds.transform,
            nodata=ds.nodata,
            bands=chosen,
            alpha_band=_alpha_band(ds),
            res=ds.res,
        )


def compute_stretch(
    info: SceneInfo, percentiles: tuple[float, float] = (2.0, 98.0)
) -> Stretch | None:
    """Scene-wide per-band percentile stretch from a decimated read (uses overviews if any).

    Returns None for 8-bit data, which is used as is (value / 255).
    """
    if np.dtype(info.dtype) == np.uint8:
        return None
    scale = max(info.width, info.height) / STRETCH_SAMPLE_PX
    out_h = max(1, round(info.height / max(scale, 1.0)))
    out_w = max(1, round(info.width / max(scale, 1.0)))
    bands = sorted(set(info.bands))
    with open_raster(info.path) as ds:
        try:
            data = ds.read(bands, out_shape=(len(bands), out_h, out_w)).astype(np.float64)
            valid = ds.dataset_mask(out_shape=(out_h, out_w)) > 0
        except RasterioIOError as exc:
            raise InputError(f"{info.path}: read failed ({first_line(exc)})") from None
    valid &= np.all(np.isfinite(data), axis=0)
    low, high = {}, {}
    for i, b in enumerate(bands):
        values = data[i][valid]
        if values.size == 0:
            low[b], high[b] = 0.0, 1.0
            continue
        lo, hi = np.percentile(values, percentiles)
        if hi <= lo:  # constant band: map it to mid-grey rather than divide by zero
            lo, hi = lo - 0.5, lo + 0.5
        low[b], high[b] = float(lo), float(hi)
    return Stretch(tuple(low[b] for b in info.bands), tuple(high[b] for b in info.bands))


@contextlib.contextmanager
def open_raster(path: Path | RasterSource) -> Iterator[rasterio.DatasetReader]:
    """Open an input for reading, quietly when it has no georeferencing, with the range-read
    GDAL options when it is remote (``gdal_env.remote_gdal_options``)."""
    with warnings.catch_warnings(), rasterio.Env(**remote_gdal_options(path)):
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as ds:
            yield ds


def _pad_mode(n: int) -> str:
    return "reflect" if n > 1 else "edge"


class TileReader:
    """Reads tile windows as ``(rgb float32 [3,T,T] in [0,1], valid bool [T,T])``.

    Thread-safe: each thread gets its own dataset handle, so tiles can be prefetched by a
    pool of reader threads while the model runs. Windows that stick out of the scene (only
    when the scene is smaller than a tile) are padded by reflection and marked invalid.

    ``raw``: 8-bit data without a stretch comes back as uint8 (the consumer divides by 255,
    e.g. ``runtime.to_model_input`` on the device): no float conversion in the reader
    threads, a quarter of the bytes through the queue.
    """

    def __init__(
        self,
        info: SceneInfo,
        stretch: Stretch | None,
        *,
        raw: bool = False,
        decode_threads: str | None = None,
    ) -> None:
        """``decode_threads``: GDAL's ``GDAL_NUM_THREADS`` for each thread's handle (a GeoTIFF
        window spanning several blocks is then decoded on that many cores); None: one."""
        self.info = info
        self.stretch = stretch
        self.raw = raw
        self.decode_threads = decode_threads
        self._local = threading.local()
        self._handles: list[rasterio.DatasetReader] = []
        self._lock = threading.Lock()

    def _dataset(self) -> rasterio.DatasetReader:
        ds = getattr(self._local, "ds", None)
        if ds is None:
            options = remote_gdal_options(self.info.path)
            if self.decode_threads:  # read by GTiff at open; config options are per thread
                options["GDAL_NUM_THREADS"] = self.decode_threads
            with warnings.catch_warnings(), rasterio.Env(**options):
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                ds = rasterio.open(self.info.path)
            self._local.ds = ds
            with self._lock:
                self._handles.append(ds)
        return ds

    def close(self) -> None:
        with self._lock:
            for ds in self._handles:
                ds.close()
            self._handles.clear()

    def __enter__(self) -> TileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _all_valid(self, ds: rasterio.DatasetReader) -> bool:
        """True when GDAL's mask of every band is ``all_valid`` (no nodata value, alpha band
        or internal mask): then ``dataset_mask`` would read nothing but 255s."""
        flags = getattr(self._local, "all_valid", None)
        if flags is None:
            flags = all(f == [MaskFlags.all_valid] for f in ds.mask_flag_enums)
            self._local.all_valid = flags
        return flags

    def read_valid(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """Validity of a window inside the scene: nodata, alpha, internal mask and NaN."""
        ds = self._dataset()
        window = Window(x0, y0, width, height)
        try:
            return ds.dataset_mask(window=window) > 0
        except RasterioIOError as exc:
            raise InputError(
                f"{self.info.path}: read failed near row {y0} ({first_line(exc)})"
            ) from None

    def read(self, x0: int, y0: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Read the ``size``×``size`` tile whose top-left pixel is (x0, y0): float32 RGB in
        [0, 1] (uint8 with ``raw`` for unstretched 8-bit data) and its validity."""
        info = self.info
        w = min(size, info.width - x0)
        h = min(size, info.height - y0)
        rgb, valid = self._read_window(x0, y0, w, h)
        if w < size or h < size:
            pad = ((0, size - h), (0, size - w))
            rgb = np.stack([np.pad(c, ((0, size - h), (0, 0)), mode=_pad_mode(h)) for c in rgb])
            rgb = np.stack([np.pad(c, ((0, 0), (0, size - w)), mode=_pad_mode(w)) for c in rgb])
            valid = np.pad(valid, pad, mode="constant", constant_values=False)
        return np.ascontiguousarray(rgb), valid

    def read_row(
        self, x0s: Sequence[int], y0: int, size: int
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``read(x0, y0, size)`` for each of ``x0s`` (tiles of one grid row, left to right),
        from one window covering them all: overlapping tiles decode, stretch and check
        validity of their shared pixels once, and GDAL is called once instead of per tile.
        Element-wise steps only, so every tile is the one ``read`` gives."""
        info = self.info
        xa, xb = min(x0s), max(x0s) + size
        if xb > info.width or y0 + size > info.height:  # tiles padded (tiny scene): per tile
            return [self.read(x0, y0, size) for x0 in x0s]
        rgb, valid = self._read_window(xa, y0, xb - xa, size)
        return [
            (
                np.ascontiguousarray(rgb[:, :, x0 - xa : x0 - xa + size]),
                np.ascontiguousarray(valid[:, x0 - xa : x0 - xa + size]),
            )
            for x0 in x0s
        ]

    def _read_window(self, x0: int, y0: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
        """Model input ``[3, h, w]`` and validity ``[h, w]`` of a window inside the scene."""
        info = self.info
        ds = self._dataset()
        window = Window(x0, y0, w, h)
        try:
            data = ds.read(list(info.bands), window=window)
            if self._all_valid(ds):  # no nodata, alpha or mask: GDAL's mask is all 255
                valid = np.ones((h, w), bool)
            else:
                valid = ds.dataset_mask(window=window) > 0
        except RasterioIOError as exc:
            raise InputError(
                f"{info.path}: read failed near row {y0} ({first_line(exc)})"
            ) from None
        if data.dtype.kind == "f":
            valid &= np.all(np.isfinite(data), axis=0)
        if not valid.all():  # nodata values (e.g. -3.4e38) must not reach the stretch
            data = np.where(valid[None], data, 0)
        if self.stretch:
            return self.stretch.apply(data), valid
        if self.raw and data.dtype == np.uint8:
            return data, valid
        return data.astype(np.float32) / 255.0, valid
