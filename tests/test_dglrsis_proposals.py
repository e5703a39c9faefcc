"""``drseg segment --method dglrsis --proposals``: per-proposal polygons with class and score,
in map coordinates, one copy of an object seen by two overlapping tiles."""

from __future__ import annotations

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import torch
from scipy import ndimage
from typer.testing import CliRunner

from drseg_cli import cli
from drseg_cli.classes import parse_classes
from drseg_cli.errors import UsageError
from drseg_cli.model.dglrsis.proposals import layer_masks
from drseg_cli.model.factory import build_model
from drseg_cli.pipeline.runtime import TilePredictor
from drseg_cli.pipeline.segment import OutputPlan, SegmentConfig, segment_scene
from drseg_cli.raster.tiling import TileGrid
from tests.helpers import DATA, write_geotiff

cli._register()

#: 280×160 scene, 160 px tiles, overlap 40: tiles at x 0 and 120, cores split at x = 140.
SQUARES = {
    "A": 16,  # tile 0 only
    "B": 122,  # seen whole by both tiles; centroid x 138: tile 0's
    "C": 158,  # cut to a 2 px sliver by tile 0's edge; whole in tile 1 (centroid 174)
    "D": 230,  # tile 1 only
}
Y0, SIDE = 64, 32
SCORE = float(torch.sigmoid(torch.tensor(3.0)))  # softmax([0, 3]) of a pure proposal


def _scene(path):
    img = np.full((3, 160, 280), 128, np.uint8)
    for x in SQUARES.values():
        img[:, Y0 : Y0 + SIDE, x : x + SIDE] = np.array([230, 20, 20], np.uint8)[:, None, None]
    return write_geotiff(path, img)


def _red(image: torch.Tensor) -> torch.Tensor:
    return (image[0] > 0.8) & (image[2] < 0.3)


def _fake_propose(image: torch.Tensor) -> torch.Tensor:
    """Proposals: each red blob of the tile, and everything else as one proposal."""
    red = _red(image)
    labels, n = ndimage.label(red.numpy())
    masks = [torch.from_numpy(labels == i + 1) for i in range(n)]
    return torch.stack([*masks, ~red])


def _fake_logits(image, masks, text):
    """CLIP replaced: a proposal's 'ship' logit is 3 × its share of red pixels."""
    frac = (masks & _red(image)).flatten(1).sum(1) / masks.flatten(1).sum(1)
    return torch.stack([3 * (1 - frac), 3 * frac], 1)


@pytest.fixture(scope="module")
def tiny():
    """One test-tiny DGL-RSIS for the module (tests patch its proposer and CLIP scores)."""
    return build_model("test-tiny", method="dglrsis")


def _run(model, tmp_path, monkeypatch, proposals_name="p.gpkg", **config):
    src = _scene(tmp_path / "scene.tif")
    monkeypatch.setattr(model, "propose", _fake_propose)
    monkeypatch.setattr(model, "proposal_logits", _fake_logits)
    predictor = TilePredictor(model, [["background"], ["ship"]], torch.device("cpu"))
    predictor.max_batch = 1  # a batch of 2 runs as two model calls: proposals stay in order
    plan = OutputPlan.from_output(tmp_path / "m.tif", proposals=tmp_path / proposals_name)
    cfg = SegmentConfig(tile_size=160, overlap=0.25, batch_size=2, **config)
    result = segment_scene(
        src, plan, predictor, parse_classes("background,ship"), cfg,
        tile_multiple=16, default_tile_size=160,
    )  # fmt: skip
    assert result.tiles_run == 2
    return src, plan, result


def _square(transform, x):
    corners = [(x, Y0), (x + SIDE, Y0), (x + SIDE, Y0 + SIDE), (x, Y0 + SIDE)]
    return shapely.Polygon([transform * c for c in corners])


