"""raster/vectorize.py and ``drseg vectorize``: polygons, areas, scores, seams, formats, atomicity.

Masks are made here with rasterio; real georeferencing comes from rasters in tests/data
(provenance in tests/data/PROVENANCE.md). Expected values are computed independently of the
implementation (scipy labelling, pyproj Geod on hand-made rings, numpy means).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sqlite3
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pyogrio
import pyproj
import pytest
import rasterio
import shapely
import typer
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_origin
from scipy import ndimage
from typer.testing import CliRunner

from drseg_cli.atomic import TMP_MARKER
from drseg_cli.commands import vectorize as vectorize_cmd
from drseg_cli.errors import InputError, UsageError
from drseg_cli.raster import vectorize as vec
from drseg_cli.raster.mask_meta import class_names_tag
from drseg_cli.raster.vectorize import vectorize_array, vectorize_mask
from drseg_cli.raster.writers import class_colors, known_color

DATA = Path(__file__).parent / "data"
WGS84 = pyproj.Geod(ellps="WGS84")
FORMATS = [".gpkg", ".shp", ".geojson", ".parquet"]
STYLES = "layer_styles"


def _open(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path)


def georef(name: str) -> tuple[object, object, int, int]:
    """CRS, transform and size of a real test raster."""
    with _open(DATA / name) as ds:
        return ds.crs, ds.transform, ds.width, ds.height


def write_mask(
    path: Path,
    mask: np.ndarray,
    *,
    crs="EPSG:32633",
    transform=None,
    names: list[str] | None = None,
    nodata: int | None = 255,
) -> Path:
    """A drseg-style class mask: uint8, 255 nodata, class names in the tags."""
    profile = dict(
        driver="GTiff",
        width=mask.shape[1],
        height=mask.shape[0],
        count=1,
        dtype="uint8",
        crs=crs,
        transform=transform or from_origin(500000, 4600000, 10, 10),
        nodata=nodata,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as ds:
            ds.write(mask.astype(np.uint8), 1)
            if names is not None:
                ds.update_tags(**class_names_tag(names))
    return path


def write_float(path: Path, data: np.ndarray, like: Path, nodata=float("nan")) -> Path:
    with _open(like) as m:
        profile = dict(
            driver="GTiff", width=m.width, height=m.height, crs=m.crs, transform=m.transform
        )
    data = data if data.ndim == 3 else data[None]
    profile.update(count=data.shape[0], dtype=data.dtype, nodata=nodata)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return path


def read_layer(path: Path):
    import geopandas as gpd

    if path.suffix == ".parquet":
        return gpd.read_parquet(path)
    return gpd.read_file(path, engine="pyogrio", layer=0)  # a GeoPackage's polygons


def geod_ring_area(xs, ys, crs) -> float:
    """Independent geodesic area of one ring given in ``crs`` map coordinates."""
    to_ll = pyproj.Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    lon, lat = to_ll.transform(np.asarray(xs, float), np.asarray(ys, float))
    return abs(WGS84.polygon_area_perimeter(lon, lat)[0])


def blocky_mask(seed: int, shape=(60, 50), classes=4, cell=3, nodata_frac=0.08) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, classes, (shape[0] // cell + 1, shape[1] // cell + 1))
    mask = np.kron(coarse, np.ones((cell, cell), np.int64))[: shape[0], : shape[1]]
    mask = mask.astype(np.uint8)
    mask[rng.random(shape) < nodata_frac] = 255  # speckle: single-pixel holes and islands
    return mask


def region_key(frame) -> list[tuple[int, bytes]]:
    geoms = shapely.normalize(np.asarray(frame.geometry.values))
    return sorted(zip(frame["class_id"].tolist(), shapely.to_wkb(geoms), strict=True))


def no_temps(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if TMP_MARKER in p.name]


# ------------------------------------------------------------------------- geometry, areas


@pytest.mark.parametrize("easting", [320000.0, 500000.0])
def test_utm_squares_exact_counts_names_and_geodesic_area(tmp_path, easting):
    mask = np.full((40, 30), 255, np.uint8)
    mask[2:5, 3:6] = 0  # 9 pixels
    mask[10:20, 10:15] = 1  # 50 pixels
    mask[30:32, 20:28] = 0  # 16 pixels, second region of class 0
    transform = from_origin(easting, 4600000, 10, 10)
    out = tmp_path / "squares.gpkg"
    path = write_mask(tmp_path / "m.tif", mask, transform=transform, names=["road", "building"])
    summary = vectorize_mask(path, out)

    df = read_layer(out).sort_values("area_m2").reset_index(drop=True)
    assert summary.n_polygons == 3 and summary.class_counts == {"road": 2, "building": 1}
    assert df["class_id"].tolist() == [0, 0, 1]
    assert df["class_name"].tolist() == ["road", "road", "building"]
    proj = pyproj.Proj("EPSG:32633")
    to_ll = pyproj.Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    for n, (_, row) in zip([9, 16, 50], df.iterrows(), strict=True):
        x0, y0, x1, y1 = row.geometry.bounds
        assert row.geometry.area == pytest.approx(n * 100.0, rel=1e-12)  # planar: n·100 m²
        ring = ([x0, x1, x1, x0], [y0, y0, y1, y1])
        assert row["area_m2"] == pytest.approx(geod_ring_area(*ring, "EPSG:32633"), rel=1e-9)
        # True ground area = map area / areal scale: ≈ n·100 m² where k ≈ 1 (E 320 km),
        # 0.08 % more on the central meridian (k0 = 0.9996).
        scale = proj.get_factors(*to_ll.transform((x0 + x1) / 2, (y0 + y1) / 2)).areal_scale
        assert row["area_m2"] == pytest.approx(n * 100.0 / scale, rel=1e-6)
    assert np.isnan(df["mean_score"]).all()


def test_holes_are_kept_and_nodata_never_vectorised():
    mask = np.full((12, 12), 0, np.uint8)
    mask[0, :] = 255  # nodata row: not a polygon, not part of a class
    mask[3:6, 3:6] = 1  # island of another class → hole in class 0
    mask[8:10, 8:10] = 255  # nodata hole
    df = vectorize_array(mask, transform=from_origin(500000, 4600000, 10, 10), crs="EPSG:32633")
    assert sorted(df["class_id"].tolist()) == [0, 1]
    ring = df[df["class_id"] == 0].geometry.iloc[0]
    assert len(ring.interiors) == 2
    assert ring.area == pytest.approx((11 * 12 - 9 - 4) * 100.0)
    assert shapely.union_all(df.geometry.values).area == pytest.approx((11 * 12 - 4) * 100.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_one_polygon_per_four_connected_region(seed):
    mask = blocky_mask(seed, cell=1, classes=3, nodata_frac=0.1)  # many diagonal contacts
    df = vectorize_array(mask)
    for c in range(3):
        _, expected = ndimage.label(mask == c)  # scipy default structure: 4-connectivity
        assert (df["class_id"] == c).sum() == expected
    assert shapely.is_valid(df.geometry.values).all()
    counts = np.bincount(mask.ravel(), minlength=256)
    for c in range(3):  # no CRS, identity transform: areas in pixels
        assert df.loc[df["class_id"] == c, "area_m2"].sum() == pytest.approx(counts[c])


def lonlat_box_area(lon0: float, lon1: float, lat0: float, lat1: float) -> float:
    """Independent area of the WGS84 region between two parallels and two meridians: the
    ellipsoid's area element a²(1-e²)cosφ/(1-e²sin²φ)² integrated numerically over φ."""
    from scipy.integrate import quad

    a, e2 = WGS84.a, WGS84.es

    def element(phi: float) -> float:
        return a * a * (1 - e2) * math.cos(phi) / (1 - e2 * math.sin(phi) ** 2) ** 2

    lo, hi = math.radians(lat0), math.radians(lat1)
    return quad(element, lo, hi, epsabs=0, epsrel=1e-13)[0] * math.radians(lon1 - lon0)


