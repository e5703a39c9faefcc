"""Per-proposal polygons (``drseg segment --proposals``): the classified mask proposals of a
mask-classification method (DGL-RSIS), streamed tile by tile into one polygon layer.

A tile hands over its proposals as label-map layers (overlapping proposals in different
layers) with a class and a score each. They are cut to the tile's valid pixels, and a
proposal is kept only by the tile whose *core* (``TileGrid.core``: the tile up to the middle
of each overlap) holds its centroid, so an object seen by two overlapping tiles is written
once — whole, from the tile that sees it around its middle. Kept proposals are polygonised
in tile pixel coordinates (exact integer vertices), taken to map coordinates through the
tile's window transform, measured (``area_m2``: ``vectorize.AreaCalculator``, the area of the
pixel region on the CRS's ellipsoid) and appended to a work GeoPackage, so memory follows one
tile, never the scene. A ``.gpkg`` output *is* that file; other formats are converted from
it when the scene is done (that step holds the polygons in memory, as ``vectorize`` does).

Fields: ``class_id``, ``class_name``, ``score`` (the probability of that class), ``area_m2``;
geometries are MultiPolygons (a SAM mask may come in parts).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyproj
import shapely
from affine import Affine

from drseg_cli.errors import OutputError, first_line
from drseg_cli.raster.mask_meta import class_names_tag
from drseg_cli.raster.vectorize import (
    STYLE_SUFFIX,
    AreaCalculator,
    layer_style,
    output_crs,
    pixel_to_map,
    polygonise,
    truncate_utf8,
    vector_format,
    write_frame,
)

#: Layer metadata (GeoPackage) saying what the layer holds.
PROPOSALS_TAG = "DRSEG_PROPOSALS"
FIELDS = ("class_id", "class_name", "score", "area_m2")


def centroids(
    layers: np.ndarray, valid: np.ndarray | None, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per proposal ``0..n-1``: pixel count, centroid (x, y: pixel centres, tile pixel
    coordinates) over ``valid`` pixels, and the layer it lies in (-1: no pixel)."""
    h, w = layers.shape[1:]
    cols = np.tile(np.arange(w, dtype=np.float64), h)
    rows = np.repeat(np.arange(h, dtype=np.float64), w)
    count = np.zeros(n + 1)
    sx, sy = np.zeros(n + 1), np.zeros(n + 1)
    layer_of = np.full(n + 1, -1, np.int64)
    for i, layer in enumerate(layers):
        flat = (layer if valid is None else np.where(valid, layer, 0)).ravel()
        c = np.bincount(flat, minlength=n + 1)[: n + 1]
        count += c
        sx += np.bincount(flat, weights=cols, minlength=n + 1)[: n + 1]
        sy += np.bincount(flat, weights=rows, minlength=n + 1)[: n + 1]
        layer_of[c > 0] = i
    with np.errstate(invalid="ignore", divide="ignore"):
        cx, cy = sx / count + 0.5, sy / count + 0.5
    return count[1:], cx[1:], cy[1:], layer_of[1:]


