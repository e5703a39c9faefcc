"""``drseg refer`` on several scenes: one model, one output per scene, the batch manifest
(settings fingerprint, checksums), --resume, keep-going, one run per folder."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from tests.helpers import DATA

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("geopandas")

from drseg_cli import cli  # noqa: E402
from drseg_cli.cli import app  # noqa: E402
from drseg_cli.pipeline.batch import MANIFEST_NAME, file_sha256  # noqa: E402

cli._register()
runner = CliRunner()
TINY = ["--method", "rsrefseg2", "-m", "test-tiny", "--batch-size", "16"]
TEXT = "the white building"


def _run(*args: str):
    return runner.invoke(app, ["refer", *args])


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend on a shared machine
    yield
    torch.set_num_threads(n)


@pytest.fixture
def scenes(tmp_path):
    """Two good scenes and a corrupt one in a folder."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(DATA / "rgbn_suba.tif", folder / "a.tif")
    shutil.copy(DATA / "rgbn_suba.tif", folder / "b.tif")
    shutil.copy(DATA / "corrupt.tif", folder / "c.tif")
    return folder


def _manifest(out):
    data = json.loads((out / MANIFEST_NAME).read_text())
    return data, {r["input"].rsplit("/", 1)[-1]: r for r in data["scenes"]}


def test_batch_keeps_going_and_matches_single_scene_runs(scenes, tmp_path):
    out = tmp_path / "out"
    res = _run(str(scenes), TEXT, *TINY, "-o", f"{out}/", "--json")
    assert res.exit_code == 1, res.output  # the corrupt scene fails, the others are done
    summary = json.loads(res.stdout)
    assert (summary["done"], summary["failed"], summary["skipped"]) == (2, 1, 0)
    assert summary["failures"][0]["input"].endswith("c.tif")
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".tif") == [
        "a_refer.tif",
        "b_refer.tif",
    ]
    single = tmp_path / "single.tif"
    assert _run(str(scenes / "a.tif"), TEXT, *TINY, "-o", str(single)).exit_code == 0
    assert file_sha256(out / "a_refer.tif") == file_sha256(single)
    assert file_sha256(out / "b_refer.tif") == file_sha256(single)  # same pixels
    data, records = _manifest(out)
    assert records["a.tif"]["status"] == records["b.tif"]["status"] == "done"
    assert records["c.tif"]["status"] == "failed" and records["c.tif"]["error"]
    assert records["a.tif"]["checksums"]["mask"] == file_sha256(single)
    assert set(records["a.tif"]["checksums"]) == {"mask", "style"}
    settings = data["settings"][records["a.tif"]["settings"]]
    assert settings["expressions"] == [TEXT] and settings["top_k"] == 1
    assert settings["method"] == "rsrefseg2" and settings["model"] == "test-tiny"


def test_batch_vector_format_and_inputs_option(tmp_path):
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    shutil.copy(DATA / "rgbn_suba.tif", a)
    shutil.copy(DATA / "rgbn_suba.tif", b)
    out = tmp_path / "out"
    res = _run(str(a), TEXT, *TINY, "-i", str(b), "-o", f"{out}/", "--format", "geojson")
    assert res.exit_code == 0, res.output
    import geopandas as gpd

    for name in ("a_refer.geojson", "b_refer.geojson"):
        frame = gpd.read_file(out / name)
        assert set(frame["expression"]) == {TEXT} and (frame["area_m2"] > 0).all()
    _, records = _manifest(out)
    assert set(records["a.tif"]["checksums"]) == {"vector"}
    # resume checks the polygons (fields, expressions): valid ones are skipped
    res = _run(str(a), TEXT, *TINY, "-i", str(b), "-o", f"{out}/", "--format", "geojson",
               "--resume", "--json")  # fmt: skip
    assert json.loads(res.stdout)["skipped"] == 2, res.output


def test_resume_verifies_referring_outputs(tmp_path):
    """A polygon layer that is not a referring one (other fields) fails the check."""
    from drseg_cli.errors import InputError
    from drseg_cli.pipeline.refer import verify_refer_outputs
    from drseg_cli.pipeline.segment import OutputPlan

    src = tmp_path / "a.tif"
    shutil.copy(DATA / "rgbn_suba.tif", src)
    out = tmp_path / "out"
    assert _run(str(src), TEXT, *TINY, "-o", f"{out}/", "--format", "gpkg").exit_code == 0
    plan = OutputPlan(None, out / "a_refer.gpkg")
    verify_refer_outputs(src, plan, [TEXT])
    with pytest.raises(InputError, match="expressions not of this run"):
        verify_refer_outputs(src, plan, ["another sentence"])
    import geopandas as gpd

    frame = gpd.read_file(plan.vector, layer="a_refer").drop(columns=["score"])
    frame.to_file(tmp_path / "bad.gpkg", layer="bad")
    with pytest.raises(InputError, match="missing fields"):
        verify_refer_outputs(src, OutputPlan(None, tmp_path / "bad.gpkg"), [TEXT])