#: WGS84's surface area: the equator's geodesic ring encloses half of it.
_EQ = np.linspace(-180.0, 180.0, 3601)[:-1]
EARTH = 2 * abs(WGS84.polygon_area_perimeter(_EQ, np.zeros_like(_EQ))[0])


def test_earth_area_and_closed_forms_are_independent_of_each_other():
    assert abs(EARTH - 5.10066e14) < 1e9  # WGS84: 510 065 622 km²
    assert lonlat_box_area(-180, 180, -90, 90) == pytest.approx(EARTH, rel=1e-12)
    # A polar cap from Geod (a ring along the parallel, densified) agrees with the integral.
    lons = np.linspace(-180.0, 180.0, 36001)[:-1]
    cap = abs(WGS84.polygon_area_perimeter(lons, np.full(lons.size, 70.0))[0])
    assert cap == pytest.approx(lonlat_box_area(-180, 180, 70, 90), rel=1e-8)


def test_epsg4326_cell_is_bounded_by_parallels_not_geodesics():
    mask = np.array([[0]], np.uint8)
    df = vectorize_array(mask, transform=from_origin(10.0, 61.0, 1.0, 1.0), crs="EPSG:4326")
    area = df["area_m2"].iloc[0]
    assert area == pytest.approx(lonlat_box_area(10, 11, 60, 61), rel=1e-12)
    # A ring through the four corners with geodesic edges is not the pixel: 3e-5 off here.
    corners = abs(WGS84.polygon_area_perimeter([10, 11, 11, 10], [60, 60, 61, 61])[0])
    assert abs(corners - area) / area > 2e-5


def test_epsg4326_sloped_edges_of_a_rotated_grid():
    """Edges straight on the lon/lat map but along neither axis (a rotated geotransform):
    the area element integrated over the pixel parallelogram, independently."""
    from scipy.integrate import dblquad

    transform = Affine(0.8, 0.6, 20.0, 0.6, -0.8, 70.0)  # 1° pixels rotated by ~37°
    mask = np.zeros((30, 20), np.uint8)
    df = vectorize_array(mask, transform=transform, crs="EPSG:4326")
    a, e2 = WGS84.a, WGS84.es
    jac = math.radians(1) ** 2 * abs(transform.determinant)

    def element(row: float, col: float) -> float:
        phi = math.radians((transform * (col, row))[1])
        return a * a * (1 - e2) * math.cos(phi) / (1 - e2 * math.sin(phi) ** 2) ** 2 * jac

    expected = dblquad(element, 0, 20, 0, 30, epsabs=0, epsrel=1e-12)[0]
    assert df["area_m2"].iloc[0] == pytest.approx(expected, rel=1e-10)


def world_grid() -> tuple[object, Affine, int, int]:
    crs, transform, w, h = georef("world.rgb.tif")
    assert (transform.c, transform.f, w * transform.a, h * -transform.e) == (-180, 90, 360, 180)
    return crs, transform, w, h


