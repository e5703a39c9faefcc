"""Areas of interest (``--aoi``): only the tiles that reach it run, pixels outside are nodata
in every raster, polygons are cut to it, any CRS is reprojected, and bad AOIs fail in one line.
"""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.features
import shapely
import torch
from affine import Affine
from pyproj import Transformer
from typer.testing import CliRunner

from drseg_cli import cli
from drseg_cli.classes import parse_classes
from drseg_cli.errors import InputError, UsageError
from drseg_cli.pipeline.runtime import TilePredictor
from drseg_cli.pipeline.segment import OutputPlan, SegmentConfig, segment_scene
from drseg_cli.pipeline.verify import verify_outputs
from drseg_cli.raster.aoi import AreaOfInterest, read_aoi
from drseg_cli.raster.mask_meta import MASK_NODATA
from tests.helpers import ContextModel, error_line, write_geotiff

cli._register()
CLASSES = parse_classes("water,tree,building")
TRANSFORM = Affine(10, 0, 500000, 0, -10, 4600000)  # 10 m UTM 33N (write_geotiff's grid)
SIZE = 160  # 64 px tiles, overlap 16: offsets 0, 48, 96 → 3 × 3 tiles


def drseg(*args):
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture
def scene(tmp_path):
    rng = np.random.default_rng(3)
    base = rng.integers(0, 255, (3, 20, 20)).astype(np.uint8)
    return write_geotiff(tmp_path / "scene.tif", np.kron(base, np.ones((1, 8, 8), np.uint8)))


def map_box(col0, row0, col1, row1) -> shapely.Polygon:
    """The map-coordinate box of pixel columns [col0, col1) and rows [row0, row1)."""
    x0, y0 = TRANSFORM * (col0, row0)
    x1, y1 = TRANSFORM * (col1, row1)
    return shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def run(path, out, aoi=None, aoi_crs=None, vector=False):
    """Segment with a context model, counting the tiles the model sees."""
    plan = OutputPlan(
        out / "mask.tif",
        vector=out / "mask.gpkg" if vector else None,
        probs=out / "probs.tif",
        uncertainty=out / "unc.tif",
    )
    out.mkdir(exist_ok=True)
    predictor = TilePredictor(
        ContextModel(), [c.prompt_names for c in CLASSES], torch.device("cpu")
    )
    seen = []
    predict = predictor.predict_tensor

    def counting(tiles, out_size=None, **kw):
        seen.append(len(tiles))
        return predict(tiles, out_size, **kw)

    predictor.predict_tensor = counting
    cfg = SegmentConfig(tile_size=64, overlap=0.25, batch_size=1, aoi=aoi, aoi_crs=aoi_crs)
    result = segment_scene(
        path, plan, predictor, CLASSES, cfg, tile_multiple=16, default_tile_size=64
    )
    with (
        rasterio.open(plan.mask) as m,
        rasterio.open(plan.probs) as p,
        rasterio.open(plan.uncertainty) as u,
    ):
        arrays = m.read(1), p.read(), u.read(1), p.nodata
    return result, sum(seen), arrays, plan


def test_aoi_runs_only_its_tiles_and_outside_is_nodata_everywhere(scene, tmp_path):
    full, full_calls, (mask0, probs0, unc0, _), _ = run(scene, tmp_path / "full")
    # pixel columns 10..60, rows 10..30: tiles at x 0 and 48, row 0 → 2 of 9
    aoi = map_box(10, 10, 60, 30).wkt
    cut, calls, (mask, probs, unc, probs_nodata), _ = run(scene, tmp_path / "cut", aoi)
    assert (full.tiles_total, full_calls, full.tiles_outside_aoi) == (9, 9, 0)
    assert (cut.tiles_total, cut.tiles_outside_aoi, cut.tiles_run, calls) == (9, 7, 2, 2)

    inside = np.zeros(mask.shape, bool)
    inside[10:30, 10:60] = True
    assert (mask[~inside] == MASK_NODATA).all() and (mask[inside] != MASK_NODATA).all()
    assert (probs[:, ~inside] == probs_nodata).all()
    assert np.isnan(unc[~inside]).all()
    # every tile that covers an AOI pixel ran in both runs: the AOI pixels are the full run's
    np.testing.assert_array_equal(mask[inside], mask0[inside])
    np.testing.assert_array_equal(probs[:, inside], probs0[:, inside])
    np.testing.assert_array_equal(unc[inside], unc0[inside])


