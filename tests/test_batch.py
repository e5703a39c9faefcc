"""Batch runs at library level: keep-going, fail-fast, manifest, resume, verification."""

import json
import shutil

import numpy as np
import pytest
import torch

from drseg_cli.classes import parse_classes
from drseg_cli.errors import InputError, UsageError
from drseg_cli.pipeline.batch import Manifest, expand_inputs, plan_outputs, run_batch
from drseg_cli.pipeline.runtime import TilePredictor
from drseg_cli.pipeline.segment import SegmentConfig, segment_scene
from drseg_cli.pipeline.verify import verify_mask
from tests.helpers import DATA, ContextModel, write_geotiff

CLASSES = parse_classes("water,field")
NAMES = [c.name for c in CLASSES]


@pytest.fixture
def scenes(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(3)
    for name in ("a", "c"):
        write_geotiff(src / f"{name}.tif", rng.integers(0, 255, (3, 90, 120)).astype(np.uint8))
    shutil.copy(DATA / "corrupt.tif", src / "b.tif")
    return src


def runner(calls):
    predictor = TilePredictor(
        ContextModel(), [c.prompt_names for c in CLASSES], torch.device("cpu")
    )

    def run_scene(path, plan, replace):
        calls.append(path.name)
        cfg = SegmentConfig(tile_size=64, overwrite=replace)
        return segment_scene(
            path, plan, predictor, CLASSES, cfg, tile_multiple=16, default_tile_size=64
        )

    return run_scene


def batch(src, out, calls, **kw):
    inputs = expand_inputs([src])
    plans = plan_outputs(inputs, out, vector=False)
    manifest = Manifest.load(out / "drseg_manifest.json", {"classes": NAMES})
    return run_batch(inputs, plans, runner(calls), manifest, class_names=NAMES, **kw), plans


def test_one_corrupt_scene_does_not_stop_the_others(scenes, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    summary, plans = batch(scenes, out, [])
    assert (summary.done, summary.failed, summary.exit_code) == (2, 1, 1)
    assert plans[0].mask.is_file() and plans[2].mask.is_file()
    assert sorted(p.name for p in out.iterdir()) == [
        "a_mask.qml", "a_mask.tif", "c_mask.qml", "c_mask.tif", "drseg_manifest.json",
    ]  # fmt: skip
    manifest = json.loads((out / "drseg_manifest.json").read_text())
    status = {s["input"].rsplit("/", 1)[1]: s for s in manifest["scenes"]}
    assert status["b.tif"]["status"] == "failed" and "read failed" in status["b.tif"]["error"]
    assert status["a.tif"]["status"] == "done" and len(status["a.tif"]["checksums"]["mask"]) == 64


def test_fail_fast_stops_at_first_failure(scenes, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    calls = []
    summary, _ = batch(scenes, out, calls, keep_going=False)
    assert calls == ["a.tif", "b.tif"] and summary.failed == 1


def test_resume_skips_valid_and_redoes_missing_or_broken(scenes, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (scenes / "b.tif").unlink()  # only good scenes
    first, plans = batch(scenes, out, [])
    reference = plans[1].mask.read_bytes()
    plans[0].mask.unlink()  # lost output
    plans[1].mask.write_bytes(plans[1].mask.read_bytes()[:500])  # truncated output
    (out / "c_mask.drseg-tmp-deadbeef.tif").write_bytes(b"partial")  # a killed run's leftover
    calls = []
    second, _ = batch(scenes, out, calls, resume=True)
    assert sorted(calls) == ["a.tif", "c.tif"] and second.done == 2
    assert plans[1].mask.read_bytes() == reference
    assert not list(out.glob("*drseg-tmp*"))
    calls.clear()
    third, _ = batch(scenes, out, calls, resume=True)
    assert calls == [] and third.skipped == 2 and third.exit_code == 0


def test_verify_mask_catches_wrong_classes_and_grid(scenes, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    batch(scenes, out, [])
    mask = out / "a_mask.tif"
    assert verify_mask(mask, scenes / "a.tif", NAMES)["classes"] == NAMES
    with pytest.raises(InputError, match="classes"):
        verify_mask(mask, scenes / "a.tif", ["water", "road"])
    with pytest.raises(InputError, match="grid or CRS differs"):
        verify_mask(mask, DATA / "RGB.byte.tif", NAMES)
    with pytest.raises(InputError, match="not a drseg class mask"):
        verify_mask(scenes / "a.tif", None, None)


def test_inputs_and_output_names(scenes, tmp_path):
    assert [p.name for p in expand_inputs([scenes])] == ["a.tif", "b.tif", "c.tif"]
    assert [p.name for p in expand_inputs([str(scenes / "[ac].tif")])] == ["a.tif", "c.tif"]
    with pytest.raises(UsageError, match="no file matches"):
        expand_inputs([str(scenes / "*.jp2")])
    plans = plan_outputs([scenes / "a.tif"], tmp_path, fmt=".gpkg", probs=True)
    assert plans[0].mask is None and plans[0].vector == tmp_path / "a.gpkg"
    assert plans[0].probs == tmp_path / "a_probs.tif"
    (tmp_path / "x").mkdir()
    with pytest.raises(UsageError, match="outputs would collide"):
        plan_outputs([scenes / "a.tif", tmp_path / "x" / "a.tif"], tmp_path)
