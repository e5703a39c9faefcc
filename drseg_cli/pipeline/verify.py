"""Check produced outputs against their input and each other, as a QGIS user would see them.

A mask must be on its input's grid with its class table intact: class names in the tags, a
colour table for every class and a ``.qml`` style whose palette has the same values, labels
and colours. A polygon layer must have readable fields, its input's CRS (or a reprojection
of it, taken back to the input's grid for the checks), a QGIS style in the mask's class
colours, a positive finite ``area_m2`` everywhere, the mask's class names, polygons if the
mask has classified pixels, and polygons that lie on the mask (vertices on its pixel
corners, the same classes where a sample is rasterised back). Used by ``drseg check`` and
by ``--resume``.
"""

from __future__ import annotations

import math
import sqlite3
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyproj
import rasterio
import rasterio.features
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from drseg_cli.errors import InputError, first_line
from drseg_cli.pipeline.segment import OutputPlan
from drseg_cli.raster.mask_meta import (
    CLIPPED_TAG,
    MASK_NODATA,
    MIN_AREA_TAG,
    class_band_tags,
    class_name_for,
    class_names_from_tags,
)
from drseg_cli.raster.writers import STYLE_FIELD

if TYPE_CHECKING:  # polygon checks only: checking a mask needs neither pandas nor shapely
    import pandas as pd
    import shapely

#: Polygons whose geometry is compared with the mask (the first ones of the layer).
SAMPLE_FEATURES = 2000
#: A vertex this close (in pixels) to a pixel corner is on it.
CORNER_TOL_PX = 1e-6
#: Share of sampled vertices that must sit on pixel corners (simplification keeps corners;
#: repairing an invalid simplified polygon may add a few crossing points).
MIN_ON_CORNER = 0.99
#: A layer that cannot record ``DRSEG_CLIPPED`` (GeoJSON, Shapefile, Parquet) and has at
#: least this share of its vertices on pixel corners (median offset 0) is taken as cut to an
#: area of interest; a shifted layer has next to none on them.
MIN_ON_CORNER_CUT = 0.5
#: Share of the pixels under simplified polygons that must have the polygon's class.
MIN_AGREEMENT = 0.8
#: The GeoPackage table of QGIS styles (not a polygon layer).
STYLE_TABLE = "layer_styles"


def _open(path: Path) -> rasterio.DatasetReader:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path)


def _hex(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb[:3])


@dataclass
class MaskGrid:
    """What a verified mask tells the checks of a polygon layer made from it."""

    path: Path
    names: list[str]
    crs: rasterio.crs.CRS | None
    transform: Affine
    width: int
    height: int
    classified: int  # pixels with a class (not nodata)
    colors: dict[int, tuple[int, ...]] = field(default_factory=dict)  # the colour table
    clipped: bool = False  # cut to an area of interest (--aoi)


def verify_style(qml: Path, names: Sequence[str], colors: dict[int, tuple[int, ...]]) -> dict:
    """Raise InputError unless ``qml`` is a QGIS paletted style with the mask's class values,
    names and colours (QGIS applies it when it opens the mask)."""
    if not qml.is_file():
        raise InputError(f"{qml}: QGIS style missing (QGIS would show the mask without names)")
    try:
        root = ET.parse(qml).getroot()
    except (ET.ParseError, OSError) as exc:
        raise InputError(f"{qml}: not a QGIS style ({first_line(exc)})") from None
    renderer = root.find("pipe/rasterrenderer") if root.tag == "qgis" else None
    if renderer is None or renderer.get("type") != "paletted" or renderer.get("band") != "1":
        raise InputError(f"{qml}: not a QGIS paletted style for band 1")
    entries: dict[int, ET.Element] = {}
    for entry in renderer.iterfind("colorPalette/paletteEntry"):
        try:
            value = int(entry.get("value", ""))
        except ValueError:
            bad = entry.get("value")
            raise InputError(f"{qml}: palette value {bad!r} is not a class value") from None
        entries[value] = entry
    if sorted(entries) != list(range(len(names))):
        raise InputError(
            f"{qml}: style has class values {sorted(entries)}, the mask 0..{len(names) - 1}"
        )
    for value, entry in entries.items():
        if entry.get("label") != names[value]:
            raise InputError(
                f"{qml}: style labels class {value} {entry.get('label')!r}, "
                f"the mask calls it {names[value]!r}"
            )
        want = _hex(colors[value])
        if (entry.get("color") or "").lower() != want:
            raise InputError(
                f"{qml}: style colour {entry.get('color')} for class {value} ({names[value]}) "
                f"differs from the mask's colour table {want}"
            )
    return {"style": str(qml)}