class ProposalLayerWriter:
    """Append each tile's kept proposals to a polygon layer; ``commit`` finishes the file at
    ``staged`` (a temp name the caller renames into place), ``abort`` removes the work."""

    def __init__(
        self,
        path: Path,
        staged: Path,
        *,
        crs: pyproj.CRS | None,
        transform: Affine,
        size: tuple[int, int],
        class_names: Sequence[str],
        dst_crs: Any = None,
        layer: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """``path``: the final file (its format, its layer name); ``size``: the scene's
        (width, height); ``metadata``: extra layer metadata (GeoPackage)."""
        self.fmt = vector_format(path)
        self.staged = Path(staged)
        self.work = self.staged if self.fmt == "GPKG" else self.staged.with_suffix(".work.gpkg")
        self.layer = layer or Path(path).stem
        self.crs, self.transform = crs, transform
        self.out_crs = output_crs(crs, Path(path), dst_crs)
        self.areas = AreaCalculator(crs, transform, *size)
        self.names = list(class_names)
        self.metadata = {PROPOSALS_TAG: "1"} | class_names_tag(self.names) | (metadata or {})
        self.count = 0
        self.present: set[int] = set()
        empty = self._frame(*(np.zeros(0),) * 3, np.empty(0, object))
        if self.out_crs is not None:  # the layer is made in the CRS it is written in
            empty = empty.set_crs(self.out_crs, allow_override=True)
        try:
            self._append(empty, first=True)
        except BaseException:
            self.abort()
            raise

    # ------------------------------------------------------------------ per tile

    def add(
        self,
        x0: int,
        y0: int,
        layers: np.ndarray,
        classes: np.ndarray,
        scores: np.ndarray,
        *,
        core: tuple[float, float, float, float],
        valid: np.ndarray | None = None,
    ) -> int:
        """Write the proposals of the tile at scene pixel (``x0``, ``y0``): ``layers``
        ``[L, h, w]`` cut to the tile's part of the scene, ``valid [h, w]`` its pixels with
        data; kept: proposals with valid pixels whose centroid lies in ``core`` (scene pixel
        coordinates, half-open). Returns how many were written."""
        n = len(classes)
        if n == 0 or len(layers) == 0:
            return 0
        count, cx, cy, layer_of = centroids(layers, valid, n)
        cx, cy = cx + x0, cy + y0
        lo_x, lo_y, hi_x, hi_y = core
        keep = (count > 0) & (cx >= lo_x) & (cx < hi_x) & (cy >= lo_y) & (cy < hi_y)
        ids, geoms = [], []
        for i, layer in enumerate(layers):
            mine = np.flatnonzero(keep & (layer_of == i))  # 0-based proposal ids
            if not len(mine):
                continue
            lut = np.zeros(n + 1, np.int32)
            lut[mine + 1] = np.arange(1, len(mine) + 1, dtype=np.int32)
            labels = lut[layer if valid is None else np.where(valid, layer, 0)]
            geoms.append(polygonise(labels, 0, len(mine), 0))
            ids.append(mine)
        if not ids:
            return 0
        mine = np.concatenate(ids)
        window = self.transform * Affine.translation(x0, y0)  # the tile's window transform
        px = np.concatenate(geoms)
        world = pixel_to_map(px, window)
        areas, _ = self.areas(world)
        frame = self._frame(classes[mine], scores[mine], areas, world)
        if self.out_crs is not None and self.out_crs != self.crs:
            frame = frame.to_crs(self.out_crs)  # area_m2 stays the area of the exact region
        self._append(frame)
        self.count += len(frame)
        self.present.update(int(c) for c in classes[mine])
        return len(frame)

    def _frame(
        self, classes: np.ndarray, scores: np.ndarray, areas: np.ndarray, geoms: np.ndarray
    ) -> gpd.GeoDataFrame:
        ids = np.asarray(classes, np.int64)
        names = [self.names[c] if 0 <= c < len(self.names) else f"class_{c}" for c in ids]
        if self.fmt == "ESRI Shapefile":
            names = [truncate_utf8(n) for n in names]
        geoms = shapely.orient_polygons(geoms) if len(geoms) else geoms
        return gpd.GeoDataFrame(
            {
                "class_id": pd.array(ids, dtype="int32"),
                "class_name": pd.Series(names, dtype=object),
                "score": pd.array(np.asarray(scores, np.float64), dtype="Float64"),
                "area_m2": pd.array(np.asarray(areas, np.float64), dtype="Float64"),
            },
            geometry=gpd.GeoSeries(geoms, crs=self.crs),
            crs=self.crs,
        )

    def _append(self, frame: gpd.GeoDataFrame, first: bool = False) -> None:
        import pyogrio

        kwargs: dict[str, Any] = {"layer_metadata": self.metadata} if first else {}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="'crs' was not provided")
                pyogrio.write_dataframe(
                    frame, self.work, layer=self.layer, driver="GPKG",
                    geometry_type="MultiPolygon", promote_to_multi=True, append=not first,
                    **kwargs,
                )  # fmt: skip
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - driver errors have many types; one line
            raise OutputError(f"{self.work}: cannot write proposals ({first_line(exc)})") from None

    # ------------------------------------------------------------------ the end

    def commit(self) -> None:
        """Finish the layer at ``staged``: style (class colours) and, for formats other than
        GeoPackage, the conversion from the work file."""
        from drseg_cli.raster.vectorize import write_gpkg_style

        style = layer_style(self.names, sorted(self.present), None)
        if self.fmt == "GPKG":
            write_gpkg_style(self.staged, self.layer, style)
            return
        import pyogrio

        frame = pyogrio.read_dataframe(self.work, layer=self.layer)
        if self.out_crs is not None:
            frame = frame.set_crs(self.out_crs, allow_override=True)
        try:
            write_frame(frame, self.staged, self.fmt, self.layer, self.metadata)
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise OutputError(f"{self.staged}: cannot write ({first_line(exc)})") from None
        self.staged.with_suffix(STYLE_SUFFIX).write_text(style, encoding="utf-8")
        self._remove_work()

    def _remove_work(self) -> None:
        if self.work != self.staged:
            with contextlib.suppress(OSError):
                self.work.unlink()

    def abort(self) -> None:
        """Remove what was written (the staged file and the work file)."""
        self._remove_work()
        with contextlib.suppress(OSError):
            self.staged.unlink()
