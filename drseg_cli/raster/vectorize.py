"""Class mask → polygons: one polygon per 4-connected region of one class, written as a layer.

The mask is read in blocks of rows, so memory follows the block and the polygons, never the
scene. Each block is labelled (scipy) and polygonised (GDAL through rasterio) in pixel
coordinates, where every vertex is an exact integer; regions cut by a block seam are merged
afterwards (connected components over the labels that touch across a seam, then a polygon
union), so the result does not depend on the block size. Score sums and pixel counts are
carried per piece, so ``mean_score`` is exact across seams too.

Pixel geometries reach map coordinates through the full affine transform (rotation and shear
included). ``area_m2`` is the area on the CRS's own ellipsoid of the region the polygon covers
on the map. In a geographic CRS it is exact (closed-form zone areas between parallels, so
whole-world, polar and antimeridian polygons are right); in a projected CRS it is geodesic
(pyproj.Geod) after densifying edges to about ``DENSIFY_GROUND_M`` on the ground — right for
UTM, Web Mercator (where planar area is badly wrong) and world projections alike.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import sqlite3
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyproj
import rasterio
import rasterio.features
import shapely
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from drseg_cli.atomic import (
    atomic_output,
    check_writable,
    is_file,
    publish,
    staged_paths,
    staging_folder,
)
from drseg_cli.errors import InputError, OutputError, UsageError, first_line
from drseg_cli.raster.mask_meta import (
    MASK_NODATA,
    class_name_for,
    class_names_from_tags,
    vector_layer_tags,
)
from drseg_cli.raster.vsi import is_vsi, output_path, store_path
from drseg_cli.raster.writers import class_colors, vector_qml_style

log = logging.getLogger(__name__)

#: Output formats by file extension (lower case) → GDAL driver, or "Parquet" for GeoParquet.
FORMATS: dict[str, str] = {
    ".gpkg": "GPKG",
    ".shp": "ESRI Shapefile",
    ".geojson": "GeoJSON",
    ".json": "GeoJSON",
    ".parquet": "Parquet",
}
SHP_SIDECARS = (".shx", ".dbf", ".prj", ".cpg")
#: Where a layer's QGIS style goes: inside a GeoPackage (its ``layer_styles`` table, which
#: QGIS applies on load), else in ``<name>.qml`` beside the file (QGIS's default style).
STYLE_SUFFIX = ".qml"
#: RFC 7946: GeoJSON is WGS 84 longitude/latitude, with no ``crs`` member.
GEOJSON_CRS = "EPSG:4326"
#: Decimals of GeoJSON coordinates (GDAL's RFC 7946 default of 7 moves vertices by ~1 cm).
GEOJSON_DECIMALS = 15
#: The GeoPackage table QGIS reads a layer's default style from (QGIS's own schema).
LAYER_STYLES_SQL = """CREATE TABLE IF NOT EXISTS layer_styles (
    id INTEGER PRIMARY KEY AUTOINCREMENT, f_table_catalog TEXT(256), f_table_schema TEXT(256),
    f_table_name TEXT(256), f_geometry_column TEXT(256), styleName TEXT(30), styleQML TEXT,
    styleSLD TEXT, useAsDefault BOOLEAN, description TEXT, owner TEXT(30), ui TEXT(30),
    update_time DATETIME DEFAULT CURRENT_TIMESTAMP)"""
#: A dBASE text field holds at most 254 bytes.
SHP_TEXT_BYTES = 254
#: Edges are split to about this ground length before the geodesic area, so that an edge that
#: is straight on the map (a parallel in Web Mercator) is not replaced by one long geodesic.
DENSIFY_GROUND_M = 500.0
#: Densification step bounds, in pixels.
DENSIFY_MIN_PX, DENSIFY_MAX_PX, DENSIFY_FALLBACK_PX = 1, 1024, 16
#: The pixel fallback for polygons a CRS cannot invert samples at most this many cells.
FALLBACK_MAX_CELLS = 1 << 20
DEFAULT_BLOCK_ROWS = 2048
#: Blocks of very wide masks get fewer rows, so one block stays near this many pixels.
MAX_BLOCK_PIXELS = 1 << 24
FIELDS = ("class_id", "class_name", "area_m2", "mean_score")
_FOUR = ndimage.generate_binary_structure(2, 1)


@dataclass
class VectorSummary:
    """What one vectorisation wrote (``class_counts``: polygons per class name)."""

    path: Path
    n_polygons: int
    class_counts: dict[str, int]
    crs: str | None
    seconds: float
    n_dropped: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form for ``--json``."""
        return {
            "path": str(self.path),
            "polygons": self.n_polygons,
            "class_counts": self.class_counts,
            "crs": self.crs,
            "dropped_small": self.n_dropped,
            "seconds": self.seconds,
            "warnings": self.warnings,
        }


# ----------------------------------------------------------------------------- regions


@dataclass
class Regions:
    """Connected regions in pixel coordinates (x = column, y = row of pixel corners)."""

    geoms: np.ndarray  # shapely Polygons, normalised, no collinear vertices
    class_ids: np.ndarray  # int64
    score_sum: np.ndarray  # float64, over pixels with a finite score
    score_count: np.ndarray  # int64


ScoreFn = Callable[[int], np.ndarray]


