"""Device-side stitching equals the host path, and speed switches never change a mask.

The device code path (``pipeline/device_stitch.py``) runs here on ``device='cpu'`` tensors:
the same torch code a GPU runs, compared with the numpy ``LogitAccumulator``.
"""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch

from drseg_cli.classes import parse_classes
from drseg_cli.pipeline.device_stitch import DeviceLogitAccumulator
from drseg_cli.pipeline.runtime import TilePredictor
from drseg_cli.pipeline.segment import OutputPlan, SegmentConfig, segment_scene, stitch_scene
from drseg_cli.raster.mask_meta import MASK_NODATA
from drseg_cli.raster.reader import TileReader, inspect_raster
from drseg_cli.raster.stitch import ARGMAX, ClassRule, LogitAccumulator
from drseg_cli.raster.tiling import TileGrid, blend_window
from tests.helpers import ContextModel, write_geotiff

CPU = torch.device("cpu")
CLASSES = parse_classes("water,tree,building,road")
ALL = ("probs", "prob_codes", "score", "uncertainty")


def _tiles(grid: TileGrid, k: int, seed: int = 0):
    """Random logits per tile (no smooth field: every blend weight shows) and holes."""
    rng = np.random.default_rng(seed)
    for t in grid:
        logits = (3 * rng.normal(size=(k, t.height, t.width))).astype(np.float32)
        valid = rng.random((t.height, t.width)) > 0.05
        yield t, logits, valid


def _host(grid, k, rule, blend="linear"):
    win = blend_window(grid.size, grid.overlap, blend)
    acc = LogitAccumulator(k, grid.width, grid.height, grid.size, rule=rule)
    rows = []
    for t, lg, valid in _tiles(grid, k):
        rows += acc.add(t.x0, t.y0, lg, win[: t.height, : t.width], valid)
    rows += acc.flush(grid.height)
    return rows


def _device(grid, k, rule, blend="linear"):
    win = torch.from_numpy(blend_window(grid.size, grid.overlap, blend))
    acc = DeviceLogitAccumulator(k, grid.width, grid.height, grid.size, CPU, rule=rule, outputs=ALL)
    rows = []
    for t, lg, valid in _tiles(grid, k):
        found = acc.add(
            t.x0,
            t.y0,
            torch.from_numpy(lg),
            win[: t.height, : t.width],
            torch.from_numpy(valid),
        )
        rows += [r.to_host() for r in found]
    rows += [r.to_host() for r in acc.flush(grid.height)]
    return rows


def _cat(rows, get):
    return np.concatenate([get(r) for r in rows], axis=-2)


@pytest.mark.parametrize(
    "rule,blend", [(ARGMAX, "linear"), (ClassRule(0.5, 1), "linear"), (ARGMAX, "flat")]
)
def test_device_accumulator_equals_the_host_path(rule, blend):
    # 150 rows with a 64-row band and stride 40: the ring wraps inside tiles
    grid = TileGrid(201, 150, 64, 24)
    k = 5
    host, dev = _host(grid, k, rule, blend), _device(grid, k, rule, blend)
    assert [r.y0 for r in host] == [r.y0 for r in dev]
    classes = _cat(dev, lambda r: r.classes)
    np.testing.assert_array_equal(classes, _cat(host, lambda r: r.classes))
    assert (classes == MASK_NODATA).any() and (classes != MASK_NODATA).any()
    if rule.threshold:
        assert (classes == 1).mean() > 0.3  # the threshold did pick the background often
    valid = _cat(host, lambda r: r.valid)
    np.testing.assert_array_equal(_cat(dev, lambda r: r.valid), valid)
    hp, dp = _cat(host, lambda r: r.probs), _cat(dev, lambda r: r.probs)
    np.testing.assert_allclose(dp, hp, atol=1e-6, rtol=0)
    for name in ("score", "uncertainty"):
        h = _cat(host, lambda r, n=name: getattr(r, n)())
        d = _cat(dev, lambda r, n=name: getattr(r, n)())
        np.testing.assert_array_equal(np.isnan(d), ~valid)
        np.testing.assert_allclose(d[valid], h[valid], atol=1e-6, rtol=0)
    codes = _cat(dev, lambda r: r.prob_codes)
    expected = np.rint(hp * 254.0).astype(np.uint8)
    expected[:, ~valid] = 255
    # the same rounding of probabilities within 1e-6: a code may differ only at a .5 tie
    assert np.abs(codes.astype(int) - expected).max() <= 1
    assert (codes == expected).mean() > 0.9999


