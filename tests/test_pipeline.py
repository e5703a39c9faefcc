"""The scene loop with small deterministic models: stitching, nodata, georeferencing, atomicity."""

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from drseg_cli.atomic import TMP_MARKER
from drseg_cli.classes import parse_classes
from drseg_cli.errors import DrsegError, InputError, UsageError
from drseg_cli.pipeline.runtime import TilePredictor
from drseg_cli.pipeline.segment import OutputPlan, SegmentConfig, segment_scene, stitch_scene
from drseg_cli.raster.mask_meta import MASK_NODATA, class_names_from_tags
from drseg_cli.raster.reader import compute_stretch, inspect_raster
from drseg_cli.raster.tiling import TileGrid
from tests.helpers import DATA, ContextModel, PixelModel, gdal_cache_max, write_geotiff

CLASSES = parse_classes("water,tree,building")


def run(model, path, out, **config):
    plan = OutputPlan(out / "mask.tif", probs=out / "probs.tif", uncertainty=out / "unc.tif")
    predictor = TilePredictor(model, [c.prompt_names for c in CLASSES], torch.device("cpu"))
    cfg = SegmentConfig(**{"tile_size": 64, "overlap": 0.25, **config})
    result = segment_scene(
        path, plan, predictor, CLASSES, cfg, tile_multiple=16, default_tile_size=64
    )
    with rasterio.open(plan.mask) as m, rasterio.open(plan.probs) as p:
        return result, m.read(1), p.read(), m


def expected_pixel_classes(model, path):
    with rasterio.open(path) as ds:
        img = torch.from_numpy(ds.read().astype(np.float32) / 255.0)[None]
    text = model.encode_text([c.prompt_names for c in CLASSES])
    return model(img, text)[0].argmax(0).numpy()


def test_tiled_per_pixel_model_is_seamless(rgb_scene, tmp_path):
    model = PixelModel()
    result, mask, _, _ = run(model, rgb_scene, tmp_path)
    assert result.tiles_total > 4
    np.testing.assert_array_equal(mask, expected_pixel_classes(model, rgb_scene))


def test_single_tile_scene_equals_untiled(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (3, 64, 64)).astype(np.uint8)
    path = write_geotiff(tmp_path / "one.tif", img)
    model = ContextModel()
    result, mask, probs, _ = run(model, path, tmp_path)
    assert result.tiles_total == 1
    x = torch.from_numpy(img.astype(np.float32) / 255.0)[None]
    logits = model(x, model.encode_text([c.prompt_names for c in CLASSES]))
    up = torch.nn.functional.interpolate(logits, size=(64, 64), mode="bilinear")
    np.testing.assert_array_equal(mask, up[0].argmax(0).numpy())
    np.testing.assert_allclose(probs / 254.0, up[0].softmax(0).numpy(), atol=1 / 254.0)


@pytest.mark.parametrize("config", [{"batch_size": 1}, {"batch_size": 5, "read_threads": 1}])
def test_batch_size_and_threads_do_not_change_results(rgb_scene, tmp_path, config):
    model = ContextModel()
    _, ref_mask, ref_probs, _ = run(model, rgb_scene, tmp_path / "a", batch_size=3)
    _, mask, probs, _ = run(model, rgb_scene, tmp_path / "b", **config)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_array_equal(probs, ref_probs)