class RegionAccumulator:
    """Label and polygonise a mask fed top to bottom in row blocks; merge across the seams.

    ``add_block`` takes the class values of the next rows, their validity and optionally
    ``score(class_id)`` → float array of the same rows (NaN: no score). With
    ``score_per_class`` the array differs per class (probability bands), else it is called
    once with -1.
    """

    def __init__(self, width: int) -> None:
        self.width = width
        self.rows = 0
        self._pieces: list[np.ndarray] = []
        self._classes: list[np.ndarray] = []
        self._sums: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []
        self._edges: list[np.ndarray] = []
        self._n = 0  # labels handed out; label l (≥ 1) is piece l - 1
        self._last: tuple[np.ndarray, np.ndarray] | None = None  # labels, classes of last row

    def add_block(
        self,
        classes: np.ndarray,
        valid: np.ndarray | None = None,
        score: ScoreFn | None = None,
        *,
        score_per_class: bool = False,
    ) -> None:
        """Add the next ``classes.shape[0]`` rows (uint8 class ids, 255 = nodata)."""
        h, w = classes.shape
        if w != self.width:
            raise ValueError(f"block width {w} != mask width {self.width}")
        cls = np.asarray(classes, np.uint8)
        if valid is not None:
            cls = np.where(valid, cls, np.uint8(MASK_NODATA))
        base = self._n
        present = np.flatnonzero(np.bincount(cls.ravel(), minlength=256)[:MASK_NODATA])
        labels = np.zeros((h, w), np.int32)
        lab = np.empty((h, w), np.int32)
        is_c = np.empty((h, w), bool)
        offset = np.zeros(256, np.int32)  # class → first global label - 1; nodata keeps 0
        class_of, sums, counts = [], [], []
        n_local = 0
        for c in present:
            np.equal(cls, c, out=is_c)
            n = ndimage.label(is_c, structure=_FOUR, output=lab)
            labels += lab  # lab is 0 off class c; the class offset is added once below
            offset[c] = base + n_local
            class_of.append(np.full(n, c, np.int64))
            if score is not None and score_per_class:
                vals = score(int(c))
                ok = is_c & np.isfinite(vals)
                idx = lab[ok] - 1
                sums.append(np.bincount(idx, weights=vals[ok], minlength=n))
                counts.append(np.bincount(idx, minlength=n))
            n_local += n
        del lab, is_c
        labels += offset[cls]
        if score is not None and not score_per_class:
            vals = score(-1)
            ok = (labels > 0) & np.isfinite(vals)
            idx = labels[ok] - (base + 1)
            sums = [np.bincount(idx, weights=vals[ok], minlength=n_local)]
            counts = [np.bincount(idx, minlength=n_local)]

        self._pieces.append(polygonise(labels, base, n_local, self.rows))
        self._classes.append(np.concatenate(class_of) if class_of else np.zeros(0, np.int64))
        if score is not None:
            self._sums.append(np.concatenate(sums) if sums else np.zeros(0))
            self._counts.append(np.concatenate(counts) if counts else np.zeros(0, np.int64))
        if self._last is not None:
            self._edges.append(_seam_pairs(*self._last, labels[0], cls[0]))
        self._last = (labels[-1].copy(), cls[-1].copy())
        self._n += n_local
        self.rows += h

    def finish(self) -> Regions:
        """Merge the pieces of regions cut by block seams; return one entry per region."""
        n = self._n
        pieces = np.concatenate(self._pieces) if self._pieces else np.empty(0, object)
        classes = np.concatenate(self._classes) if self._classes else np.zeros(0, np.int64)
        if self._sums:
            sums, counts = np.concatenate(self._sums), np.concatenate(self._counts)
        else:
            sums, counts = np.zeros(n), np.zeros(n, np.int64)
        edges = np.concatenate(self._edges) if self._edges else np.zeros((0, 2), np.int64)
        if len(edges) == 0:
            return Regions(shapely.normalize(pieces), classes, sums, counts.astype(np.int64))

        graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
        n_regions, region = connected_components(graph, directed=False)
        size = np.bincount(region, minlength=n_regions)
        first = np.full(n_regions, n, np.int64)
        np.minimum.at(first, region, np.arange(n))
        geoms = pieces[first].copy()
        order = np.argsort(region, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(size)])
        for r in np.flatnonzero(size > 1):
            merged = shapely.union_all(pieces[order[bounds[r] : bounds[r + 1]]])
            # Start rings at a corner, then drop the collinear vertices the seam left.
            geoms[r] = shapely.simplify(shapely.normalize(merged), 0.0)
        return Regions(
            shapely.normalize(geoms),
            classes[first],
            np.bincount(region, weights=sums, minlength=n_regions),
            np.bincount(region, weights=counts, minlength=n_regions).astype(np.int64),
        )


def polygonise(labels: np.ndarray, base: int, n: int, y0: int) -> np.ndarray:
    """One polygon per label of a block, in whole-mask pixel coordinates, ordered by label."""
    out = np.empty(n, dtype=object)
    if n == 0:
        return out
    shapes = rasterio.features.shapes(
        labels, mask=labels > 0, connectivity=4, transform=Affine.translation(0, y0)
    )
    xy: list[tuple[float, float]] = []
    ring_sizes: list[int] = []
    rings_per_poly: list[int] = []
    values: list[float] = []
    for geom, value in shapes:  # one step per polygon; coordinates are gathered in bulk
        rings = geom["coordinates"]
        rings_per_poly.append(len(rings))
        for ring in rings:
            ring_sizes.append(len(ring))
            xy.extend(ring)
        values.append(value)
    ring_index = np.repeat(np.arange(len(ring_sizes)), ring_sizes)
    rings = shapely.linearrings(np.asarray(xy, np.float64), indices=ring_index)
    geoms = shapely.polygons(rings, indices=np.repeat(np.arange(len(values)), rings_per_poly))
    idx = np.asarray(values, np.int64) - base - 1
    if len(idx) == n and np.array_equal(np.sort(idx), np.arange(n)):
        out[idx] = geoms
        return out
    # Not expected for 4-connected labels; stay correct should GDAL ever split one.
    for i in range(n):
        out[i] = shapely.union_all(geoms[idx == i])
    return out


def _seam_pairs(
    labels_above: np.ndarray, cls_above: np.ndarray, labels_below: np.ndarray, cls_below: np.ndarray
) -> np.ndarray:
    """0-based piece pairs that are 4-neighbours of the same class across a block seam."""
    touch = (labels_above > 0) & (labels_below > 0) & (cls_above == cls_below)
    if not touch.any():
        return np.zeros((0, 2), np.int64)
    pairs = np.stack([labels_above[touch], labels_below[touch]], axis=1).astype(np.int64) - 1
    return np.unique(pairs, axis=0)


# ------------------------------------------------------------------------ geometry, area


def pixel_to_xy(
    col: np.ndarray, row: np.ndarray, transform: Affine
) -> tuple[np.ndarray, np.ndarray]:
    """Map coordinates of pixel positions (the same arithmetic for every caller, so shared
    vertices stay bit-identical)."""
    a, b, c, d, e, f = (float(v) for v in tuple(transform)[:6])
    return a * col + b * row + c, d * col + e * row + f


def pixel_to_map(geoms: np.ndarray, transform: Affine) -> np.ndarray:
    """Apply the full affine ``transform`` (rotation/shear included) to pixel geometries."""

    def apply(xy: np.ndarray) -> np.ndarray:
        return np.column_stack(pixel_to_xy(xy[:, 0], xy[:, 1], transform))

    return shapely.transform(geoms, apply)


