"""Every bad input gets a one-line error, a non-zero exit code, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from typer.testing import CliRunner

from drseg_cli import cli
from tests.helpers import DATA, error_line, write_geotiff

cli._register()
TINY = ["--model", "test-tiny", "--device", "cpu", "--method", "clip"]


def drseg(*args):
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _truncated(p: Path) -> Path:
    p.write_bytes((DATA / "RGB.byte.tif").read_bytes()[:5000])
    return p


def _pdf(p: Path) -> Path:
    p.write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer\n%%EOF\n")
    return p


def _complex(p: Path) -> Path:
    return write_geotiff(p, np.ones((1, 16, 16), np.complex64))


def _zero_size(p: Path) -> Path:
    p.write_text(
        '<VRTDataset rasterXSize="0" rasterYSize="10"><VRTRasterBand dataType="Byte" band="1">'
        "</VRTRasterBand></VRTDataset>"
    )
    return p


BAD_INPUTS = {
    "missing file": (lambda d: d / "nope.tif", [], 1, "file not found"),
    "directory": (
        lambda d: (d / "dir.tif").mkdir() or d / "dir.tif",
        [],
        2,
        "is a folder with no raster files",
    ),
    "text file": (
        lambda d: (d / "t.tif").write_text("not an image") and d / "t.tif",
        [],
        1,
        "not a raster GDAL can read",
    ),
    "pdf named tif": (lambda d: _pdf(d / "doc.tif"), [], 1, "not a raster GDAL can read"),
    "truncated geotiff": (lambda d: _truncated(d / "trunc.tif"), [], 1, "trunc.tif"),
    "corrupt block mid-run": (
        lambda d: shutil.copy(DATA / "corrupt.tif", d / "c.tif") and d / "c.tif",
        [],
        1,
        "read failed near row",
    ),
    "no crs": (lambda d: DATA / "float_nan.tif", [], 1, "has no CRS"),
    "fewer bands than --bands": (
        lambda d: DATA / "rgbn_suba.tif",
        ["--bands", "1,2,7"],
        1,
        "band 7 but the file has 4",
    ),
    "complex dtype": (lambda d: _complex(d / "cplx.tif"), [], 1, "complex"),
    "zero size": (lambda d: _zero_size(d / "zero.vrt"), [], 1, "zero.vrt"),
    "empty class list": (lambda d: DATA / "rgbn_suba.tif", ["-c", " , "], 2, "empty"),
    "duplicate classes": (lambda d: DATA / "rgbn_suba.tif", ["-c", "a,b,A"], 2, "duplicate"),
    "absurdly long class list": (
        lambda d: DATA / "rgbn_suba.tif",
        ["-c", ",".join(f"c{i}" for i in range(300))],
        2,
        "at most 254",
    ),
    "cuda absent": (lambda d: DATA / "rgbn_suba.tif", ["--device", "cuda:0"], 2, "CUDA"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_matrix(tmp_path, case):
    make, extra, code, message = BAD_INPUTS[case]
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    scene = make(src_dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["segment", scene, "-o", out_dir / "result.tif", *TINY]
    if "-c" not in extra:
        args += ["-c", "water,field"]
    r = drseg(*args, *extra)
    assert r.exit_code == code, r.output
    assert message in error_line(r)
    assert list(out_dir.iterdir()) == []


def test_all_nodata_scene_writes_an_all_nodata_mask(tmp_path):
    out = tmp_path / "empty.tif"
    r = drseg("segment", DATA / "all-nodata.tif", "-c", "a,b", "-o", out, *TINY, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["tiles"]["run"] == 0 and summary["tiles"]["skipped_nodata"] > 0
    with rasterio.open(out) as m:
        assert (m.read(1) == 255).all() and m.shape == (2475, 71)


def test_huge_aspect_raster(tmp_path):
    src = write_geotiff(tmp_path / "strip.tif", np.full((3, 1, 3000), 90, np.uint8))
    out = tmp_path / "strip_mask.tif"
    r = drseg("segment", src, "-c", "a,b", "-o", out, *TINY)
    assert r.exit_code == 0, r.output
    with rasterio.open(out) as m:
        assert m.shape == (1, 3000) and (m.read(1) != 255).all()


def test_unwritable_output_folder(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root ignores permissions: make the check see what a user would
        real_access = os.access
        monkeypatch.setattr(
            os, "access", lambda p, m: False if Path(p) == locked else real_access(p, m)
        )
    else:
        locked.chmod(0o500)
    r = drseg("segment", DATA / "rgbn_suba.tif", "-c", "a,b", "-o", locked / "m.tif", *TINY)
    assert r.exit_code == 1 and "is not writable" in r.stderr
    (tmp_path / "afile").write_text("")  # a missing folder is created, one under a file can't be
    r = drseg(
        "segment", DATA / "rgbn_suba.tif", "-c", "a,b", "-o", tmp_path / "afile/sub/m.tif", *TINY
    )
    assert r.exit_code == 1 and "cannot create the output folder" in r.stderr, r.output


def test_disk_full_leaves_nothing(tmp_path, monkeypatch):
    from drseg_cli.raster import writers

    def full(self, data, window):
        raise rasterio.errors.RasterioIOError("TIFFWriteTile: No space left on device")

    monkeypatch.setattr(writers.RasterWriter, "_write_window", full)
    out = tmp_path / "m.tif"
    r = drseg("segment", DATA / "rgbn_suba.tif", "-c", "a,b", "-o", out, *TINY)
    assert r.exit_code == 1 and "no space left on device" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_three_scenes_one_corrupt(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(DATA / "rgbn_suba.tif", src / "a.tif")
    shutil.copy(DATA / "corrupt.tif", src / "b.tif")
    shutil.copy(DATA / "RGBA.uint16.tif", src / "c.tif")
    out = tmp_path / "out"
    r = drseg("segment", src, "-c", "water,field", "-o", f"{out}/", *TINY, "--json")
    assert r.exit_code == 1, r.output
    summary = json.loads(r.stdout)
    assert (summary["done"], summary["failed"]) == (2, 1)
    assert summary["failures"][0]["input"].endswith("b.tif")
    assert (out / "a_mask.tif").is_file() and (out / "c_mask.tif").is_file()
    assert not (out / "b_mask.tif").exists()
    manifest = json.loads((out / "drseg_manifest.json").read_text())
    failed = [s for s in manifest["scenes"] if s["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["input"].endswith("b.tif")


def _batch_cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "drseg_cli", "segment", str(src), "-c", "water,field",
        "-o", f"{out}/", "--tile-size", "64", *TINY, "--quiet", *extra,
    ]  # fmt: skip


def test_sigkill_mid_batch_then_resume_matches_uninterrupted_run(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(7)
    for i in range(6):
        img = rng.integers(0, 255, (3, 320, 320)).astype(np.uint8)
        write_geotiff(src / f"s{i}.tif", img)
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run(_batch_cmd(src, ref), check=True, timeout=300)
    proc = subprocess.Popen(_batch_cmd(src, out))
    manifest = out / "drseg_manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill after the 2nd scene is done
        if manifest.exists() and manifest.read_text().count('"done"') >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished on its own
    at_kill = json.loads(manifest.read_text())["scenes"]
    n_done = sum(s["status"] == "done" for s in at_kill)
    assert 2 <= n_done < 6  # mid-batch
    finals = [p for p in out.iterdir() if "drseg-tmp" not in p.name]
    for p in finals:  # nothing partial under a final name
        if p.suffix == ".tif":
            with rasterio.open(p) as ds:
                ds.read(1)
    done = subprocess.run(_batch_cmd(src, out, "--resume", "--json"), capture_output=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["skipped"], summary["done"]) == (n_done, 6 - n_done)
    assert not list(out.glob("*drseg-tmp*"))
    for i in range(6):
        with rasterio.open(ref / f"s{i}_mask.tif") as a, rasterio.open(out / f"s{i}_mask.tif") as b:
            np.testing.assert_array_equal(a.read(1), b.read(1))
    scenes = json.loads(manifest.read_text())["scenes"]
    assert len(scenes) == 6 and all(s["status"] == "done" for s in scenes)


def test_fuzz_random_bytes_and_mutated_headers_never_crash(tmp_path):
    """Seeded fuzz: random bytes and GeoTIFFs with corrupted header bytes."""
    rng = random.Random(1234)
    good = (DATA / "rgbn_suba.tif").read_bytes()
    cases = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 4000))) for _ in range(4)]
    for _ in range(10):
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            pos = rng.randint(0, 600)  # the IFD and tag area
            data[pos] = rng.getrandbits(8)
        cases.append(bytes(data))
    for i, blob in enumerate(cases):
        scene = tmp_path / f"fuzz{i}.tif"
        scene.write_bytes(blob)
        out = tmp_path / f"out{i}"
        out.mkdir()
        start = time.perf_counter()
        r = drseg("segment", scene, "-c", "a,b", "-o", out / "m.tif", *TINY, "--tile-size", "64")
        assert time.perf_counter() - start < 60
        assert r.exit_code in (0, 1, 2), r.output
        if r.exit_code:
            assert error_line(r) and list(out.iterdir()) == []
        else:
            with rasterio.open(out / "m.tif") as m:
                m.read(1)


def _two_scenes(tmp_path: Path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(5)
    for name in ("a", "b"):
        write_geotiff(src / f"{name}.tif", rng.integers(0, 255, (3, 64, 64)).astype(np.uint8))
    return src


def test_resume_redoes_scenes_when_method_or_options_change(tmp_path):
    src, out = _two_scenes(tmp_path), tmp_path / "out"
    base = ["segment", src, "-c", "water,field", "-o", f"{out}/", "--model", "test-tiny"]
    base += ["--device", "cpu", "--json"]

    def run(*extra):
        r = drseg(*base, *extra)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    run("--method", "clip")
    changed = run("--resume", "--method", "drseg", "--rho", "0.3", "--tile-size", "64")
    assert (changed["done"], changed["skipped"], changed["redone_changed_settings"]) == (2, 0, 2)
    same = run("--resume", "--method", "drseg", "--rho", "0.3", "--tile-size", "64")
    assert (same["done"], same["skipped"]) == (0, 2)
    rho = run("--resume", "--method", "drseg", "--rho", "0.4", "--tile-size", "64")
    assert (rho["done"], rho["redone_changed_settings"]) == (2, 2)
    settings = json.loads((out / "drseg_manifest.json").read_text())["settings"]
    (current,) = settings.values()
    assert current["drseg_options"]["rho"] == 0.4 and current["scene"]["tile_size"] == 64


def test_second_run_on_the_same_folder_is_refused(tmp_path):
    from drseg_cli.atomic import LOCK_NAME, folder_lock

    src, out = _two_scenes(tmp_path), tmp_path / "out"
    out.mkdir()
    args = ["segment", src, "-c", "a,b", "-o", f"{out}/", *TINY, "--tile-size", "64"]
    with folder_lock(out):
        r = drseg(*args)
        assert r.exit_code == 2
        assert error_line(r) == (
            f"drseg: error: {out}: another drseg run is writing to this folder "
            f"(pid {os.getpid()}); wait for it or use another folder"
        )
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]
    r = drseg(*args)
    assert r.exit_code == 0, r.output
    assert not (out / LOCK_NAME).exists()  # released and removed at the end
    with folder_lock(out):
        pass


def test_failed_vector_step_keeps_every_previous_output(tmp_path, monkeypatch):
    from drseg_cli.errors import OutputError
    from drseg_cli.raster import vectorize

    scene = _two_scenes(tmp_path) / "a.tif"
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "m.tif"
    args = ["segment", scene, "-o", out, *TINY, "--tile-size", "64"]
    args += ["--vector", "--probs", folder / "p.tif", "--uncertainty", folder / "u.tif"]
    r = drseg(*args, "-c", "water,field")
    assert r.exit_code == 0, r.output
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert sorted(before) == ["m.gpkg", "m.qml", "m.tif", "p.tif", "u.tif"]

    def fail(*a, **k):
        raise OutputError(f"{a[1]}: no space left on device")

    monkeypatch.setattr(vectorize, "vectorize_mask", fail)
    r = drseg(*args, "-c", "road,tree,water", "--overwrite")  # would change every output
    assert r.exit_code == 1 and "no space left on device" in error_line(r)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_crs_a_vector_format_cannot_store_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from drseg_cli.commands import _model

    aeqd = "+proj=aeqd +lat_0=52 +lon_0=10 +datum=WGS84 +units=m +no_defs"
    scene = write_geotiff(tmp_path / "s.tif", np.full((3, 40, 40), 90, np.uint8), crs=aeqd)
    loaded = []
    real = _model.build_model_for
    monkeypatch.setattr(_model, "build_model_for", lambda **kw: loaded.append(1) or real(**kw))
    out = tmp_path / "out"
    out.mkdir()
    # GeoJSON keeps EPSG codes only (by default it is WGS 84, RFC 7946)
    r = drseg("segment", scene, "-c", "a,b", "-o", out / "s.geojson", "--dst-crs", aeqd, *TINY)
    assert r.exit_code == 2 and "cannot record the mask's CRS" in error_line(r)
    assert loaded == [] and list(out.iterdir()) == []
    r = drseg("segment", scene, "-c", "a,b", "-o", out / "s.gpkg", *TINY)  # gpkg can
    assert r.exit_code == 0 and loaded == [1], r.output


def test_single_scene_run_removes_temps_of_dead_runs_only(tmp_path):
    from drseg_cli.atomic import TMP_MARKER

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"drseg-acc-band{TMP_MARKER}-{dead.pid}-0123abcd.f32"
    mine = tmp_path / f"m{TMP_MARKER}-{os.getpid()}-0123abcd.tif"  # a live run's
    for p in (stale, mine):
        p.write_bytes(b"x")
    scene = write_geotiff(tmp_path / "s.tif", np.full((3, 40, 40), 90, np.uint8))
    r = drseg("segment", scene, "-c", "a,b", "-o", tmp_path / "m.tif", *TINY)
    assert r.exit_code == 0, r.output
    assert not stale.exists() and mine.exists()