def test_world_rgb_one_class_is_the_whole_earth_hole_cap_and_hemispheres():
    """Issue 10: one class over world.rgb.tif gave area 0; with a hole, -2.4e13."""
    crs, transform, w, h = world_grid()
    step = transform.a  # 0.703125° per pixel, both ways
    whole = vectorize_array(np.zeros((h, w), np.uint8), transform=transform, crs=crs)
    assert whole["area_m2"].tolist() == [pytest.approx(EARTH, rel=1e-12)]

    mask = np.zeros((h, w), np.uint8)
    mask[100:110, 200:220] = 1  # a hole in the global class
    df = vectorize_array(mask, transform=transform, crs=crs).set_index("class_id")
    lon0, lat1 = -180 + 200 * step, 90 - 100 * step
    hole = lonlat_box_area(lon0, lon0 + 20 * step, lat1 - 10 * step, lat1)
    assert df.loc[1, "area_m2"] == pytest.approx(hole, rel=1e-10)
    assert df.loc[0, "area_m2"] == pytest.approx(EARTH - hole, rel=1e-12)

    mask = np.zeros((h, w), np.uint8)
    mask[:20] = 1  # a polar cap: every vertex of its top edge is the North Pole
    mask[h // 2 :] = 2  # the southern hemisphere, bounded by the equator and the South Pole
    df = vectorize_array(mask, transform=transform, crs=crs).set_index("class_id")
    cap = lonlat_box_area(-180, 180, 90 - 20 * step, 90)
    assert df.loc[1, "area_m2"] == pytest.approx(cap, rel=1e-10)
    assert df.loc[2, "area_m2"] == pytest.approx(EARTH / 2, rel=1e-12)
    assert df.loc[0, "area_m2"] == pytest.approx(EARTH / 2 - cap, rel=1e-10)


def test_antimeridian_polygons_on_either_grid():
    """A region across the antimeridian: two polygons on a -180…180 grid (the mask's
    regions), one on a 0…360 grid; both add up to the same lon/lat box."""
    box = lonlat_box_area(170, 190, -30, 30)
    mask = np.zeros((180, 360), np.uint8)
    mask[60:120, :10] = mask[60:120, 350:] = 1
    df = vectorize_array(mask, transform=from_origin(-180, 90, 1, 1), crs="EPSG:4326")
    halves = df.loc[df["class_id"] == 1, "area_m2"]
    assert len(halves) == 2 and halves.sum() == pytest.approx(box, rel=1e-10)
    shifted = np.roll(mask, 180, axis=1)  # the same Earth on a 0…360 grid
    df = vectorize_array(shifted, transform=from_origin(0, 90, 1, 1), crs="EPSG:4326")
    one = df.loc[df["class_id"] == 1, "area_m2"]
    assert len(one) == 1 and one.iloc[0] == pytest.approx(box, rel=1e-10)
    assert df.loc[df["class_id"] == 0, "area_m2"].sum() == pytest.approx(EARTH - box, rel=1e-10)


@pytest.mark.parametrize("crs", ["EPSG:4326", "EPSG:4087"])
def test_any_world_partition_has_positive_areas_summing_to_the_earth(crs):
    """Random regions with holes, touching both poles and the antimeridian, in a geographic
    and in a projected plate carrée (where Geod sees the whole-world ring as area 0)."""
    to_map = pyproj.Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    (x0, x1), (y0, y1) = to_map.transform([-180.0, 180.0], [-90.0, 90.0])
    transform = rasterio.transform.from_bounds(x0, y0, x1, y1, 120, 60)
    mask = blocky_mask(7, shape=(60, 120), classes=3, cell=4, nodata_frac=0.0)
    mask[3:57, 3:117] = np.where(mask[3:57, 3:117] == 2, 2, 0)  # class 0 wraps round holes
    mask[:, :3] = mask[:, -3:] = 1
    df = vectorize_array(mask, transform=transform, crs=crs)
    areas = df["area_m2"].to_numpy(float)
    assert len(areas) > 20 and (areas > 0).all() and np.isfinite(areas).all()
    assert areas.sum() == pytest.approx(EARTH, rel=1e-9)
    whole = vectorize_array(np.zeros((60, 120), np.uint8), transform=transform, crs=crs)
    assert whole["area_m2"].tolist() == [pytest.approx(EARTH, rel=1e-9)]


def test_world_rgb_areas_sum_of_pixel_cells_and_bounds(tmp_path):
    crs, transform, w, h = world_grid()
    with _open(DATA / "world.rgb.tif") as ds:
        rgb = ds.read().astype(int)
    classes = np.select([rgb[2] > rgb[0] + 20, rgb[1] > rgb[0]], [0, 1], 2).astype(np.uint8)
    path = write_mask(tmp_path / "world.tif", classes, crs=crs, transform=transform)
    out = tmp_path / "world.gpkg"
    vectorize_mask(path, out, class_names=["water", "green", "other"])
    df = read_layer(out)

    assert pyproj.CRS(df.crs) == pyproj.CRS(crs.to_wkt())
    x0, y0, x1, y1 = df.total_bounds
    assert x0 >= -180 and x1 <= 180 and y0 >= -90 and y1 <= 90
    # Independent: every pixel cell's area (it depends on the row only).
    lon0, lon1 = transform.c, transform.c + transform.a
    cell = np.empty(h)
    for r in range(h):
        top, bottom = transform.f + r * transform.e, transform.f + (r + 1) * transform.e
        cell[r] = lonlat_box_area(lon0, lon1, bottom, top)
    for c in range(3):
        expected = float(np.sum((classes == c).sum(axis=1) * cell))
        got = df.loc[df["class_id"] == c, "area_m2"].sum()
        assert got == pytest.approx(expected, rel=1e-9)
    assert (df["area_m2"] > 0).all()
    assert df["area_m2"].sum() == pytest.approx(EARTH, rel=1e-9)


def test_web_mercator_area_is_geodesic_not_planar():
    lat = 60.0
    y = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:3857").transform(lat, 10.0)[1]
    mask = np.zeros((5, 5), np.uint8)
    df = vectorize_array(mask, transform=from_origin(1113194.9, y, 1000, 1000), crs="EPSG:3857")
    poly = df.geometry.iloc[0]
    xs, ys = np.asarray(poly.exterior.coords)[:-1].T
    assert df["area_m2"].iloc[0] == pytest.approx(geod_ring_area(xs, ys, "EPSG:3857"), rel=1e-4)
    assert df["area_m2"].iloc[0] == pytest.approx(
        poly.area * math.cos(math.radians(lat)) ** 2, rel=2e-2
    )
    assert poly.area / df["area_m2"].iloc[0] > 3.9  # planar area is ~4x too large at 60°N


def test_web_mercator_long_parallel_edges_are_densified():
    """A Mercator rectangle is a longitude/latitude box: its edges follow parallels, not
    geodesics; 10° wide at 60°N the difference is far above the tolerance below."""
    to_merc = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
    (x0, x1), (y0, y1) = to_merc.transform([0.0, 10.0], [60.0, 61.0])
    width, height = 100, 10
    transform = rasterio.transform.from_bounds(x0, y0, x1, y1, width, height)
    df = vectorize_array(np.zeros((height, width), np.uint8), transform=transform, crs="EPSG:3857")
    lons = np.linspace(0, 10, 20001)
    box_lon = np.r_[lons, lons[::-1]]
    box_lat = np.r_[np.full(lons.size, 60.0), np.full(lons.size, 61.0)]
    exact = abs(WGS84.polygon_area_perimeter(box_lon, box_lat)[0])
    corners = abs(WGS84.polygon_area_perimeter([0, 10, 10, 0], [60, 60, 61, 61])[0])
    assert abs(corners - exact) / exact > 1e-3
    assert df["area_m2"].iloc[0] == pytest.approx(exact, rel=1e-5)


def test_rotated_transform_places_polygons_and_planar_area_without_crs(tmp_path, caplog):
    _, transform, w, h = georef("rotated.tif")
    mask = np.full((h, w), 255, np.uint8)
    mask[4:7, 2:4] = 3  # rows 4..6, columns 2..3
    path = write_mask(tmp_path / "rot.tif", mask, crs=None, transform=transform)
    out = tmp_path / "rot.gpkg"
    with caplog.at_level(logging.WARNING):
        summary = vectorize_mask(path, out)
    assert any("no CRS" in r.getMessage() for r in caplog.records)
    assert summary.crs is None and summary.class_counts == {"class_3": 1}
    df = read_layer(out)
    poly = df.geometry.iloc[0]
    corners = {transform * (c, r) for c, r in [(2, 4), (4, 4), (4, 7), (2, 7)]}
    got = {tuple(p) for p in np.asarray(poly.exterior.coords)[:-1]}
    assert len(got) == 4
    for p in got:
        assert min(math.dist(p, q) for q in corners) < 1e-6
    assert df["area_m2"].iloc[0] == pytest.approx(6 * abs(transform.determinant))
    assert df.crs is None


def test_goes_geostationary_off_disk_falls_back_without_crash(caplog):
    crs, transform, w, h = georef("goes.tif")
    with _open(DATA / "goes.tif") as ds:
        on_disk = ds.dataset_mask() > 0
        grey = ds.read().mean(axis=0)
    # Whole raster as one class: its corners are off the Earth.
    with caplog.at_level(logging.WARNING):
        whole = vectorize_array(np.zeros((h, w), np.uint8), transform=transform, crs=crs)
    assert any("cannot be inverted" in r.getMessage() for r in caplog.records)
    r, sat = 6378137.0, 35786023.0  # visible cap of the Earth from geostationary height
    cap = 2 * math.pi * r * r * (1 - r / (r + sat))
    assert whole["area_m2"].iloc[0] == pytest.approx(cap, rel=2e-2)
    # A real partition of the disk: every polygon gets a finite area, and they add up to
    # the area of the disk as one region.
    classes = (grey > 100).astype(np.uint8)
    parts = vectorize_array(classes, valid=on_disk, transform=transform, crs=crs)
    disk = vectorize_array(np.zeros((h, w), np.uint8), valid=on_disk, transform=transform, crs=crs)
    assert len(parts) > 100 and np.isfinite(parts["area_m2"].to_numpy(float)).all()
    assert parts["area_m2"].sum() == pytest.approx(disk["area_m2"].iloc[0], rel=1e-3)


# --------------------------------------------------------------------------- block seams


@pytest.mark.parametrize("block_rows", [1, 2, 7, 16])
def test_blockwise_equals_whole_array(block_rows):
    mask = blocky_mask(3)
    rng = np.random.default_rng(4)
    score = rng.random(mask.shape)
    score[rng.random(mask.shape) < 0.1] = np.nan
    args = dict(transform=from_origin(320000, 4600000, 10, 10), crs="EPSG:32633", score=score)
    whole = vectorize_array(mask, block_rows=10_000, **args)
    blocks = vectorize_array(mask, block_rows=block_rows, **args)
    assert region_key(blocks) == region_key(whole)
    a = whole.sort_values(["class_id", "area_m2"]).reset_index(drop=True)
    b = blocks.sort_values(["class_id", "area_m2"]).reset_index(drop=True)
    assert np.allclose(a["area_m2"].to_numpy(float), b["area_m2"].to_numpy(float), rtol=1e-9)
    assert np.allclose(
        a["mean_score"].to_numpy(float, na_value=np.nan),
        b["mean_score"].to_numpy(float, na_value=np.nan),
        rtol=1e-12,
        equal_nan=True,
    )


def test_seams_merge_only_same_class_four_neighbours():
    mask = np.full((6, 6), 255, np.uint8)
    mask[0:3, 0] = 0  # U shape: two arms in rows 0-2 joined only by row 3, below the seam
    mask[0:3, 2] = 0
    mask[3, 0:3] = 0
    mask[2, 4:6] = 1  # class 1 right above class 2 across the seam: never merged
    mask[3, 4] = 2
    mask[5, 5] = 1  # a second, separate class-1 region
    diag = np.full((4, 4), 255, np.uint8)
    diag[1, 1] = 0
    diag[2, 2] = 0  # corner contact only: two regions under 4-connectivity
    for block_rows in (1, 3, 100):  # 3: the seam lies between rows 2 and 3
        df = vectorize_array(mask, block_rows=block_rows)
        assert sorted(df["class_id"].tolist()) == [0, 1, 1, 2]
        u = df[df["class_id"] == 0].geometry.iloc[0]
        assert u.area == 9 and len(u.interiors) == 0
        assert len(vectorize_array(diag, block_rows=block_rows)) == 2


def test_blockwise_file_equals_whole_file(tmp_path):
    mask = blocky_mask(7, shape=(45, 33))
    path = write_mask(tmp_path / "m.tif", mask, transform=from_origin(320000, 4600000, 10, 10))
    s1 = vectorize_mask(path, tmp_path / "a.gpkg", block_rows=4)
    s2 = vectorize_mask(path, tmp_path / "b.gpkg", block_rows=4096)
    assert s1.n_polygons == s2.n_polygons and s1.class_counts == s2.class_counts
    assert region_key(read_layer(tmp_path / "a.gpkg")) == region_key(
        read_layer(tmp_path / "b.gpkg")
    )


# ----------------------------------------------------------------------------------- scores


def check_means(df, mask: np.ndarray, transform, score_of_class) -> None:
    """Each polygon's mean_score equals numpy's float64 mean of the finite scores over the
    4-connected region (found by scipy) under a point inside the polygon."""
    labels = {c: ndimage.label(mask == c)[0] for c in np.unique(mask[mask != 255]).tolist()}
    seen = set()
    for c, geom, got in zip(df["class_id"], df.geometry, df["mean_score"], strict=True):
        col, row = ~transform * tuple(geom.representative_point().coords[0])
        region = labels[c] == labels[c][int(row), int(col)]
        assert mask[int(row), int(col)] == c and region.sum() * abs(transform.determinant) == (
            pytest.approx(geom.area)
        )
        vals = score_of_class(c)[region].astype(np.float64)
        vals = vals[np.isfinite(vals)]
        if vals.size:
            assert got == pytest.approx(vals.mean(), rel=1e-12)
        else:
            assert pd.isna(got)
        seen.add((c, int(labels[c][int(row), int(col)])))
    assert len(seen) == sum(int(lab.max()) for lab in labels.values())


def test_mean_score_single_band_exact_across_blocks(tmp_path):
    mask = blocky_mask(11, shape=(30, 40), cell=5, nodata_frac=0.0)
    transform = from_origin(320000, 4600000, 10, 10)
    path = write_mask(tmp_path / "m.tif", mask, transform=transform)
    rng = np.random.default_rng(12)
    score = rng.random(mask.shape).astype(np.float32)
    score[rng.random(mask.shape) < 0.2] = np.nan
    score_path = write_float(tmp_path / "score.tif", score, path)
    out = tmp_path / "s.gpkg"
    vectorize_mask(path, out, score_path=score_path, block_rows=3)
    check_means(read_layer(out), mask, transform, lambda c: score)


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_mean_score_from_per_class_probability_bands(tmp_path, dtype):
    mask = blocky_mask(5, shape=(24, 20), classes=3, cell=4, nodata_frac=0.05)
    transform = from_origin(320000, 4600000, 10, 10)
    path = write_mask(tmp_path / "m.tif", mask, transform=transform)
    rng = np.random.default_rng(6)
    probs = rng.random((3, *mask.shape))
    if dtype == "uint8":  # the project's probability files: value / 254, 255 = nodata
        raw = np.rint(probs * 254).astype(np.uint8)
        raw[:, mask == 255] = 255
        score_path = write_float(tmp_path / "p.tif", raw, path, nodata=255)
        per_class = raw.astype(np.float64) / 254.0
        per_class[raw == 255] = np.nan
    else:
        raw = probs.astype(np.float32)
        score_path = write_float(tmp_path / "p.tif", raw, path)
        per_class = raw
    out = tmp_path / "p.geojson"  # WGS 84 (RFC 7946): compared back on the mask's grid
    vectorize_mask(path, out, score_path=score_path, block_rows=5)
    layer = read_layer(out).to_crs(rasterio.open(path).crs)
    check_means(layer, mask, transform, lambda c: per_class[c])


def test_score_raster_on_another_grid_or_too_few_bands_is_rejected(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[4:, :] = 2
    path = write_mask(tmp_path / "m.tif", mask)
    other = write_mask(tmp_path / "other.tif", np.zeros((8, 9), np.uint8))
    bad = write_float(tmp_path / "bad.tif", np.zeros((8, 9), np.float32), other)
    with pytest.raises(InputError, match="not on the grid"):
        vectorize_mask(path, tmp_path / "o.gpkg", score_path=bad)
    two = write_float(tmp_path / "two.tif", np.zeros((2, 8, 8), np.float32), path)
    with pytest.raises(InputError, match="2 probability bands.*class 2"):
        vectorize_mask(path, tmp_path / "o.gpkg", score_path=two)
    assert not (tmp_path / "o.gpkg").exists() and no_temps(tmp_path)


# --------------------------------------------------------------------- min_area, simplify


def test_min_area_drops_small_regions(tmp_path):
    mask = np.full((20, 20), 255, np.uint8)
    mask[0, 0] = 0  # 1 px  = ~100 m²
    mask[5:7, 5:7] = 0  # 4 px = ~400 m²
    mask[10:13, 10:13] = 1  # 9 px = ~900 m²
    path = write_mask(tmp_path / "m.tif", mask, transform=from_origin(320000, 4600000, 10, 10))
    summary = vectorize_mask(path, tmp_path / "o.gpkg", min_area=500.0)
    df = read_layer(tmp_path / "o.gpkg")
    assert summary.n_dropped == 2 and summary.n_polygons == 1
    assert df["class_id"].tolist() == [1] and df["area_m2"].iloc[0] >= 500.0
    kept = vectorize_array(
        mask, crs="EPSG:32633", min_area=300.0, transform=from_origin(320000, 4600000, 10, 10)
    )
    assert sorted(kept["class_id"]) == [0, 1]


def test_simplify_keeps_a_valid_non_overlapping_coverage():
    yy, xx = np.mgrid[0:60, 0:60]
    mask = np.where(yy > 0.7 * xx + 5, 0, 1).astype(np.uint8)  # staircase boundary
    mask[(yy - 40) ** 2 + (xx - 20) ** 2 < 64] = 2  # disc inside class 0
    mask[50:53, 50:53] = 255
    args = dict(transform=from_origin(320000, 4600000, 10, 10), crs="EPSG:32633")
    raw = vectorize_array(mask, **args)
    simple = vectorize_array(mask, simplify=25.0, **args)
    assert sorted(simple["class_id"]) == sorted(raw["class_id"])
    n_raw = shapely.get_num_coordinates(raw.geometry.values).sum()
    n_simple = shapely.get_num_coordinates(simple.geometry.values).sum()
    assert n_simple < n_raw / 3
    geoms = simple.geometry.values
    assert shapely.is_valid(geoms).all()
    assert shapely.coverage_is_valid(np.asarray(geoms))
    total = shapely.union_all(geoms).area
    assert sum(g.area for g in geoms) == pytest.approx(total, rel=1e-9)  # no overlaps
    assert total == pytest.approx(shapely.union_all(raw.geometry.values).area, rel=2e-2)
    # area_m2 describes the polygons as written
    for g, a in zip(geoms, simple["area_m2"], strict=True):
        xs, ys = np.asarray(g.exterior.coords).T
        holes = sum(geod_ring_area(*np.asarray(i.coords).T, "EPSG:32633") for i in g.interiors)
        assert a == pytest.approx(geod_ring_area(xs, ys, "EPSG:32633") - holes, rel=1e-6)


# ----------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("source", ["RGB.byte.tif", "test_esri_wkt.tif"])
def test_formats_keep_the_mask_crs_and_schema(tmp_path, suffix, source):
    crs, transform, w, h = georef(source)
    mask = np.zeros((h, w), np.uint8)
    mask[: h // 2] = 1
    path = write_mask(tmp_path / "m.tif", mask, crs=crs, transform=transform, names=["a", "b"])
    out = tmp_path / f"out{suffix}"
    summary = vectorize_mask(path, out)
    df = read_layer(out)
    if suffix == ".geojson":  # RFC 7946: WGS 84 lon/lat; back on the mask's grid below
        assert pyproj.CRS.from_user_input(df.crs) == pyproj.CRS("EPSG:4326")
        df = df.to_crs(crs)
    assert pyproj.CRS.from_user_input(df.crs) == pyproj.CRS.from_wkt(crs.to_wkt())
    assert rasterio.crs.CRS.from_user_input(df.crs.to_wkt()) == crs
    assert {"class_id", "class_name", "area_m2", "mean_score"} <= set(df.columns)
    assert len(df) == summary.n_polygons == 2
    assert sorted(df["class_name"]) == ["a", "b"]
    left, bottom, right, top = rasterio.transform.array_bounds(h, w, transform)
    x0, y0, x1, y1 = df.total_bounds
    eps = 1e-6 * max(abs(left), abs(top), 1.0)
    assert left - eps <= x0 and x1 <= right + eps and bottom - eps <= y0 and y1 <= top + eps
    assert df["mean_score"].isna().all()
    assert no_temps(tmp_path)


def test_gpkg_layer_name_is_stem_or_given(tmp_path):
    path = write_mask(tmp_path / "m.tif", np.zeros((4, 4), np.uint8))
    vectorize_mask(path, tmp_path / "scene.gpkg")
    vectorize_mask(path, tmp_path / "named.gpkg", layer="landcover")
    # the polygons, and QGIS's style table
    assert [n for n, _ in pyogrio.list_layers(tmp_path / "scene.gpkg")] == ["scene", STYLES]
    assert [n for n, _ in pyogrio.list_layers(tmp_path / "named.gpkg")] == ["landcover", STYLES]


def test_gpkg_records_its_class_list_and_settings(tmp_path):
    path = write_mask(tmp_path / "m.tif", np.zeros((4, 4), np.uint8), names=["road", "roof"])
    vectorize_mask(path, tmp_path / "o.gpkg", min_area=250.0, simplify=0.5)
    meta = pyogrio.read_info(tmp_path / "o.gpkg", layer="o")["layer_metadata"]
    assert json.loads(meta["DRSEG_CLASS_NAMES"]) == ["road", "roof"]
    assert (float(meta["DRSEG_MIN_AREA"]), float(meta["DRSEG_SIMPLIFY"])) == (250.0, 0.5)


def test_shapefile_sidecars_and_utf8_safe_truncation(tmp_path):
    long_name = "a" + "é" * 300  # 601 bytes; 254 would cut an "é" in half
    path = write_mask(tmp_path / "m.tif", np.zeros((3, 3), np.uint8), names=[long_name])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vectorize_mask(path, tmp_path / "o.shp")
    assert not [w for w in caught if "truncated" in str(w.message)]  # not left to GDAL
    for s in (".shp", ".shx", ".dbf", ".prj", ".cpg"):
        assert (tmp_path / f"o{s}").is_file()
    name = read_layer(tmp_path / "o.shp")["class_name"].iloc[0]
    assert name == "a" + "é" * 126 and len(name.encode("utf-8")) == 253
    vectorize_mask(path, tmp_path / "o.gpkg")
    assert read_layer(tmp_path / "o.gpkg")["class_name"].iloc[0] == long_name
    assert vec.truncate_utf8("ab€", 4) == "ab" and vec.truncate_utf8("abc", 3) == "abc"
    assert no_temps(tmp_path)


def test_formats_that_cannot_record_the_crs_are_refused(tmp_path):
    crs, transform, w, h = georef("goes.tif")  # geostationary, sweep=x, no EPSG code
    path = write_mask(tmp_path / "g.tif", np.zeros((h, w), np.uint8), crs=crs, transform=transform)
    with pytest.raises(UsageError, match="cannot record"):
        vectorize_mask(path, tmp_path / "o.shp")
    with pytest.raises(UsageError, match="cannot record"):  # GeoJSON keeps EPSG codes only
        vectorize_mask(path, tmp_path / "o.geojson", dst_crs=crs.to_wkt())
    # WGS 84 (GeoJSON's default) has no place for the disk's corners, off the Earth
    with pytest.raises(UsageError, match=r"o\.geojson: \d+ vertices cannot be reprojected"):
        vectorize_mask(path, tmp_path / "o.geojson")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.tif"]


@pytest.mark.parametrize("suffix", FORMATS)
def test_all_nodata_writes_an_empty_layer_with_schema_and_crs(tmp_path, suffix):
    path = write_mask(tmp_path / "m.tif", np.full((5, 5), 255, np.uint8), crs="EPSG:32618")
    out = tmp_path / f"empty{suffix}"
    summary = vectorize_mask(path, out)
    assert summary.n_polygons == 0 and summary.class_counts == {}
    df = read_layer(out)
    assert len(df) == 0
    want = "EPSG:4326" if suffix == ".geojson" else "EPSG:32618"  # GeoJSON: RFC 7946
    assert pyproj.CRS.from_user_input(df.crs) == pyproj.CRS(want)
    if suffix == ".geojson":
        return  # GeoJSON keeps properties per feature only: no features, no field list
    assert {"class_id", "class_name", "area_m2", "mean_score"} <= set(df.columns)
    if suffix != ".parquet":
        info = pyogrio.read_info(out, layer=0)
        assert info["geometry_type"] == "Polygon"
        types = dict(zip(info["fields"], info["dtypes"], strict=True))
        assert types["class_id"].startswith("int") and types["area_m2"] == "float64"


def test_class_names_argument_then_tags_then_default(tmp_path):
    mask = np.array([[0, 1], [3, 3]], np.uint8)
    tagged = write_mask(tmp_path / "t.tif", mask, names=["water", "tree"])
    plain = write_mask(tmp_path / "p.tif", mask)
    s = vectorize_mask(tagged, tmp_path / "a.gpkg")
    assert s.class_counts == {"water": 1, "tree": 1, "class_3": 1}
    s = vectorize_mask(tagged, tmp_path / "b.gpkg", class_names=["x", "y", "z", "w"])
    assert s.class_counts == {"x": 1, "y": 1, "w": 1}
    s = vectorize_mask(plain, tmp_path / "c.gpkg")
    assert s.class_counts == {"class_0": 1, "class_1": 1, "class_3": 1}
    df = read_layer(tmp_path / "b.gpkg").sort_values("class_id")
    assert df["class_name"].tolist() == ["x", "y", "w"]


# --------------------------------------------------------------------- styles for QGIS


def test_class_colours_follow_words_synonyms_and_stay_distinct():
    blue, red, grey = (31, 120, 180), (227, 26, 28), (150, 150, 150)
    for name, want in [
        ("Water", blue), ("water body", blue), ("rivers", blue), ("Buildings", red),
        ("building roofs", red), ("Roads", grey), ("tall trees", (51, 160, 44)),
        ("Low_vegetation", (178, 223, 138)), ("impervious surfaces", (190, 190, 190)),
        ("bare soil", (191, 129, 45)), ("clutter/background", (40, 40, 40)),
    ]:  # fmt: skip
        assert known_color(name) == want, name
    assert known_color("xyzzy") is None
    names = ["water", "river", "lake", "forest", "tree", "foo", "bar"] + [
        f"u{i}" for i in range(248)
    ]
    colors = class_colors(names)
    assert len(set(colors)) == len(names) == 255  # never two classes alike
    assert colors[0] == blue and colors[1] != blue  # a second blue class gets a shade of it
    assert colors[1][2] > max(colors[1][:2])  # ... still blue
    assert colors[:7] == class_colors(names[:7])  # stable


def style_of(path: Path) -> ET.Element:
    """The QGIS style QGIS applies to ``path``: its GeoPackage layer_styles row (read with
    sqlite3, as QGIS does through OGR) or the .qml beside it."""
    if path.suffix != ".gpkg":
        return ET.parse(path.with_suffix(".qml")).getroot()
    with contextlib.closing(sqlite3.connect(path)) as con:
        rows = con.execute(
            "SELECT f_table_name, f_geometry_column, useAsDefault, styleQML FROM layer_styles"
        ).fetchall()
        geom = con.execute("SELECT column_name FROM gpkg_geometry_columns").fetchone()[0]
        kind = con.execute(
            "SELECT data_type FROM gpkg_contents WHERE table_name = 'layer_styles'"
        ).fetchone()
    assert len(rows) == 1 and rows[0][:3] == (path.stem, geom, 1) and kind == ("attributes",)
    return ET.fromstring(rows[0][3])


def categories(root: ET.Element) -> dict[int, tuple[str, tuple[int, int, int]]]:
    renderer = root.find("renderer-v2")
    assert renderer.get("type") == "categorizedSymbol" and renderer.get("attr") == "class_id"
    fill = {}
    for sym in renderer.iterfind("symbols/symbol"):
        value = sym.find("layer[@class='SimpleFill']/Option/Option[@name='color']").get("value")
        fill[sym.get("name")] = tuple(int(v) for v in value.split(",")[:3])
    return {
        int(c.get("value")): (c.get("label"), fill[c.get("symbol")])
        for c in renderer.iterfind("categories/category")
    }


@pytest.mark.parametrize("suffix", FORMATS)
def test_layers_carry_the_mask_class_colours(tmp_path, suffix):
    """One category per class (absent ones too), labelled and filled as in the mask's colour
    table; inside a GeoPackage, else in a .qml beside the file."""
    mask = np.zeros((6, 6), np.uint8)
    mask[3:] = 2
    path = write_mask(tmp_path / "m.tif", mask, names=["water", "forest", "xyz"])
    table = {0: (10, 20, 30, 255), 1: (40, 50, 60, 255), 2: (70, 80, 90, 255)}
    with rasterio.open(path, "r+") as ds:
        ds.write_colormap(1, table)
    out = tmp_path / f"out{suffix}"
    vectorize_mask(path, out)
    assert categories(style_of(out)) == {
        0: ("water", (10, 20, 30)), 1: ("forest", (40, 50, 60)), 2: ("xyz", (70, 80, 90))
    }  # fmt: skip
    if suffix == ".gpkg":
        assert not (tmp_path / "out.qml").exists()
    # A mask without a colour table: class_colors, as segment's masks have.
    plain = write_mask(tmp_path / "p.tif", mask, names=["water", "forest", "xyz"])
    vectorize_mask(plain, tmp_path / f"p2{suffix}")
    got = categories(style_of(tmp_path / f"p2{suffix}"))
    want = class_colors(["water", "forest", "xyz"])
    assert {k: v[1] for k, v in got.items()} == dict(enumerate(want))
    assert no_temps(tmp_path)


def test_a_vector_style_never_replaces_the_mask_style(tmp_path):
    path = write_mask(tmp_path / "m.tif", np.zeros((4, 4), np.uint8), names=["road"])
    (tmp_path / "m.qml").write_text("the mask's paletted style", encoding="utf-8")
    for suffix in (".shp", ".geojson"):
        with pytest.raises(UsageError, match=r"m\.qml would replace the style of the mask"):
            vectorize_mask(path, tmp_path / f"m{suffix}", overwrite=True)
    assert (tmp_path / "m.qml").read_text(encoding="utf-8") == "the mask's paletted style"
    vectorize_mask(path, tmp_path / "m.gpkg")  # the style is inside the GeoPackage
    assert (tmp_path / "m.qml").read_text(encoding="utf-8") == "the mask's paletted style"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gpkg", "m.qml", "m.tif"]


def test_overwriting_replaces_the_style_row_and_sidecar(tmp_path):
    path = write_mask(tmp_path / "m.tif", np.zeros((4, 4), np.uint8), names=["road"])
    for _ in range(2):
        vectorize_mask(path, tmp_path / "o.gpkg", overwrite=True)
        vectorize_mask(path, tmp_path / "o.shp", overwrite=True)
    assert categories(style_of(tmp_path / "o.gpkg")) == categories(style_of(tmp_path / "o.shp"))
    (tmp_path / "x.qml").write_text("old", encoding="utf-8")  # a style counts as the output
    with pytest.raises(UsageError, match=r"x\.qml: output exists"):
        vectorize_mask(path, tmp_path / "x.geojson")


# ------------------------------------------------------------------------ standard CRSs


def test_geojson_is_rfc7946_wgs84_with_areas_from_the_mask_crs(tmp_path):
    mask = blocky_mask(3, shape=(20, 30), classes=3, cell=5, nodata_frac=0.0)
    path = write_mask(tmp_path / "m.tif", mask, crs="EPSG:32633")
    vectorize_mask(path, tmp_path / "ref.gpkg")
    summary = vectorize_mask(path, tmp_path / "o.geojson")
    assert summary.crs == "EPSG:4326"
    doc = json.loads((tmp_path / "o.geojson").read_text(encoding="utf-8"))
    assert "crs" not in doc  # RFC 7946: no crs member, WGS 84 lon/lat implied
    ref = read_layer(tmp_path / "ref.gpkg")
    got = read_layer(tmp_path / "o.geojson")
    lon, lat = shapely.get_coordinates(got.geometry.values).T
    assert (lon > 10).all() & (lon < 20).all() & (lat > 40).all() & (lat < 45).all()  # lon, lat
    # Full precision (not GDAL's RFC 7946 default of 7 decimals): back on the pixel corners.
    back = shapely.get_coordinates(got.to_crs("EPSG:32633").geometry.values)
    assert np.abs(back - shapely.get_coordinates(ref.geometry.values)).max() < 1e-6
    assert got["area_m2"].tolist() == ref["area_m2"].tolist()  # measured before reprojecting
    vectorize_mask(path, tmp_path / "c.geojson", dst_crs="OGC:CRS84")  # WGS 84 lon/lat too
    assert "crs" not in json.loads((tmp_path / "c.geojson").read_text(encoding="utf-8"))


@pytest.mark.parametrize("suffix", FORMATS)
def test_dst_crs_reprojects_any_format(tmp_path, suffix):
    path = write_mask(
        tmp_path / "m.tif", blocky_mask(4, shape=(12, 12), classes=2), names=["a", "b"]
    )
    vectorize_mask(path, tmp_path / "ref.gpkg")
    summary = vectorize_mask(path, tmp_path / f"o{suffix}", dst_crs="EPSG:3857")
    got, ref = read_layer(tmp_path / f"o{suffix}"), read_layer(tmp_path / "ref.gpkg")
    assert summary.crs == "EPSG:3857" and pyproj.CRS(got.crs) == pyproj.CRS("EPSG:3857")
    want = ref.to_crs("EPSG:3857")
    assert np.allclose(  # shapefiles turn rings clockwise: compare normalised
        shapely.get_coordinates(shapely.normalize(got.geometry.values)),
        shapely.get_coordinates(shapely.normalize(want.geometry.values)),
        rtol=0,
        atol=1e-6,
    )
    assert got["area_m2"].tolist() == ref["area_m2"].tolist()
    with pytest.raises(UsageError, match="--dst-crs EPSG:99999: not a CRS"):
        vectorize_mask(path, tmp_path / f"bad{suffix}", dst_crs="EPSG:99999")


def test_a_mask_without_crs_never_becomes_wgs84_geojson(tmp_path):
    path = write_mask(tmp_path / "n.tif", np.zeros((4, 4), np.uint8), crs=None)
    for suffix in (".geojson", ".json"):
        with pytest.raises(UsageError, match=r"no CRS, and GeoJSON without one is read as WGS 84"):
            vectorize_mask(path, tmp_path / f"o{suffix}")
    with pytest.raises(UsageError, match="--dst-crs EPSG:4326: the mask has no CRS"):
        vectorize_mask(path, tmp_path / "o.gpkg", dst_crs="EPSG:4326")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.tif"]
    vectorize_mask(path, tmp_path / "o.gpkg")  # formats that can say "no CRS" still work
    assert pyogrio.read_info(tmp_path / "o.gpkg", layer="o")["crs"] is None


# ------------------------------------------------------------------------- atomic, errors


def test_existing_output_needs_overwrite_and_stays_untouched(tmp_path):
    path = write_mask(tmp_path / "m.tif", np.zeros((4, 4), np.uint8))
    out = tmp_path / "o.gpkg"
    out.write_bytes(b"precious")
    with pytest.raises(UsageError, match="exists"):
        vectorize_mask(path, out)
    assert out.read_bytes() == b"precious"
    vectorize_mask(path, out, overwrite=True)
    assert len(read_layer(out)) == 1
    (tmp_path / "s.dbf").write_bytes(b"old")  # a shapefile part counts as the output
    with pytest.raises(UsageError, match="exists"):
        vectorize_mask(path, tmp_path / "s.shp")
    assert (tmp_path / "s.dbf").read_bytes() == b"old" and not (tmp_path / "s.shp").exists()


@pytest.mark.parametrize("suffix", [".gpkg", ".shp", ".geojson"])
def test_failure_while_writing_leaves_nothing_behind(tmp_path, monkeypatch, suffix):
    path = write_mask(tmp_path / "m.tif", np.zeros((4, 4), np.uint8))
    real_write = vec.write_frame

    def write_then_fail(frame, target, *rest):
        real_write(frame, target, *rest)  # the temp files exist now
        if TMP_MARKER in target.name:  # not the CRS probe of shapefiles
            assert target.exists()
            raise RuntimeError("disk went away")

    monkeypatch.setattr(vec, "write_frame", write_then_fail)
    with pytest.raises(Exception, match="disk went away"):
        vectorize_mask(path, tmp_path / f"o{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tif"]


def test_unknown_extension_and_missing_pyarrow(tmp_path, monkeypatch):
    path = write_mask(tmp_path / "m.tif", np.zeros((2, 2), np.uint8))
    with pytest.raises(UsageError, match="unknown vector format .kml"):
        vectorize_mask(path, tmp_path / "o.kml")
    real_find_spec = vec.importlib.util.find_spec
    monkeypatch.setattr(
        vec.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pyarrow" else real_find_spec(name, *a),
    )
    with pytest.raises(UsageError, match="pyarrow"):
        vectorize_mask(path, tmp_path / "o.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tif"]


def test_bad_masks_are_one_line_input_errors(tmp_path):
    with pytest.raises(InputError, match="missing.tif: file not found"):
        vectorize_mask(tmp_path / "missing.tif", tmp_path / "o.gpkg")
    with pytest.raises(InputError, match=r"RGB.byte.tif: not a class mask .*3 band"):
        vectorize_mask(DATA / "RGB.byte.tif", tmp_path / "o.gpkg")
    (tmp_path / "junk.tif").write_bytes(b"not a tiff")
    with pytest.raises(InputError, match="junk.tif: not a raster"):
        vectorize_mask(tmp_path / "junk.tif", tmp_path / "o.gpkg")
    with pytest.raises(UsageError, match="min-area"):
        vectorize_mask(DATA / "rotated.tif", tmp_path / "o.gpkg", min_area=-1)


# ------------------------------------------------------------------------------------- CLI


@pytest.fixture
def cli():
    app = typer.Typer()
    app.command()(vectorize_cmd.command)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def test_cli_summary_json_and_errors(tmp_path, cli):
    mask = np.full((10, 10), 255, np.uint8)
    mask[:5, :5] = 0
    mask[6:, 6:] = 1
    path = write_mask(tmp_path / "m.tif", mask, names=["road", "tree"])
    score = write_float(tmp_path / "s.tif", np.full((10, 10), 0.25, np.float32), path)

    res = cli(path, "-o", tmp_path / "o.gpkg", "--score", score)
    assert res.exit_code == 0, res.output
    assert "2 polygons" in res.output and "road 1" in res.output and "EPSG:32633" in res.output

    res = cli(path, "-o", tmp_path / "o.gpkg", "--json", "--overwrite", "--min-area", 2000)
    payload = json.loads(res.stdout)
    assert payload["polygons"] == 1 and payload["class_counts"] == {"road": 1}  # 25 px kept
    assert payload["dropped_small"] == 1 and payload["crs"] == "EPSG:32633"
    df = read_layer(tmp_path / "o.gpkg")
    assert df["mean_score"].isna().all()

    res = cli(path, "-o", tmp_path / "q.gpkg", "--score", score, "--quiet")
    assert res.exit_code == 0 and res.stdout == ""
    assert read_layer(tmp_path / "q.gpkg")["mean_score"].tolist() == [0.25, 0.25]

    res = cli(path, "-o", tmp_path / "o.gpkg")
    assert res.exit_code == 2 and "output exists" in res.output
    res = cli(tmp_path / "nope.tif", "-o", tmp_path / "x.gpkg")
    assert res.exit_code == 1 and "nope.tif: file not found" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = cli(DATA / "float_nan.tif", "-o", tmp_path / "x.gpkg")
    assert res.exit_code == 1 and "float_nan.tif: not a class mask" in res.output
    res = cli(path, "-o", tmp_path / "x.kml")
    assert res.exit_code == 2 and "unknown vector format" in res.output