def test_proposals_layer_holds_the_planted_objects_once_in_map_coordinates(
    tiny, tmp_path, monkeypatch
):
    import geopandas as gpd

    src, plan, result = _run(tiny, tmp_path, monkeypatch)
    assert result.outputs["proposals"] == str(plan.proposals)
    layer = gpd.read_file(plan.proposals, layer="p")
    with rasterio.open(src) as ds:
        transform, crs = ds.transform, ds.crs
    assert layer.crs == crs
    assert list(layer.columns) == ["class_id", "class_name", "score", "area_m2", "geometry"]
    ships = layer[layer["class_name"] == "ship"]
    assert len(ships) == len(SQUARES)  # B (two tiles) and C (cut by a tile edge) once each
    for name, x in SQUARES.items():
        square = _square(transform, x)
        hits = ships[ships.geometry.intersects(square.buffer(-1))]
        assert len(hits) == 1, name
        assert hits.geometry.iloc[0].equals(square), name  # exact, through the window transform
    assert ships["class_id"].tolist() == [1] * 4
    assert np.allclose(ships["score"], SCORE)
    assert np.allclose(ships["area_m2"], SIDE * SIDE * 100, rtol=2e-3)  # 10 m pixels, UTM
    # the rest: one background proposal per tile, around the squares the tile kept or cut
    rest = layer[layer["class_name"] == "background"]
    assert len(rest) == 2 and np.allclose(rest["score"], SCORE)
    meta = pyogrio.read_info(plan.proposals, layer="p")["layer_metadata"]
    assert meta["DRSEG_PROPOSALS"] == "1"
    # the tile seam: each tile's background covers its own tile only
    tile0 = shapely.box(*(transform * (0, 160)), *(transform * (160, 0)))
    assert rest.geometry.iloc[0].difference(tile0).area == 0


def test_proposals_reprojected_geojson_and_nothing_left_on_failure(tiny, tmp_path, monkeypatch):
    import geopandas as gpd

    _, plan, _ = _run(tiny, tmp_path, monkeypatch, "p.geojson")
    layer = gpd.read_file(plan.proposals)
    assert layer.crs.to_epsg() == 4326 and len(layer) == 6  # GeoJSON: WGS 84 (RFC 7946)
    assert (tmp_path / "p.qml").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m.qml", "m.tif", "p.geojson", "p.qml", "scene.tif",
    ]  # fmt: skip


def test_proposals_refused_for_a_model_without_them(tmp_path):
    src = _scene(tmp_path / "scene.tif")
    model = build_model("test-tiny", method="clip")
    predictor = TilePredictor(model, [["background"], ["ship"]], torch.device("cpu"))
    plan = OutputPlan.from_output(tmp_path / "m.tif", proposals=tmp_path / "p.gpkg")
    with pytest.raises(UsageError, match="no mask proposals"):
        segment_scene(
            src, plan, predictor, parse_classes("background,ship"), SegmentConfig(tile_size=160),
            tile_multiple=16, default_tile_size=160,
        )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]


def test_cli_refuses_proposals_for_method_clip(tmp_path):
    src = DATA / "RGB.byte.tif"
    r = CliRunner().invoke(
        cli.app,
        ["segment", str(src), "-c", "water", "-m", "test-tiny", "--method", "clip",
         "-o", str(tmp_path / "m.tif"), "--proposals", str(tmp_path / "p.gpkg")],
    )  # fmt: skip
    assert r.exit_code == 2
    errors = [ln for ln in r.output.splitlines() if ln.startswith("drseg: error:")]
    assert len(errors) == 1 and "--method clip makes no mask proposals" in errors[0]
    assert not list(tmp_path.iterdir())


