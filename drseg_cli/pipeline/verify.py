"""Check produced outputs against their input: grid, CRS, classes, readable pixels.

Used by ``drseg check`` and by ``--resume`` to decide whether a scene is really done.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

from drseg_cli.errors import InputError
from drseg_cli.pipeline.segment import OutputPlan
from drseg_cli.raster.mask_meta import MASK_NODATA, class_names_from_tags


def _open(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path)


def verify_mask(mask: Path, source: Path | None, class_names: Sequence[str] | None) -> dict:
    """Raise InputError unless ``mask`` is a complete drseg class mask matching ``source``."""
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
            for _, window in m.block_windows(1):  # every block decodes
                block = m.read(1, window=window)
                bad = (block != MASK_NODATA) & (block >= len(names))
                if bad.any():
                    raise InputError(f"{mask}: class values beyond the {len(names)} classes")
            grid = (m.crs, m.transform, m.width, m.height)
    except RasterioIOError as exc:
        raise InputError(f"{mask}: unreadable ({str(exc).splitlines()[0]})") from None
    if source is not None:
        with _open(source) as s:
            if (s.crs, s.transform, s.width, s.height) != grid:
                raise InputError(f"{mask}: grid or CRS differs from its input {source}")
    return {"mask": str(mask), "classes": names, "size": [grid[2], grid[3]]}


def verify_vector(vector: Path, source: Path | None) -> dict:
    """Raise InputError unless ``vector`` is a readable drseg polygon layer in the input's CRS."""
    import pyogrio

    if not vector.is_file():
        raise InputError(f"{vector}: output missing")
    try:
        if vector.suffix.lower() == ".parquet":
            import geopandas as gpd

            df = gpd.read_parquet(vector)
            crs, fields, n = df.crs, list(df.columns), len(df)
        else:
            info = pyogrio.read_info(vector)
            crs, fields, n = info["crs"], list(info["fields"]), info["features"]
    except Exception as exc:  # noqa: BLE001 - any reader failure means "not valid"
        raise InputError(f"{vector}: unreadable ({str(exc).splitlines()[0]})") from None
    missing = {"class_id", "class_name", "area_m2", "mean_score"} - set(fields)
    if missing:
        raise InputError(f"{vector}: missing fields {sorted(missing)}")
    if source is not None:
        with _open(source) as s:
            src_crs = s.crs
        if src_crs is not None and (
            crs is None or rasterio.crs.CRS.from_user_input(crs) != src_crs
        ):
            raise InputError(f"{vector}: CRS differs from its input {source}")
    return {"vector": str(vector), "features": int(n)}


def verify_outputs(source: Path, plan: OutputPlan, class_names: Sequence[str]) -> dict:
    """Verify every output of ``plan`` for ``source``; returns what was checked."""
    report: dict = {}
    if plan.mask:
        report |= verify_mask(plan.mask, source, class_names)
        if not plan.mask.with_suffix(".qml").is_file():
            raise InputError(f"{plan.mask.with_suffix('.qml')}: output missing")
    if plan.vector:
        report |= verify_vector(plan.vector, source)
    for extra in (plan.probs, plan.uncertainty):
        if extra:
            if not extra.is_file():
                raise InputError(f"{extra}: output missing")
            with _open(extra) as e, _open(source) as s:
                if (e.crs, e.transform, e.width, e.height) != (
                    s.crs,
                    s.transform,
                    s.width,
                    s.height,
                ):
                    raise InputError(f"{extra}: grid or CRS differs from its input {source}")
                np.asarray(e.read(1, window=((0, 1), (0, 1))))
    return report
