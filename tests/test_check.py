"""``drseg check``: good outputs pass; outputs broken one way at a time fail with one clear line.

The good outputs are made by the real CLI (``segment --model test-tiny``, ``vectorize``) on
real rasters from tests/data; each test copies them and breaks one thing a QGIS user would
notice: the .qml style, the class table, an empty layer, wrong names, areas, shifted polygons.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sqlite3
import xml.etree.ElementTree as ET
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from typer.testing import CliRunner

from drseg_cli import cli
from drseg_cli.raster.mask_meta import MIN_AREA_TAG, class_names_tag
from drseg_cli.raster.reader import inspect_raster
from drseg_cli.raster.vectorize import write_gpkg_style
from drseg_cli.raster.writers import ClassMaskWriter
from tests.helpers import DATA, error_line

cli._register()
SCENE = DATA / "rgbn_suba.tif"
CLASSES = ["water", "land", "cloud"]


def drseg(*args: object):
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """One real segment run: mask, its .qml, polygons beside it; plus a GeoJSON copy."""
    folder = tmp_path_factory.mktemp("good")
    r = drseg("segment", SCENE, "-c", ",".join(CLASSES), "-o", folder / "m.tif", "--vector",
              "--model", "test-tiny", "--device", "cpu", "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    r = drseg("vectorize", folder / "m.tif", "-o", folder / "other.geojson")
    assert r.exit_code == 0, r.output
    return folder


@pytest.fixture
def out(made, tmp_path) -> Path:
    """A private copy of the good outputs."""
    for p in made.iterdir():
        shutil.copy(p, tmp_path / p.name)
    return tmp_path


def check(path: Path, *extra: object, source: Path | None = SCENE):
    args = ["check", path, *extra] + (["--input", source] if source else [])
    return drseg(*args)


def fails(path: Path, pattern: str, *extra: object, source: Path | None = SCENE) -> str:
    r = check(path, *extra, source=source)
    assert r.exit_code == 1, r.output
    line = error_line(r)
    assert str(path.with_suffix("")) in line and re.search(pattern, line), line  # names the file
    return line


def layer(path: Path):
    return pyogrio.read_dataframe(path, layer=0)  # a GeoPackage's polygons, not its styles


def gpkg_style(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as con:
        return con.execute("SELECT styleQML FROM layer_styles").fetchone()[0]


def rewrite(path: Path, frame, **kwargs) -> None:
    """Replace a polygon file, keeping its layer metadata and style (only the break differs)."""
    gpkg = path.suffix == ".gpkg"
    meta = pyogrio.read_info(path, layer=0)["layer_metadata"] if gpkg else None
    style = gpkg_style(path) if gpkg else None
    path.unlink()
    pyogrio.write_dataframe(frame, path, layer_metadata=meta, **kwargs)
    if style is not None:
        write_gpkg_style(path, path.stem, style)


def test_good_outputs_pass(made):
    m = check(made / "m.tif", "--json")
    assert m.exit_code == 0, m.output
    report = json.loads(m.stdout)
    assert report["ok"] and report["classes"] == CLASSES and report["classified_pixels"] > 0
    v = check(made / "m.gpkg", "--json")
    assert v.exit_code == 0, v.output
    report = json.loads(v.stdout)
    assert report["against_mask"] == str(made / "m.tif") and report["features"] > 0
    assert check(made / "other.geojson", "--mask", made / "m.tif").exit_code == 0
    assert check(made / "other.geojson").exit_code == 0  # input only: grid, CRS, areas
    assert check(made / "m.gpkg", source=None).exit_code == 0


@pytest.mark.parametrize("suffix", [".shp", ".parquet"])
def test_other_formats_pass_and_a_broken_area_fails(out, suffix):
    path = out / f"o{suffix}"
    assert drseg("vectorize", out / "m.tif", "-o", path).exit_code == 0
    r = check(path, "--mask", out / "m.tif")
    assert r.exit_code == 0, r.output
    frame = pyogrio.read_dataframe(path) if suffix == ".shp" else gpd.read_parquet(path)
    frame.loc[frame.index[0], "area_m2"] = -1.0
    if suffix == ".shp":
        rewrite(path, frame)
    else:
        frame.to_parquet(path)
    fails(path, r"no positive finite area_m2", "--mask", out / "m.tif")


def test_simplified_and_min_area_outputs_pass(out):
    r = drseg("vectorize", out / "m.tif", "-o", out / "s.gpkg", "--simplify", "40")
    assert r.exit_code == 0, r.output
    simple = layer(out / "s.gpkg").geometry.values
    rectilinear = layer(out / "m.gpkg").geometry.values
    assert (
        shapely.get_num_coordinates(simple).sum() < shapely.get_num_coordinates(rectilinear).sum()
    )  # really simplified
    r = check(out / "s.gpkg", "--mask", out / "m.tif")
    assert r.exit_code == 0, r.output
    # --min-area above every region: an empty layer, which records why.
    r = drseg("vectorize", out / "m.tif", "-o", out / "none.gpkg", "--min-area", "1e12")
    assert r.exit_code == 0 and len(layer(out / "none.gpkg")) == 0
    assert check(out / "none.gpkg", "--mask", out / "m.tif").exit_code == 0


# ----------------------------------------------------------------------------- the mask


def edit_qml(path: Path, fn) -> None:
    tree = ET.parse(path)
    fn(tree.getroot().findall("pipe/rasterrenderer/colorPalette/paletteEntry"), tree)
    tree.write(path)


def test_missing_style(out):
    (out / "m.qml").unlink()
    fails(out / "m.tif", r"m\.qml: QGIS style missing")


def test_style_label_differs_from_the_class_names(out):
    edit_qml(out / "m.qml", lambda entries, _: entries[1].set("label", "forest"))
    line = fails(out / "m.tif", r"m\.qml: style labels class 1 'forest', the mask calls it 'land'")
    assert str(out / "m.qml") in line


def test_style_colour_differs_from_the_colour_table(out):
    edit_qml(out / "m.qml", lambda entries, _: entries[0].set("color", "#ff00ff"))
    fails(out / "m.tif", r"style colour #ff00ff for class 0 \(water\) differs from the mask's")


def test_style_missing_a_class(out):
    def drop(entries, tree):
        tree.getroot().find("pipe/rasterrenderer/colorPalette").remove(entries[2])

    edit_qml(out / "m.qml", drop)
    fails(out / "m.tif", r"style has class values \[0, 1\], the mask 0\.\.2")


def test_style_that_is_not_xml_or_not_paletted(out):
    (out / "m.qml").write_text("<qgis><pipe>", encoding="utf-8")
    fails(out / "m.tif", r"not a QGIS style \(")
    (out / "m.qml").write_text("<qgis><pipe><rasterrenderer type='singlebandgray' band='1'/>"
                               "</pipe></qgis>", encoding="utf-8")  # fmt: skip
    fails(out / "m.tif", r"not a QGIS paletted style")


def test_class_names_tag_differs_from_band_tags(out):
    with rasterio.open(out / "m.tif", "r+", IGNORE_COG_LAYOUT_BREAK="YES") as ds:
        ds.update_tags(**class_names_tag(["water", "land", "snow"]))
    fails(out / "m.tif", r"band tags name the classes \['water', 'land', 'cloud'\]")


def test_colour_table_missing(out, tmp_path):
    with rasterio.open(out / "m.tif") as ds:
        profile, data, tags = ds.profile, ds.read(), ds.tags()
    profile.update(driver="GTiff", photometric="MINISBLACK")
    bare = tmp_path / "bare.tif"
    with rasterio.open(bare, "w", **profile) as ds:
        ds.write(data)
        ds.update_tags(**tags)
    shutil.copy(out / "m.qml", bare.with_suffix(".qml"))
    fails(bare, r"bare\.tif: no colour table")


# ------------------------------------------------------------------------------ polygons


def test_empty_layer_when_the_mask_has_classes(out):
    frame = layer(out / "m.gpkg")
    rewrite(out / "m.gpkg", frame.iloc[:0])
    fails(out / "m.gpkg", r"no polygons, but .*m\.tif has \d+ classified pixels")
    # A format without metadata, checked against the input alone.
    rewrite(out / "other.geojson", frame.iloc[:0])
    fails(out / "other.geojson", r"no polygons, but .*rgbn_suba\.tif has valid pixels")


def test_empty_layer_is_not_excused_by_a_zero_min_area(out):
    frame = layer(out / "m.gpkg")
    path = out / "m.gpkg"
    path.unlink()
    pyogrio.write_dataframe(frame.iloc[:0], path, layer_metadata={MIN_AREA_TAG: "0.0"})
    fails(path, r"no polygons")


def test_class_names_that_do_not_match_the_mask(out):
    frame = layer(out / "m.gpkg")
    frame.loc[frame.index[0], "class_name"] = "river"
    rewrite(out / "m.gpkg", frame)
    fails(out / "m.gpkg", r"class_name 'river' for class_id \d, but .*m\.tif names it")
    frame = layer(out / "other.geojson")
    frame["class_id"] = frame["class_id"] + 3
    rewrite(out / "other.geojson", frame)
    fails(out / "other.geojson", r"class_id \d is not a class of .*m\.tif", "--mask", out / "m.tif")


@pytest.mark.parametrize("value", [0.0, -2.4e13, float("nan")])
def test_areas_not_positive_or_missing(out, value):
    frame = layer(out / "m.gpkg")
    frame.loc[frame.index[-1], "area_m2"] = value
    rewrite(out / "m.gpkg", frame)
    fails(out / "m.gpkg", r"1 polygon\(s\) have no positive finite area_m2")


def shifted(frame, dx: float, dy: float):
    frame = frame.copy()
    frame["geometry"] = shapely.transform(frame.geometry.values, lambda xy: xy + [dx, dy])
    return frame


def test_polygons_shifted_by_part_of_a_pixel(out):
    frame = layer(out / "m.gpkg")
    with rasterio.open(SCENE) as ds:
        px = ds.transform.a
    rewrite(out / "m.gpkg", shifted(frame, px / 2, 0))
    fails(out / "m.gpkg", r"vertices are off the pixel corners .* median offset [+-]0\.500")
    wgs84 = layer(out / "other.geojson")  # shifted on the scene's grid, written in WGS 84
    moved = shifted(wgs84.to_crs(frame.crs), 0, px / 4).to_crs(wgs84.crs)
    rewrite(out / "other.geojson", moved)
    fails(out / "other.geojson", r"off the pixel corners of .*rgbn_suba\.tif")


def test_polygons_shifted_by_whole_pixels(out):
    frame = layer(out / "m.gpkg")
    with rasterio.open(SCENE) as ds:
        px = ds.transform.a
        width = ds.width
    rewrite(out / "m.gpkg", shifted(frame, -2 * px, 0))  # inside the extent or just past it
    fails(out / "m.gpkg", r"(do not match .*m\.tif|reach outside).*shifted")
    rewrite(out / "m.gpkg", shifted(frame, width * px, 0))  # another scene's place
    fails(out / "m.gpkg", r"polygons reach outside .*m\.tif")


def test_polygons_of_another_class_at_the_right_place(out):
    """On the grid and inside the extent, but the mask has another class there."""
    frame = layer(out / "m.gpkg")
    big = frame["area_m2"].astype(float).idxmax()
    frame.loc[big, "class_id"] = (int(frame.loc[big, "class_id"]) + 1) % 3
    frame.loc[big, "class_name"] = CLASSES[int(frame.loc[big, "class_id"])]
    rewrite(out / "m.gpkg", frame)
    fails(out / "m.gpkg", r"polygons do not match .*m\.tif .* pixels have another class")


# ---------------------------------------------------------------- reprojected, styled layers


def test_reprojected_layers_pass_and_a_relabelled_crs_fails(out):
    """GeoJSON (WGS 84) and --dst-crs layers are checked on the mask's grid; a layer whose
    CRS was changed without moving its coordinates is not."""
    r = check(out / "other.geojson", "--mask", out / "m.tif", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["reprojected_from"] == "EPSG:32618"
    r = drseg("vectorize", out / "m.tif", "-o", out / "merc.gpkg", "--dst-crs", "EPSG:3857")
    assert r.exit_code == 0, r.output
    r = check(out / "merc.gpkg", "--mask", out / "m.tif", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["crs"] == "EPSG:3857"
    relabelled = layer(out / "m.gpkg").set_crs("EPSG:32619", allow_override=True)
    rewrite(out / "m.gpkg", relabelled)
    fails(
        out / "m.gpkg", r"(vertices are off the pixel corners of|polygons reach outside) .*m\.tif"
    )


def test_segment_dst_crs_and_no_crs_geojson(tmp_path):
    """segment --dst-crs writes reprojected polygons that check accepts; a scene without CRS
    is refused as GeoJSON before any model runs, and --dst-crs needs polygons."""
    r = drseg("segment", SCENE, "-c", "water,land", "-o", tmp_path / "s.tif", "--vector",
              "--dst-crs", "EPSG:4326", "--model", "test-tiny", "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert pyogrio.read_info(tmp_path / "s.gpkg", layer="s")["crs"] == "EPSG:4326"
    assert check(tmp_path / "s.gpkg").exit_code == 0
    with rasterio.open(SCENE) as ds:
        profile, data = ds.profile, ds.read()
    profile.update(crs=None, transform=rasterio.Affine.identity())
    bare = tmp_path / "bare.tif"
    with rasterio.open(bare, "w", **profile) as ds:
        ds.write(data)
    for args, pattern in [
        (["-o", tmp_path / "b.geojson"], r"b\.geojson: the input has no CRS"),
        (["-o", tmp_path / "b.tif", "--dst-crs", "EPSG:4326"], r"--dst-crs reprojects polygons"),
    ]:
        r = drseg("segment", bare, "-c", "water,land", *args, "--allow-no-crs",
                  "--model", "no-such-model")  # fmt: skip
        assert r.exit_code == 2 and re.search(pattern, error_line(r)), r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.tif", "s.gpkg", "s.qml", "s.tif"]


def edit_vector_style(path: Path, fn) -> None:
    """Change the style QGIS would apply to ``path`` (its layer_styles row or .qml)."""
    if path.suffix == ".gpkg":
        root = ET.fromstring(gpkg_style(path))
        fn(root)
        with contextlib.closing(sqlite3.connect(path)) as con, con:
            con.execute("UPDATE layer_styles SET styleQML = ?", (ET.tostring(root, "unicode"),))
    else:
        tree = ET.parse(path.with_suffix(".qml"))
        fn(tree.getroot())
        tree.write(path.with_suffix(".qml"))


def test_vector_style_in_the_mask_colours(out):
    r = check(out / "m.gpkg", "--json")
    assert json.loads(r.stdout)["style"] == f"{out / 'm.gpkg'} (layer_styles)"
    with rasterio.open(out / "m.tif") as ds:
        water = "{},{},{},255".format(*ds.colormap(1)[0][:3])

    def recolour(root):
        for opt in root.iterfind(".//symbol[@name='0']//Option[@name='color']"):
            assert opt.get("value") == water  # the mask's colour, as written
            opt.set("value", "255,0,255,255")

    edit_vector_style(out / "m.gpkg", recolour)
    fails(out / "m.gpkg", r"style colour #ff00ff for class 0 \(water\) differs from the mask's")
    edit_vector_style(out / "other.geojson", recolour)
    fails(out / "other.geojson", r"other\.qml: style colour #ff00ff", "--mask", out / "m.tif")


def test_vector_style_missing_a_class_or_not_categorized(out):
    def drop(root):
        cats = root.find("renderer-v2/categories")
        cats.remove(cats.find("category[@value='1']"))

    edit_vector_style(out / "m.gpkg", drop)
    fails(out / "m.gpkg", r"style has class values \[0, 2\], the layer's classes are \[0, 1, 2\]")
    shutil.copy(out / "m.qml", out / "other.qml")  # the mask's paletted style
    fails(out / "other.geojson", r"other\.qml: not a QGIS categorized style on class_id")


def test_vector_style_missing(out):
    with contextlib.closing(sqlite3.connect(out / "m.gpkg")) as con, con:
        con.execute("DELETE FROM layer_styles")
    fails(out / "m.gpkg", r"no QGIS style for layer 'm' in its layer_styles table")
    (out / "other.qml").unlink()
    fails(out / "other.geojson", r"other\.qml: QGIS style missing")


# ------------------------------------------------------------------------ whole-world areas


def test_world_polygon_area_is_the_earth_and_a_zero_area_fails(tmp_path):
    """Issue 10: one class over world.rgb.tif (EPSG:4326) had area_m2 0; check said ok."""
    info = inspect_raster(DATA / "world.rgb.tif")
    mask = tmp_path / "w.tif"
    writer = ClassMaskWriter(mask, info, ["earth"], cog=False)
    writer.write_rows(0, np.zeros((info.height, info.width), np.uint8))
    writer.commit()
    r = drseg("vectorize", mask, "-o", tmp_path / "w.gpkg", "--json")
    assert r.exit_code == 0, r.output
    frame = layer(tmp_path / "w.gpkg")
    assert frame["area_m2"].tolist() == [pytest.approx(5.10066e14, rel=1e-6)]
    r = check(tmp_path / "w.gpkg", "--json", source=DATA / "world.rgb.tif")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["area_m2"] == pytest.approx(5.10066e14, rel=1e-6)
    frame["area_m2"] = 0.0  # what vectorize wrote before
    rewrite(tmp_path / "w.gpkg", frame)
    fails(tmp_path / "w.gpkg", r"no positive finite area_m2", source=DATA / "world.rgb.tif")


def test_mask_option_is_for_polygons_only():
    r = check(Path("x.tif"), "--mask", "y.tif")
    assert r.exit_code == 2 and "--mask is for checking polygons" in error_line(r)


@pytest.mark.parametrize("option", ["--input", "--mask"])
def test_check_refuses_a_plain_url_for_its_inputs(option, tmp_path):
    """check reads local files and object stores; an http(s) URL is one usage line naming
    the option (not taken for an output it cannot write)."""
    r = drseg("check", tmp_path / "m.gpkg", option, "https://example.com/scene.tif")
    assert r.exit_code == 2 and error_line(r).startswith(f"drseg: error: {option} https:/")