def test_cli_writes_proposals_of_real_superpixels(tmp_path):
    import geopandas as gpd

    src = DATA / "rgbn_suba.tif"  # 276×212: one 288 px tile
    out, props = tmp_path / "m.tif", tmp_path / "p.gpkg"
    args = ["segment", str(src), "-c", "water,building", "-m", "test-tiny", "--method",
            "dglrsis", "--dglrsis", "superpixels=12", "--device", "cpu", "--tile-size", "288",
            "-o", str(out), "--proposals", str(props), "--quiet"]  # fmt: skip
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    layer = gpd.read_file(props, layer="p")
    with rasterio.open(src) as ds:
        assert layer.crs == ds.crs
        bounds = shapely.box(*ds.bounds)
    assert len(layer) > 0 and set(layer["class_name"]) <= {"water", "building"}
    assert ((layer["score"] > 0.5) & (layer["score"] <= 1)).all()  # argmax of two classes
    assert (layer["area_m2"] > 0).all() and layer.geometry.within(bounds.buffer(1e-6)).all()
    r = CliRunner().invoke(cli.app, args)  # existing outputs stay without --overwrite
    assert r.exit_code != 0 and "exists" in r.output


def test_layer_masks_packs_a_hierarchy_by_level():
    fine = torch.zeros(4, 8, 8, dtype=torch.bool)
    for i in range(4):
        fine[i, :, 2 * i : 2 * i + 2] = True
    coarse = torch.stack([fine[:2].any(0), fine[2:].any(0)])
    masks = torch.cat([fine, coarse, coarse.any(0, keepdim=True)])
    layers = layer_masks(masks)
    assert layers.shape == (3, 8, 8) and layers.dtype == torch.int32
    for i, m in enumerate(masks):  # every mask is exactly one layer's label i + 1
        found = [bool(((layer == i + 1) == m).all()) for layer in layers]
        assert sum(found) == 1


GRIDS = [(280, 160, 160, 0.25), (1000, 700, 224, 0.5), (100, 90, 224, 0.25), (513, 300, 128, 0.0)]