#: Gauss–Legendre nodes on [0, 1] and weights (sum 1) for the mean of the zone-area function
#: along a sloped lon/lat edge; F is smooth, so 8 nodes are exact to rounding for any edge.
_GL_X, _GL_W = np.polynomial.legendre.leggauss(8)
_GL_T, _GL_W = 0.5 * (_GL_X + 1.0), 0.5 * _GL_W
#: A ring whose geodesic area comes back within this share of the Earth's area of 0 may
#: really enclose (nearly) the whole Earth: Geod only knows areas modulo the Earth's area.
WRAP_SHARE = 1e-3


def zone_area(lat: np.ndarray, a: float, f: float) -> np.ndarray:
    """Area (m²) between the equator and latitude ``lat`` (radians), per radian of longitude,
    on the ellipsoid (a, f): a²·q(φ)/2 with q the authalic-latitude function (odd in φ).

    The area between two parallels and two meridians is ``Δλ · (F(φ2) - F(φ1))``, exactly.
    """
    s = np.sin(np.clip(np.asarray(lat, np.float64), -math.pi / 2, math.pi / 2))
    e2 = f * (2.0 - f)
    if e2 == 0:
        return a * a * s
    e = math.sqrt(e2)
    return 0.5 * a * a * (1.0 - e2) * (s / (1.0 - e2 * s * s) + np.arctanh(e * s) / e)


def ellipsoid_area(a: float, f: float) -> float:
    """Surface area (m²) of the ellipsoid (a, f)."""
    return float(4.0 * math.pi * zone_area(np.array(math.pi / 2), a, f))


