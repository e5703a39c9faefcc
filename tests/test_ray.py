"""``segment --ray``: scenes on Ray actors give the outputs and manifest of a one-process run;
a worker killed mid-scene is retried with nothing partial left; ``--resume`` after the driver
is killed finishes the rest; no ``ray`` package is one error line.

One local Ray instance for the module (``num_cpus=2``); the CLI connects to it by address.
"""

from __future__ import annotations

import contextlib
import json
import os
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
from drseg_cli.atomic import TMP_MARKER
from drseg_cli.commands.options import optional_values
from tests.helpers import DATA, error_line

cli._register()
ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "-c",
    "water,land,cloud",
    "--model",
    "test-tiny",
    "--device",
    "cpu",
    "--probs",
    "on",
]  # batch: no file name
#: Scene copies: 2 + 6 + 2 tiles of 224 px.
SCENES = {"a.tif": "rgbn_suba.tif", "b.tif": "world.rgb.tif", "c.tif": "rgbn_suba.tif"}


def drseg(*args: object):
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture(scope="module")
def ray_address():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes")
    for name, source in SCENES.items():
        shutil.copy(DATA / source, folder / name)
    return folder


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    """A scene whose blocks cannot be read: it fails, the others go on (exit code 1)."""
    path = tmp_path_factory.mktemp("bad") / "bad.tif"
    shutil.copy(DATA / "corrupt.tif", path)
    return path


