"""End to end through the CLI with the test-tiny model on real rasters."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from shapely.geometry import box
from typer.testing import CliRunner

from drseg_cli import cli
from drseg_cli.raster.mask_meta import MASK_NODATA, class_names_from_tags
from tests.helpers import DATA, error_line

cli._register()
LANDSAT = DATA / "LC08_L1TP_224077_20200518_20200518_01_RT_B2_60m.TIF"
TINY = ["--model", "test-tiny", "--device", "cpu"]


def drseg(*args: str):
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_segment_real_scene_mask_matches_input_grid(tmp_path):
    out = tmp_path / "rgb_mask.tif"
    r = drseg(
        "segment", DATA / "RGB.byte.tif", "-c", "water,land,cloud", "-o", out, *TINY, "--json"
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["outputs"]["mask"] == str(out) and summary["classes"] == [
        "water",
        "land",
        "cloud",
    ]
    assert summary["tiles"]["total"] >= 1 and summary["device"] == "cpu"
    with rasterio.open(DATA / "RGB.byte.tif") as src, rasterio.open(out) as m:
        assert (m.crs, m.transform, m.shape) == (src.crs, src.transform, src.shape)
        assert class_names_from_tags(m.tags()) == ["water", "land", "cloud"]
        assert m.colormap(1)[0][:3] == (31, 120, 180)
        mask, valid = m.read(1), src.dataset_mask() > 0
    np.testing.assert_array_equal(mask == MASK_NODATA, ~valid)
    assert set(np.unique(mask[valid])) <= {0, 1, 2}
    assert out.with_suffix(".qml").is_file()


def test_landsat_to_geopackage_polygons(tmp_path):
    out = tmp_path / "landsat.gpkg"
    r = drseg("segment", LANDSAT, "-c", "water,forest,field", "-o", out, *TINY, "-q")
    assert r.exit_code == 0, r.output
    gdf = gpd.read_file(out)
    assert {"class_id", "class_name", "area_m2", "mean_score"} <= set(gdf.columns)
    with rasterio.open(LANDSAT) as src:
        assert gdf.crs == src.crs
        bounds = box(*src.bounds)
        pixel_area = abs(src.transform.a * src.transform.e)
    assert len(gdf) > 0 and gdf.geometry.within(bounds.buffer(1e-6)).all()
    assert set(gdf.class_name) <= {"water", "forest", "field"}
    assert ((gdf.mean_score > 0) & (gdf.mean_score <= 1)).all()
    assert gdf.area_m2.sum() == pytest.approx(758 * 1003 * pixel_area, rel=0.01)
    assert not list(tmp_path.glob("*drseg-tmp*"))


def test_shapefile_export_has_prj(tmp_path):
    mask = tmp_path / "m.tif"
    assert drseg("segment", DATA / "rgbn_suba.tif", "-c", "a,b", "-o", mask, *TINY).exit_code == 0
    r = drseg("vectorize", mask, "-o", tmp_path / "poly.shp")
    assert r.exit_code == 0, r.output
    for ext in (".shp", ".shx", ".dbf", ".prj"):
        assert (tmp_path / f"poly{ext}").is_file()
    assert gpd.read_file(tmp_path / "poly.shp").crs == rasterio.open(mask).crs


def test_vector_flag_writes_mask_and_gpkg(tmp_path):
    out = tmp_path / "scene.tif"
    r = drseg("segment", DATA / "rgbn_suba.tif", "-c", "a,b", "-o", out, "--vector", *TINY)
    assert r.exit_code == 0, r.output
    assert out.is_file() and (tmp_path / "scene.gpkg").is_file()


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["-c", "road,,water"], 2, "empty class name"),
        (["-c", "road,Road"], 2, "duplicate class name"),
        (["-c", "x" * 500], 2, "characters"),
        (["-c", "a,b", "--device", "cuda"], 2, "CUDA is not available"),
        (["-c", "a,b", "--bands", "1,2,9"], 1, "band 9 but the file has 3"),
        (["-c", "a,b", "--tile-size", "100"], 2, "multiple of"),
        (["-c", "a,b", "--method", "magic"], 2, "method"),
        (["-c", "a,b", "--blend", "gaussian"], 2, "--blend 'gaussian'"),
        (["-c", "a,b", "--method", "segearth", "--rho", "0.5"], 2, "need --method drseg"),
        (["-c", "a,b", "--clip-baseline", "maskclip"], 2, "clip_baseline"),
        (["-c", "a,b", "--model", "nope"], 2, "nope"),
    ],
)
def test_bad_arguments_one_line_error_and_no_output(tmp_path, args, code, message):
    out = tmp_path / "o.tif"
    r = drseg("segment", DATA / "RGB.byte.tif", "-o", out, "--model", "test-tiny", *args)
    assert r.exit_code == code, r.output
    assert message in error_line(r)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "o.tif"
    out.write_bytes(b"keep me")
    r = drseg("segment", DATA / "rgbn_suba.tif", "-c", "a,b", "-o", out, *TINY)
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    assert out.read_bytes() == b"keep me"
    r = drseg("segment", DATA / "rgbn_suba.tif", "-c", "a,b", "-o", out, *TINY, "--overwrite")
    assert r.exit_code == 0 and rasterio.open(out).count == 1


def test_missing_crs_is_a_clear_error_and_can_be_allowed(tmp_path):
    out = tmp_path / "o.tif"
    r = drseg("segment", DATA / "float_nan.tif", "-c", "a,b", "-o", out, *TINY)
    assert r.exit_code == 1 and "has no CRS" in r.stderr and "--allow-no-crs" in r.stderr
    assert not out.exists()
    r = drseg("segment", DATA / "float_nan.tif", "-c", "a,b", "-o", out, *TINY, "--allow-no-crs")
    assert r.exit_code == 0, r.output
    with rasterio.open(out) as m:
        assert m.shape == (2, 3) and m.crs is None


def test_info_reports_tiles_and_bands():
    r = drseg("info", DATA / "RGBA.uint16.tif", "--json", "--tile-size", "224")
    facts = json.loads(r.stdout)
    assert facts["size"] == [634, 411] and facts["rgb_bands"] == [3, 2, 1]
    assert facts["alpha_band"] == 4 and facts["crs"] == "EPSG:32612"
    assert facts["tiles"] == 4 * 3  # stride 168: x at 0,168,336,410; y at 0,168,187


def test_info_counts_tiles_as_segment_runs_them(rgb_scene, tmp_path):
    """The tile count is the chosen model's (test-tiny: 224 px, 2 tiles here; 448 px: 1)."""
    r = drseg("info", rgb_scene, "-m", "test-tiny", "--json")
    assert r.exit_code == 0, r.output
    facts = json.loads(r.stdout)
    assert (facts["tile_size"], facts["overlap"], facts["tiles"]) == (224, 0.25, 2)
    out = tmp_path / "m.tif"
    r = drseg("segment", rgb_scene, "-c", "a,b", "-o", out, *TINY, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tiles"]["total"] == facts["tiles"]
    r = drseg("info", rgb_scene, "--json")  # the default preset, vit-b16: 448 px
    assert (json.loads(r.stdout)["tile_size"], json.loads(r.stdout)["tiles"]) == (448, 1)


@pytest.mark.parametrize("method", ["drseg", "clip", "segearth"])
def test_info_tiling_table_matches_built_models(method):
    """``info`` knows each method's tiling without torch; it must be what models are built with."""
    from drseg_cli.model.base import Preprocess
    from drseg_cli.model.clipseg import get_baseline
    from drseg_cli.model.factory import METHOD_TILING, build_model, default_tiling

    net = build_model("test-tiny", method=method)
    tiling = (net.preprocess.tile_size, net.preprocess.overlap)
    assert default_tiling("test-tiny", method) == tiling
    if method == "drseg":
        assert METHOD_TILING[method] == (None, Preprocess.overlap)
    else:  # the baseline's own tile size (test-tiny's preset size is 224 too: check the table)
        base = get_baseline("segearth" if method == "segearth" else "clearclip")
        assert METHOD_TILING[method] == (base.tile_size, base.overlap)


def test_info_describes_rasters_without_crs_and_several_files():
    r = drseg("info", DATA / "float_nan.tif", DATA / "RGB.byte.tif", "-m", "test-tiny", "--json")
    assert r.exit_code == 0, r.output
    no_crs, rgb = json.loads(r.stdout)
    assert no_crs["path"].endswith("float_nan.tif") and no_crs["size"] == [3, 2]
    assert no_crs["crs"] is None and no_crs["georeferenced"] is False
    assert rgb["crs"] == "EPSG:32618" and rgb["georeferenced"] is True
    r = drseg("info", DATA / "float_nan.tif", "-m", "test-tiny")
    assert r.exit_code == 0 and "--allow-no-crs" in r.stdout


def test_info_bad_file_among_several_is_one_error_line(tmp_path):
    missing = tmp_path / "missing.tif"
    r = drseg("info", DATA / "RGB.byte.tif", missing, "--json")
    assert r.exit_code != 0 and r.stdout == ""
    assert str(missing) in error_line(r)


def test_rho_one_mask_is_identical_to_clip_method(tmp_path):
    masks = {}
    for name, extra in (
        ("clip", ["--method", "clip"]),
        ("rho1", ["--method", "drseg", "--rho", "1"]),
    ):
        out = tmp_path / f"{name}.tif"
        r = drseg(
            "segment", DATA / "RGB.byte.tif", "-c", "water,land,cloud", "-o", out, *TINY, *extra
        )
        assert r.exit_code == 0, r.output
        masks[name] = rasterio.open(out).read(1)
    np.testing.assert_array_equal(masks["rho1"], masks["clip"])
    full = tmp_path / "full.tif"
    assert (
        drseg(
            "segment", DATA / "RGB.byte.tif", "-c", "water,land,cloud", "-o", full, *TINY
        ).exit_code
        == 0
    )
    assert (rasterio.open(full).read(1) != masks["clip"]).any()  # the full method does differ


def test_segearth_method_defaults_to_the_reference_slide_scheme(tmp_path):
    """``--method segearth`` tiles as SegEarth-OV slides (224 px, overlap 0.5, flat blend)
    unless told otherwise: the defaults equal the explicit options and differ from drseg's."""
    probs, tiles = {}, {}
    for name, extra in (
        ("default", []),
        ("explicit", ["--tile-size", "224", "--overlap", "0.5", "--blend", "flat"]),
        ("drseg_tiling", ["--overlap", "0.25", "--blend", "linear"]),
    ):
        out, p = tmp_path / f"{name}.tif", tmp_path / f"{name}.probs.tif"
        args = ["-c", "water,land:field|grass,cloud", "--method", "segearth", *extra]
        r = drseg(
            "segment", DATA / "world.rgb.tif", "-o", out, *TINY, *args,
            "--probs", p, "--probs-dtype", "float16", "--json",
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        tiles[name] = json.loads(r.stdout)["tiles"]["total"]
        probs[name] = rasterio.open(p).read()
    assert tiles == {"default": 8, "explicit": 8, "drseg_tiling": 6}  # x 0,112,224,288 × y 0,32
    np.testing.assert_array_equal(probs["default"], probs["explicit"])
    assert np.abs(probs["default"] - probs["drseg_tiling"]).max() > 1e-3


def test_segment_with_a_trained_checkpoint(tmp_path):
    from drseg_cli.train.checkpoint import (
        ModelSpec,
        build_trained_model,
        checkpoint_payload,
        save_checkpoint,
    )

    spec = ModelSpec(preset="test-tiny", tile_size=64)
    model = build_trained_model(spec, "cpu")
    classes = [{"name": "water", "synonyms": []}, {"name": "field", "synonyms": []}]
    ckpt = tmp_path / "best.pt"
    save_checkpoint(checkpoint_payload(model, spec, classes, eval_settings={}), ckpt)
    out = tmp_path / "m.tif"
    r = drseg("segment", DATA / "rgbn_suba.tif", "-c", "water,field", "-o", out,
              "--checkpoint", ckpt, "--device", "cpu", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    with rasterio.open(out) as m, rasterio.open(DATA / "rgbn_suba.tif") as src:
        assert (m.crs, m.transform, m.shape) == (src.crs, src.transform, src.shape)
        assert set(np.unique(m.read(1))) <= {0, 1, 255}
    r = drseg("segment", DATA / "rgbn_suba.tif", "-c", "a,b", "-o", tmp_path / "x.tif",
              "--checkpoint", ckpt, "--rho", "0.3")  # fmt: skip
    assert r.exit_code == 2 and "come from the checkpoint" in error_line(r)


# --- --threshold / --background ----------------------------------------------------------------


def _segment_with_threshold(tmp_path, classes, *extra):
    out = tmp_path / "m.tif"
    r = drseg(
        "segment", DATA / "rgbn_suba.tif", "-c", classes, "-o", out, *TINY, "--threshold",
        "0.6", "--probs", tmp_path / "p.tif", "--probs-dtype", "float16", *extra,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    with rasterio.open(out) as m, rasterio.open(tmp_path / "p.tif") as p:
        return m.read(1), p.read().max(axis=0), class_names_from_tags(m.tags()), out


def test_threshold_assigns_a_new_background_class_styled_and_checked(tmp_path):
    mask, best, names, out = _segment_with_threshold(tmp_path, "water,field", "--vector")
    assert names == ["water", "field", "background"]
    valid = mask != MASK_NODATA
    clear = valid & (np.abs(best - 0.6) > 2e-3)  # float16 probabilities: skip the rounding band
    assert ((mask == 2) & clear).any() and ((mask < 2) & clear).any()
    np.testing.assert_array_equal((mask == 2)[clear], (best < 0.6)[clear])
    assert 'label="background"' in out.with_suffix(".qml").read_text()
    layer = gpd.read_file(out.with_suffix(".gpkg"))
    assert "background" in set(layer["class_name"])
    for product in (out, out.with_suffix(".gpkg")):
        r = drseg("check", product, "--input", DATA / "rgbn_suba.tif")
        assert r.exit_code == 0, r.output


def test_threshold_reuses_a_listed_background_class(tmp_path):
    mask, best, names, _ = _segment_with_threshold(tmp_path, "background,water,field")
    assert names == ["background", "water", "field"]
    clear = (mask != MASK_NODATA) & (np.abs(best - 0.6) > 2e-3)
    assert (best[clear] < 0.6).any()
    np.testing.assert_array_equal((mask == 0)[clear & (best < 0.6)], True)


def test_threshold_to_nodata(tmp_path):
    mask, best, names, _ = _segment_with_threshold(
        tmp_path, "water,field", "--background", "nodata"
    )
    assert names == ["water", "field"]
    low = (best < 0.6 - 2e-3) & np.isfinite(best)
    assert low.any() and (mask[low] == MASK_NODATA).all()


@pytest.mark.parametrize(
    "args,message",
    [(["--threshold", "1.5"], "--threshold 1.5: must be in [0, 1)"),
     (["--threshold", "0.5", "--background", " "], "--background: give a class name")],
)  # fmt: skip
def test_bad_threshold_options_fail_before_the_model(tmp_path, args, message):
    r = drseg("segment", DATA / "rgbn_suba.tif", "-c", "a,b", "-o", tmp_path / "m.tif", *args)
    assert r.exit_code == 2 and message in error_line(r)
    assert list(tmp_path.iterdir()) == []


def test_resume_with_threshold_skips_scenes_already_done(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b"):
        (src / f"{name}.tif").write_bytes((DATA / "rgbn_suba.tif").read_bytes())
    args = ["segment", src, "-c", "water,field", "-o", f"{tmp_path}/out/", *TINY, "--json"]
    args += ["--threshold", "0.6", "--tile-size", "128"]
    first = drseg(*args)
    assert first.exit_code == 0, first.output
    again = json.loads(drseg(*args, "--resume").stdout)
    assert again["skipped"] == 2 and again["done"] == 0, again


# -- scripts and progress (issue 16.8) -------------------------------------------------------


def test_json_summary_is_printed_when_the_scene_fails(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes((DATA / "RGB.byte.tif").read_bytes()[:5000])  # truncated
    r = drseg("segment", bad, "-c", "a,b", "-o", tmp_path / "o.tif", *TINY, "--json")
    assert r.exit_code != 0
    summary = json.loads(r.stdout)
    assert summary["failed"] == 1 and summary["outputs"] == {}
    assert summary["inputs"] == [str(bad)]
    assert summary["error"] in error_line(r)


def test_warnings_print_through_the_progress_console(monkeypatch):
    import io
    import logging

    from rich.console import Console
    from rich.progress import Progress

    from drseg_cli.commands import _common

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=80, color_system=None)
    monkeypatch.setattr(_common, "err_console", console)
    assert drseg("info", DATA / "RGB.byte.tif").exit_code == 0  # sets up drseg's logging
    logger = logging.getLogger("drseg")
    with Progress(console=console, transient=True) as bar:
        bar.add_task("tiles", total=10)
        logger.warning("a warning mid-run")
    lines = [ln for ln in screen.getvalue().splitlines() if "a warning mid-run" in ln]
    assert len(lines) == 1  # printed above the live bar, on a line of its own
    assert lines[0].split("\r")[-1].strip().endswith("a warning mid-run")


def test_stage_labels_after_the_tiles(tmp_path, monkeypatch):
    from drseg_cli.pipeline import segment as pipeline

    seen: list[str] = []
    original = pipeline.segment_scene

    def spy(*args, **kwargs):
        label = kwargs["stage"]
        kwargs["stage"] = lambda name: (seen.append(name), label(name))
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "segment_scene", spy)
    out = tmp_path / "s.tif"
    r = drseg("segment", DATA / "rgbn_suba.tif", "-c", "a,b", "-o", out, "--vector", *TINY)
    assert r.exit_code == 0, r.output
    assert seen == ["writing COG", "polygons"]


def test_batch_reports_scenes_done_of_total(tmp_path):
    for name in ("one", "two"):
        (tmp_path / f"{name}.tif").write_bytes((DATA / "rgbn_suba.tif").read_bytes())
    r = drseg("segment", tmp_path / "one.tif", tmp_path / "two.tif", "-c", "a,b", "-o",
              tmp_path / "out/", *TINY)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "[1/2] " in r.stderr and "[2/2] " in r.stderr


def test_missing_pyarrow_is_found_before_any_tile(tmp_path, monkeypatch):
    import sys

    from drseg_cli.pipeline import segment as pipeline

    def no_tiles(*a, **k):
        raise AssertionError("a tile was computed")

    monkeypatch.setattr(pipeline, "stitch_scene", no_tiles)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    out = tmp_path / "o.parquet"
    r = drseg("segment", DATA / "rgbn_suba.tif", "-c", "a,b", "-o", out, *TINY)
    assert r.exit_code == 2, r.output
    assert "needs pyarrow" in error_line(r)
    assert list(tmp_path.iterdir()) == []


def test_output_folder_is_created_when_missing(tmp_path):
    out = tmp_path / "new" / "deeper" / "s.tif"
    r = drseg("segment", DATA / "rgbn_suba.tif", "-c", "a,b", "-o", out, *TINY, "-q")
    assert r.exit_code == 0, r.output
    assert out.is_file()


def test_single_band_warning_appears_once(tmp_path):
    out = tmp_path / "l.tif"
    r = drseg("segment", LANDSAT, "-c", "water,land", "-o", out, *TINY, "--tile-size", "448")
    assert r.exit_code == 0, r.output
    assert r.stderr.count("single-band image") == 1, r.stderr


def test_segment_progress_bar_shares_the_logging_console():
    """The bar ``segment`` shows is drawn on the console warnings are printed through (the
    test above), so a warning mid-run lands above the bar instead of garbling it."""
    from drseg_cli.commands import _common
    from drseg_cli.commands.segment import _Progress

    with _Progress(True, "scene.tif") as progress:
        assert progress.bar is not None and progress.bar.console is _common.err_console
    assert _Progress(False, "scene.tif").bar is None  # scripts, --quiet, --json: no bar