def test_aoi_is_rasterised_per_tile_window(scene, tmp_path, monkeypatch):
    """Memory stays bounded: the AOI mask is made one tile window at a time, never the scene."""
    shapes = []
    original = AreaOfInterest.window_mask

    def record(self, x0, y0, width, height):
        shapes.append((height, width))
        return original(self, x0, y0, width, height)

    monkeypatch.setattr(AreaOfInterest, "window_mask", record)
    run(scene, tmp_path / "cut", map_box(0, 0, 90, 90).wkt)
    assert len(shapes) == 4 and max(max(s) for s in shapes) <= 64


def test_aoi_in_wgs84_lands_on_the_utm_pixels(scene, tmp_path):
    """A lon/lat polygon (its corners are the UTM rectangle's) selects that rectangle."""
    to_lonlat = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    rect = map_box(20, 30, 70, 110)
    lonlat = shapely.transform(rect, lambda xy: np.column_stack(to_lonlat.transform(*xy.T)))
    _, _, (mask, *_), _ = run(scene, tmp_path / "ll", lonlat.wkt, "EPSG:4326")
    expect = np.zeros(mask.shape, bool)
    expect[30:110, 20:70] = True
    np.testing.assert_array_equal(mask != MASK_NODATA, expect)
    # the same AOI as a GeoPackage in EPSG:4326 (the file's own CRS, no --aoi-crs)
    gpkg = tmp_path / "aoi.gpkg"
    gpd.GeoDataFrame(geometry=[lonlat], crs="EPSG:4326").to_file(gpkg)
    _, _, (mask2, *_), _ = run(scene, tmp_path / "file", str(gpkg))
    np.testing.assert_array_equal(mask2, mask)


def test_polygons_are_cut_to_the_aoi_and_still_check(scene, tmp_path):
    """A triangle: pixels whose centre is inside are kept, polygons end on its edges."""
    a, b, c = TRANSFORM * (8, 8), TRANSFORM * (150, 20), TRANSFORM * (40, 140)
    tri = shapely.Polygon([a, b, c])
    result, _, (mask, *_), plan = run(scene, tmp_path / "tri", tri.wkt, vector=True)
    centres = rasterio.features.geometry_mask([tri], mask.shape, TRANSFORM, invert=True)
    np.testing.assert_array_equal(mask != MASK_NODATA, centres)
    polys = gpd.read_file(plan.vector, layer="mask")
    union = shapely.union_all(polys.geometry.values)
    assert shapely.difference(union, tri).area < 1e-6 * tri.area  # nothing outside
    rows, cols = np.nonzero(centres)
    staircase = shapely.union_all(
        [map_box(x, y, x + 1, y + 1) for y, x in zip(rows.tolist(), cols.tolist(), strict=True)]
    )
    assert shapely.difference(staircase, tri).area > 100  # the pixels alone would overhang
    assert abs(union.area - shapely.intersection(staircase, tri).area) < 1e-3
    assert polys["area_m2"].sum() == pytest.approx(union.area, rel=1e-3)
    assert result.tiles_outside_aoi == 1  # the bottom-right tile lies beyond the long edge
    verify_outputs(scene, plan, [c.name for c in CLASSES])
    r = drseg("check", plan.vector, "-i", scene)  # the layer says it is cut to an AOI
    assert r.exit_code == 0, r.output


def test_info_reports_the_aoi_tile_count(scene):
    args = ["info", scene, "-m", "test-tiny", "--tile-size", "64", "--overlap", "0.25", "--json"]
    r = drseg(*args, "--aoi", map_box(10, 10, 60, 30).wkt)
    assert r.exit_code == 0, r.output
    facts = json.loads(r.stdout)
    assert (facts["tiles"], facts["aoi_tiles"]) == (9, 2)
    bounds = ",".join(str(v) for v in map_box(100, 100, 150, 150).bounds)
    facts = json.loads(drseg(*args, "--aoi", bounds).stdout)
    assert facts["aoi_tiles"] == 4  # tiles at 48 and 96 both reach pixel 100, in x and y
    assert "aoi_tiles" not in json.loads(drseg(*args).stdout)


