import numpy as np
import pytest

from drseg_cli.raster.mask_meta import MASK_NODATA
from drseg_cli.raster.stitch import (
    ClassRule,
    CoarseLogitAccumulator,
    LogitAccumulator,
    finalize_logits,
)
from drseg_cli.raster.tiling import TileGrid


@pytest.mark.parametrize("width,height,size,overlap", [(700, 500, 128, 32), (128, 90, 128, 32)])
def test_grid_covers_scene_and_stays_inside(width, height, size, overlap):
    grid = TileGrid(width, height, size, overlap)
    cover = np.zeros((height, width), int)
    for t in grid:
        assert t.x0 >= 0 and t.x0 + t.width <= width and t.y0 + t.height <= height
        cover[t.y0 : t.y0 + t.height, t.x0 : t.x0 + t.width] += 1
    assert cover.min() >= 1
    assert len(list(grid)) == len(grid)
    steps = np.diff(grid.x_offsets)
    assert (steps <= size - overlap).all()  # consecutive tiles overlap at least `overlap`


def test_blend_window_positive_symmetric_and_falls_off():
    w = TileGrid(500, 500, 64, 16).blend_window()
    assert w.shape == (64, 64) and (w > 0).all()
    np.testing.assert_allclose(w, w.T)
    np.testing.assert_allclose(w, w[::-1, ::-1])
    assert w[32, 32] == 1.0 and w[0, 32] < w[8, 32] < w[16, 32]


def test_flat_blend_is_segearth_ov_uniform_averaging():
    """``blend="flat"``: every covering tile counts once (SegEarth-OV's forward_slide:
    preds += crop logits; count_mat += 1; preds / count_mat), crop 224, stride 112."""
    h, w, k = 300, 500, 3
    grid = TileGrid.from_fraction(w, h, 224, 0.5)
    assert grid.stride == 112
    win = grid.blend_window("flat")
    assert win.shape == (224, 224) and (win == 1).all()
    rng = np.random.default_rng(0)
    acc = LogitAccumulator(k, w, h, grid.size)
    preds, count = np.zeros((k, h, w)), np.zeros((h, w))
    got = np.zeros((k, h, w), np.float32)
    for t in grid:  # each tile its own random logits: the average is not a smooth field
        tile = rng.normal(size=(k, t.height, t.width)).astype(np.float32)
        sl = np.s_[t.y0 : t.y0 + t.height, t.x0 : t.x0 + t.width]
        preds[(slice(None), *sl)] += tile
        count[sl] += 1
        for y0, logits, _ in acc.flush_logits(t.y0):  # rows above this tile are final
            got[:, y0 : y0 + logits.shape[1]] = logits
        acc.accumulate(t.x0, t.y0, tile, win[: t.height, : t.width], np.ones(tile.shape[1:], bool))
    for y0, logits, _ in acc.flush_logits(h):
        got[:, y0 : y0 + logits.shape[1]] = logits
    assert count.max() == 6 and count.min() == 1
    np.testing.assert_allclose(got, preds / count, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="blend"):
        grid.blend_window("gaussian")


def smooth_field(k, h, w):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([np.sin(xx / 37.0 + i) * 3 + np.cos(yy / 23.0 - i) * 2 for i in range(k)])


def stitch(field, grid, valid=None, **kw):
    k, h, w = field.shape
    valid = np.ones((h, w), bool) if valid is None else valid
    acc = LogitAccumulator(k, w, h, grid.size, **kw)
    win = grid.blend_window()
    classes = np.full((h, w), 77, np.uint8)
    probs = np.zeros(field.shape, np.float32)
    rows = []
    for t in grid:
        sl = np.s_[t.y0 : t.y0 + t.height, t.x0 : t.x0 + t.width]
        tile = field[(slice(None), *sl)]
        rows += list(acc.add(t.x0, t.y0, tile, win[: t.height, : t.width], valid[sl]))
    rows += list(acc.finish())
    for r in rows:
        classes[r.y0 : r.y0 + r.height] = r.classes
        probs[:, r.y0 : r.y0 + r.height] = r.probs
    return classes, probs, acc


