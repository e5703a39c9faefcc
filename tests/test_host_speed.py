"""The host-side speed switches of issue 17 give exactly what the plain code gives.

Row reads (one window per run of row neighbours), the branch-free argmax, the packed
temporary mask and the OpenMP wait policy change speed only: tiles, classes and files are
compared with the per-tile / ``np.argmax`` / plain-GeoTIFF results they replace.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from drseg_cli.pipeline.segment import ROW_READ_TILES, row_runs
from drseg_cli.raster.reader import TileReader, compute_stretch, inspect_raster
from drseg_cli.raster.stitch import argmax_classes
from drseg_cli.raster.tiling import TileGrid
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
