"""The scene loop with small deterministic models: stitching, nodata, georeferencing, atomicity."""

import numpy as np
import pytest
import rasterio
import torch

from drseg_cli.classes import parse_classes
from drseg_cli.errors import DrsegError, InputError, UsageError
from drseg_cli.pipeline.runtime import TilePredictor
from drseg_cli.pipeline.segment import OutputPlan, SegmentConfig, segment_scene
from drseg_cli.raster.mask_meta import MASK_NODATA, class_names_from_tags
from tests.helpers import DATA, ContextModel, PixelModel, write_geotiff

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