def test_segment_cli_and_api_with_a_bbox_aoi(scene, tmp_path):
    from drseg_cli import segment

    bounds = ",".join(str(v) for v in map_box(0, 0, 40, 40).bounds)
    out = tmp_path / "m.tif"
    r = drseg(
        "segment", scene, "-c", "water,land", "-o", out, "--model", "test-tiny", "--device",
        "cpu", "--tile-size", "64", "--aoi", bounds, "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    tiles = json.loads(r.stdout)["tiles"]
    assert tiles == {"total": 9, "run": 1, "skipped_nodata": 0, "outside_aoi": 8}
    with rasterio.open(out) as m:
        cli_mask = m.read(1)
    got = segment(scene, "water,land", model="test-tiny", device="cpu", tile_size=64, aoi=bounds)
    np.testing.assert_array_equal(got.mask, cli_mask)
    assert (got.mask[40:, :] == MASK_NODATA).all() and (got.mask[:40, :40] != MASK_NODATA).all()


@pytest.mark.parametrize(
    ("aoi", "code", "message"),
    [
        ("1,2,3,4", 2, "does not overlap"),
        ("POLYGON((0 0, 1 1", 2, "not valid WKT"),
        ("LINESTRING(500000 4599000, 500500 4599500)", 2, "no polygon"),
        ("5,5,1,1", 2, "minx < maxx"),
        ("missing.gpkg", 1, "missing.gpkg: no such file"),
        ("BROKEN", 1, "unreadable"),
    ],
)
def test_bad_aoi_is_one_error_line_naming_it(scene, tmp_path, aoi, code, message):
    if aoi == "BROKEN":
        aoi = tmp_path / "broken.geojson"
        aoi.write_text("{not json")
    out = tmp_path / "m.tif"
    r = drseg("segment", scene, "-c", "a,b", "-o", out, "--model", "test-tiny", "--aoi", aoi)
    assert r.exit_code == code, r.output
    line = error_line(r)
    assert line.startswith(f"drseg: error: --aoi {str(aoi)[:20]}") and message in line, line
    assert not list(tmp_path.glob("m*"))
    r = drseg("info", scene, "--aoi", aoi)
    assert r.exit_code == code and message in error_line(r)


def test_aoi_crs_rules():
    with pytest.raises(UsageError, match="--aoi-crs EPSG:99999: not a CRS"):
        read_aoi("0,0,1,1", "EPSG:99999")
    geom, crs = read_aoi("0,0,1,1", "EPSG:4326")
    assert crs.to_epsg() == 4326 and geom.area == 1
    with pytest.raises(InputError, match="no such file"):
        read_aoi("aoi/shape.shp")


def test_resume_accepts_clipped_polygons_in_a_format_without_metadata(scene, tmp_path):
    """GeoJSON records no layer metadata: --resume knows from the run that it is clipped.
    The WKT is longer than a file name may be (it must not be taken for one)."""
    tri = shapely.Polygon([TRANSFORM * (8, 8), TRANSFORM * (150, 20), TRANSFORM * (40, 140)])
    tri = shapely.segmentize(tri, 100.0)
    assert len(tri.wkt) > 300
    args = [
        "segment", scene, "-c", "water,land", "-o", tmp_path / "out/", "--format", "geojson",
        "--model", "test-tiny", "--device", "cpu", "--tile-size", "64", "--aoi", tri.wkt,
        "--dst-crs", "EPSG:32633", "--json",
    ]  # fmt: skip
    first = drseg(*args)
    assert first.exit_code == 0 and json.loads(first.stdout)["done"] == 1, first.output
    again = drseg(*args, "--resume")
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert (summary["skipped"], summary["done"]) == (1, 0), summary


@pytest.mark.parametrize("fmt", ["geojson", "shp"])
def test_check_alone_accepts_a_clipped_layer_without_metadata_but_not_a_shifted_one(
    scene, tmp_path, fmt
):
    """GeoJSON and shapefiles cannot record DRSEG_CLIPPED: ``drseg check`` alone takes
    vertices off the pixel corners as cuts by an AOI when most are on them; the same layer
    shifted by 0.3 px (every vertex off, by one offset) still fails."""
    tri = shapely.Polygon([TRANSFORM * (8, 8), TRANSFORM * (150, 20), TRANSFORM * (40, 140)])
    out = tmp_path / f"cut.{fmt}"
    args = ["segment", scene, "-c", "water,land", "-o", out, "--model", "test-tiny", "--device",
            "cpu", "--tile-size", "64", "--aoi", tri.wkt, "--dst-crs", "EPSG:32633"]  # fmt: skip
    assert drseg(*args).exit_code == 0
    r = drseg("check", out, "--input", scene)
    assert r.exit_code == 0, r.output
    layer = gpd.read_file(out)
    layer.geometry = layer.geometry.translate(0.3 * TRANSFORM.a, 0.0)
    shifted = tmp_path / f"shifted.{fmt}"
    layer.to_file(shifted)
    (tmp_path / "shifted.qml").write_bytes((tmp_path / "cut.qml").read_bytes())
    r = drseg("check", shifted, "--input", scene)
    assert r.exit_code == 1 and "shifted" in error_line(r), r.output
