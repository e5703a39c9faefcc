"""The host-side speed switches of issue 17 give exactly what the plain code gives.

Row reads (one window per run of row neighbours), the branch-free argmax, the mask's own
MODE overviews with a packed staging file, and the OpenMP wait policy change speed only:
tiles, classes and files are compared with the per-tile / ``np.argmax`` / GDAL results they
replace.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from rasterio.crs import CRS
from rasterio.transform import from_origin

from drseg_cli.pipeline.segment import (
    ROW_READ_TILES,
    default_decode_threads,
    default_read_threads,
    row_runs,
)
from drseg_cli.raster.mask_meta import MASK_NODATA
from drseg_cli.raster.overviews import cog_overview_shapes
from drseg_cli.raster.reader import SceneInfo, TileReader, compute_stretch, inspect_raster
from drseg_cli.raster.stitch import argmax_classes
from drseg_cli.raster.tiling import TileGrid
from drseg_cli.raster.writers import ClassMaskWriter
from tests.helpers import DATA, write_geotiff

LANDSAT = DATA / "LC08_L1TP_224077_20200518_20200518_01_RT_B2_60m.TIF"


@pytest.mark.parametrize("k", [1, 2, 6, 21])
def test_argmax_classes_is_numpy_argmax_first_on_ties(k):
    rng = np.random.default_rng(k)
    logits = rng.normal(size=(k, 37, 53)).astype(np.float32)
    logits[:, ::3] = np.round(logits[:, ::3])  # many exact ties: the first index wins
    logits[:, 5] = 0.0  # all tied
    got = argmax_classes(logits)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.argmax(logits, axis=0))


@pytest.mark.parametrize(
    ("path", "raw"),
    [(DATA / "RGB.byte.tif", True), (DATA / "RGB.byte.tif", False), (LANDSAT, False)],
)
def test_row_read_equals_tile_reads(path, raw):
    """Every tile of a row read equals its own window read: uint8, /255 and stretched
    data, nodata holes (RGB.byte.tif has a nodata collar), the scene's right edge."""
    info = inspect_raster(path)
    stretch = compute_stretch(info)
    grid = TileGrid.from_fraction(info.width, info.height, 96, 0.25)
    with TileReader(info, stretch, raw=raw) as reader:
        for run in row_runs(grid, most=5):
            together = reader.read_row([t.x0 for t in run], run[0].y0, grid.size)
            for tile, (rgb, valid) in zip(run, together, strict=True):
                alone_rgb, alone_valid = reader.read(tile.x0, tile.y0, grid.size)
                assert rgb.dtype == alone_rgb.dtype and rgb.flags.c_contiguous
                np.testing.assert_array_equal(rgb, alone_rgb)
                np.testing.assert_array_equal(valid, alone_valid)
    assert not valid.all() or path == LANDSAT  # the holes were in the comparison


def test_row_read_of_a_scene_smaller_than_a_tile_is_padded_as_a_tile_read():
    info = inspect_raster(DATA / "float_raster_with_nodata.tif")  # 13 x 12
    with TileReader(info, compute_stretch(info)) as reader:
        [(rgb, valid)] = reader.read_row([0], 0, 32)
        alone = reader.read(0, 0, 32)
    np.testing.assert_array_equal(rgb, alone[0])
    np.testing.assert_array_equal(valid, alone[1])