def read_mask(mask: Path, class_names: Sequence[str] | None) -> MaskGrid:
    """Raise InputError unless ``mask`` is a complete drseg class mask with an intact class
    table (names, band tags, colour table; ``class_names`` if given); every block is read."""
    if not mask.is_file():
        raise InputError(f"{mask}: output missing")
    try:
        with _open(mask) as m:
            names = class_names_from_tags(m.tags())
            if names is None:
                raise InputError(f"{mask}: not a drseg class mask (no class names)")
            if class_names is not None and list(class_names) != names:
                raise InputError(f"{mask}: classes {names} differ from {list(class_names)}")
            if m.count != 1 or m.dtypes[0] != "uint8" or m.nodata != MASK_NODATA:
                raise InputError(f"{mask}: not a single-band uint8 mask with nodata 255")
            band = {k: v for k, v in m.tags(1).items() if k.startswith("CLASS_")}
            if band and band != class_band_tags(names):
                raise InputError(
                    f"{mask}: band tags name the classes {[band[k] for k in sorted(band)]}, "
                    f"the class list is {names}"
                )
            try:
                colors = m.colormap(1)
            except ValueError:
                msg = "no colour table (QGIS cannot show its classes)"
                raise InputError(f"{mask}: {msg}") from None
            classified = 0
            for _, window in m.block_windows(1):  # every block decodes
                block = m.read(1, window=window)
                bad = (block != MASK_NODATA) & (block >= len(names))
                if bad.any():
                    raise InputError(f"{mask}: class values beyond the {len(names)} classes")
                classified += int(np.count_nonzero(block != MASK_NODATA))
            grid = MaskGrid(
                mask,
                names,
                m.crs,
                m.transform,
                m.width,
                m.height,
                classified,
                dict(colors),
                clipped=bool(m.tags().get(CLIPPED_TAG)),
            )
    except RasterioIOError as exc:
        raise InputError(f"{mask}: unreadable ({first_line(exc)})") from None
    verify_style(mask.with_suffix(".qml"), names, colors)
    return grid


def _same_grid(path: Path, grid: tuple, source: Path) -> None:
    with _open(source) as s:
        if (s.crs, s.transform, s.width, s.height) != grid:
            raise InputError(f"{path}: grid or CRS differs from its input {source}")


def verify_mask(mask: Path, source: Path | None, class_names: Sequence[str] | None) -> dict:
    """Raise InputError unless ``mask`` is a complete drseg class mask with its QGIS style,
    matching ``source``'s grid and CRS (and ``class_names`` if given)."""
    grid = read_mask(mask, class_names)
    if source is not None:
        _same_grid(mask, (grid.crs, grid.transform, grid.width, grid.height), source)
    return {
        "mask": str(mask),
        "classes": grid.names,
        "size": [grid.width, grid.height],
        "style": str(mask.with_suffix(".qml")),
        "classified_pixels": grid.classified,
    }


def _has_valid_pixels(source: Path) -> bool:
    """Whether any pixel of ``source`` is valid (stops at the first block that has one)."""
    with _open(source) as s:
        return any(s.read_masks(1, window=w).any() for _, w in s.block_windows(1))


def _read_layer(vector: Path) -> tuple[object, list[str], int, dict, str | None]:
    """CRS, field names, feature count, layer metadata and layer name (GeoPackage: the
    polygon layer, not QGIS's ``layer_styles`` table), or InputError."""
    import pyogrio

    if not vector.is_file():
        raise InputError(f"{vector}: output missing")
    try:
        if vector.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            schema = pq.read_schema(vector)
            import geopandas as gpd

            crs = gpd.read_parquet(vector, columns=["geometry"]).crs
            return crs, list(schema.names), pq.read_metadata(vector).num_rows, {}, None
        layer = None
        if vector.suffix.lower() == ".gpkg":
            names = [str(n) for n, _ in pyogrio.list_layers(vector) if n != STYLE_TABLE]
            layer = names[0] if names else None
        info = pyogrio.read_info(vector, layer=layer)
        meta = info["layer_metadata"] or {}
        return info["crs"], list(info["fields"]), info["features"], meta, layer
    except Exception as exc:  # noqa: BLE001 - any reader failure means "not valid"
        raise InputError(f"{vector}: unreadable ({first_line(exc)})") from None


