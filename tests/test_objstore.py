"""Outputs (and inputs) on an object store: ``segment`` to ``/vsis3/`` against a real S3 API.

A ``moto`` S3 server runs in its own process on a loopback port (GDAL may hold the GIL during
network I/O, see tests/range_server.py); GDAL reaches it through its usual settings
(``AWS_S3_ENDPOINT``, ``AWS_HTTPS``, ``AWS_VIRTUAL_HOSTING``, dummy keys), as docs/SCALE.md
tells users to. Each test gets its own bucket, so GDAL's per-path caches cannot mix tests.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
from typer.testing import CliRunner

from drseg_cli import cli
from drseg_cli.atomic import LOCK_NAME, folder_lock, publish
from drseg_cli.errors import OutputError, UsageError
from drseg_cli.raster import vsi
from tests.helpers import error_line, write_geotiff

pytest.importorskip("moto.server", reason="the dev extra installs moto[server]")
cli._register()

TINY = ["--model", "test-tiny", "--device", "cpu", "--tile-size", "64", "-c", "water,field"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
            break
        except (urllib.error.URLError, OSError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("moto server did not start")
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def bucket(s3_server, monkeypatch) -> str:
    """A new bucket, and GDAL pointed at the server through its environment variables."""
    host = s3_server.removeprefix("http://")
    for key, value in {
        "AWS_S3_ENDPOINT": host,
        "AWS_HTTPS": "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "GDAL_HTTP_TIMEOUT": "20",
    }.items():
        monkeypatch.setenv(key, value)
    name = f"b{uuid.uuid4().hex[:12]}"
    request = urllib.request.Request(f"{s3_server}/{name}", method="PUT")
    urllib.request.urlopen(request, timeout=10).close()
    return name


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scenes")
    rng = np.random.default_rng(5)
    for name in ("a", "b"):
        write_geotiff(folder / f"{name}.tif", rng.integers(0, 255, (3, 60, 70)).astype(np.uint8))
    return folder


def drseg(*args: object):
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def listing(server: str, bucket: str, prefix: str) -> list[str]:
    """Names under ``prefix/`` in ``bucket``, as the server lists them (no GDAL cache)."""
    query = urllib.parse.urlencode({"list-type": "2", "prefix": f"{prefix}/"})
    with urllib.request.urlopen(f"{server}/{bucket}?{query}", timeout=10) as r:
        tree = ET.fromstring(r.read())
    keys = [e.text or "" for e in tree.iter() if e.tag.endswith("}Key") or e.tag == "Key"]
    return sorted(k.removeprefix(f"{prefix}/") for k in keys)


def test_batch_to_s3_equals_the_local_run_and_resume_skips_done_scenes(
    s3_server, bucket, scenes, tmp_path
):
    local = tmp_path / "local"
    args = [scenes / "a.tif", scenes / "b.tif", *TINY, "--vector", "-q"]
    r = drseg("segment", *args, "-o", f"{local}/")
    assert r.exit_code == 0, r.output
    prefix = f"/vsis3/{bucket}/runs/x"
    r = drseg("segment", *args, "-o", f"{prefix}/", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert (summary["done"], summary["failed"]) == (2, 0)
    assert summary["manifest"] == f"{prefix}/drseg_manifest.json"

    names = sorted(p.name for p in local.iterdir() if not p.name.startswith("."))
    assert (
        listing(s3_server, bucket, "runs/x") == names
    )  # the same files, no lock or temp object left behind
    for name in names:
        remote = f"{prefix}/{name}"
        if name.endswith((".tif", ".qml")):  # rasters and styles: the very bytes
            assert vsi.read_bytes(remote) == (local / name).read_bytes(), name
            if name.endswith(".tif"):
                with rasterio.open(remote) as got, rasterio.open(local / name) as ref:
                    np.testing.assert_array_equal(got.read(), ref.read())
        elif name.endswith(".gpkg"):  # polygons read back through /vsis3 (GDAL of pyogrio)
            got = pyogrio.read_dataframe(remote, layer=0)
            ref = pyogrio.read_dataframe(local / name, layer=0)
            assert got.drop(columns="geometry").equals(ref.drop(columns="geometry"))
            assert got.geometry.geom_equals_exact(ref.geometry, 0).all()

    manifest = json.loads(vsi.read_bytes(f"{prefix}/drseg_manifest.json"))
    ref_manifest = json.loads((local / "drseg_manifest.json").read_text())
    records = {Path(s["input"]).name: s for s in manifest["scenes"]}
    for ref in ref_manifest["scenes"]:
        got = records[Path(ref["input"]).name]
        assert got["status"] == "done"
        assert got["outputs"]["mask"] == f"{prefix}/{Path(ref['outputs']['mask']).name}"
        tifs_and_styles = {k: v for k, v in ref["checksums"].items() if k != "vector"}
        assert tifs_and_styles.items() <= got["checksums"].items()  # sha256 of the objects

    r = drseg("segment", *args, "-o", f"{prefix}/", "--json", "--resume")
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout)
    assert (again["done"], again["skipped"]) == (0, 2)  # verified from the store, skipped

    # an object changed behind drseg's back: resume sees it (sha256 read from the store)
    (tmp_path / "junk.qml").write_text("<qgis/>")
    vsi.upload(tmp_path / "junk.qml", f"{prefix}/b_mask.qml")
    r = drseg("segment", *args, "-o", f"{prefix}/", "--json", "--resume")
    again = json.loads(r.stdout)
    assert (again["done"], again["skipped"], again["redone_changed_outputs"]) == (1, 1, 1)
    assert vsi.read_bytes(f"{prefix}/b_mask.qml") == (local / "b_mask.qml").read_bytes()


def test_existing_object_is_not_replaced_without_overwrite(s3_server, bucket, scenes, tmp_path):
    target = f"/vsis3/{bucket}/out/a_mask.tif"
    (tmp_path / "mine.tif").write_bytes(b"not drseg's")
    vsi.upload(tmp_path / "mine.tif", target)
    r = drseg("segment", scenes / "a.tif", *TINY, "-o", target)
    assert r.exit_code == 2
    assert error_line(r) == f"drseg: error: {target}: output exists; pass --overwrite to replace it"
    assert vsi.read_bytes(target) == b"not drseg's"
    assert listing(s3_server, bucket, "out") == ["a_mask.tif"]  # nothing else written

    r = drseg("segment", scenes / "a.tif", *TINY, "-o", target, "--overwrite", "-q")
    assert r.exit_code == 0, r.output
    with rasterio.open(target) as ds:
        assert json.loads(ds.tags()["DRSEG_CLASS_NAMES"])[:2] == ["water", "field"]
    assert listing(s3_server, bucket, "out") == ["a_mask.qml", "a_mask.tif"]


def test_input_on_s3_and_polygons_to_s3_as_shapefile(s3_server, bucket, scenes, tmp_path):
    vsi.upload(scenes / "a.tif", f"/vsis3/{bucket}/in/a.tif")
    r = drseg("segment", f"s3://{bucket}/in/a.tif", *TINY, "-o", f"s3://{bucket}/out/a.shp")
    assert r.exit_code == 0, r.output
    assert listing(s3_server, bucket, "out") == [
        "a.cpg",
        "a.dbf",
        "a.prj",
        "a.qml",
        "a.shp",
        "a.shx",
    ]
    assert drseg("segment", scenes / "a.tif", *TINY, "-o", tmp_path / "a.shp").exit_code == 0
    got = pyogrio.read_dataframe(f"/vsis3/{bucket}/out/a.shp")
    ref = pyogrio.read_dataframe(tmp_path / "a.shp")
    assert got.drop(columns="geometry").equals(ref.drop(columns="geometry")) and len(ref)


def test_dglrsis_proposals_go_to_s3_with_the_mask(s3_server, bucket, scenes, tmp_path):
    """Every output of the plan is staged and uploaded, the proposal polygons included."""
    args = [scenes / "a.tif", *TINY, "--method", "dglrsis"]
    r = drseg(
        "segment", *args, "-o", f"s3://{bucket}/p/a.tif", "--proposals", f"s3://{bucket}/p/a_p.gpkg"
    )
    assert r.exit_code == 0, r.output
    assert listing(s3_server, bucket, "p") == ["a.qml", "a.tif", "a_p.gpkg"]
    local = ["-o", tmp_path / "a.tif", "--proposals", tmp_path / "a_p.gpkg"]
    assert drseg("segment", *args, *local).exit_code == 0
    assert vsi.read_bytes(f"/vsis3/{bucket}/p/a.tif") == (tmp_path / "a.tif").read_bytes()
    got = pyogrio.read_dataframe(f"/vsis3/{bucket}/p/a_p.gpkg", layer=0)
    ref = pyogrio.read_dataframe(tmp_path / "a_p.gpkg", layer=0)
    assert len(ref) and got.drop(columns="geometry").equals(ref.drop(columns="geometry"))
    assert got.geometry.geom_equals(ref.geometry).all()


def test_resume_of_an_s3_input_knows_it_by_its_etag(bucket, scenes):
    vsi.upload(scenes / "a.tif", f"/vsis3/{bucket}/in/a.tif")
    args = [f"/vsis3/{bucket}/in/a.tif", *TINY, "-o", f"/vsis3/{bucket}/out/", "--json"]
    assert json.loads(drseg("segment", *args).stdout)["done"] == 1
    assert json.loads(drseg("segment", *args, "--resume").stdout)["skipped"] == 1
    vsi.upload(scenes / "b.tif", f"/vsis3/{bucket}/in/a.tif")  # new content, same name
    again = json.loads(drseg("segment", *args, "--resume").stdout)
    assert (again["done"], again["redone_changed_input"]) == (1, 1)


def test_lock_object_keeps_a_second_run_out_and_is_removed_after(bucket):
    prefix = Path(f"/vsis3/{bucket}/locked")
    with folder_lock(prefix):
        holder = json.loads(vsi.read_bytes(prefix / LOCK_NAME))
        assert holder["pid"] > 0 and holder["host"]
        with (
            pytest.raises(UsageError, match="another drseg run is writing here"),
            folder_lock(prefix),
        ):
            pass
    assert not vsi.exists(prefix / LOCK_NAME)


def test_lock_of_a_dead_run_is_taken_over_one_of_another_host_is_not(bucket, tmp_path):
    prefix = Path(f"/vsis3/{bucket}/stale")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    lock = tmp_path / LOCK_NAME
    for pid in (int(dead.stdout), os.getpid()):  # a dead pid; ours from a former container
        lock.write_text(json.dumps({"run": "old", "host": socket.gethostname(), "pid": pid}))
        vsi.upload(lock, prefix / LOCK_NAME)
        with folder_lock(prefix):
            assert json.loads(vsi.read_bytes(prefix / LOCK_NAME))["run"] != "old"
        assert not vsi.exists(prefix / LOCK_NAME)
    lock.write_text(json.dumps({"run": "x", "host": "elsewhere", "pid": 1, "started": "T"}))
    vsi.upload(lock, prefix / LOCK_NAME)
    with pytest.raises(UsageError) as err, folder_lock(prefix):
        pass
    assert str(err.value) == (
        f"{prefix}: another drseg run is writing here (pid 1 on elsewhere since T); wait for "
        f"it, or delete {prefix}/{LOCK_NAME} if no run is using it"
    )
    assert json.loads(vsi.read_bytes(prefix / LOCK_NAME))["run"] == "x"  # left as it was


def test_unwritable_targets_are_one_line_errors(bucket, scenes):
    r = drseg("segment", scenes / "a.tif", *TINY, "-o", "https://example.com/a.tif")
    assert r.exit_code == 1 and "cannot write to a URL" in error_line(r)
    r = drseg("segment", scenes / "a.tif", scenes / "b.tif", *TINY, "-o", "/vsis3/nobucket-x/o/")
    assert r.exit_code == 1
    assert error_line(r).startswith("drseg: error: /vsis3/nobucket-x/o/.drseg.lock: upload failed")


def test_ray_workers_write_the_same_objects(s3_server, bucket, scenes, tmp_path):
    pytest.importorskip("ray")
    args = [scenes / "a.tif", scenes / "b.tif", *TINY, "--vector", "-q"]
    assert drseg("segment", *args, "-o", f"{tmp_path}/").exit_code == 0
    prefix = f"/vsis3/{bucket}/ray"
    r = drseg("segment", *args, "-o", f"{prefix}/", "--ray", "local", "--workers", "1")
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".tif", ".qml"))
    assert len(names) == 4 and set(names) <= set(listing(s3_server, bucket, "ray"))
    for name in names:
        assert vsi.read_bytes(f"{prefix}/{name}") == (tmp_path / name).read_bytes(), name
    manifest = json.loads(vsi.read_bytes(f"{prefix}/drseg_manifest.json"))
    assert [s["status"] for s in manifest["scenes"]] == ["done", "done"]
    assert all(s["checksums"]["mask"] for s in manifest["scenes"])


def test_refer_batch_to_s3_equals_the_local_run_and_resumes(s3_server, bucket, scenes, tmp_path):
    args = [
        scenes / "a.tif",
        "the pond",
        "--method",
        "rsrefseg2",
        "-m",
        "test-tiny",
        "--batch-size",
        "16",
    ]
    r = drseg("refer", *args, "-o", f"{tmp_path}/", "-q")
    assert r.exit_code == 0, r.output
    prefix = f"/vsis3/{bucket}/refer"
    r = drseg("refer", *args, "-o", f"s3://{bucket}/refer/", "-q")  # the URL form, as typed
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".tif", ".qml"))
    assert len(names) == 2
    assert listing(s3_server, bucket, "refer") == sorted([*names, "drseg_manifest.json"])
    for name in names:
        assert vsi.read_bytes(f"{prefix}/{name}") == (tmp_path / name).read_bytes(), name
    r = drseg("refer", *args, "-o", f"{prefix}/", "--resume", "--json")
    assert (json.loads(r.stdout)["done"], json.loads(r.stdout)["skipped"]) == (0, 1)


def test_a_failed_upload_takes_back_the_new_objects_of_its_scene(bucket, tmp_path):
    (tmp_path / "a.tif").write_bytes(b"a")
    (tmp_path / "b.tif").write_bytes(b"b")
    good, bad = f"/vsis3/{bucket}/x/a.tif", "/vsis3/nobucket-y/x/b.tif"
    pairs = [(tmp_path / "a.tif", Path(good)), (tmp_path / "b.tif", Path(bad))]
    with pytest.raises(OutputError, match="nobucket-y/x/b.tif: upload failed"):
        publish(pairs, replace=False)
    assert not vsi.exists(good)  # nothing new is left of a scene that did not make it
    with pytest.raises(OutputError):
        publish(pairs, replace=True)  # replacing: what was uploaded stays, the scene pending
    assert vsi.read_bytes(good) == b"a"


def test_check_reads_outputs_on_the_store_and_names_their_objects(bucket, scenes):
    """``drseg check s3://…``: a mask (with its .qml) and polygons (against the mask beside
    them) are checked on local copies; a problem names the object, not the copy."""
    out = f"s3://{bucket}/c"
    assert (
        drseg("segment", scenes / "a.tif", *TINY, "-o", f"{out}/a.tif", "--vector").exit_code == 0
    )
    for name in ("a.tif", "a.gpkg"):
        r = drseg("check", f"{out}/{name}", "--input", scenes / "a.tif", "--json")
        assert r.exit_code == 0, r.output
        report = json.loads(r.stdout)
        assert report["ok"] and f"/vsis3/{bucket}/c/" in json.dumps(report)
    assert json.loads(r.stdout)["against_mask"] == f"/vsis3/{bucket}/c/a.tif"
    vsi.remove(f"/vsis3/{bucket}/c/a.qml")
    r = drseg("check", f"{out}/a.tif")
    assert r.exit_code == 1 and error_line(r).startswith(f"drseg: error: /vsis3/{bucket}/c/a"), (
        r.output
    )
    assert "/tmp" not in r.output and ".qml" in r.output
    r = drseg("check", f"{out}/missing.tif")
    assert r.exit_code == 1 and f"/vsis3/{bucket}/c/missing.tif" in r.output, r.output


def test_vectorize_reads_and_writes_the_store(s3_server, bucket, scenes, tmp_path):
    """``drseg vectorize s3://…mask.tif -o s3://….shp``: the mask read in place, the
    shapefile and its sidecars uploaded; the same polygons as a local run; no overwrite."""
    assert drseg("segment", scenes / "a.tif", *TINY, "-o", tmp_path / "a.tif").exit_code == 0
    vsi.upload(tmp_path / "a.tif", f"/vsis3/{bucket}/v/a.tif")
    args = ["vectorize", f"s3://{bucket}/v/a.tif", "-o", f"s3://{bucket}/v/a_polygons.shp"]
    r = drseg(*args, "--quiet")
    assert r.exit_code == 0, r.output
    names = listing(s3_server, bucket, "v")
    assert names == [
        "a.tif",
        *(f"a_polygons.{s}" for s in ("cpg", "dbf", "prj", "qml", "shp", "shx")),
    ]
    assert drseg("vectorize", tmp_path / "a.tif", "-o", tmp_path / "p.shp").exit_code == 0
    got = pyogrio.read_dataframe(f"/vsis3/{bucket}/v/a_polygons.shp")
    ref = pyogrio.read_dataframe(tmp_path / "p.shp")
    assert len(ref) and got.drop(columns="geometry").equals(ref.drop(columns="geometry"))
    r = drseg(*args)
    assert r.exit_code == 2 and "exists" in error_line(r), r.output
    assert drseg(*args, "--overwrite", "--quiet").exit_code == 0
