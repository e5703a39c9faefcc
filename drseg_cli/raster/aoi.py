"""Areas of interest (``--aoi``): a polygon limiting which tiles run and which pixels count.

An AOI is a vector file (any OGR format, its own CRS), a WKT polygon or a
``minx,miny,maxx,maxy`` box (both in the scene's CRS unless ``--aoi-crs`` says otherwise).
It is reprojected to each scene (densified first, so a lon/lat box stays a lon/lat box) and
kept in the scene's pixel coordinates. A pixel belongs to the AOI when its centre lies inside
(GDAL's rasterisation rule, as ``gdalwarp -cutline`` and ``rio mask`` use); a tile runs when
one of its pixel centres may. The mask is rasterised one tile at a time, so memory does not
grow with the scene. Files only (GDAL/OGR, shapely, pyproj): no model here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from drseg_cli.errors import InputError, UsageError, first_line

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    import pyproj
    import shapely

    from drseg_cli.raster.reader import SceneInfo
    from drseg_cli.raster.tiling import Tile

_NUMBER = r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*"
_BBOX = re.compile(rf"^{_NUMBER},{_NUMBER},{_NUMBER},{_NUMBER}$")
_WKT_TYPES = ("POLYGON", "MULTIPOLYGON", "GEOMETRYCOLLECTION", "POINT", "LINESTRING",
              "MULTIPOINT", "MULTILINESTRING")  # fmt: skip
#: Vertices added per edge's worth of extent before reprojecting (curved edges stay curved).
DENSIFY_STEPS = 256


def label(spec: str) -> str:
    """``--aoi VALUE`` for messages, a long WKT cut short."""
    text = " ".join(str(spec).split())
    return f"--aoi {text if len(text) <= 60 else text[:57] + '...'}"


def _polygonal(geom: shapely.Geometry, name: str) -> shapely.Geometry:
    """The polygons of ``geom`` (made valid); a point or line is no area."""
    import shapely

    geom = shapely.make_valid(geom) if not shapely.is_valid(geom) else geom
    parts = shapely.get_parts(geom)
    polys = parts[np.isin(shapely.get_type_id(parts), (3, 6))]  # Polygon, MultiPolygon
    if not len(polys):
        raise UsageError(f"{name}: no polygon in it (an area of interest must be an area)")
    out = shapely.union_all(polys)
    if out.is_empty or out.area <= 0:
        raise UsageError(f"{name}: the polygon is empty")
    return out


def _parse_crs(text: str, what: str) -> pyproj.CRS:
    import pyproj

    try:
        return pyproj.CRS.from_user_input(text)
    except pyproj.exceptions.CRSError as exc:
        raise UsageError(f"{what} {text}: not a CRS ({first_line(exc)})") from None


def _exists(text: str) -> bool:
    try:
        return Path(text).exists()
    except OSError:  # e.g. a name too long for the file system: not a file
        return False


def _is_file_like(text: str) -> bool:
    return Path(text).suffix != "" or "/" in text or "\\" in text or "://" in text


def read_aoi(spec: str, aoi_crs: str | None = None) -> tuple[shapely.Geometry, pyproj.CRS | None]:
    """The AOI's polygon and its CRS (None: the scene's). A vector file keeps its own CRS
    (``aoi_crs`` only names it for a file without one); WKT and boxes are in ``aoi_crs``."""
    import shapely

    name = label(spec)
    text = str(spec).strip()
    if not text:
        raise UsageError("--aoi: give a vector file, a WKT polygon or minx,miny,maxx,maxy")
    crs = _parse_crs(aoi_crs, "--aoi-crs") if aoi_crs else None
    box = _BBOX.match(text)
    if box:
        minx, miny, maxx, maxy = (float(v) for v in box.groups())
        if not (minx < maxx and miny < maxy):
            raise UsageError(f"{name}: need minx < maxx and miny < maxy")
        return shapely.box(minx, miny, maxx, maxy), crs
    if text.split("(")[0].strip().upper().split(" ")[0] in _WKT_TYPES:
        try:
            geom = shapely.from_wkt(text)
        except shapely.errors.GEOSException as exc:
            raise UsageError(f"{name}: not valid WKT ({first_line(exc)})") from None
        return _polygonal(geom, name), crs
    if not _exists(text) and not text.startswith("/vsi") and "://" not in text:
        if _is_file_like(text):
            raise InputError(f"{name}: no such file")
        raise UsageError(f"{name}: not a vector file, WKT polygon or minx,miny,maxx,maxy")
    return _read_file(text, name, crs)


def _read_file(
    path: str, name: str, given: pyproj.CRS | None
) -> tuple[shapely.Geometry, pyproj.CRS | None]:
    """Every polygon of the file's first layer, as one geometry, and the layer's CRS."""
    import pyogrio.raw
    import pyproj
    import shapely

    try:
        meta, _, wkb, _ = pyogrio.raw.read(path, columns=[], force_2d=True)
    except Exception as exc:  # noqa: BLE001 - OGR errors have many types: one line
        raise InputError(f"{name}: unreadable ({first_line(exc)})") from None
    geoms = shapely.from_wkb(np.asarray([g for g in wkb if g is not None], dtype=object))
    if not len(geoms):
        raise InputError(f"{name}: no features in it")
    own = pyproj.CRS.from_user_input(meta["crs"]) if meta.get("crs") else None
    if own is not None and given is not None and own != given:
        raise UsageError(
            f"--aoi-crs {given.to_string()}: {name} has its own CRS ({own.name}); drop --aoi-crs"
        )
    return _polygonal(shapely.GeometryCollection(list(geoms)), name), own or given


@dataclass(frozen=True)
class AreaOfInterest:
    """An AOI on one scene: ``geometry`` in the scene's CRS, ``pixels`` in its pixel grid
    (column, row; pixel (c, r) covers ``[c, c+1] × [r, r+1]``)."""

    spec: str
    geometry: shapely.Geometry
    pixels: shapely.Geometry

    def __post_init__(self) -> None:
        import shapely

        shapely.prepare(self.pixels)

    def touches(self, x0: int, y0: int, width: int, height: int) -> bool:
        """Whether the window's pixel centres span part of the AOI (the tile must run)."""
        import shapely

        centres = shapely.box(
            x0 + 0.5, y0 + 0.5, x0 + max(width - 0.5, 0.501), y0 + max(height - 0.5, 0.501)
        )
        return bool(shapely.intersects(self.pixels, centres))

    def window_mask(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """``bool [height, width]``: pixels of the window whose centre lies in the AOI."""
        import rasterio.features
        import shapely
        from affine import Affine

        part = shapely.clip_by_rect(self.pixels, x0 - 1, y0 - 1, x0 + width + 1, y0 + height + 1)
        if part.is_empty:
            return np.zeros((height, width), bool)
        return rasterio.features.geometry_mask(
            [part], (height, width), Affine.translation(x0, y0), invert=True
        )

    def tiles(self, tiles: Iterable[Tile]) -> Iterator[Tile]:
        """The tiles that run (lazily: a huge grid is never listed)."""
        for t in tiles:
            if self.touches(t.x0, t.y0, t.width, t.height):
                yield t


def _transform(
    geom: shapely.Geometry, src: pyproj.CRS, dst: pyproj.CRS, name: str
) -> shapely.Geometry:
    """``geom`` from ``src`` to ``dst``, densified first so edges follow ``src``'s lines."""
    import pyproj
    import shapely

    x0, y0, x1, y1 = shapely.bounds(geom)
    step = max(x1 - x0, y1 - y0) / DENSIFY_STEPS
    dense = shapely.segmentize(geom, step) if step > 0 else geom
    transformer = pyproj.Transformer.from_crs(src, dst, always_xy=True)

    def apply(xy: np.ndarray) -> np.ndarray:
        return np.column_stack(transformer.transform(xy[:, 0], xy[:, 1], errcheck=False))

    out = shapely.transform(dense, apply)
    if not np.isfinite(shapely.get_coordinates(out)).all():
        raise UsageError(f"{name}: cannot be reprojected from {src.name} to {dst.name}")
    return shapely.make_valid(out) if not shapely.is_valid(out) else out


def scene_aoi(
    spec: str,
    info: SceneInfo,
    aoi_crs: str | None = None,
    read: tuple[shapely.Geometry, pyproj.CRS | None] | None = None,
) -> AreaOfInterest:
    """The AOI ``spec`` on the scene ``info`` (``read``: ``read_aoi``'s answer, if already
    read); a one-line error when it misses the scene."""
    import pyproj
    import shapely
    import shapely.affinity

    name = label(spec)
    geom, crs = read or read_aoi(spec, aoi_crs)
    scene_crs = None if info.crs is None else pyproj.CRS.from_wkt(info.crs.to_wkt())
    if crs is not None and scene_crs is None:
        raise UsageError(f"{name}: {info.path} has no CRS to reproject the area of interest to")
    if crs is not None and scene_crs is not None and crs != scene_crs:
        geom = _transform(geom, crs, scene_crs, name)
    inv = ~info.transform
    pixels = shapely.affinity.affine_transform(geom, [inv.a, inv.b, inv.d, inv.e, inv.c, inv.f])
    aoi = AreaOfInterest(str(spec), geom, pixels)
    if not aoi.touches(0, 0, info.width, info.height):
        x0, y0, x1, y1 = shapely.bounds(geom)
        where = scene_crs.to_string() if scene_crs is not None else "pixel coordinates"
        raise UsageError(
            f"{name}: does not overlap {info.path} (AOI bounds {x0:.6g}, {y0:.6g}, {x1:.6g}, "
            f"{y1:.6g} in {where}); check --aoi-crs"
        )
    return aoi


def count_tiles(aoi: AreaOfInterest | None, tiles: Iterable[Tile]) -> int:
    """How many of ``tiles`` an AOI lets run (all of them without one)."""
    source = tiles if aoi is None else aoi.tiles(tiles)
    return sum(1 for _ in source)