def _read_features(
    vector: Path, *, geometry: bool, limit: int | None = None, layer: str | None = None
):
    """The class and area fields (and the geometry of the first ``limit`` features)."""
    import geopandas as gpd
    import pyogrio

    columns = ["class_id", "class_name", "area_m2"]
    try:
        if vector.suffix.lower() == ".parquet":
            frame = gpd.read_parquet(vector, columns=[*columns, "geometry"])
            return frame.iloc[:limit] if limit else frame
        return pyogrio.read_dataframe(
            vector, layer=layer, columns=columns, read_geometry=geometry, max_features=limit
        )
    except Exception as exc:  # noqa: BLE001 - any reader failure means "not valid"
        raise InputError(f"{vector}: unreadable ({first_line(exc)})") from None


def _read_vector_style(vector: Path, layer: str | None) -> tuple[str, str]:
    """Where QGIS finds ``vector``'s default style and its QML text: the GeoPackage's
    ``layer_styles`` table, else the ``.qml`` beside the file; InputError if there is none."""
    from drseg_cli.raster.vectorize import style_path

    qml = style_path(vector)
    if qml is not None:
        if not qml.is_file():
            raise InputError(
                f"{qml}: QGIS style missing (QGIS would draw every class of {vector.name} "
                "in one colour)"
            )
        try:
            return str(qml), qml.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{qml}: unreadable ({first_line(exc)})") from None
    where = f"{vector} (layer_styles)"
    row = None
    try:
        con = sqlite3.connect(f"{vector.resolve().as_uri()}?mode=ro", uri=True)
        try:
            row = con.execute(
                f"SELECT styleQML FROM {STYLE_TABLE} WHERE f_table_name = ? "
                "ORDER BY useAsDefault DESC, update_time DESC LIMIT 1",
                (layer,),
            ).fetchone()
        finally:
            con.close()
    except sqlite3.Error:  # e.g. no layer_styles table
        row = None
    if row is None or not row[0]:
        raise InputError(
            f"{vector}: no QGIS style for layer {layer!r} in its {STYLE_TABLE} table "
            "(QGIS would draw every class in one colour)"
        )
    return where, str(row[0])


def _fill_color(symbol: ET.Element | None) -> str | None:
    """``#rrggbb`` of a QGIS fill symbol's SimpleFill layer (new ``Option`` or old ``prop``)."""
    if symbol is None:
        return None
    layer = symbol.find("layer[@class='SimpleFill']")
    if layer is None:
        return None
    node = layer.find("Option[@type='Map']/Option[@name='color']")
    text = node.get("value") if node is not None else None
    if text is None:
        prop = layer.find("prop[@k='color']")
        text = prop.get("v") if prop is not None else None
    try:
        return _hex([int(v) for v in (text or "").split(",")[:3]])
    except (ValueError, IndexError):
        return None


def verify_vector_style(
    vector: Path,
    layer: str | None,
    labels: dict[int, str],
    colors: dict[int, tuple[int, ...]] | None,
    *,
    complete: bool = True,
) -> str:
    """Raise InputError unless QGIS opens ``vector`` with a categorized style on
    ``STYLE_FIELD`` with the classes ``labels`` (value → name; exactly those if
    ``complete``, else at least) and, given ``colors``, the mask's colour of each; returns
    where the style is."""
    where, text = _read_vector_style(vector, layer)
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise InputError(f"{where}: not a QGIS style ({first_line(exc)})") from None
    renderer = root.find("renderer-v2") if root.tag == "qgis" else None
    if (
        renderer is None
        or renderer.get("type") != "categorizedSymbol"
        or renderer.get("attr") != STYLE_FIELD
    ):
        raise InputError(f"{where}: not a QGIS categorized style on {STYLE_FIELD}")
    symbols = {sym.get("name"): sym for sym in renderer.iterfind("symbols/symbol")}
    categories: dict[int, tuple[str | None, str | None]] = {}
    for cat in renderer.iterfind("categories/category"):
        try:
            value = int(cat.get("value", ""))
        except ValueError:
            bad = cat.get("value")
            raise InputError(f"{where}: category {bad!r} is not a class value") from None
        categories[value] = (cat.get("label"), _fill_color(symbols.get(cat.get("symbol"))))
    if sorted(categories) != sorted(labels) and (complete or not set(labels) <= set(categories)):
        raise InputError(
            f"{where}: style has class values {sorted(categories)}, the layer's classes "
            f"are {sorted(labels)}"
        )
    from drseg_cli.raster.vectorize import truncate_utf8

    cut = truncate_utf8 if vector.suffix.lower() == ".shp" else str  # dBASE keeps 254 bytes
    for value, (label, color) in categories.items():
        if value in labels and labels[value] not in (label, cut(label or "")):
            raise InputError(
                f"{where}: style labels class {value} {label!r}, the layer calls it "
                f"{labels[value]!r}"
            )
        if colors is not None and value in colors and color != _hex(colors[value]):
            raise InputError(
                f"{where}: style colour {color} for class {value} ({label}) differs from "
                f"the mask's colour table {_hex(colors[value])}"
            )
    return where