def test_row_runs_are_neighbours_of_one_row():
    grid = TileGrid(1000, 500, 100, 20)
    runs = list(row_runs(grid))
    assert [t for run in runs for t in run] == list(grid)  # grid order, nothing lost
    per_row = len(grid.x_offsets)
    assert len(runs) == len(grid.y_offsets) * -(-per_row // ROW_READ_TILES)
    # a subset with gaps (an AOI) is cut at every gap: a read never spans a skipped tile
    subset = [t for t in grid if t.col not in (3, 4)]
    for run in row_runs(subset, most=4):
        assert len({t.row for t in run}) == 1 and len(run) <= 4
        assert [t.col for t in run] == list(range(run[0].col, run[0].col + len(run)))


def test_openmp_waits_passively_unless_the_user_says_otherwise(tmp_path):
    """Importing drseg sets OMP_WAIT_POLICY before torch loads OpenMP; a user's value wins."""
    code = "import os, drseg_cli; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "PASSIVE", out.stderr
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "ACTIVE", out.stderr


def test_row_read_honours_a_nodata_value(tmp_path):
    data = np.random.default_rng(0).integers(1, 255, (3, 40, 90)).astype(np.uint8)
    data[:, 10:20, 30:70] = 0
    path = write_geotiff(tmp_path / "nd.tif", data, nodata=0)
    info = inspect_raster(path)
    with TileReader(info, None, raw=True) as reader:
        row = reader.read_row([0, 24, 48, 58], 8, 32)
        for x0, (rgb, valid) in zip([0, 24, 48, 58], row, strict=True):
            np.testing.assert_array_equal(rgb, data[:, 8:40, x0 : x0 + 32])
            np.testing.assert_array_equal(valid, data[:, 8:40, x0 : x0 + 32].any(axis=0))
    assert not row[1][1].all()


def _scene(height: int, width: int) -> SceneInfo:
    return SceneInfo(
        path=Path("in.tif"), width=width, height=height, count=3, dtype="uint8",
        crs=CRS.from_epsg(32633), transform=from_origin(500000, 4600000, 10, 10), nodata=None,
        bands=(1, 2, 3), alpha_band=None, res=(10.0, 10.0),
    )  # fmt: skip


def _mask(height: int, width: int, noisy: bool, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if noisy:  # every tie case of a 2x2 / 3x3 window, and nodata inside windows
        mask = rng.integers(0, 4, (height, width)).astype(np.uint8)
        mask[rng.random((height, width)) < 0.15] = MASK_NODATA
    else:
        yy, xx = np.mgrid[0:height, 0:width]
        mask = ((np.sin(xx / 37.0) * np.cos(yy / 23.0) + 1) * 2.5).astype(np.uint8)
    mask[:40, :90] = MASK_NODATA  # windows of nodata only
    return mask


@pytest.mark.parametrize(
    ("height", "width", "noisy", "band"),
    [
        (1201, 1099, True, 168),
        (777, 1537, True, 1),
        (1030, 1024, False, 100),
        (1201, 1099, True, -168),
        (300, 200, True, 64),
    ],
    ids=["odd", "row-by-row", "smooth", "bottom-first", "no-overviews"],
)
def test_class_mask_cog_with_own_overviews_is_gdals_byte_for_byte(
    tmp_path, height, width, noisy, band
):
    """Odd sizes (windows of 1-3 px), ties, nodata: the COG with overviews computed in
    raster/overviews.py is the file GDAL's own MODE resampling gives: built level by level
    while rows arrive (bands of 168 rows, row by row), or from the file when rows come
    bottom first; a mask within one block has none."""
    mask = _mask(height, width, noisy)
    starts = list(range(0, height, abs(band)))
    outputs = {}
    for own in (True, False):
        path = tmp_path / f"{own}.tif"
        writer = ClassMaskWriter(path, _scene(height, width), ["a", "b", "c", "d"], cog=True)
        writer.own_overviews = own
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning reaches the user (e.g. no georef)
            for y0 in starts if band > 0 else starts[::-1]:
                writer.write_rows(y0, mask[y0 : y0 + abs(band)])
            writer.commit()
        outputs[own] = path.read_bytes()
    assert outputs[True] == outputs[False]
    with rasterio.open(tmp_path / "True.tif") as ds:
        assert bool(ds.overviews(1)) == (height > 512) and ds.compression.name == "deflate"
        np.testing.assert_array_equal(ds.read(1), mask)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "False.qml",
        "False.tif",
        "True.qml",
        "True.tif",
    ]  # fmt: skip  (no level files, VRT or staging file left)


def test_overview_shapes_are_the_cog_drivers(tmp_path):
    for height, width in [(1025, 1025), (29, 4097), (5632, 9), (3, 2000), (2049, 1537)]:
        path = tmp_path / "z.tif"
        with rasterio.open(
            path, "w", driver="GTiff", width=width, height=height, count=1, dtype="uint8"
        ) as ds:
            ds.write(np.zeros((1, height, width), np.uint8))
        rasterio.shutil.copy(path, tmp_path / "c.tif", driver="COG", BLOCKSIZE="512")
        with rasterio.open(tmp_path / "c.tif") as ds:
            levels = range(len(ds.overviews(1)))
        got = []
        for i in levels:
            with rasterio.open(tmp_path / "c.tif", overview_level=i) as ov:
                got.append((ov.height, ov.width))
        assert got == cog_overview_shapes(height, width, 512), (height, width)


def test_plain_geotiff_mask_stays_deflate(tmp_path):
    """The packed staging file is only for masks the COG driver re-encodes."""
    writer = ClassMaskWriter(tmp_path / "m.tif", _scene(300, 200), ["a"], cog=False)
    writer.write_rows(0, _mask(300, 200, noisy=False) % 2)
    writer.commit()
    with rasterio.open(tmp_path / "m.tif") as ds:
        assert ds.compression.name == "deflate" and not ds.overviews(1)


def test_one_read_thread_for_a_local_file_on_a_cpu_two_otherwise():
    """Each read thread's GDAL handle caches its own decoded blocks: on a CPU, where the
    model needs every core, a local scene gets one reader; a GPU host or a remote scene two."""
    local = _scene(64, 64)
    remote = dataclasses.replace(local, path="/vsis3/bucket/in.tif")
    assert default_read_threads(local, "cpu") == 1
    assert default_read_threads(local, "cuda") == 2
    assert default_read_threads(remote, "cpu") == 2


def test_gdal_decodes_on_every_core_on_a_gpu_host_and_gives_the_same_tiles(tmp_path):
    """On a GPU's host each read thread's GDAL handle decodes on all cores (GDAL_NUM_THREADS,
    set in that thread at open); the tiles are the ones a one-core read gives."""
    assert default_decode_threads("cuda") == "ALL_CPUS" and default_decode_threads("cpu") is None
    data = np.random.default_rng(4).integers(0, 255, (3, 700, 900)).astype(np.uint8)
    path = write_geotiff(
        tmp_path / "blocks.tif",
        data,
        tiled=True,
        blockxsize=128,
        blockysize=128,
        compress="deflate",
    )
    info = inspect_raster(path)
    reads = []
    for threads in (None, "ALL_CPUS"):
        with TileReader(info, None, raw=True, decode_threads=threads) as reader:
            reads.append(reader.read_row([0, 200, 400, 600], 300, 256))
    for (a, va), (b, vb) in zip(*reads, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(va, vb)