@contextlib.contextmanager
def one_thread():
    """torch on one thread, as a Ray worker with --cpus-per-worker 1: CPU sums depend on it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(scenes, corrupt, tmp_path_factory):
    """The single-process batch: outputs and manifest every Ray run must reproduce."""
    out = tmp_path_factory.mktemp("single") / "out"
    with one_thread():
        r = drseg("segment", scenes, corrupt, "-o", out, *ARGS, "--vector", "--json")
    assert r.exit_code == 1, r.output  # the corrupt scene failed, the others are done
    return out, json.loads(r.stdout)


def rasters(folder: Path) -> dict[str, np.ndarray]:
    """Every raster output of a folder, by file name, as arrays (with its tags checked equal
    through the caller's comparison of names)."""
    arrays = {}
    for path in sorted(folder.glob("*.tif")):
        with rasterio.open(path) as ds:
            arrays[path.name] = ds.read()
    return arrays


def assert_same_outputs(out: Path, reference: Path, *, vector: bool = True) -> None:
    names = {p.name for p in reference.iterdir() if not p.name.startswith(".")}
    if not vector:
        names = {n for n in names if not n.endswith(".gpkg")}
    assert names <= {p.name for p in out.iterdir()}
    ref, got = rasters(reference), rasters(out)
    assert ref.keys() == got.keys() and len(ref) == 6  # mask + probs of 3 scenes
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    for name in names - {"drseg_manifest.json"}:
        if name.endswith((".tif", ".qml")):  # COG bytes too: the same file, not just pixels
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name
        if name.endswith(".gpkg"):  # a GeoPackage records when it was written: compare rows
            import geopandas as gpd

            layer = Path(name).stem
            got, ref = (gpd.read_file(f / name, layer=layer) for f in (out, reference))
            assert len(ref) > 0 and got.to_wkb().equals(ref.to_wkb()), name
    assert not list(out.glob(f"*{TMP_MARKER}*"))


def comparable(manifest_path: Path, *, vector: bool = True) -> dict:
    """A manifest without timings (seconds, GeoPackage timestamps: the polygons' checksum),
    its output folder replaced by OUT."""
    text = manifest_path.read_text().replace(str(manifest_path.parent), "OUT")
    data = json.loads(text)
    for scene in data["scenes"]:
        scene.pop("seconds")
        if scene["status"] == "done" and vector:
            assert len(scene["checksums"].pop("vector")) == 64
    return data


def test_ray_batch_matches_single_process_run(ray_address, scenes, corrupt, reference, tmp_path):
    ref_out, ref_summary = reference
    out = tmp_path / "out"
    r = drseg(
        "segment", scenes, corrupt, "-o", out, *ARGS, "--vector", "--json", "--ray", ray_address,
        "--workers", "3",
    )  # fmt: skip
    assert r.exit_code == 1, r.output  # the corrupt scene failed, as in one process
    summary = json.loads(r.stdout)
    assert summary.pop("ray_workers") == 3  # the third never fits in 2 CPUs: no one waits
    # the cluster's tiles, aggregated in the driver: the good scenes' and some of the bad one's
    assert 2 + 6 + 2 < summary.pop("ray_tiles") < 2 + 6 + 2 + 36
    assert summary.pop("ray_tiles_per_s") > 0
    for s in (summary, dict(ref_summary)):
        s.pop("seconds"), s.pop("manifest")
    assert summary == {k: v for k, v in ref_summary.items() if k not in ("seconds", "manifest")}
    assert summary["done"] == 3 and summary["failed"] == 1
    assert "bad.tif" in summary["failures"][0]["error"]
    assert_same_outputs(out, ref_out)
    assert comparable(out / "drseg_manifest.json") == comparable(ref_out / "drseg_manifest.json")


class KillOnce:
    """A runner factory (what ``RayExecutor`` ships to each actor) whose runner SIGKILLs its
    own process after the first tiles of scene ``victim`` the first time it runs it, as a
    node failure would, with the scene's temp files half written."""

    def __init__(self, runner, victim: str, marker: Path) -> None:
        self.runner, self.victim, self.marker = runner, victim, marker

    def __call__(self, gpu_share: float = 1.0):
        loaded = self.runner(gpu_share)
        victim, marker = self.victim, self.marker

        def run(path, plan, replace, *, progress=None):
            def tick(tiles, total):
                if path.name == victim and not marker.exists():
                    folder = plan.mask.parent
                    marker.write_text(json.dumps(sorted(p.name for p in folder.iterdir())))
                    os.kill(os.getpid(), signal.SIGKILL)
                if progress:
                    progress(tiles, total)

            return loaded(path, plan, replace, progress=tick)

        run.info = loaded.info
        return run


def test_worker_killed_mid_scene_is_retried_with_nothing_partial(
    ray_address, scenes, reference, tmp_path
):
    from drseg_cli.classes import parse_classes
    from drseg_cli.commands._model import ModelChoice, SegmentRunner, segment_config
    from drseg_cli.pipeline.batch import Manifest, expand_inputs, plan_outputs, run_batch
    from drseg_cli.pipeline.distributed import RayExecutor, RayOptions

    ref_out, _ = reference
    out = tmp_path / "out"
    out.mkdir()
    classes = parse_classes("water,land,cloud")
    runner = SegmentRunner(
        ModelChoice(model="test-tiny"), classes, segment_config(), device="cpu", warn=False
    )
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers lack tests/ on path
    marker = tmp_path / "killed.json"
    inputs = expand_inputs([scenes])
    plans = plan_outputs(inputs, out, probs=True)
    with RayExecutor(KillOnce(runner, "b.tif", marker), RayOptions(workers=2)) as executor:
        pids_before = set(executor.worker_pids)
        manifest = Manifest.load(out / "drseg_manifest.json", {})
        summary = run_batch(
            inputs, plans, executor, manifest, class_names=[c.name for c in classes]
        )
    assert (summary.done, summary.failed) == (3, 0)
    seen_when_killed = json.loads(marker.read_text())
    assert any(TMP_MARKER in n for n in seen_when_killed)  # it died with temps half written
    assert "b_mask.tif" not in seen_when_killed  # never a partial file under a final name
    assert executor.worker_pids > pids_before  # a new worker process took over
    assert_same_outputs(out, ref_out, vector=False)


def start_driver(scenes: Path, out: Path, *flags: str, stdout: int) -> subprocess.Popen:
    """``drseg segment SCENES -o OUT … --vector FLAGS`` as its own process (the tests signal
    it); stderr goes where stdout does (text when piped)."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    command = [sys.executable, "-m", "drseg_cli", "segment", str(scenes), "-o", str(out), *ARGS]
    return subprocess.Popen(
        [*command, "--vector", *flags],
        env=env,
        stdout=stdout,
        stderr=stdout,
        text=stdout == subprocess.PIPE,
    )


def test_resume_after_the_driver_is_killed_finishes_the_rest(
    ray_address, scenes, reference, tmp_path
):
    ref_out, _ = reference
    out = tmp_path / "out"
    driver = start_driver(
        scenes, out, "-q", "--ray", ray_address, "--workers", "1", stdout=subprocess.DEVNULL
    )
    manifest = out / "drseg_manifest.json"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            with_done = manifest.is_file() and '"status": "done"' in manifest.read_text()
            if with_done:
                break
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.wait(30)
    statuses = [s["status"] for s in json.loads(manifest.read_text())["scenes"]]
    assert "done" in statuses and statuses.count("done") < 3, statuses
    r = drseg("segment", scenes, "-o", out, *ARGS, "--vector", "--json", "--resume",
              "--ray", ray_address, "--workers", "2")  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["skipped"] == statuses.count("done")
    assert summary["done"] == 3 - summary["skipped"] and summary["failed"] == 0
    assert_same_outputs(out, ref_out)


def test_without_ray_the_option_is_one_error_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    r = drseg("segment", DATA / "rgbn_suba.tif", "-o", tmp_path / "out", *ARGS, "--ray")
    assert r.exit_code == 2
    assert error_line(r) == "drseg: error: --ray needs the ray package: pip install 'drseg[ray]'"
    assert not (tmp_path / "out").exists()


def test_ray_options_need_ray_and_a_folder(tmp_path):
    r = drseg("segment", DATA / "rgbn_suba.tif", "-o", tmp_path / "out", *ARGS, "--workers", "2")
    assert r.exit_code == 2 and "need --ray" in error_line(r)
    pytest.importorskip("ray")
    r = drseg("segment", DATA / "rgbn_suba.tif", "-o", tmp_path / "m.tif", *ARGS, "--ray")
    assert r.exit_code == 2 and "--ray runs a batch: give -o OUTDIR/" in error_line(r)
    refer = [DATA / "rgbn_suba.tif", "the lake", "--method", "rsrefseg2", "-m", "test-tiny"]
    r = drseg("refer", *refer, "-o", tmp_path / "r.tif", "--cpus-per-worker", "2")
    assert r.exit_code == 2 and "need --ray" in error_line(r)
    r = drseg("refer", *refer, "-o", tmp_path / "r.tif", "--ray")
    assert r.exit_code == 2 and "--ray runs a batch: give -o OUTDIR/" in error_line(r)
    assert not (tmp_path / "r.tif").exists()


def test_cluster_progress_is_drawn_and_summarised(monkeypatch):
    """The driver's bar: scenes done, the cluster's tiles and tiles/s, redrawn as the
    executor reports them; the same figures end in the --json summary."""
    import io

    from rich.console import Console

    from drseg_cli.commands import _ray

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100)
    monkeypatch.setattr(_ray, "err_console", console)
    with _ray.ClusterProgress(True, scenes=3, workers=2) as cluster:
        cluster(0, 0)
        time.sleep(0.05)
        cluster(4, 10)  # what RayExecutor.on_progress passes: all workers' tiles
        cluster.scene()
        cluster.bar.refresh()
        drawn = screen.getvalue()
    assert "ray (2 workers)" in drawn and "1/3" in drawn and "4/10 tiles" in drawn
    summary = cluster.summary()
    assert (summary["ray_workers"], summary["ray_tiles"]) == (2, 4)
    assert 0 < summary["ray_tiles_per_s"] <= 4 / 0.05
    quiet = _ray.ClusterProgress(False, scenes=3, workers=1)
    quiet(6, 6)
    assert quiet.bar is None and quiet.summary()["ray_tiles"] == 6


def test_ray_address_is_optional():
    assert optional_values(["--ray", "scenes/", "-o", "out"]) == [
        "--ray=local",
        "scenes/",
        "-o",
        "out",
    ]
    assert optional_values(["a.tif", "--ray"]) == ["a.tif", "--ray=local"]
    assert optional_values(["--ray", "--workers", "2"]) == ["--ray=local", "--workers", "2"]
    for address in ("10.0.0.5:6379", "auto", "ray://head:10001", "head-node.local:6379"):
        assert optional_values(["--ray", address, "x"]) == ["--ray", address, "x"]
    assert optional_values(["--", "--ray"]) == ["--", "--ray"]


def test_more_gpus_per_worker_than_the_cluster_has_is_one_line(ray_address, tmp_path):
    r = drseg("segment", DATA / "rgbn_suba.tif", "-o", tmp_path / "out", *ARGS,
              "--ray", ray_address, "--gpus-per-worker", "1")  # fmt: skip
    assert r.exit_code == 2
    assert error_line(r).startswith(
        "drseg: error: --gpus-per-worker 1 --cpus-per-worker 1: the Ray cluster has 0 GPU(s)"
    )  # rather than waiting forever for a GPU


def test_fractional_gpu_worker_sizes_its_batch_on_its_share(monkeypatch):
    import torch

    from drseg_cli.pipeline.runtime import auto_batch_size

    gib = 1024**3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * gib, 40 * gib))
    cuda = torch.device("cuda")
    # half of 40 GiB at 600 MiB a 448 px tile: 34 tiles; a half-GPU worker gets half of that
    assert (auto_batch_size(cuda, 448), auto_batch_size(cuda, 448, share=0.5)) == (34, 17)


REFER = ["the white building", "--expressions", None, "--method", "rsrefseg2", "-m", "test-tiny",
         "--batch-size", "4", "--device", "cpu"]  # fmt: skip


def refer_args(tmp_path: Path) -> list[str]:
    """Two expressions (one as a file), tiny random RSRefSeg 2."""
    (tmp_path / "expressions.txt").write_text("water\n")
    return [str(tmp_path / "expressions.txt") if a is None else a for a in REFER]


def test_refer_batch_on_ray_matches_one_process_run(ray_address, scenes, corrupt, tmp_path):
    """``refer --ray``: the masks, polygons, manifest and --json summary of the one-process
    refer batch; the driver's cluster progress counts every window the workers ran."""
    import geopandas as gpd

    from drseg_cli.model.factory import build_referring_model
    from drseg_cli.raster.tiling import TileGrid

    args = refer_args(tmp_path)
    runs = {}
    for fmt in ("tif", "gpkg"):
        for mode in ("single", "ray"):
            out = tmp_path / f"{mode}-{fmt}"
            extra = ["--ray", ray_address, "--workers", "2"] if mode == "ray" else []
            with one_thread():
                r = drseg("refer", scenes, *args, "-i", corrupt, "-o", f"{out}/",
                          "--format", fmt, "--json", *extra)  # fmt: skip
            assert r.exit_code == 1, r.output  # the corrupt scene failed, the others done
            runs[fmt, mode] = out, json.loads(r.stdout)
    ray_summary = runs["tif", "ray"][1]
    assert ray_summary.pop("ray_workers") == 2
    size = build_referring_model("rsrefseg2", "test-tiny", device="cpu").preprocess.tile_size
    windows = {}
    for name in [*SCENES.values(), "corrupt.tif"]:
        with rasterio.open(DATA / name) as ds:
            windows[name] = len(TileGrid.from_fraction(ds.width, ds.height, size, 0.25))
    good = sum(windows[name] for name in SCENES.values())
    # every window of the good scenes, counted in the driver, and those of the bad one it ran
    assert good <= ray_summary.pop("ray_tiles") < good + windows["corrupt.tif"]
    assert ray_summary.pop("ray_tiles_per_s") > 0
    for fmt in ("tif", "gpkg"):
        (single, ref), (out, got) = runs[fmt, "single"], runs[fmt, "ray"]
        for key in ("seconds", "manifest", "ray_workers", "ray_tiles", "ray_tiles_per_s"):
            ref.pop(key, None), got.pop(key, None)
        assert got == ref and (got["done"], got["failed"]) == (3, 1)
        assert comparable(out / "drseg_manifest.json", vector=fmt == "gpkg") == comparable(
            single / "drseg_manifest.json", vector=fmt == "gpkg"
        )
        names = sorted(p.name for p in single.iterdir() if not p.name.startswith("."))
        assert names == sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        assert len(names) == (7 if fmt == "tif" else 4)  # 3 masks + 3 styles, or 3 layers
        for name in names:
            if name.endswith(".tif"):
                ref_masks, got_masks = rasters(single), rasters(out)
                np.testing.assert_array_equal(got_masks[name], ref_masks[name], err_msg=name)
                assert (out / name).read_bytes() == (single / name).read_bytes(), name
            if name.endswith(".gpkg"):
                got_rows, ref_rows = (
                    gpd.read_file(f / name, layer=name[:-5]) for f in (out, single)
                )
                assert len(ref_rows) > 0, name
                assert got_rows.drop(columns="geometry").equals(ref_rows.drop(columns="geometry"))
                assert got_rows.to_wkb().geometry.equals(ref_rows.to_wkb().geometry), name
        assert not list(out.glob(f"*{TMP_MARKER}*"))


def test_ctrl_c_stops_the_workers_and_resume_finishes_the_rest(
    ray_address, scenes, reference, tmp_path
):
    """SIGINT (Ctrl-C) to the driver while workers are mid-scene (temp files written): exit
    130, the workers stopped, no temp file, no partial file under a final name, the folder
    lock released; ``--resume`` then finishes the rest."""
    from drseg_cli.atomic import LOCK_NAME, folder_lock

    ref_out, _ = reference
    out = tmp_path / "out"
    driver = start_driver(
        scenes, out, "--json", "--ray", ray_address, "--workers", "2", stdout=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            if out.is_dir() and any(TMP_MARKER in p.name for p in out.iterdir()):
                break  # a worker is writing a scene
            time.sleep(0.02)
        driver.send_signal(signal.SIGINT)
        stdout, stderr = driver.communicate(timeout=60)
    finally:
        driver.kill()
    assert driver.returncode == 130, stderr
    summary = json.loads(stdout)  # one document: Ray's own lines went to stderr
    assert summary["interrupted"] and summary["done"] < 3
    left = sorted(p.name for p in out.iterdir())
    assert not [n for n in left if TMP_MARKER in n], left  # workers stopped, temps removed
    assert LOCK_NAME not in left
    with folder_lock(out):  # released: a next run may take the folder
        pass
    scenes_ = {
        Path(s["input"]).stem: s
        for s in json.loads((out / "drseg_manifest.json").read_text())["scenes"]
    }
    for name in left:  # a final name holds a whole output of this run: the reference's bytes
        if name.endswith((".tif", ".qml")):
            assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name
    assert {s["status"] for s in scenes_.values()} <= {"done", "pending"}
    time.sleep(1)  # nothing is written after the driver is gone
    assert sorted(p.name for p in out.iterdir()) == left
    with one_thread():  # in this process, as the reference
        r = drseg("segment", scenes, "-o", out, *ARGS, "--vector", "--json", "--resume")
    assert r.exit_code == 0, r.output
    resumed = json.loads(r.stdout)
    assert resumed["skipped"] == summary["done"] and resumed["done"] == 3 - summary["done"]
    assert_same_outputs(out, ref_out)