@pytest.fixture(autouse=True)
def _dirs(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()


def _test_tiny():
    from drseg_cli.model.factory import build_model

    return build_model("test-tiny", method="drseg")


@pytest.mark.parametrize("make_model", [ContextModel, _test_tiny], ids=["context", "test-tiny"])
def test_scene_far_larger_than_accumulator_budget_equals_in_memory(rgb_scene, tmp_path, make_model):
    model = make_model()
    _, ref_mask, ref_probs, _ = run(model, rgb_scene, tmp_path / "a")
    _, mask, probs, _ = run(model, rgb_scene, tmp_path / "b", accumulator_bytes=1024)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_array_equal(probs, ref_probs)
    assert not list((tmp_path / "b").glob("drseg-acc-*"))


def test_real_scene_georeferencing_and_nodata_in_every_output(tmp_path):
    src = DATA / "RGB.byte.tif"
    result, mask, probs, _ = run(ContextModel(), src, tmp_path)
    with rasterio.open(src) as ds, rasterio.open(tmp_path / "mask.tif") as m:
        valid = ds.dataset_mask() > 0
        assert (m.crs, m.transform, m.width, m.height) == (
            ds.crs,
            ds.transform,
            ds.width,
            ds.height,
        )
        assert m.nodata == MASK_NODATA and m.dtypes[0] == "uint8"
        assert class_names_from_tags(m.tags()) == ["water", "tree", "building"]
        assert m.colormap(1)[0][:3] == (31, 120, 180)  # water is blue
        assert m.descriptions == ("class",)
        assert m.profile["tiled"] and m.profile["compress"] == "deflate" and m.overviews(1)
        crs, transform = m.crs, m.transform
    np.testing.assert_array_equal(mask == MASK_NODATA, ~valid)
    assert (probs[:, ~valid] == 255).all() and (probs[:, valid] <= 254).all()
    with rasterio.open(tmp_path / "unc.tif") as u:
        unc = u.read(1)
        assert u.crs == crs and u.transform == transform
    assert np.isnan(unc[~valid]).all() and np.isfinite(unc[valid]).all()
    assert unc[valid].min() >= 0 and unc[valid].max() <= 1.001
    qml = (tmp_path / "mask.qml").read_text()
    assert 'label="building"' in qml and 'type="paletted"' in qml
    assert result.class_pixels["nodata"] == int((~valid).sum())


def test_all_nodata_tiles_are_skipped(tmp_path):
    img = np.zeros((3, 200, 200), np.uint8)
    img[:, 150:, 150:] = 120
    path = write_geotiff(tmp_path / "sparse.tif", img, nodata=0)
    result, mask, _, _ = run(ContextModel(), path, tmp_path)
    assert (
        result.tiles_skipped > 0 and result.tiles_run + result.tiles_skipped == result.tiles_total
    )
    assert (mask[:150] == MASK_NODATA).all() and (mask[150:, 150:] != MASK_NODATA).all()


def test_existing_output_is_not_overwritten(rgb_scene, tmp_path):
    (tmp_path / "mask.tif").write_bytes(b"precious")
    with pytest.raises(UsageError, match="output exists; pass --overwrite"):
        run(ContextModel(), rgb_scene, tmp_path)
    assert (tmp_path / "mask.tif").read_bytes() == b"precious"


def test_corrupt_input_leaves_no_output(tmp_path):
    with pytest.raises(InputError, match="corrupt.tif: read failed"):
        run(ContextModel(), DATA / "corrupt.tif", tmp_path)
    leftovers = [p.name for p in tmp_path.iterdir() if p.is_file()]
    assert leftovers == []


def test_output_plan_by_extension(tmp_path):
    assert OutputPlan.from_output(tmp_path / "m.tif", vector=True).vector == tmp_path / "m.gpkg"
    plan = OutputPlan.from_output(tmp_path / "p.shp")
    assert plan.mask is None and plan.vector == tmp_path / "p.shp"
    with pytest.raises(UsageError, match="unknown output type .png"):
        OutputPlan.from_output(tmp_path / "m.png")


class OomModel(ContextModel):
    """Runs out of memory above 2 tiles per batch, like a GPU would."""

    def forward(self, images, text):
        if images.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().forward(images, text)


def test_out_of_memory_retries_with_smaller_batches(rgb_scene, tmp_path, caplog):
    _, ref, _, _ = run(ContextModel(), rgb_scene, tmp_path / "a", batch_size=8)
    with caplog.at_level("WARNING"):
        _, mask, _, _ = run(OomModel(), rgb_scene, tmp_path / "b", batch_size=8)
    np.testing.assert_array_equal(mask, ref)
    assert "out of CPU memory with batch size 8: retrying with 4" in caplog.text


def test_out_of_memory_with_one_tile_is_a_clear_error():
    class AlwaysOom(ContextModel):
        def forward(self, images, text):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    predictor = TilePredictor(AlwaysOom(), [["a"]], torch.device("cpu"))
    with pytest.raises(DrsegError, match="single tile; use a smaller --tile-size"):
        predictor.predict(np.zeros((4, 3, 64, 64), np.float32))
    assert predictor.max_batch == 1


def test_coarse_logit_stitching_is_close_and_keeps_nodata_exact(tmp_path):
    src = DATA / "RGB.byte.tif"
    _, ref, _, _ = run(ContextModel(), src, tmp_path / "a")
    _, mask, _, _ = run(ContextModel(), src, tmp_path / "b", logit_scale=4)
    np.testing.assert_array_equal(mask == MASK_NODATA, ref == MASK_NODATA)
    valid = ref != MASK_NODATA
    assert (mask[valid] == ref[valid]).mean() > 0.97
    with pytest.raises(UsageError, match="must divide the tile size"):
        run(ContextModel(), src, tmp_path / "b", logit_scale=5, overwrite=True)


# --- GDAL block cache -----------------------------------------------------------------------


class CacheProbeModel(PixelModel):
    """Records GDAL's block-cache limit while the scene runs."""

    def __init__(self) -> None:
        super().__init__()
        self.cache_seen: list[int] = []

    def forward(self, images, text):
        self.cache_seen.append(gdal_cache_max())
        return super().forward(images, text)


@pytest.mark.parametrize("width", [290, 9000])
def test_gdal_block_cache_is_sized_from_the_width_in_bytes(tmp_path, width):
    """64 MiB for reading plus 3 output block rows (64-row bands) of mask + 3 probability
    bands (uint8) + uncertainty (float32): 8 bytes a pixel. Never the scene height."""
    path = write_geotiff(tmp_path / "s.tif", np.zeros((3, 70, width), np.uint8) + 60)
    before = gdal_cache_max()
    model = CacheProbeModel()
    run(model, path, tmp_path)
    expected = 64 * 1024**2 + 3 * 256 * width * 8
    assert model.cache_seen and set(model.cache_seen) == {expected}
    assert gdal_cache_max() == before  # restored after the scene
    model.cache_seen.clear()
    run(model, path, tmp_path, overwrite=True, gdal_cache_bytes=200 * 1024**2)
    assert set(model.cache_seen) == {200 * 1024**2}


def test_plain_geotiff_output_is_as_compact_as_a_rewrite(tmp_path):
    """Rows arrive in bands shorter than a 256-row block: with the cache off GDAL flushes
    partly filled deflate blocks and re-encodes them, leaving dead space in the file."""
    rng = np.random.default_rng(3)
    img = rng.integers(0, 255, (3, 520, 520)).astype(np.uint8)
    path = write_geotiff(tmp_path / "big.tif", img)
    run(PixelModel(), path, tmp_path, cog=False, tile_size=48, overlap=0.0)
    probs = tmp_path / "probs.tif"
    compact = tmp_path / "compact.tif"
    with rasterio.open(probs) as src:
        profile = src.profile
        with rasterio.open(compact, "w", **profile) as dst:
            dst.write(src.read())
    ratio = probs.stat().st_size / compact.stat().st_size
    assert ratio < 1.1, f"plain GeoTIFF is {ratio:.2f}× its compact rewrite"


# --- the scene loop: seams, streaming, NaN, atomic COG ----------------------------------------


def _ramp(size: int, overlap: int) -> np.ndarray:
    """Linear hand-over over ``overlap`` pixels, written out here independently of tiling.py."""
    i = np.arange(size) + 0.5
    w = np.clip(np.minimum(i, size - i) / overlap, None, 1.0)
    return np.outer(w, w)


def _stitch(model, path, tile, overlap, **kwargs):
    """Probabilities [K, H, W] of ``stitch_scene`` plus the (y0, y1) of each hand-out."""
    info = inspect_raster(path)
    grid = TileGrid(info.width, info.height, tile, overlap)
    predictor = TilePredictor(model, [c.prompt_names for c in CLASSES], torch.device("cpu"))
    parts, spans = [], []

    def on_rows(rows):
        parts.append(rows.probs)
        spans.append((rows.y0, rows.y0 + rows.height))

    stitch_scene(info, compute_stretch(info), grid, predictor, on_rows, **kwargs)
    return np.concatenate(parts, axis=1), spans, grid


def test_context_model_seams_match_an_independent_linear_blend(rgb_scene):
    """Weighted hand-over between overlapping tiles, recomputed here from the tiles alone."""
    model = ContextModel()
    probs, _, grid = _stitch(model, rgb_scene, 64, 24)
    with rasterio.open(rgb_scene) as ds:
        img = torch.from_numpy(ds.read().astype(np.float32) / 255.0)
    text = model.encode_text([c.prompt_names for c in CLASSES])
    k, h, w = len(CLASSES), img.shape[1], img.shape[2]
    blended, plain = np.zeros((k, h, w)), np.zeros((k, h, w))
    weights, counts = np.zeros((h, w)), np.zeros((h, w))
    for t in grid:
        tile = img[:, t.y0 : t.y0 + 64, t.x0 : t.x0 + 64][None]
        lg = torch.nn.functional.interpolate(model(tile, text), size=(64, 64), mode="bilinear")
        lg = lg[0].double().numpy()
        wt = _ramp(64, 24)
        blended[:, t.y0 : t.y0 + 64, t.x0 : t.x0 + 64] += lg * wt
        weights[t.y0 : t.y0 + 64, t.x0 : t.x0 + 64] += wt
        plain[:, t.y0 : t.y0 + 64, t.x0 : t.x0 + 64] += lg
        counts[t.y0 : t.y0 + 64, t.x0 : t.x0 + 64] += 1
    assert len(grid) >= 12 and counts.max() >= 4
    expected = torch.from_numpy(blended / weights).softmax(0).numpy()
    unblended = torch.from_numpy(plain / counts).softmax(0).numpy()
    assert np.abs(unblended - expected).max() > 0.05  # the blend matters on this scene
    np.testing.assert_allclose(probs, expected, atol=2e-5)


def test_rows_are_handed_out_while_tiles_are_still_predicted(tmp_path):
    """Memory independent of scene height: finished rows leave before the scene ends."""
    rng = np.random.default_rng(5)
    path = write_geotiff(tmp_path / "tall.tif", rng.integers(0, 255, (3, 1280, 64), np.uint8))
    info = inspect_raster(path)
    predictor = TilePredictor(PixelModel(), [c.prompt_names for c in CLASSES], torch.device("cpu"))
    handed_out, at_each_predict = [0], []
    predict = predictor.predict_tensor

    def counting_predict(tiles, out_size=None, **kw):
        at_each_predict.append(handed_out[0])
        return predict(tiles, out_size, **kw)

    def on_rows(rows):
        assert rows.y0 == handed_out[0]  # in order, no gap, no repeat
        handed_out[0] = rows.y0 + rows.height

    predictor.predict_tensor = counting_predict
    grid = TileGrid(info.width, info.height, 64, 0)
    stitch_scene(info, None, grid, predictor, on_rows, batch_size=1)
    assert len(at_each_predict) == 20 and handed_out[0] == 1280
    assert at_each_predict[-1] >= 1280 - 4 * 64, at_each_predict


class FiniteInputModel(PixelModel):
    """Fails if a non-finite value reaches the model."""

    def forward(self, images, text):
        assert torch.isfinite(images).all(), "NaN/Inf reached the model"
        return super().forward(images, text)


@pytest.mark.parametrize("declared", [True, False], ids=["nodata=nan", "undeclared-nan"])
def test_nan_pixels_reach_neither_the_stretch_nor_the_model(tmp_path, declared):
    rng = np.random.default_rng(9)
    img = rng.uniform(100.0, 300.0, (3, 150, 150)).astype(np.float32)
    img[:, 40:90, 20:130] = np.nan
    kw = {"nodata": float("nan")} if declared else {}
    path = write_geotiff(tmp_path / "nan.tif", img, **kw)
    stretch = compute_stretch(inspect_raster(path))
    finite = img[~np.isnan(img)].reshape(3, -1)
    for b in range(3):
        lo, hi = np.percentile(finite[b], (2, 98))
        assert stretch.low[b] == pytest.approx(lo, rel=0.02)
        assert stretch.high[b] == pytest.approx(hi, rel=0.02)
    _, mask, probs, _ = run(FiniteInputModel(), path, tmp_path)
    nan = np.isnan(img[0])
    assert (mask[nan] == MASK_NODATA).all() and (mask[~nan] < 3).all()
    assert (probs[:, nan] == 255).all()


def test_cog_is_never_written_under_its_final_name(rgb_scene, tmp_path, monkeypatch):
    """The COG conversion writes a temp file; a crash inside it leaves nothing behind."""
    import rasterio.shutil

    real_copy = rasterio.shutil.copy
    targets = []

    def crashing_copy(src, dst, **kwargs):
        targets.append(Path(dst))
        real_copy(src, dst, **kwargs)  # the file exists under ``dst`` when the crash comes
        raise rasterio.errors.RasterioIOError("simulated crash during COG conversion")

    monkeypatch.setattr(rasterio.shutil, "copy", crashing_copy)
    with pytest.raises(DrsegError):
        run(PixelModel(), rgb_scene, tmp_path)
    assert targets and all(TMP_MARKER in t.name for t in targets)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "scene.tif"]