def _check_areas(vector: Path, area: pd.Series) -> None:
    import pandas as pd

    values = pd.to_numeric(area, errors="coerce").to_numpy(np.float64, na_value=np.nan)
    bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
    if len(bad):
        raise InputError(
            f"{vector}: {len(bad)} polygon(s) have no positive finite area_m2 "
            f"(feature {bad[0]}: {values[bad[0]]})"
        )


def _check_names(vector: Path, frame: pd.DataFrame, names: list[str] | None, origin: str) -> None:
    """Every polygon's class_name is the one its class_id has in ``names``; without names,
    at least one name per class_id."""
    import pandas as pd

    from drseg_cli.raster.vectorize import truncate_utf8

    ids = frame["class_id"].to_numpy(np.int64)
    got = frame["class_name"].astype(str).to_numpy()
    shp = vector.suffix.lower() == ".shp"
    if names is not None:
        bad_id = np.flatnonzero((ids < 0) | (ids >= len(names)))
        if len(bad_id):
            raise InputError(
                f"{vector}: class_id {ids[bad_id[0]]} is not a class of {origin} "
                f"({len(names)} classes)"
            )
        want = [class_name_for(names, int(c)) for c in range(len(names))]
        if shp:  # dBASE keeps 254 bytes of text
            want = [truncate_utf8(n) for n in want]
        bad = np.flatnonzero(got != np.asarray(want, dtype=object)[ids])
        if len(bad):
            i = bad[0]
            raise InputError(
                f"{vector}: class_name {got[i]!r} for class_id {ids[i]}, but {origin} names it "
                f"{want[ids[i]]!r} ({len(bad)} polygon(s))"
            )
        return
    pairs = pd.DataFrame({"id": ids, "name": got}).drop_duplicates()
    twice = pairs["id"][pairs["id"].duplicated()]
    if len(twice):
        c = int(twice.iloc[0])
        raise InputError(
            f"{vector}: class_id {c} has several names {sorted(pairs.loc[pairs.id == c, 'name'])}"
        )