def test_resume_skips_done_and_redoes_changed(scenes, tmp_path):
    (scenes / "c.tif").unlink()
    out = tmp_path / "out"
    assert _run(str(scenes), TEXT, *TINY, "-o", f"{out}/").exit_code == 0
    res = _run(str(scenes), TEXT, *TINY, "-o", f"{out}/", "--resume", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert (summary["done"], summary["skipped"]) == (0, 2)

    # an output edited by hand is redone, the other scene skipped
    (out / "b_refer.tif").write_bytes(b"not a mask")
    summary = json.loads(
        _run(str(scenes), TEXT, *TINY, "-o", f"{out}/", "--resume", "--json").stdout
    )
    assert (summary["done"], summary["skipped"], summary["redone_changed_outputs"]) == (1, 1, 1)
    _, records = _manifest(out)
    assert records["b.tif"]["checksums"]["mask"] == file_sha256(out / "b_refer.tif")
    assert "redone" in records["b.tif"]["note"]

    # an input rewritten since (other mtime): that scene is redone
    st = (scenes / "a.tif").stat()
    os.utime(scenes / "a.tif", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    summary = json.loads(
        _run(str(scenes), TEXT, *TINY, "-o", f"{out}/", "--resume", "--json").stdout
    )
    assert (summary["done"], summary["skipped"], summary["redone_changed_input"]) == (1, 1, 1)

    # other settings: every scene is redone
    res = _run(str(scenes), TEXT, *TINY, "-o", f"{out}/", "--resume", "--top-k", "2", "--json")
    summary = json.loads(res.stdout)
    assert (summary["done"], summary["skipped"], summary["redone_changed_settings"]) == (2, 0, 2)
    data, records = _manifest(out)
    assert data["settings"][records["a.tif"]["settings"]]["top_k"] == 2


def test_existing_outputs_need_overwrite_or_resume(scenes, tmp_path):
    (scenes / "c.tif").unlink()
    out = tmp_path / "out"
    assert _run(str(scenes), TEXT, *TINY, "-o", f"{out}/").exit_code == 0
    res = _run(str(scenes), TEXT, *TINY, "-o", f"{out}/", "--json")
    assert res.exit_code == 1
    assert json.loads(res.stdout)["failed"] == 2  # not replaced without --overwrite
    res = _run(str(scenes), TEXT, *TINY, "-o", f"{out}/", "--resume", "--overwrite")
    assert res.exit_code != 0 and "exclude each other" in res.output


def test_fail_fast_stops_at_first_failure(scenes, tmp_path):
    (scenes / "0.tif").write_bytes((DATA / "corrupt.tif").read_bytes())  # sorted first
    out = tmp_path / "out"
    res = _run(str(scenes), TEXT, *TINY, "-o", f"{out}/", "--fail-fast", "--json")
    assert res.exit_code == 1
    summary = json.loads(res.stdout)
    assert (summary["done"], summary["failed"]) == (0, 1)
    assert not list(out.glob("*_refer.tif"))


def test_second_run_on_the_folder_is_refused(scenes, tmp_path):
    from drseg_cli.atomic import folder_lock

    out = tmp_path / "out"
    out.mkdir()
    with folder_lock(out):
        res = _run(str(scenes), TEXT, *TINY, "-o", f"{out}/")
    assert res.exit_code != 0
    assert "another drseg run is writing to this folder" in res.output
    assert not list(out.glob("*_refer.*"))


def test_several_inputs_need_an_output_folder(scenes, tmp_path):
    res = _run(str(scenes), TEXT, *TINY, "-o", str(tmp_path / "x.tif"))
    assert res.exit_code != 0 and "OUTDIR" in res.output
    res = _run(str(scenes / "a.tif"), TEXT, *TINY, "-o", str(tmp_path / "x.tif"), "--resume")
    assert res.exit_code != 0 and "--resume needs" in res.output


def test_model_is_built_once_per_batch(scenes, tmp_path, monkeypatch):
    from drseg_cli.model import factory

    (scenes / "c.tif").unlink()
    calls = []
    real = factory.build_referring_model

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(factory, "build_referring_model", counting)
    res = _run(str(scenes), TEXT, *TINY, "-o", f"{tmp_path / 'out'}/")
    assert res.exit_code == 0, res.output
    assert len(calls) == 1 and "[2/2]" in res.output