def softmax(x):
    e = np.exp(x - x.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


def test_overlapping_tiles_reproduce_known_smooth_field():
    field = smooth_field(4, 333, 517)
    classes, probs, _ = stitch(field, TileGrid(517, 333, 96, 24))
    assert np.abs(probs - softmax(field)).max() < 1e-3
    np.testing.assert_array_equal(classes, field.argmax(0))


def test_single_tile_equals_untiled():
    field = smooth_field(3, 64, 64)
    classes, probs, _ = stitch(field, TileGrid(64, 64, 64, 16))
    np.testing.assert_array_equal(classes, field.argmax(0))
    np.testing.assert_allclose(probs, softmax(field), atol=1e-6)


def test_seam_between_two_tiles_is_a_smooth_blend():
    """Two tiles that disagree hand over linearly across the overlap: no step at the seam."""
    grid = TileGrid(112, 64, 64, 16)
    assert grid.x_offsets == [0, 48]
    acc = LogitAccumulator(2, 112, 64, 64)
    win = grid.blend_window()
    left = np.stack([np.ones((64, 64)), np.zeros((64, 64))]).astype(np.float32)
    right = left[::-1].copy()
    list(acc.add(0, 0, left, win, np.ones((64, 64), bool)))
    rows = list(acc.add(48, 0, right, win, np.ones((64, 64), bool))) + list(acc.finish())
    p0 = np.concatenate([r.probs[0] for r in rows])[32]
    assert np.abs(np.diff(p0)).max() < 0.05  # gradual hand-over, not a jump
    assert p0[:48].min() > 0.7 and p0[64:].max() < 0.3


def test_memmap_band_equals_in_memory(tmp_path):
    field = smooth_field(3, 300, 260)
    grid = TileGrid(260, 300, 64, 16)
    c1, p1, a1 = stitch(field, grid)
    c2, p2, a2 = stitch(field, grid, max_bytes=0, tmp_dir=tmp_path)
    assert not a1.on_disk and a2.on_disk
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(p1, p2)
    assert list(tmp_path.iterdir()) == []  # the memmap file is removed


def test_band_memory_does_not_grow_with_scene_height():
    small = LogitAccumulator(5, 400, 500, 64)
    tall = LogitAccumulator(5, 400, 50_000, 64)
    assert small.sum.nbytes == tall.sum.nbytes == 5 * 64 * 400 * 4


def test_invalid_pixels_are_nodata():
    field = smooth_field(2, 100, 100)
    valid = np.ones((100, 100), bool)
    valid[10:30, 40:90] = False
    classes, _, _ = stitch(field, TileGrid(100, 100, 64, 16), valid=valid)
    assert (classes[~valid] == MASK_NODATA).all()
    assert (classes[valid] != MASK_NODATA).all()


def test_tiles_out_of_order_are_refused():
    acc = LogitAccumulator(1, 100, 200, 64)
    ones = np.ones((1, 64, 64), np.float32)
    list(acc.add(0, 100, ones, ones[0], ones[0] > 0))
    with pytest.raises(ValueError, match="after rows"):
        list(acc.add(0, 0, ones, ones[0], ones[0] > 0))


@pytest.mark.parametrize("scale,size", [(4, 64), (2, 96), (8, 128)])
def test_coarse_stitching_equals_bilinear_upsampling_of_the_coarse_blend(scale, size):
    import torch

    from drseg_cli.raster.stitch import CoarseLogitAccumulator

    h, w = 333, 517
    grid = TileGrid.from_fraction(w, h, size, 0.25, align=scale)
    assert all(o % scale == 0 for o in grid.x_offsets + grid.y_offsets)
    ch, cw = -(-h // scale), -(-w // scale)
    coarse = smooth_field(3, ch, cw) * 0.5
    acc = CoarseLogitAccumulator(3, w, h, size, scale)
    cwin = TileGrid(w, h, size // scale, 0).blend_window()  # any positive window: one field
    rows = []
    for t in grid:
        cy, cx, n = t.y0 // scale, t.x0 // scale, size // scale
        tile = coarse[:, cy : cy + n, cx : cx + n]
        valid = np.ones((t.height, t.width), bool)
        rows += list(acc.add(t.x0, t.y0, tile, cwin[: tile.shape[1], : tile.shape[2]], valid))
    rows += list(acc.finish())
    assert [r.y0 for r in rows] == sorted(r.y0 for r in rows)
    probs = np.concatenate([r.probs for r in rows], axis=1)
    assert probs.shape == (3, h, w)
    up = torch.nn.functional.interpolate(
        torch.from_numpy(coarse)[None], scale_factor=scale, mode="bilinear", align_corners=False
    )[0, :, :h, :w]
    np.testing.assert_allclose(probs, up.softmax(0).numpy(), atol=1e-5)
    assert acc.coarse.sum.nbytes == 3 * (size // scale + 1) * cw * 4  # scale² smaller band


@pytest.mark.parametrize("below", [3, MASK_NODATA], ids=["background-class", "nodata"])
def test_threshold_gives_background_exactly_below_the_probability(below):
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 1.5, (3, 40, 50)).astype(np.float32)
    valid = rng.random((40, 50)) > 0.1
    classes, probs = finalize_logits(logits, valid, ClassRule(0.6, below))
    e = np.exp(logits.astype(np.float64))
    best = (e / e.sum(0)).max(0)
    low = best < 0.6
    assert 0.2 < low.mean() < 0.8  # both kinds of pixel are present
    np.testing.assert_array_equal(classes[low & valid], below)
    np.testing.assert_array_equal(classes[~low & valid], logits.argmax(0)[~low & valid])
    assert (classes[~valid] == MASK_NODATA).all()
    plain, plain_probs = finalize_logits(logits, valid)
    np.testing.assert_array_equal(probs, plain_probs)  # the rule never changes probabilities
    np.testing.assert_array_equal(plain[valid], logits.argmax(0)[valid])


@pytest.mark.parametrize("scale", [1, 2])
def test_accumulators_apply_their_class_rule(scale):
    rng = np.random.default_rng(8)
    logits = rng.normal(0, 1.0, (2, 32 // scale, 32 // scale)).astype(np.float32)
    weight = np.ones(logits.shape[1:], np.float32)
    valid = np.ones((32, 32), bool)
    rule = ClassRule(0.7, 2)
    if scale == 1:
        acc = LogitAccumulator(2, 32, 32, 32, rule=rule)
    else:
        acc = CoarseLogitAccumulator(2, 32, 32, 32, scale, rule=rule)
    rows = list(acc.add(0, 0, logits, weight, valid)) + list(acc.flush(32))
    classes = np.concatenate([r.classes for r in rows])
    best = np.concatenate([r.probs for r in rows]).max(0)
    assert (classes == 2).any() and (classes < 2).any()
    np.testing.assert_array_equal(classes == 2, best < 0.7)