@pytest.mark.parametrize("width,height,size,overlap", GRIDS)
def test_tile_cores_partition_the_scene(width, height, size, overlap):
    grid = TileGrid.from_fraction(width, height, size, overlap)
    owners = np.zeros((height, width), int)
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    for tile in grid:
        x0, y0, x1, y1 = grid.core(tile)
        assert tile.x0 <= x0 and x1 <= tile.x0 + tile.width  # inside the tile
        owners += (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    assert (owners == 1).all()


def test_api_returns_the_proposals(tmp_path):
    import drseg_cli

    src = _scene(tmp_path / "scene.tif")
    out = drseg_cli.segment(
        src, "background,ship", model="test-tiny", method="dglrsis", device="cpu",
        dglrsis="superpixels=8", tile_size=288, proposals=True, quiet=True,
    )  # fmt: skip
    assert out.mask.shape == (160, 280)
    assert len(out.proposals) > 0 and out.proposals.crs.to_epsg() == 32633
    assert set(out.proposals.columns) >= {"class_name", "score", "area_m2"}
    with pytest.raises(UsageError, match="no mask proposals"):
        drseg_cli.segment(src, "ship", model="test-tiny", method="clip", proposals=True)


def test_proposals_are_kept_only_when_asked(tiny):
    assert tiny.has_proposals and not tiny._keep
    text = torch.nn.functional.normalize(torch.randn(2, tiny.clip.embed_dim), dim=-1)
    with torch.inference_mode():
        tiny(torch.rand(2, 3, 32, 32), text)
        assert tiny.last_proposals() == []
        tiny.keep_proposals(True)
        try:
            tiny(torch.rand(2, 3, 32, 32), text)
            got = tiny.last_proposals()
        finally:
            tiny.keep_proposals(False)
    assert len(got) == 2 and tiny.last_proposals() == []  # handed over once
    for p in got:
        assert p.layers.shape[1:] == (32, 32) and (p.layers > 0).any(0).all()
        assert len(p.classes) == len(p.scores) == p.layers.max()
        assert ((p.scores >= 0.5) & (p.scores <= 1)).all()


def test_cli_refuses_proposals_file_names_for_batches_and_clashing_files(tmp_path):
    src = DATA / "RGB.byte.tif"
    base = ["segment", "-c", "water", "-m", "test-tiny", "--method", "dglrsis"]
    cases = [
        ([str(src), str(DATA / "rgbn_suba.tif"), "-o", str(tmp_path / "out/")], "give a format"),
        ([str(src), "-o", str(tmp_path / "m.gpkg")], "share this file"),
        ([str(src), "-o", str(tmp_path / "m.tif")], "unknown vector format .tif"),
    ]
    props = [tmp_path / "p.gpkg", tmp_path / "m.gpkg", tmp_path / "p.tif"]
    for (args, why), p in zip(cases, props, strict=True):
        r = CliRunner().invoke(cli.app, [*base, *args, "--proposals", str(p)])
        assert r.exit_code == 2 and why in r.output, r.output
    assert not list(tmp_path.iterdir())


def test_proposals_are_cut_to_the_area_of_interest(tiny, tmp_path, monkeypatch):
    import geopandas as gpd

    # pixels x < 140 (map x < 501400): A whole, B cut at its 18th column, C and D outside
    aoi = (
        "POLYGON ((500000 4598400, 501400 4598400, 501400 4600000, 500000 4600000, 500000 4598400))"
    )
    _, plan, _ = _run(tiny, tmp_path, monkeypatch, aoi=aoi)
    layer = gpd.read_file(plan.proposals, layer="p")
    ships = layer[layer["class_name"] == "ship"]
    with rasterio.open(tmp_path / "scene.tif") as ds:
        transform = ds.transform
    assert len(ships) == 2
    assert ships.geometry.iloc[0].equals(_square(transform, SQUARES["A"]))
    cut = shapely.box(*(transform * (122, Y0 + SIDE)), *(transform * (140, Y0)))
    assert ships.geometry.iloc[1].equals(cut)
    assert pyogrio.read_info(plan.proposals, layer="p")["layer_metadata"]["DRSEG_CLIPPED"] == "aoi"


def test_batch_writes_each_scenes_proposals_and_resume_checks_them(tmp_path):
    """``--proposals gpkg`` with several inputs: OUTDIR/<scene>_proposals.gpkg per scene,
    recorded in the manifest; --resume skips them while intact and redoes a scene whose
    proposals went missing."""
    import json

    scenes = tmp_path / "scenes"
    scenes.mkdir()
    data = rasterio.open(DATA / "rgbn_suba.tif").read()
    for name, flip in (("a", False), ("b", True)):
        write_geotiff(scenes / f"{name}.tif", data[:3, :, ::-1] if flip else data[:3])
    out = tmp_path / "out"
    args = ["segment", str(scenes), "-c", "water,building", "-m", "test-tiny", "--method",
            "dglrsis", "--dglrsis", "superpixels=12", "--device", "cpu", "--tile-size", "288",
            "-o", f"{out}/", "--proposals", "gpkg", "--json"]  # fmt: skip
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "drseg_manifest.json").read_text())
    for name in ("a", "b"):
        props = out / f"{name}_proposals.gpkg"
        layer = pyogrio.read_dataframe(props, layer=f"{name}_proposals")
        assert len(layer) > 0 and set(layer["class_name"]) <= {"water", "building"}
        record = next(r for r in manifest["scenes"] if r["input"].endswith(f"{name}.tif"))
        assert record["outputs"]["proposals"] == str(props) and "proposals" in record["checksums"]
    r = CliRunner().invoke(cli.app, [*args, "--resume"])
    assert r.exit_code == 0 and json.loads(r.stdout)["skipped"] == 2, r.output
    (out / "b_proposals.gpkg").unlink()
    r = CliRunner().invoke(cli.app, [*args, "--resume"])
    summary = json.loads(r.stdout)
    assert r.exit_code == 0 and summary["skipped"] == 1, r.output
    assert summary["redone_changed_outputs"] == 1 and (out / "b_proposals.gpkg").is_file()