def test_device_rows_carry_only_what_is_asked():
    grid = TileGrid(80, 70, 64, 16)
    acc = DeviceLogitAccumulator(3, 80, 70, 64, CPU, outputs=("score",))
    win = torch.ones(64, 64)
    rows = []
    for t, lg, valid in _tiles(grid, 3):
        rows += acc.add(t.x0, t.y0, torch.from_numpy(lg), win, torch.from_numpy(valid))
    rows += list(acc.flush(70))
    assert rows and all(set(r.extras) == {"score"} for r in rows)
    with pytest.raises(ValueError, match="no probabilities"):
        _ = rows[0].to_host().probs


@pytest.fixture
def scene(tmp_path):
    rng = np.random.default_rng(3)
    base = rng.integers(0, 255, (3, 18, 25))
    img = np.kron(base, np.ones((1, 9, 9)))[:, :150, :211].astype(np.uint8)
    img[:, 100:, :40] = 0  # nodata corner
    return write_geotiff(tmp_path / "scene.tif", img, nodata=0)


def _run_stitch(path, **kwargs):
    info = inspect_raster(path)
    grid = TileGrid(info.width, info.height, 64, 16)
    predictor = TilePredictor(ContextModel(), [c.prompt_names for c in CLASSES], CPU)
    rows = []
    stitch_scene(info, None, grid, predictor, rows.append, **kwargs)
    return _cat(rows, lambda r: r.classes), _cat(rows, lambda r: r.probs)


def test_stitch_scene_on_the_device_path_equals_the_host_path(scene):
    host_classes, host_probs = _run_stitch(scene, device_stitch=False)
    dev_classes, dev_probs = _run_stitch(scene, device_stitch=True, batch_size=3)
    np.testing.assert_array_equal(dev_classes, host_classes)
    assert (host_classes == MASK_NODATA).any() and len(np.unique(host_classes)) >= 3
    np.testing.assert_allclose(dev_probs, host_probs, atol=1e-6, rtol=0)


def test_uint8_tiles_give_the_float_path_logits_bit_for_bit(scene):
    info = inspect_raster(scene)
    with TileReader(info, None, raw=True) as raw, TileReader(info, None) as flt:
        a, va = raw.read(0, 0, 64)
        b, vb = flt.read(0, 0, 64)
    assert a.dtype == np.uint8 and b.dtype == np.float32
    np.testing.assert_array_equal(va, vb)
    predictor = TilePredictor(ContextModel(), [c.prompt_names for c in CLASSES], CPU)
    np.testing.assert_array_equal(predictor.predict(a[None]), predictor.predict(b[None]))


SWITCHES = [
    {"batch_size": 1, "read_threads": 1},
    {"batch_size": 5, "read_threads": 3},
    {"accumulator_bytes": 1},  # the band on a disk memmap
]


def test_every_speed_switch_writes_the_same_mask(scene, tmp_path):
    """Batch size, reader threads, the accumulator on disk and device-side stitching change
    speed only: the masks are array-equal (probabilities within float rounding)."""

    def segment(name, **config):
        out = tmp_path / name
        out.mkdir()
        plan = OutputPlan(out / "m.tif", probs=out / "p.tif", uncertainty=out / "u.tif")
        predictor = TilePredictor(ContextModel(), [c.prompt_names for c in CLASSES], CPU)
        cfg = SegmentConfig(tile_size=64, **config)
        segment_scene(scene, plan, predictor, CLASSES, cfg, tile_multiple=16, default_tile_size=64)
        reads = []
        for path in (plan.mask, plan.probs, plan.uncertainty):
            with rasterio.open(path) as ds:
                reads.append(ds.read())
        return reads[0][0], reads[1], reads[2][0]

    mask, probs, unc = segment("reference", device_stitch=False)
    assert "device_stitch" not in SegmentConfig(device_stitch=True).output_settings()
    assert (mask == MASK_NODATA).any() and len(np.unique(mask)) >= 3
    runs = [segment(f"s{i}", **sw) for i, sw in enumerate(SWITCHES)]
    runs.append(segment("device", device_stitch=True))
    for m, p, u in runs:
        np.testing.assert_array_equal(m, mask)
        assert np.abs(p.astype(int) - probs).max() <= 1  # uint8 codes: a .5 tie at most
        np.testing.assert_allclose(u, unc, atol=1e-3, equal_nan=True)  # stored as float16
