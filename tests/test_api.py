"""The Python API (``drseg_cli.segment``): the CLI's results, options, errors and light import;
the model kept between calls; the example notebook runs."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from typer.testing import CliRunner

import drseg_cli
from drseg_cli import api, cli
from drseg_cli.commands import segment as segment_command
from drseg_cli.errors import DrsegError, UsageError
from tests.helpers import error_line

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "sample_tiles" / "naip_prairie_512.tif"
NOTEBOOK = ROOT / "docs" / "examples" / "segment.ipynb"
CLASSES = "water,tree,grass,road"
cli._register()


def run_cli(*args: object):
    return CliRunner().invoke(cli.app, ["segment", *(str(a) for a in args)])


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """A 320 × 320 crop of the NAIP sample: a few test-tiny tiles, seams included."""
    path = tmp_path_factory.mktemp("scene") / "crop.tif"
    with rasterio.open(SCENE) as src:
        window = rasterio.windows.Window(96, 64, 320, 320)
        profile = src.profile | {
            "width": 320,
            "height": 320,
            "transform": src.window_transform(window),
        }
        data = src.read(window=window)
    with rasterio.open(path, "w", photometric="MINISBLACK", **profile) as dst:
        dst.write(data)  # as the source: four plain bands, no alpha
    return path


@pytest.fixture(autouse=True)
def fresh_cache():
    api.clear_model_cache()
    yield
    api.clear_model_cache()


def test_api_writes_what_the_cli_writes(scene, tmp_path):
    options = dict(threshold=0.3, rho=0.6, overlap=0.5, min_area=50)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    cli_out = tmp_path / "cli.tif"
    result = run_cli(
        scene, "-c", CLASSES, "-o", cli_out, "-m", "test-tiny", "-q", "--vector", *flags
    )
    assert result.exit_code == 0, result.output
    out = drseg_cli.segment(
        scene, CLASSES.split(","), tmp_path / "api.tif", model="test-tiny", vector=True,
        probs=True, quiet=True, return_array=True, **options,
    )  # fmt: skip
    assert out.outputs == {
        "mask": tmp_path / "api.tif",
        "vector": tmp_path / "api.gpkg",
        "probs": tmp_path / "api_probs.tif",
        "style": tmp_path / "api.qml",
    }
    with rasterio.open(cli_out) as ds:
        cli_mask, cli_transform = ds.read(1), ds.transform
    assert np.array_equal(out.mask, cli_mask)
    assert len(np.unique(cli_mask)) > 1  # a mask worth comparing
    assert out.transform == cli_transform and out.crs == "EPSG:26914"
    assert out.class_names == ["water", "tree", "grass", "road", "background"]
    assert out.probs.shape == (4, *cli_mask.shape)
    import geopandas

    cli_polygons = geopandas.read_file(tmp_path / "cli.gpkg", layer="cli")
    assert len(out.polygons) == len(cli_polygons)
    assert sorted(out.polygons["area_m2"]) == pytest.approx(sorted(cli_polygons["area_m2"]))


@pytest.mark.parametrize(
    "options",
    [
        {"overlap": 0.95},
        {"blend": "cubic"},
        {"threshold": 1.5},
        {"probs_dtype": "int8"},
        {"percentiles": "98,2"},
        {"bands": "1,x"},
        {"background": " "},
        {"method": "clip", "rho": 0.5},
        {"tile_size": 100},
    ],
    ids=lambda o: ",".join(o),
)
def test_bad_options_raise_the_cli_error(scene, tmp_path, options):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    result = run_cli(
        scene, "-c", CLASSES, "-o", tmp_path / "m.tif", "-m", "test-tiny", "-q", *flags
    )
    assert result.exit_code == 2
    with pytest.raises(UsageError) as raised:
        drseg_cli.segment(
            scene, CLASSES, tmp_path / "m.tif", model="test-tiny", quiet=True, **options
        )
    assert error_line(result) == f"drseg: error: {raised.value}"
    assert list(tmp_path.iterdir()) == []


def test_api_only_errors_are_drseg_errors(scene, tmp_path):
    with pytest.raises(UsageError, match="unknown option.*roh.*known: .*rho"):
        drseg_cli.segment(scene, CLASSES, model="test-tiny", roh=0.5)
    with pytest.raises(UsageError, match="logit-scale 0"):
        drseg_cli.segment(scene, CLASSES, model="test-tiny", logit_scale=0)
    with pytest.raises(DrsegError, match="missing.tif"):
        drseg_cli.segment(tmp_path / "missing.tif", CLASSES, model="test-tiny")


def test_existing_output_is_kept_without_overwrite(scene, tmp_path):
    target = tmp_path / "m.tif"
    target.write_bytes(b"keep")
    with pytest.raises(UsageError, match="overwrite"):
        drseg_cli.segment(scene, CLASSES, target, model="test-tiny")
    assert target.read_bytes() == b"keep"


def test_config_file_gives_defaults_and_keywords_win(scene, tmp_path):
    config = tmp_path / "best.json"
    config.write_text(json.dumps({"drseg-config": 1, "model": "test-tiny", "threshold": 0.99}))
    thresholded = drseg_cli.segment(scene, CLASSES, config=config, quiet=True)
    assert thresholded.class_names[-1] == "background"
    assert (thresholded.mask == 4).mean() > 0.5  # nearly every pixel below 0.99
    plain = drseg_cli.segment(scene, CLASSES, config=config, threshold=0.0, quiet=True)
    assert plain.class_names == CLASSES.split(",")


def test_no_output_writes_nothing(scene, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    out = drseg_cli.segment(
        scene, CLASSES, model="test-tiny", vector=True, uncertainty="u.tif", quiet=True
    )
    assert out.outputs == {}
    assert out.mask.shape == (320, 320) and out.uncertainty.shape == (320, 320)
    assert len(out.polygons) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]
    left = [p.name for p in temp.iterdir() if not p.name.startswith("torchinductor")]
    assert left == []  # the temporary outputs are gone (torch may keep its own cache there)


def test_model_is_built_once_per_model_options(scene, monkeypatch):
    from drseg_cli.model import factory

    builds = []
    real = factory.build_model

    def counted(*args, **kwargs):
        builds.append(kwargs.get("drseg_options"))
        return real(*args, **kwargs)

    monkeypatch.setattr(factory, "build_model", counted)
    first = drseg_cli.segment(scene, "water,tree", model="test-tiny", quiet=True)
    again = drseg_cli.segment(scene, "grass,road", model="test-tiny", threshold=0.2, quiet=True)
    assert len(builds) == 1  # other classes and scene options: the same model
    assert again.class_names == ["grass", "road", "background"]
    other = drseg_cli.segment(scene, "water,tree", model="test-tiny", rho=0.6, quiet=True)
    assert len(builds) == 2 and builds[1].rho == 0.6
    back = drseg_cli.segment(scene, "water,tree", model="test-tiny", quiet=True)
    assert len(builds) == 3  # one model kept: the first was let go
    assert np.array_equal(back.mask, first.mask)
    assert not np.array_equal(other.mask, first.mask)


def test_defaults_are_the_clis():
    cli_defaults = {}
    for name, param in inspect.signature(segment_command.command).parameters.items():
        default = getattr(param.default, "default", param.default)
        cli_defaults[name] = default
    for name, default in api.OPTIONS.items():
        if name != "quiet":
            assert cli_defaults[name] == default, name
    for name in ("model", "method", "device", "precision"):
        parameter = inspect.signature(api.segment).parameters[name]
        assert parameter.default is None and api.OPTIONS[name] == cli_defaults[name]


def test_import_stays_light():
    code = (
        "import sys, drseg_cli; drseg_cli.segment; from drseg_cli import segment, vectorize;"
        "print([m for m in ('torch', 'open_clip', 'timm', 'geopandas') if m in sys.modules])"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_example_notebook_runs(tmp_path, monkeypatch):
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4 and notebook["nbformat_minor"] >= 5
    assert {c["cell_type"] for c in notebook["cells"]} == {"markdown", "code"}
    for cell in notebook["cells"]:
        assert isinstance(cell["source"], list) and isinstance(cell["metadata"], dict)
        assert cell["id"]
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
    import matplotlib

    matplotlib.use("Agg")
    (tmp_path / "sample_tiles").symlink_to(ROOT / "sample_tiles")
    cwd = tmp_path / "docs" / "examples"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), str(NOTEBOOK), "exec"), namespace)
    assert namespace["MODEL"] == "test-tiny"
    assert namespace["result"].mask.shape == (512, 512)
    assert len(namespace["polygons"]) > 0
    assert sorted(p.name for p in cwd.iterdir()) == ["prairie.gpkg"]


def test_vectorize_writes_what_the_cli_writes(scene, tmp_path):
    mask = drseg_cli.segment(scene, CLASSES, tmp_path / "m.tif", model="test-tiny", quiet=True)
    mask = mask.outputs["mask"]
    result = CliRunner().invoke(
        cli.app, ["vectorize", str(mask), "-o", str(tmp_path / "cli.geojson"), "--min-area=2000"]
    )
    assert result.exit_code == 0, result.output
    summary = drseg_cli.vectorize(mask, tmp_path / "api.geojson", min_area=2000)
    import geopandas

    cli_polygons = geopandas.read_file(tmp_path / "cli.geojson")
    api_polygons = geopandas.read_file(summary.path)
    assert summary.n_polygons == len(cli_polygons) > 0
    assert sorted(api_polygons["area_m2"]) == pytest.approx(sorted(cli_polygons["area_m2"]))
    assert summary.n_dropped > 0  # min_area passed on
    missing = tmp_path / "missing.tif"
    for args in ([missing, tmp_path / "x.kml"], [missing, tmp_path / "api.geojson"]):
        bad = CliRunner().invoke(cli.app, ["vectorize", str(args[0]), "-o", str(args[1])])
        with pytest.raises(DrsegError) as raised:  # the CLI's checks, in the CLI's order
            drseg_cli.vectorize(*args)
        assert error_line(bad) == f"drseg: error: {raised.value}"
    with pytest.raises(UsageError, match="exists"):
        drseg_cli.vectorize(mask, tmp_path / "api.geojson")


# --------------------------------------------------------------------------- refer


def test_refer_writes_what_the_cli_writes_and_returns_arrays(scene, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    opts = ["--method", "rsrefseg2", "-m", "test-tiny", "--top-k", "2"]
    cli_tif = tmp_path / "cli.tif"
    res = CliRunner().invoke(
        cli.app, ["refer", str(scene), "the large field", *opts, "-o", str(cli_tif), "--quiet"]
    )
    assert res.exit_code == 0, res.output
    built = []
    from drseg_cli.model import factory

    original = factory.build_referring_model
    monkeypatch.setattr(
        factory, "build_referring_model", lambda *a, **k: built.append(a) or original(*a, **k)
    )
    api_tif = tmp_path / "api.tif"
    kw = {"method": "rsrefseg2", "model": "test-tiny", "top_k": 2, "quiet": True}
    written = drseg_cli.refer(scene, "the large field", api_tif, **kw)
    assert written.outputs == {"mask": api_tif} and written.mask is None and written.objects
    with rasterio.open(cli_tif) as a, rasterio.open(api_tif) as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))
        assert (a.crs, a.transform) == (b.crs, b.transform)
    in_memory = drseg_cli.refer(scene, ["the large field"], **kw)
    assert in_memory.outputs == {} and len(built) == 1  # the model was kept between calls
    with rasterio.open(cli_tif) as a:
        np.testing.assert_array_equal(in_memory.mask, a.read(1))
        assert in_memory.transform == a.transform
    assert len(in_memory.polygons) == len(in_memory.objects) == len(written.objects)
    assert set(in_memory.polygons["expression"]) <= {"the large field"}


def test_refer_errors_are_the_clis(scene, tmp_path):
    with pytest.raises(UsageError, match="unknown option"):
        drseg_cli.refer(scene, "a ship", tmp_path / "x.tif", rho=0.5)
    with pytest.raises(UsageError, match="--method dglrsis"):
        drseg_cli.refer(scene, "a ship", tmp_path / "x.tif", model="test-tiny", dglrsis="x=1")
    assert not (tmp_path / "x.tif").exists()
