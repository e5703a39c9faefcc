"""``drseg refer`` end to end: tiny random RSRefSeg 2 on a real GeoTIFF, planted targets on a
multi-window scene (ranking, seam merging, map coordinates), several expressions, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from typer.testing import CliRunner

from tests.helpers import DATA, write_geotiff

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
gpd = pytest.importorskip("geopandas")
shapely = pytest.importorskip("shapely")

from drseg_cli import cli  # noqa: E402
from drseg_cli.cli import app  # noqa: E402
from drseg_cli.model.base import ReferOutput  # noqa: E402
from drseg_cli.model.rsrefseg2 import RSRefSeg2Model  # noqa: E402

cli._register()
runner = CliRunner()
TINY = ["--method", "rsrefseg2", "-m", "test-tiny", "--batch-size", "16"]


def _run(*args: str):
    return runner.invoke(app, ["refer", *args])


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend on a shared machine
    yield
    torch.set_num_threads(n)


def test_end_to_end_real_geotiff_keeps_georeferencing(tmp_path):
    src = DATA / "RGB.byte.tif"
    tif, gpkg = tmp_path / "out.tif", tmp_path / "out.gpkg"
    res = _run(
        str(src), "the white building", *TINY, "-o", str(tif), "-o", str(gpkg), "--top-k", "3",
        "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["windows_total"] == 64  # 791×718: 8 × 8 windows of 128 px, stride 96
    assert 0 < len(summary["objects"]) <= 3
    with rasterio.open(src) as a, rasterio.open(tif) as b:
        assert b.crs == a.crs and b.transform == a.transform and b.shape == a.shape
        assert b.profile["dtype"] == "uint8" and b.nodata == 255
        mask = b.read(1)
        # RGB.byte's collar (nodata 0) stays nodata; objects are class 1.
        valid = a.dataset_mask() > 0
        assert (mask[~valid] == 255).all() and set(np.unique(mask[valid])) <= {0, 1}
        assert b.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    frame = gpd.read_file(gpkg)
    assert frame.crs == rasterio.open(src).crs
    assert list(frame.columns[:4]) == ["class_id", "expression", "score", "area_m2"]
    assert len(frame) == len(summary["objects"])
    assert (frame["expression"] == "the white building").all()
    # Each polygon covers its object's mask pixels (UTM scale ≈ 0.9996: geodesic ≈ grid area).
    px = np.array([o["pixels"] for o in summary["objects"]])
    with rasterio.open(src) as a:
        cell = abs(a.res[0] * a.res[1])
    np.testing.assert_allclose(
        sorted(frame["area_m2"]), sorted(px * cell), rtol=3e-3
    )  # geodesic vs grid
    assert (mask == 1).sum() == px.sum()
    # QGIS loads the layer in the mask's colours (the GeoPackage's layer_styles table).
    import sqlite3

    with sqlite3.connect(gpkg) as con:
        (qml,) = con.execute(
            "SELECT styleQML FROM layer_styles WHERE f_table_name='out'"
        ).fetchone()
    with rasterio.open(tif) as b:
        r, g, bl, _ = b.colormap(1)[1]
    assert "categorizedSymbol" in qml and "the white building" in qml
    assert f"{r},{g},{bl}" in qml


# ------------------------------------------------------------------ planted targets


ORIGIN = (600000.0, 4200000.0)
RES = 2.0
TARGET = (40, 71, 60, 181)  # rows [40, 71), cols [60, 181): cut by the seam at col 128
DISTRACTOR = (300, 341, 400, 441)  # grey, far from the target, also across windows


def _planted_scene(path):
    data = np.full((3, 400, 520), 40, np.uint8)
    r0, r1, c0, c1 = TARGET
    data[:, r0:r1, c0:c1] = 255
    r0, r1, c0, c1 = DISTRACTOR
    data[:, r0:r1, c0:c1] = 150
    transform = from_origin(*ORIGIN, RES, RES)
    return write_geotiff(path, data, transform=transform)


def _box(rect):
    r0, r1, c0, c1 = rect
    x0, y0 = ORIGIN
    return shapely.box(x0 + c0 * RES, y0 - r1 * RES, x0 + c1 * RES, y0 - r0 * RES)


def _planted_forward(self, images, encoded):
    """Window score = its brightest pixel; mask = every bright-ish pixel (target AND
    distractor), at full window resolution. Only the ranking can tell them apart."""
    grey = images.mean(1)  # [B, H, W]
    e = len(encoded.expressions)
    scores = grey.flatten(1).max(1).values[:, None].expand(-1, e)
    logits = torch.where(grey > 0.5, 10.0, -10.0)[:, None].expand(-1, e, -1, -1)
    return ReferOutput(scores.clone(), logits.clone())


def test_planted_target_is_the_only_output_and_merged_across_seams(tmp_path, monkeypatch):
    monkeypatch.setattr(RSRefSeg2Model, "forward", _planted_forward)
    scene = _planted_scene(tmp_path / "scene.tif")
    tif, gpkg = tmp_path / "t.tif", tmp_path / "t.gpkg"
    res = _run(str(scene), "the white roof", *TINY, "-o", str(tif), "-o", str(gpkg), "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["windows_total"] == 24  # 6 columns × 4 rows of 128 px windows
    [obj] = summary["objects"]
    assert obj["score"] == pytest.approx(1.0)
    assert len(obj["windows"]) >= 2  # one object made of masks from several windows
    frame = gpd.read_file(gpkg)
    assert len(frame) == 1
    geom = frame.geometry.iloc[0]
    assert geom.geom_type == "Polygon"
    assert geom.symmetric_difference(_box(TARGET)).area == pytest.approx(0.0, abs=1e-6)
    assert frame["area_m2"].iloc[0] == pytest.approx(31 * 121 * RES * RES, rel=2e-3)  # geodesic
    with rasterio.open(tif) as ds:
        mask = ds.read(1)
    expected = np.zeros_like(mask)
    r0, r1, c0, c1 = TARGET
    expected[r0:r1, c0:c1] = 1
    np.testing.assert_array_equal(mask, expected)

    # --top-k 2: the distractor comes second, itself merged across its windows.
    res = _run(
        str(scene), "the white roof", *TINY, "-o", str(gpkg), "--top-k", "2", "--overwrite",
        "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    scores = [o["score"] for o in json.loads(res.stdout)["objects"]]
    assert scores == pytest.approx([1.0, 150 / 255], abs=1e-3)
    frame = gpd.read_file(gpkg)
    assert frame.geometry.iloc[1].symmetric_difference(_box(DISTRACTOR)).area == pytest.approx(0)

    # --min-score above the distractor's windows: back to the target alone.
    res = _run(
        str(scene), "the white roof", *TINY, "-o", str(gpkg), "--top-k", "2", "--min-score",
        "0.8", "--overwrite", "--json",
    )  # fmt: skip
    assert [o["score"] for o in json.loads(res.stdout)["objects"]] == pytest.approx([1.0])


def _per_expression_forward(self, images, encoded):
    """Expression 0 is the white target, expression 1 the grey one."""
    grey = images.mean(1)
    levels = torch.tensor([1.0, 150 / 255])[: len(encoded.expressions)]
    hit = (grey[:, None] - levels[None, :, None, None]).abs() < 0.02
    scores = torch.where(hit.flatten(2).any(-1), 0.9, 0.1)
    return ReferOutput(scores, torch.where(hit, 10.0, -10.0))


def test_expressions_file_gives_one_class_and_layer_rows_each(tmp_path, monkeypatch):
    monkeypatch.setattr(RSRefSeg2Model, "forward", _per_expression_forward)
    scene = _planted_scene(tmp_path / "scene.tif")
    exprs = tmp_path / "exprs.txt"
    exprs.write_text("# what to find\nthe white roof\n\nthe grey roof\n", encoding="utf-8")
    tif, gj = tmp_path / "m.tif", tmp_path / "m.geojson"
    res = _run(str(scene), "--expressions", str(exprs), *TINY, "-o", str(tif), "-o", str(gj))
    assert res.exit_code == 0, res.output
    with rasterio.open(tif) as ds:
        mask = ds.read(1)
    for value, rect in ((1, TARGET), (2, DISTRACTOR)):
        r0, r1, c0, c1 = rect
        assert (mask[r0:r1, c0:c1] == value).all()
        assert (mask == value).sum() == (r1 - r0) * (c1 - c0)
    frame = gpd.read_file(gj)
    assert sorted(frame["expression"]) == ["the grey roof", "the white roof"]


# ------------------------------------------------------------------ errors


def test_errors_are_one_line_and_leave_nothing(tmp_path):
    src = str(DATA / "RGB.byte.tif")
    out = tmp_path / "x.tif"
    res = _run(src, *TINY)
    assert res.exit_code == 2  # -o is required
    res = _run(src, *TINY, "-o", str(out))
    assert res.exit_code == 2 and "give an expression" in res.output
    res = _run(src, "a", *TINY, "--method", "nope", "-o", str(out))
    assert res.exit_code == 2 and "unknown referring method 'nope'" in res.output
    res = _run(src, "a", *TINY, "-o", str(tmp_path / "x.shp"))
    assert res.exit_code == 2 and ".gpkg, .geojson or .parquet" in res.output
    res = _run(src, *TINY, "--expressions", str(tmp_path / "none.txt"), "-o", str(out))
    assert res.exit_code == 1 and "none.txt: file not found" in res.output
    res = _run(str(tmp_path / "missing.tif"), "a", *TINY, "-o", str(out))
    assert res.exit_code == 1 and "file not found" in res.output
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"old")
    res = _run(src, "a", *TINY, "-o", str(out))
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert out.read_bytes() == b"old"
    res = _run(src, "a", "-o", str(tmp_path / "y.tif"))  # default variant: no weights here
    assert res.exit_code == 1 and "needs trained weights" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tif"]