def _ring_index(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rings of polygonal ``geoms``, the geometry each belongs to, and which are exteriors."""
    parts, part_of = shapely.get_parts(geoms, return_index=True)
    rings, ring_part = shapely.get_rings(parts, return_index=True)
    exterior = np.ones(len(rings), bool)
    exterior[1:] = ring_part[1:] != ring_part[:-1]
    return rings, part_of[ring_part], exterior


class AreaCalculator:
    """Ground area (m²) of polygons given in map coordinates of ``crs``.

    Geographic CRS: the exact ellipsoidal area of the region the polygon covers on the
    lon/lat map (edges straight in lon/lat, so a pixel is bounded by parallels and
    meridians): Green's theorem with the closed-form zone area :func:`zone_area`. This is
    right for whole-world, polar and antimeridian polygons, where a geodesic ring is
    degenerate or ambiguous. Projected CRS: geodesic on the CRS's ellipsoid after
    transforming densified rings to lon/lat; a ring that may enclose the whole Earth is
    resolved with :meth:`_cell_area`, as is a polygon with a vertex the projection cannot
    invert (off the disk of a geostationary view, say). No CRS: planar, in map units².
    """

    def __init__(self, crs: pyproj.CRS | None, transform: Affine, width: int, height: int) -> None:
        self.notes: list[str] = []
        self.geod: pyproj.Geod | None = None
        self.to_lonlat: pyproj.Transformer | None = None
        self.max_segment = 0.0
        self.radians_per_unit = 0.0  # > 0: geographic CRS, map x/y are longitude/latitude
        self.transform = transform
        self.crs = crs
        if crs is None:
            self.notes.append("mask has no CRS: area_m2 is the planar area in map units²")
            return
        try:
            lonlat = pyproj.crs.GeographicCRS(datum=crs.datum)
            self.geod = crs.get_geod()
            self.to_lonlat = pyproj.Transformer.from_crs(crs, lonlat, always_xy=True)
        except (pyproj.exceptions.CRSError, pyproj.exceptions.ProjError, TypeError) as exc:
            self.geod = self.to_lonlat = None
            self.notes.append(
                f"CRS {crs.name!r} has no usable ellipsoid ({str(exc).splitlines()[0]}): "
                "area_m2 is the planar area in map units²"
            )
            return
        if self.geod is None:
            self.to_lonlat = None
            self.notes.append(f"CRS {crs.name!r} has no ellipsoid: area_m2 is planar")
            return
        if crs.is_geographic and crs.axis_info:
            self.radians_per_unit = float(crs.axis_info[0].unit_conversion_factor)
            return
        self.max_segment = self._segment_length(transform, width, height)

    def _segment_length(self, transform: Affine, width: int, height: int) -> float:
        """Map length of ≈ ``DENSIFY_GROUND_M`` on the ground, measured at the mask centre."""
        cx, cy = width / 2.0, height / 2.0
        mx, my = pixel_to_xy(np.array([cx, cx + 1.0, cx]), np.array([cy, cy, cy + 1.0]), transform)
        lon, lat = self.to_lonlat.transform(mx, my, errcheck=False)
        _, _, dist = self.geod.inv(lon[[0, 0]], lat[[0, 0]], lon[1:], lat[1:])
        ground = float(np.max(dist))
        if math.isfinite(ground) and ground > 0:
            step = int(np.clip(DENSIFY_GROUND_M // ground, DENSIFY_MIN_PX, DENSIFY_MAX_PX))
        else:
            step = DENSIFY_FALLBACK_PX
        a, b, _, d, e, _ = tuple(transform)[:6]
        return step * min(math.hypot(a, d), math.hypot(b, e))

    @property
    def earth_area(self) -> float:
        """Surface area of the ellipsoid (m²)."""
        return ellipsoid_area(self.geod.a, self.geod.f)

    @property
    def planar(self) -> bool:
        return self.to_lonlat is None

    def __call__(self, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Areas of ``geoms`` and which needed the pixel fallback (NaN if that failed too)."""
        geoms = np.asarray(geoms, dtype=object)
        fallback = np.zeros(len(geoms), bool)
        if len(geoms) == 0:
            return np.zeros(0), fallback
        if self.planar:
            return shapely.area(geoms).astype(np.float64), fallback
        if self.radians_per_unit > 0:
            return self._lonlat_area(geoms), fallback
        return self._geodesic_area(geoms)

    def _lonlat_area(self, geoms: np.ndarray) -> np.ndarray:
        """Exact area of lon/lat polygons: ``-∮ F(φ) dλ`` per ring (Green's theorem), F the
        zone area; edges along a parallel take F there, sloped ones its Gauss–Legendre mean."""
        rings, ring_geom, exterior = _ring_index(geoms)
        xy, ring_of = shapely.get_coordinates(rings, return_index=True)
        lam = xy[:, 0] * self.radians_per_unit
        phi = np.clip(xy[:, 1] * self.radians_per_unit, -math.pi / 2, math.pi / 2)
        a, f = self.geod.a, self.geod.f
        # Vertex i → i + 1 is an edge when both are in one ring (rings are closed).
        edge = np.flatnonzero((ring_of[1:] == ring_of[:-1]) & (lam[1:] != lam[:-1]))
        p0, p1 = phi[edge], phi[edge + 1]
        mean = zone_area(p0, a, f)
        sloped = np.flatnonzero(p0 != p1)
        if len(sloped):
            lat = p0[sloped, None] + _GL_T[None, :] * (p1 - p0)[sloped, None]
            mean[sloped] = zone_area(lat, a, f) @ _GL_W
        # A constant integrates to 0 round a closed ring: subtract the ring's first value of
        # F so that small rings far from the equator do not lose digits to cancellation.
        starts = np.flatnonzero(np.r_[True, ring_of[1:] != ring_of[:-1]])
        ref = zone_area(phi[starts], a, f)
        ring = ring_of[edge]
        contrib = -(lam[edge + 1] - lam[edge]) * (mean - ref[ring])
        ring_area = np.abs(np.bincount(ring, weights=contrib, minlength=len(rings)))
        signed = np.where(exterior, ring_area, -ring_area)
        return np.bincount(ring_geom, weights=signed, minlength=len(geoms))

    def _geodesic_area(self, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Geodesic areas of densified rings in lon/lat (projected CRSs)."""
        fallback = np.zeros(len(geoms), bool)
        dense = shapely.segmentize(geoms, self.max_segment) if self.max_segment > 0 else geoms
        rings, ring_geom, exterior = _ring_index(dense)
        xy, ring_of = shapely.get_coordinates(rings, return_index=True)
        lon, lat = self.to_lonlat.transform(xy[:, 0], xy[:, 1], errcheck=False)
        finite = np.isfinite(lon) & np.isfinite(lat)
        starts = np.flatnonzero(np.r_[True, ring_of[1:] != ring_of[:-1]])
        ends = np.r_[starts[1:], len(ring_of)]
        ring_ok = np.logical_and.reduceat(finite, starts)
        ring_area = np.zeros(len(rings))
        for i in np.flatnonzero(ring_ok):  # one C call per ring; the closing vertex is implied
            s, e = starts[i], ends[i] - 1
            ring_area[i] = self.geod.polygon_area_perimeter(lon[s:e], lat[s:e])[0]
        # Geod knows the area only modulo the Earth's area E, signed positive for rings
        # counter-clockwise on the ground; map and ground orientation agree, so the region a
        # ring encloses has area (±area) mod E, in [0, E). A ring enclosing (nearly) the
        # whole Earth comes back near 0: such rings are resolved below.
        earth = self.earth_area
        enclosed = np.mod(np.where(shapely.is_ccw(rings), ring_area, -ring_area), earth)
        signed = np.where(exterior, enclosed, -enclosed)
        area = np.bincount(ring_geom, weights=signed, minlength=len(geoms))
        with np.errstate(invalid="ignore"):
            lat_span = np.fmax.reduceat(lat, starts) - np.fmin.reduceat(lat, starts)
        maybe_world = ring_ok & (enclosed < WRAP_SHARE * earth) & (lat_span > 90.0)
        n_wrap = np.bincount(ring_geom, weights=maybe_world, minlength=len(geoms))
        bad = np.bincount(ring_geom, weights=~ring_ok, minlength=len(geoms)) > 0
        for i in np.flatnonzero(n_wrap > 0):  # the right multiple of E is the one nearest a
            estimate = self._cell_area(geoms[i])  # pixel-by-pixel estimate
            if math.isfinite(estimate):
                k = np.clip(np.rint((estimate - area[i]) / earth), 0, n_wrap[i])
                area[i] = min(area[i] + k * earth, earth)
        bad |= ~(area > 0)  # never a zero, negative or NaN area for a polygon with pixels
        for i in np.flatnonzero(bad):
            area[i] = self._cell_area(geoms[i])
        fallback[bad] = True
        return area, fallback

    def _cell_area(self, geom: shapely.Geometry) -> float:
        """Fallback area: the pixels (or, for huge polygons, cells of s×s pixels) whose
        centres fall in ``geom`` and map to the ground, each weighted by its map area over
        the projection's areal scale there; cells off the Earth count zero."""
        try:
            proj = pyproj.Proj(self.crs)
        except pyproj.exceptions.CRSError:
            return math.nan
        gpx = pixel_to_map(np.array([geom], dtype=object), ~self.transform)[0]
        x0, y0, x1, y1 = shapely.bounds(gpx)
        x0, y0 = math.floor(x0), math.floor(y0)
        nx, ny = max(1, math.ceil(x1) - x0), max(1, math.ceil(y1) - y0)
        s = max(1, math.ceil(math.sqrt(nx * ny / FALLBACK_MAX_CELLS)))
        inside = rasterio.features.rasterize(
            [(gpx, 1)],
            out_shape=(math.ceil(ny / s), math.ceil(nx / s)),
            transform=Affine.translation(x0, y0) * Affine.scale(s),
            fill=0,
            dtype="uint8",
        )
        rows, cols = np.nonzero(inside)
        mx, my = pixel_to_xy(x0 + (cols + 0.5) * s, y0 + (rows + 0.5) * s, self.transform)
        lon, lat = self.to_lonlat.transform(mx, my, errcheck=False)
        ok = np.isfinite(lon) & np.isfinite(lat)
        scale = proj.get_factors(lon[ok], lat[ok], errcheck=False).areal_scale
        scale = np.asarray(scale, np.float64)
        scale = scale[np.isfinite(scale) & (scale > 0)]
        cell = s * s * abs(self.transform.determinant)
        return float(np.sum(cell / scale))


def _polygonal(geom: shapely.Geometry) -> shapely.Geometry:
    """The polygonal part of ``make_valid``'s answer."""
    fixed = shapely.make_valid(geom)
    if isinstance(fixed, shapely.Polygon | shapely.MultiPolygon):
        return fixed
    parts = shapely.get_parts(fixed)
    return shapely.union_all(parts[shapely.get_type_id(parts) == 3])  # 3: Polygon


def _clip(geoms: np.ndarray, clip: shapely.Geometry | None) -> np.ndarray:
    """``geoms`` cut to ``clip`` (their polygonal parts; empty where nothing is left)."""
    if clip is None or not len(geoms):
        return geoms
    shapely.prepare(clip)
    inside = shapely.contains_properly(clip, geoms)
    out = geoms.copy()
    cut = ~inside
    if cut.any():
        parts = shapely.intersection(geoms[cut], clip)
        out[cut] = [
            g if isinstance(g, shapely.Polygon | shapely.MultiPolygon) else _polygonal(g)
            for g in parts
        ]
    return out


def _make_valid(geoms: np.ndarray) -> np.ndarray:
    bad = ~shapely.is_valid(geoms)
    if bad.any():
        geoms = geoms.copy()
        geoms[bad] = [_polygonal(g) for g in geoms[bad]]
    return geoms


# ------------------------------------------------------------------------------ frame


def polygons_frame(
    regions: Regions,
    transform: Affine,
    crs: pyproj.CRS | None,
    class_names: Sequence[str],
    *,
    min_area: float = 0.0,
    simplify: float = 0.0,
    with_score: bool = False,
    size: tuple[int, int] = (0, 0),
    clip: shapely.Geometry | None = None,
) -> tuple[gpd.GeoDataFrame, int, list[str]]:
    """Regions → GeoDataFrame (fields ``FIELDS``); also how many were dropped and notes.

    ``min_area`` (m², or map units² without a CRS) is compared with the area of the exact
    pixel region (clipped); ``simplify`` (map units) runs a coverage simplification, so
    neighbours keep shared edges; ``clip`` (an area of interest, map coordinates) cuts every
    polygon to it; ``area_m2`` is the area of the polygon as written.
    """
    areas_of = AreaCalculator(crs, transform, *size)
    notes = list(areas_of.notes)
    px = regions.geoms
    geoms = _clip(pixel_to_map(px, transform), clip)
    empty = shapely.is_empty(geoms)  # a region that only touches the clip
    keep = ~empty
    if min_area > 0 or simplify == 0:
        if empty.any():
            areas, fallback = np.full(len(px), np.nan), np.zeros(len(px), bool)
            areas[keep], fallback[keep] = areas_of(geoms[keep])
        else:
            areas, fallback = areas_of(geoms)
        if min_area > 0:
            keep &= ~(areas < min_area)  # NaN (unknown area) is kept
    n_dropped = int((~keep & ~empty).sum())
    if simplify > 0:
        areas, fallback = np.full(len(px), np.nan), np.zeros(len(px), bool)
        geoms = np.full(len(px), None, dtype=object)
        if keep.any():
            # Vertices at every pixel corner make neighbours edge-matched: a valid coverage.
            dense = pixel_to_map(shapely.segmentize(px[keep], 1.0), transform)
            geoms[keep] = _clip(_make_valid(shapely.coverage_simplify(dense, simplify)), clip)
            keep &= ~shapely.is_empty(geoms)
            areas[keep], fallback[keep] = areas_of(geoms[keep])
    n_bad = int(fallback[keep].sum())
    if n_bad:
        notes.append(
            f"{n_bad} polygon(s) reach where the CRS cannot be inverted (off the Earth): "
            "their area_m2 sums the pixels whose centres are on the ground"
        )
    for note in notes:
        log.warning("%s", note)

    ids = regions.class_ids[keep]
    names = [class_name_for(class_names, c) for c in ids.tolist()]
    count = regions.score_count[keep]
    mean = np.full(len(ids), np.nan)
    if with_score:
        np.divide(regions.score_sum[keep], count, out=mean, where=count > 0)
    out = shapely.orient_polygons(geoms[keep])  # exteriors counter-clockwise (RFC 7946)
    return _frame(ids, names, areas[keep], mean, out, crs), n_dropped, notes


def _frame(
    ids: np.ndarray,
    names: Sequence[str],
    areas: np.ndarray,
    mean: np.ndarray,
    geoms: np.ndarray,
    crs: pyproj.CRS | None,
) -> gpd.GeoDataFrame:
    """The output table; NaN becomes a null so every format writes "no value"."""
    return gpd.GeoDataFrame(
        {
            "class_id": pd.array(ids, dtype="int32"),
            "class_name": pd.Series(list(names), dtype=object),
            "area_m2": pd.array(areas, dtype="Float64"),
            "mean_score": pd.array(mean, dtype="Float64"),
        },
        geometry=gpd.GeoSeries(geoms, crs=crs),
        crs=crs,
    )


def vectorize_array(
    classes: np.ndarray,
    *,
    valid: np.ndarray | None = None,
    transform: Affine | None = None,
    crs: Any = None,
    class_names: Sequence[str] | None = None,
    score: np.ndarray | None = None,
    min_area: float = 0.0,
    simplify: float = 0.0,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> gpd.GeoDataFrame:
    """In-memory counterpart of :func:`vectorize_mask` (same code path, no files).

    ``score``: [H, W] scores or [K, H, W] per-class probabilities, float in [0, 1], NaN none.
    """
    _check_numbers(min_area, simplify, block_rows)
    classes = np.asarray(classes)
    height, width = classes.shape
    transform = transform or Affine.identity()
    per_class = score is not None and score.ndim == 3
    acc = RegionAccumulator(width)
    for y0 in range(0, height, block_rows):
        rows = slice(y0, min(y0 + block_rows, height))
        fn = None
        if score is not None:

            def fn(c: int, rows: slice = rows) -> np.ndarray:
                band = score[c, rows] if per_class else score[rows]
                return np.asarray(band, np.float64)

        acc.add_block(
            classes[rows],
            None if valid is None else valid[rows],
            fn,
            score_per_class=per_class,
        )
    pcrs = None if crs is None else pyproj.CRS.from_user_input(crs)
    frame, _, _ = polygons_frame(
        acc.finish(),
        transform,
        pcrs,
        list(class_names or []),
        min_area=min_area,
        simplify=simplify,
        with_score=score is not None,
        size=(width, height),
    )
    return frame


# ------------------------------------------------------------------------------ inputs


def _quiet_open(path: Path) -> rasterio.DatasetReader:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path)


def open_mask(path: Path) -> rasterio.DatasetReader:
    """Open ``path`` as a class mask (one uint8 band) or raise a one-line InputError."""
    path = Path(path)
    if not (is_file(path) or path.exists()):
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a class mask")
    try:
        ds = _quiet_open(path)
    except RasterioIOError as exc:
        raise InputError(f"{path}: not a raster GDAL can read ({first_line(exc)})") from None
    if ds.count != 1 or ds.dtypes[0] != "uint8":
        found = f"{ds.count} band(s) of {ds.dtypes[0]}"
        ds.close()
        raise InputError(f"{path}: not a class mask (expected 1 band of uint8, found {found})")
    return ds


class ScoreRaster:
    """Scores on the mask's grid: one float band in [0, 1] (NaN nodata), or one probability
    band per class (float in [0, 1], or uint8 on a 0–254 scale when 255 is nodata, else
    0–255), class c reading band c + 1."""

    def __init__(self, path: Path, mask: rasterio.DatasetReader, mask_path: Path) -> None:
        self.path = Path(path)
        if not is_file(self.path):
            raise InputError(f"{self.path}: score raster not found")
        try:
            self.ds = _quiet_open(self.path)
        except RasterioIOError as exc:
            raise InputError(
                f"{self.path}: not a raster GDAL can read ({first_line(exc)})"
            ) from None
        ds = self.ds
        if (
            (ds.width, ds.height) != (mask.width, mask.height)
            or ds.crs != mask.crs
            or not (ds.transform.almost_equals(mask.transform, precision=1e-9))
        ):
            self.close()
            raise InputError(
                f"{self.path}: score raster is not on the grid of {mask_path} "
                f"(size {ds.width}x{ds.height} vs {mask.width}x{mask.height}, "
                "or a different transform or CRS)"
            )
        self.dtype = np.dtype(ds.dtypes[0])
        if self.dtype != np.uint8 and self.dtype.kind != "f":
            self.close()
            raise InputError(f"{self.path}: score raster must be float or uint8, not {self.dtype}")
        self.per_class = ds.count > 1
        self.nodata = ds.nodata
        scale_tag = ds.tags().get("SCALE", "")
        self.divisor = 254.0 if (self.nodata == 255 or "254" in scale_tag) else 255.0

    def close(self) -> None:
        self.ds.close()

    def __enter__(self) -> ScoreRaster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def block(self, window: Window) -> ScoreFn:
        """``score(class_id)`` for the rows of ``window`` (each band is asked for once)."""

        def score(c: int) -> np.ndarray:
            band = c + 1 if self.per_class else 1
            if band > self.ds.count:
                raise InputError(
                    f"{self.path}: has {self.ds.count} probability bands, "
                    f"but the mask has class {c}"
                )
            return self._read(band, window)

        return score

    def _read(self, band: int, window: Window) -> np.ndarray:
        try:
            raw = self.ds.read(band, window=window)
        except RasterioIOError as exc:
            raise InputError(f"{self.path}: unreadable ({first_line(exc)})") from None
        if self.dtype == np.uint8:
            vals = raw / self.divisor  # float64: k / 254 exactly as written
        else:
            vals = raw  # float32 stays float32; sums are taken in float64
        if self.nodata is not None and not math.isnan(self.nodata):
            vals = np.where(raw == self.nodata, np.nan, vals)
        return vals


# ----------------------------------------------------------------------------- outputs


def vector_format(path: Path) -> str:
    """Driver for ``path`` by its extension, or UsageError."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(set(FORMATS)))
        raise UsageError(
            f"{path}: unknown vector format {Path(path).suffix or '(none)'}; use {known}"
        )
    return fmt


def output_paths(path: Path) -> list[Path]:
    """Every file an output at ``path`` consists of (shapefile sidecars, the ``.qml`` style
    beside formats that cannot hold one)."""
    return [path, *(Path(path).with_suffix(s) for s in sidecar_suffixes(path))]


def sidecar_suffixes(path: Path) -> tuple[str, ...]:
    """Suffixes of the files written beside ``path`` under its stem."""
    fmt = vector_format(path)
    if fmt == "GPKG":
        return ()
    return (*(SHP_SIDECARS if fmt == "ESRI Shapefile" else ()), STYLE_SUFFIX)


def style_path(path: Path) -> Path | None:
    """The ``.qml`` QGIS loads with the layer at ``path`` (None: the style is inside)."""
    return None if vector_format(path) == "GPKG" else Path(path).with_suffix(STYLE_SUFFIX)


def check_style_free(path: Path, mask_path: Path) -> None:
    """Refuse a polygon file whose ``.qml`` would be the mask's own style (``m.tif`` and
    ``m.shp`` share ``m.qml``): QGIS would style one with the other's renderer."""
    qml = style_path(path)
    if qml is not None and qml.resolve() == Path(mask_path).with_suffix(".qml").resolve():
        raise UsageError(
            f"{path}: its style {qml.name} would replace the style of the mask "
            f"{Path(mask_path).name}; name the polygons differently "
            f"(e.g. {path.stem}_polygons{path.suffix}) or write .gpkg (style stored inside)"
        )


def output_crs(crs: pyproj.CRS | None, path: Path, dst_crs: Any = None) -> pyproj.CRS | None:
    """The CRS polygons from a mask in ``crs`` are written in at ``path``: ``dst_crs`` if
    given, WGS 84 lon/lat for GeoJSON (RFC 7946), else the mask's.

    A mask without CRS cannot be reprojected, nor written as GeoJSON (readers take GeoJSON
    without ``crs`` as WGS 84): UsageError.
    """
    fmt = vector_format(path)
    target = None
    if dst_crs is not None:
        try:
            target = pyproj.CRS.from_user_input(dst_crs)
        except pyproj.exceptions.CRSError as exc:
            raise UsageError(f"--dst-crs {dst_crs}: not a CRS ({first_line(exc)})") from None
    if crs is None:
        if target is not None:
            raise UsageError(f"--dst-crs {dst_crs}: the mask has no CRS to reproject from")
        if fmt == "GeoJSON":
            raise UsageError(
                f"{path}: the input has no CRS, and GeoJSON without one is read as WGS 84 "
                "lon/lat; write .gpkg, .shp or .parquet (they record no CRS)"
            )
        return None
    wgs84 = pyproj.CRS.from_user_input(GEOJSON_CRS)
    if fmt == "GeoJSON" and (target is None or wgs84.equals(target, ignore_axis_order=True)):
        target = wgs84  # CRS84 too: RFC 7946 GeoJSON has no other way to say it
    return target or crs


def layer_style(
    names: Sequence[str], present: Sequence[int], colormap: Mapping[int, Sequence[int]] | None
) -> str:
    """The polygon style of a mask's classes: every named class and every class value
    present, labelled with its name, in the mask's colour table (else ``class_colors``)."""
    values = sorted(set(range(len(names))) | {int(c) for c in present})
    labels = [class_name_for(names, c) for c in values]
    fallback = class_colors(labels)
    colors = [
        tuple(colormap[c][:3]) if colormap and c in colormap else fallback[i]
        for i, c in enumerate(values)
    ]
    return vector_qml_style(values, labels, colors)


def write_gpkg_style(path: Path, layer: str, qml: str) -> None:
    """Store ``qml`` as the default style of ``layer`` in the GeoPackage ``path``: the
    ``layer_styles`` table QGIS reads on load, registered as an attributes table."""
    con = sqlite3.connect(path)
    try:
        with con:
            con.execute(LAYER_STYLES_SQL)
            con.execute(
                "INSERT OR REPLACE INTO gpkg_contents (table_name, data_type, identifier) "
                "VALUES ('layer_styles', 'attributes', 'layer_styles')"
            )
            row = con.execute(
                "SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?", (layer,)
            ).fetchone()
            geom = row[0] if row else "geom"
            con.execute("DELETE FROM layer_styles WHERE f_table_name = ?", (layer,))
            con.execute(
                "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, "
                "f_geometry_column, styleName, styleQML, styleSLD, useAsDefault, description, "
                "owner, ui, update_time) VALUES ('', '', ?, ?, ?, ?, '', 1, ?, '', '', "
                "strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
                (layer, geom, layer, qml, "drseg class colours"),
            )
    finally:
        con.close()


def require_pyarrow() -> None:
    """GeoParquet needs pyarrow; say so before any work."""
    if importlib.util.find_spec("pyarrow") is None:
        raise UsageError(
            "writing .parquet needs pyarrow: pip install 'drseg[parquet]' (or pyarrow), "
            "or choose .gpkg"
        )


def truncate_utf8(text: str, max_bytes: int = SHP_TEXT_BYTES) -> str:
    """At most ``max_bytes`` of UTF-8, never cutting a character in two."""
    raw = text.encode("utf-8")
    return text if len(raw) <= max_bytes else raw[:max_bytes].decode("utf-8", errors="ignore")


def write_frame(
    frame: gpd.GeoDataFrame,
    path: Path,
    fmt: str,
    layer: str,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``frame`` to ``path`` (no renaming here) as ``fmt``; ``metadata`` goes into the
    layer where the format keeps it (GeoPackage)."""
    if fmt == "Parquet":
        frame.to_parquet(path, index=False)
        return
    import pyogrio

    multi = bool(len(frame)) and bool((frame.geometry.geom_type == "MultiPolygon").any())
    kwargs: dict[str, Any] = {"layer": layer} if fmt in ("GPKG", "GeoJSON") else {}
    if metadata and fmt == "GPKG":
        kwargs["layer_metadata"] = dict(metadata)
    if fmt == "GeoJSON" and frame.crs is not None and frame.crs == pyproj.CRS(GEOJSON_CRS):
        kwargs["layer_options"] = {"RFC7946": "YES", "COORDINATE_PRECISION": GEOJSON_DECIMALS}
    with warnings.catch_warnings():  # a mask without CRS was already reported as such
        warnings.filterwarnings("ignore", message="'crs' was not provided", category=UserWarning)
        pyogrio.write_dataframe(
            frame,
            path,
            driver=fmt,
            geometry_type="MultiPolygon" if multi else "Polygon",
            promote_to_multi=multi,
            **kwargs,
        )


def _read_back_crs(path: Path, fmt: str) -> pyproj.CRS | None:
    if fmt == "Parquet":
        crs = gpd.read_parquet(path).crs
    else:
        import pyogrio

        crs = pyogrio.read_info(path)["crs"]
    return None if crs is None else pyproj.CRS.from_user_input(crs)


def check_crs_storable(crs: pyproj.CRS | None, path: Path) -> None:
    """Fail early when ``path``'s format cannot record ``crs`` exactly (GeoJSON keeps EPSG
    codes only; a shapefile's ESRI .prj drops e.g. the geostationary sweep axis)."""
    fmt = vector_format(path)
    if crs is None or fmt not in ("ESRI Shapefile", "GeoJSON"):
        return
    none = np.zeros(0)
    empty = _frame(none.astype(np.int64), [], none, none, np.empty(0, object), crs)
    try:
        with tempfile.TemporaryDirectory(prefix="drseg-crs-") as tmp:
            probe = Path(tmp) / f"probe{Path(path).suffix.lower()}"
            write_frame(empty, probe, fmt, "probe")
            back = _read_back_crs(probe, fmt)
    except OSError:  # no usable temp folder: skip the probe rather than the whole run
        return
    if back != crs:
        raise UsageError(
            f"{path}: {Path(path).suffix} cannot record the mask's CRS ({crs.name}) exactly; "
            "write .gpkg or .parquet instead"
        )


def write_polygons(
    frame: gpd.GeoDataFrame,
    path: Path,
    *,
    layer: str | None = None,
    metadata: Mapping[str, str] | None = None,
    style: str | None = None,
) -> None:
    """Write ``frame`` atomically to ``path`` (format by extension; shapefile sidecars too);
    ``metadata``: layer metadata, kept where the format can (GeoPackage); ``style``: a QGIS
    style, stored in the GeoPackage or as ``.qml`` beside the file."""
    path = Path(path)
    fmt = vector_format(path)
    if fmt == "Parquet":
        require_pyarrow()
    sidecars = sidecar_suffixes(path)
    if fmt == "ESRI Shapefile":
        frame = frame.copy()
        frame["class_name"] = [truncate_utf8(n) for n in frame["class_name"]]
    layer = layer or path.stem
    with atomic_output(path, sidecar_suffixes=sidecars) as tmp:
        try:
            write_frame(frame, tmp, fmt, layer, metadata)
            if style is not None and fmt == "GPKG":
                write_gpkg_style(tmp, layer, style)
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - driver errors have many types; one line
            raise OutputError(f"{path}: cannot write ({first_line(exc)})") from None
        if style is not None and fmt != "GPKG":
            tmp.with_suffix(STYLE_SUFFIX).write_text(style, encoding="utf-8")
        for s in sidecars:  # an overwritten shapefile keeps no stale .prj/.cpg/.qml
            if not tmp.with_suffix(s).exists():
                with contextlib.suppress(OSError):
                    path.with_suffix(s).unlink()


def _check_numbers(min_area: float, simplify: float, block_rows: int) -> None:
    if not min_area >= 0:
        raise UsageError(f"--min-area must be ≥ 0, got {min_area}")
    if not simplify >= 0:
        raise UsageError(f"--simplify must be ≥ 0, got {simplify}")
    if block_rows < 1:
        raise UsageError(f"block_rows must be ≥ 1, got {block_rows}")


def _crs_label(crs: pyproj.CRS | None) -> str | None:
    if crs is None:
        return None
    auth = crs.to_authority(min_confidence=100)
    return f"{auth[0]}:{auth[1]}" if auth else crs.name


def _blocks(height: int, block_rows: int) -> Iterator[tuple[int, int]]:
    for y0 in range(0, height, block_rows):
        yield y0, min(block_rows, height - y0)


def vectorize_mask(
    mask_path: Path,
    out_path: Path,
    *,
    class_names: Sequence[str] | None = None,
    score_path: Path | None = None,
    min_area: float = 0.0,
    simplify: float = 0.0,
    overwrite: bool = False,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    layer: str | None = None,
    dst_crs: Any = None,
    clip: shapely.Geometry | None = None,
) -> VectorSummary:
    """Polygonise a class mask into ``out_path`` (.gpkg/.shp/.geojson/.parquet), atomically,
    styled in the mask's class colours for QGIS.

    Class names come from ``class_names``, else the mask's tags, else ``class_<id>``. Memory
    is bounded by one block of at most ``block_rows`` rows (fewer for masks wider than
    ``MAX_BLOCK_PIXELS / block_rows``) plus the polygons themselves. ``score_path``: see
    :class:`ScoreRaster`. Areas are taken in the mask's CRS; polygons are then written in
    :func:`output_crs` (``dst_crs``; WGS 84 for GeoJSON); a ``.qml`` style never replaces
    the mask's. ``clip``: an area of interest in the mask's CRS that cuts every polygon
    (recorded in the layer's metadata). Raises UsageError/InputError/OutputError with
    one-line messages.
    """
    start = time.perf_counter()
    # s3://b/k (as a Path keeps it) → /vsis3/b/k; GDAL reads masks and scores there itself
    mask_path, out_path = store_path(mask_path), output_path(Path(out_path))
    score_path = None if score_path is None else store_path(score_path)
    fmt = vector_format(out_path)
    _check_numbers(min_area, simplify, block_rows)
    check_style_free(out_path, mask_path)
    check_writable(output_paths(out_path), overwrite)
    if is_vsi(out_path):  # an object store: written in a local folder, then uploaded
        finals = output_paths(out_path)
        with staging_folder() as folder:
            staged = [p for p in staged_paths(finals, folder) if p is not None]
            summary = vectorize_mask(
                mask_path, staged[0], class_names=class_names, score_path=score_path,
                min_area=min_area, simplify=simplify, overwrite=True, block_rows=block_rows,
                layer=layer, dst_crs=dst_crs, clip=clip,
            )  # fmt: skip
            publish(list(zip(staged, finals, strict=True)), replace=overwrite)
        summary.path = out_path
        return summary
    if fmt == "Parquet":
        require_pyarrow()
    with contextlib.ExitStack() as stack:
        ds = stack.enter_context(open_mask(mask_path))
        crs = None if ds.crs is None else pyproj.CRS.from_wkt(ds.crs.to_wkt())
        out_crs = output_crs(crs, out_path, dst_crs)
        check_crs_storable(out_crs, out_path)
        try:
            colormap = ds.colormap(1)
        except ValueError:  # no colour table: class_colors
            colormap = None
        score = None
        if score_path is not None:
            score = stack.enter_context(ScoreRaster(score_path, ds, mask_path))
        acc = RegionAccumulator(ds.width)
        rows = min(block_rows, max(1, MAX_BLOCK_PIXELS // ds.width))
        for y0, h in _blocks(ds.height, rows):
            window = Window(0, y0, ds.width, h)
            try:
                data = ds.read(1, window=window)
                valid = ds.read_masks(1, window=window) > 0
            except RasterioIOError as exc:
                raise InputError(
                    f"{mask_path}: unreadable rows {y0}-{y0 + h} ({first_line(exc)})"
                ) from None
            acc.add_block(
                data,
                valid,
                score.block(window) if score else None,
                score_per_class=bool(score and score.per_class),
            )
        if class_names is not None:
            names = list(class_names)
        else:
            names = class_names_from_tags(ds.tags()) or []
        transform, size = ds.transform, (ds.width, ds.height)

    frame, n_dropped, notes = polygons_frame(
        acc.finish(),
        transform,
        crs,
        names,
        min_area=min_area,
        simplify=simplify,
        with_score=score_path is not None,
        size=size,
        clip=clip,
    )
    if out_crs is not None and out_crs != crs:
        frame = frame.to_crs(out_crs)  # area_m2 stays the area of the exact region
        lost = ~np.isfinite(shapely.get_coordinates(frame.geometry.values)).all(axis=1)
        if lost.any():
            raise UsageError(
                f"{out_path}: {int(lost.sum())} vertices cannot be reprojected to "
                f"{_crs_label(out_crs)} (off the Earth in {crs.name}); write .gpkg in the "
                "mask's CRS"
            )
    tags = vector_layer_tags(names, min_area, simplify, clipped=clip is not None)
    ids, counts = np.unique(frame["class_id"].to_numpy(np.int64), return_counts=True)
    style = layer_style(names, ids.tolist(), colormap)
    write_polygons(frame, out_path, layer=layer, metadata=tags, style=style)
    by_name: dict[str, int] = {}
    for c, k in zip(ids.tolist(), counts.tolist(), strict=True):
        name = class_name_for(names, c)
        by_name[name] = by_name.get(name, 0) + k
    return VectorSummary(
        path=out_path,
        n_polygons=len(frame),
        class_counts=by_name,
        crs=_crs_label(out_crs),
        seconds=round(time.perf_counter() - start, 3),
        n_dropped=n_dropped,
        warnings=notes,
    )
