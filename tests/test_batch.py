"""Batch runs at library level: keep-going, fail-fast, manifest, resume, verification."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from drseg_cli.atomic import (
    TMP_MARKER,
    commit_together,
    remove_stale_temps,
    staging_folder,
    temp_path_for,
)
from drseg_cli.classes import parse_classes
from drseg_cli.errors import InputError, OutputError, UsageError
from drseg_cli.pipeline.batch import (
    Manifest,
    expand_inputs,
    plan_outputs,
    run_batch,
    settings_fingerprint,
)
from drseg_cli.pipeline.runtime import TilePredictor
from drseg_cli.pipeline.segment import OutputPlan, SegmentConfig, segment_scene
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


def test_resume_redoes_scenes_done_with_other_settings(scenes, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (scenes / "b.tif").unlink()
    clip = {"method": "clip", "tile_size": 64}
    drseg = {"method": "drseg", "rho": 0.3, "tile_size": 64}
    batch(scenes, out, [], settings=clip)
    calls = []
    second, _ = batch(scenes, out, calls, resume=True, settings=drseg)
    assert sorted(calls) == ["a.tif", "c.tif"] and second.done == 2 and second.skipped == 0
    assert second.redone["changed_settings"] == 2
    assert all(r.note and "settings changed" in r.note for r in second.records)
    manifest = json.loads((out / "drseg_manifest.json").read_text())
    fingerprint = settings_fingerprint(drseg)
    assert list(manifest["settings"]) == [fingerprint]  # the clip settings are no longer used
    assert manifest["settings"][fingerprint] == drseg
    assert all(s["settings"] == fingerprint for s in manifest["scenes"])
    calls.clear()
    third, _ = batch(scenes, out, calls, resume=True, settings=dict(reversed(drseg.items())))
    assert calls == [] and third.skipped == 2  # same settings in another order: same print


def test_resume_redoes_a_scene_whose_output_no_longer_matches_its_checksum(scenes, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (scenes / "b.tif").unlink()
    _, plans = batch(scenes, out, [])
    mask = plans[0].mask
    reference = mask.read_bytes()
    with rasterio.open(
        mask, "r+", IGNORE_COG_LAYOUT_BREAK="YES"
    ) as ds:  # still a valid mask: only the checksum can tell
        data = ds.read(1)
        data[0, 0] = 1 - data[0, 0]
        ds.write(data, 1)
    verify_mask(mask, scenes / "a.tif", NAMES)
    calls = []
    second, _ = batch(scenes, out, calls, resume=True)
    assert calls == ["a.tif"] and second.skipped == 1
    assert second.redone["changed_outputs"] == 1 and mask.read_bytes() == reference


def test_scenes_are_keyed_by_resolved_path(scenes, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (scenes / "b.tif").unlink()
    monkeypatch.chdir(tmp_path)
    assert len(expand_inputs(["in", scenes, "in/a.tif"])) == 2
    batch(Path("in"), Path("out"), [])
    calls = []
    second, _ = batch(scenes, out, calls, resume=True)  # the same folder, absolute
    assert calls == [] and second.skipped == 2
    manifest = json.loads((out / "drseg_manifest.json").read_text())
    assert sorted(s["input"] for s in manifest["scenes"]) == [
        str(scenes / "a.tif"),
        str(scenes / "c.tif"),
    ]


def test_resume_never_replaces_outputs_it_did_not_make(scenes, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (scenes / "b.tif").unlink()
    (out / "a_mask.tif").write_bytes(b"precious")  # not drseg's: no manifest entry
    calls = []
    summary, _ = batch(scenes, out, calls, resume=True)
    assert calls == ["c.tif"] and summary.failed == 1
    assert "output exists; pass --overwrite" in summary.records[0].error
    assert (out / "a_mask.tif").read_bytes() == b"precious"
    calls.clear()
    again, _ = batch(scenes, out, calls, resume=True)  # its failure did not make it drseg's
    assert calls == [] and again.failed == 1 and again.skipped == 1
    assert (out / "a_mask.tif").read_bytes() == b"precious"


def test_stale_temps_of_live_runs_are_kept(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        names = {
            "mine": f"a{TMP_MARKER}-{os.getpid()}-0123abcd.tif",
            "live": f"b{TMP_MARKER}-{live.pid}-0123abcd.tif.aux.xml",
            "dead": f"c{TMP_MARKER}-{dead.pid}-0123abcd.gpkg",
            "legacy": f"d{TMP_MARKER}-deadbeef.tif",  # no owner recorded: stale
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"x")
        assert remove_stale_temps(tmp_path) == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["mine"], names["live"]])
    finally:
        live.kill()
        live.wait()
    assert remove_stale_temps(tmp_path) == 1  # the live run has ended
    assert [p.name for p in tmp_path.iterdir()] == [names["mine"]]


def test_accumulator_of_a_killed_run_is_removed_by_the_next_run(scenes, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (scenes / "b.tif").unlink()
    code = (
        "import os, signal, sys; from pathlib import Path\n"
        "from drseg_cli.raster.stitch import LogitAccumulator\n"
        "acc = LogitAccumulator(3, 500, 400, 64, max_bytes=0, tmp_dir=Path(sys.argv[1]))\n"
        "assert acc.on_disk\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run(
        [sys.executable, "-c", code, str(out)], cwd=Path(__file__).parent.parent
    )
    assert killed.returncode == -signal.SIGKILL
    (left,) = out.iterdir()  # the 384 kB memmap of the killed run
    assert left.stat().st_size == 3 * 64 * 500 * 4
    summary, _ = batch(scenes, out, [])
    assert summary.done == 2 and not left.exists()


def test_commit_together_rolls_back_on_a_failed_rename(tmp_path, monkeypatch):
    finals = [tmp_path / "m.tif", tmp_path / "m.qml", tmp_path / "m.gpkg"]
    for f in finals:
        f.write_text(f"old {f.name}")
    stale = tmp_path / "m.cpg"
    stale.write_text("old cpg")
    staged = [temp_path_for(f) for f in finals]
    for s, f in zip(staged, finals, strict=True):
        s.write_text(f"new {f.name}")
    real = os.replace
    placed = []

    def flaky(src, dst):
        if Path(src) == staged[2]:  # the new vector cannot be put in place
            raise OSError(28, "No space left on device")
        placed.append(dst)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OutputError, match="m.gpkg: no space left on device"):
        commit_together(list(zip(staged, finals, strict=True)), remove=[stale])
    assert finals[0] in placed  # the first new file was in place before the failure
    assert [f.read_text() for f in finals + [stale]] == [
        "old m.tif", "old m.qml", "old m.gpkg", "old cpg",
    ]  # fmt: skip
    monkeypatch.setattr(os, "replace", real)
    for s, f in zip(staged, finals, strict=True):
        s.write_text(f"new {f.name}")
    commit_together(list(zip(staged, finals, strict=True)), remove=[stale])
    assert [f.read_text() for f in finals] == ["new m.tif", "new m.qml", "new m.gpkg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gpkg", "m.qml", "m.tif"]


def test_vector_format_that_cannot_store_the_crs_fails_before_any_tile(tmp_path):
    aeqd = "+proj=aeqd +lat_0=52 +lon_0=10 +datum=WGS84 +units=m +no_defs"
    scene = write_geotiff(tmp_path / "s.tif", np.full((3, 40, 40), 90, np.uint8), crs=aeqd)
    predictor = TilePredictor(
        ContextModel(), [c.prompt_names for c in CLASSES], torch.device("cpu")
    )

    def predict(*a, **k):
        raise AssertionError("the model ran before the CRS check")

    predictor.predict = predict
    plan = OutputPlan(None, tmp_path / "s.geojson")
    cfg = SegmentConfig(tile_size=64, dst_crs=aeqd)  # GeoJSON keeps EPSG codes only
    with pytest.raises(UsageError, match="cannot record the mask's CRS"):
        segment_scene(scene, plan, predictor, CLASSES, cfg, tile_multiple=16, default_tile_size=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tif"]


def test_resume_fingerprint_covers_every_output_shaping_setting():
    """Any SegmentConfig field is part of the fingerprint unless it only changes speed/memory."""
    base = SegmentConfig().output_settings()
    for change in ({"overlap": 0.5}, {"blend": "flat"}, {"logit_scale": 2}, {"cog": False}):
        assert SegmentConfig(**change).output_settings() != base, change
    for change in ({"batch_size": 9}, {"read_threads": 1}, {"accumulator_bytes": 1}):
        assert SegmentConfig(**change).output_settings() == base, change


def test_manifest_rewrite_serialises_only_changed_records(tmp_path, monkeypatch):
    from dataclasses import asdict

    from drseg_cli.pipeline import batch as batch_module
    from drseg_cli.pipeline.batch import SceneRecord

    m = Manifest(tmp_path / "m.json", {"classes": NAMES})
    m.settings = {"f" * 64: {"tile_size": 64}}
    for i in range(3):
        key = f"/d/s{i}.tif"
        m.update(SceneRecord(key, {"mask": f"/o/s{i}.tif"}, "done", settings="f" * 64))
    dumped = []
    real_asdict = batch_module.asdict
    monkeypatch.setattr(batch_module, "asdict", lambda r: dumped.append(r.input) or real_asdict(r))
    m.update(SceneRecord("/d/s1.tif", {"mask": "/o/s1.tif"}, "pending", note="again"))
    assert dumped == ["/d/s1.tif"]  # the other records' text was kept
    payload = dict(m.meta, settings=m.settings, scenes=[asdict(r) for r in m.records.values()])
    assert m.path.read_text() == json.dumps(payload, indent=2)  # the same file as before
    assert Manifest.load(m.path, {}).records["/d/s1.tif"].status == "pending"


def test_staging_folders_of_killed_runs_are_removed_by_the_next(tmp_path, monkeypatch):
    """``kill -9`` leaves a staging folder (outputs bound to an object store): the next
    staging on this host removes those of dead processes, not a live run's or another
    host's, and its own folder is gone after use."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(dead.stdout)
    with staging_folder() as mine:
        prefix = mine.name.split(TMP_MARKER)[0]  # drseg-stage-<host>
    stale = tmp_path / f"{prefix}{TMP_MARKER}-{dead_pid}-0123abcd"
    live = tmp_path / f"{prefix}{TMP_MARKER}-{os.getpid()}-4567cdef"
    other_host = tmp_path / f"drseg-stage-elsewhere{TMP_MARKER}-{dead_pid}-89abcdef"
    for folder in (stale, live, other_host):
        (folder / "0").mkdir(parents=True)
        (folder / "0" / "part.tif").write_bytes(b"x")
    with staging_folder() as folder:
        assert folder.is_dir() and not stale.exists()
        (folder / "f").write_bytes(b"y")
    assert not folder.exists() and live.is_dir() and other_host.is_dir()