def _check_on_grid(
    vector: Path,
    geoms: np.ndarray,
    ids: np.ndarray,
    grid: MaskGrid | None,
    footprint: tuple,
    clipped: bool | None = False,
) -> None:
    """Polygons lie on the pixel grid: inside it, vertices on pixel corners, and (with a
    mask) covering pixels of their own class. Polygons cut to an area of interest
    (``clipped``) have edges along it: their vertices are not held to the corners.
    ``clipped=None``: unknown (a format without layer metadata): vertices off the corners
    pass as cuts if most are on them and their median offset is 0 (a shift moves all)."""
    import shapely

    from drseg_cli.raster.vectorize import pixel_to_map

    transform, width, height, what = footprint
    px = pixel_to_map(geoms, ~transform)
    xy = shapely.get_coordinates(px)
    off = np.abs(xy - np.rint(xy)).max(axis=1) if len(xy) else np.zeros(0)
    on_corner = float(np.mean(off < CORNER_TOL_PX)) if len(xy) else 1.0
    shift = np.median(xy - np.rint(xy), axis=0) if len(xy) else np.zeros(2)
    cut = clipped is None and on_corner >= MIN_ON_CORNER_CUT
    cut = cut and bool(np.all(np.abs(shift) < CORNER_TOL_PX))
    if on_corner < MIN_ON_CORNER and not (clipped or cut):
        raise InputError(
            f"{vector}: polygon vertices are off the pixel corners of {what} "
            f"({1 - on_corner:.0%} of those sampled; median offset {shift[0]:+.3f}, "
            f"{shift[1]:+.3f} pixels): shifted"
        )
    x0, y0, x1, y1 = shapely.total_bounds(px)
    tol = CORNER_TOL_PX
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        raise InputError(
            f"{vector}: polygons reach outside {what} (pixel bounds {x0:.3f}, {y0:.3f}, "
            f"{x1:.3f}, {y1:.3f} of {width}x{height}): shifted or on another grid"
        )
    if grid is None:
        return
    exact = [_rectilinear(g) for g in px]
    agree = np.zeros(len(px))
    total = np.zeros(len(px))
    with _open(grid.path) as m:
        for i, g in enumerate(px):
            gx0, gy0, gx1, gy1 = (int(v) for v in np.rint(shapely.bounds(g)))
            if gx1 <= gx0 or gy1 <= gy0:
                continue
            window = Window(gx0, gy0, gx1 - gx0, gy1 - gy0)
            inside = rasterio.features.rasterize(
                [(g, 1)],
                out_shape=(gy1 - gy0, gx1 - gx0),
                transform=Affine.translation(gx0, gy0),
                dtype="uint8",
            ).astype(bool)
            values = m.read(1, window=window)
            total[i] = inside.sum()
            agree[i] = np.count_nonzero(inside & (values == ids[i]))
    exact = np.asarray(exact, bool)
    wrong = np.flatnonzero(exact & (agree != total))
    if len(wrong):
        i = wrong[0]
        raise InputError(
            f"{vector}: polygons do not match {grid.path} ({len(wrong)} of {len(px)} sampled; "
            f"feature {i}: {int(total[i] - agree[i])} of {int(total[i])} pixels have another "
            f"class): shifted or from another mask"
        )
    loose = ~exact & (total > 0)
    if loose.any() and agree[loose].sum() < MIN_AGREEMENT * total[loose].sum():
        share = agree[loose].sum() / total[loose].sum()
        raise InputError(
            f"{vector}: polygons do not match {grid.path} (only {share:.0%} of the pixels "
            "under the sampled simplified polygons have their class)"
        )


def _rectilinear(geom: shapely.Geometry) -> bool:
    """Whether every edge (pixel coordinates) is horizontal or vertical: an unsimplified
    region, which must cover exactly the pixels of its class."""
    import shapely

    rings = shapely.get_rings(shapely.get_parts(geom))
    for ring in rings:
        xy = shapely.get_coordinates(ring)
        d = np.abs(np.diff(xy, axis=0))
        if (np.minimum(d[:, 0], d[:, 1]) > CORNER_TOL_PX).any():
            return False
    return True


def _style_labels(
    vector: Path, frame: pd.DataFrame | None, names: list[str] | None
) -> dict[int, str]:
    """The categories a layer's style must have: every class of ``names`` and every class
    present, named as the layer names them."""
    ids = [] if frame is None else frame["class_id"].astype("int64").tolist()
    if names is not None:
        return {c: class_name_for(names, c) for c in sorted(set(range(len(names))) | set(ids))}
    got = {} if frame is None else dict(zip(ids, frame["class_name"].astype(str), strict=True))
    return dict(sorted(got.items()))


def _to_crs(vector: Path, geoms: np.ndarray, src: object, dst: object) -> np.ndarray:
    """``geoms`` from the layer's CRS into the reference's (a reprojected layer, e.g. GeoJSON
    in WGS 84, is checked on the grid it was made on)."""
    import shapely

    transformer = pyproj.Transformer.from_crs(
        pyproj.CRS.from_user_input(src), pyproj.CRS.from_wkt(dst.to_wkt()), always_xy=True
    )

    def apply(xy: np.ndarray) -> np.ndarray:
        return np.column_stack(transformer.transform(xy[:, 0], xy[:, 1], errcheck=False))

    out = shapely.transform(geoms, apply)
    if not np.isfinite(shapely.get_coordinates(out)).all():
        raise InputError(f"{vector}: polygons cannot be reprojected to the input's CRS")
    return out


def verify_vector(
    vector: Path, source: Path | None, mask: Path | MaskGrid | None = None, clipped: bool = False
) -> dict:
    """Raise InputError unless ``vector`` is a drseg polygon layer that matches its input
    (CRS, or reprojected from it; extent, pixel grid), is styled for QGIS with its classes
    and, given ``mask`` (a path or an already verified :class:`MaskGrid`), matches the mask
    it was made from (class names and colours, polygons where it has classes, the same
    classes under the polygons). ``clipped``: cut to an area of interest (also read from the
    layer's or the mask's metadata)."""
    import pandas as pd

    crs, fields, n, meta, layer = _read_layer(vector)
    missing = {"class_id", "class_name", "area_m2", "mean_score"} - set(fields)
    schemaless = n == 0 and not fields and vector.suffix.lower() in (".geojson", ".json")
    if missing and not schemaless:  # GeoJSON keeps no field list without features
        raise InputError(f"{vector}: missing fields {sorted(missing)}")
    layer_crs = None if crs is None else rasterio.crs.CRS.from_user_input(crs)
    grid = read_mask(mask, None) if isinstance(mask, Path) else mask
    footprint = None
    ref_crs = None
    for ref in (source, grid.path if grid else None):
        if ref is None:
            continue
        with _open(ref) as s:
            if s.crs is not None and layer_crs is None:
                raise InputError(f"{vector}: CRS differs from {ref} (the layer has none)")
            if s.crs is not None and layer_crs != s.crs:
                ref_crs = ref_crs or s.crs
            footprint = footprint or (s.transform, s.width, s.height, str(ref))
    if grid is not None:
        footprint = (grid.transform, grid.width, grid.height, str(grid.path))

    names = grid.names if grid else class_names_from_tags(meta)
    colors = grid.colors if grid else None
    origin = str(grid.path) if grid else "the layer's class list"
    report = {"vector": str(vector), "crs": None if layer_crs is None else str(layer_crs)}
    if ref_crs is not None:
        report["reprojected_from"] = str(ref_crs)
    if n == 0:
        classified = grid.classified if grid else None
        if classified is None and source is not None and _has_valid_pixels(source):
            classified = -1  # unknown count, but some
        min_area = float(meta.get(MIN_AREA_TAG, "0") or 0)
        if classified and not (min_area > 0):
            pixels = f"{classified} classified pixels" if classified > 0 else "valid pixels"
            where = grid.path if grid else source
            raise InputError(f"{vector}: no polygons, but {where} has {pixels}")
        labels = _style_labels(vector, None, names)
        style = verify_vector_style(vector, layer, labels, colors, complete=names is not None)
        return report | {"features": 0, "style": style}

    frame = _read_features(vector, geometry=False, layer=layer)
    _check_areas(vector, frame["area_m2"])
    _check_names(vector, frame, names, origin)
    labels = _style_labels(vector, frame, names)
    style = verify_vector_style(vector, layer, labels, colors, complete=names is not None)
    if footprint is not None:
        sample = _read_features(vector, geometry=True, limit=SAMPLE_FEATURES, layer=layer)
        geoms = np.asarray(sample.geometry.values, dtype=object)
        if ref_crs is not None:
            geoms = _to_crs(vector, geoms, crs, ref_crs)
        ids = sample["class_id"].to_numpy(np.int64)
        clipped = clipped or bool(meta.get(CLIPPED_TAG)) or bool(grid and grid.clipped)
        if not clipped and vector.suffix.lower() != ".gpkg":
            clipped = None  # the format cannot say (only a GeoPackage records the tag)
        _check_on_grid(vector, geoms, ids, grid, footprint, clipped)
    areas = pd.to_numeric(frame["area_m2"]).to_numpy(np.float64)
    return report | {"features": int(n), "area_m2": float(math.fsum(areas)), "style": style}


def verify_outputs(
    source: Path, plan: OutputPlan, class_names: Sequence[str], clipped: bool = False
) -> dict:
    """Verify every output of ``plan`` for ``source`` (``clipped``: made with an area of
    interest); returns what was checked."""
    report: dict = {}
    grid = None
    if plan.mask:
        grid = read_mask(plan.mask, class_names)
        _same_grid(plan.mask, (grid.crs, grid.transform, grid.width, grid.height), source)
        report |= {"mask": str(plan.mask), "classes": grid.names}
    if plan.vector:
        report |= verify_vector(plan.vector, source, grid, clipped)
    if plan.proposals:  # a readable layer on the scene's CRS (proposals overlap: no more)
        crs, fields, _, _, _ = _read_layer(plan.proposals)
        missing = {"class_id", "class_name", "score"} - set(fields)
        if missing:
            raise InputError(f"{plan.proposals}: no field {', '.join(sorted(missing))}")
        report["proposals"] = str(plan.proposals)
    for extra in (plan.probs, plan.uncertainty):
        if extra:
            if not extra.is_file():
                raise InputError(f"{extra}: output missing")
            with _open(extra) as e:
                np.asarray(e.read(1, window=((0, 1), (0, 1))))
                grid = (e.crs, e.transform, e.width, e.height)
            _same_grid(extra, grid, source)
    return report
