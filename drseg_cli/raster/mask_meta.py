"""How drseg outputs describe themselves, so ``vectorize``/``check`` can read them back.

Class masks are single-band uint8 GeoTIFFs: value i is class i, 255 is nodata; the class
names are stored as a JSON list in the dataset tag ``DRSEG_CLASS_NAMES`` (and per class as
band tags ``CLASS_<i>``). Polygon layers in formats with layer metadata (GeoPackage) record
the same class list and the ``--min-area``/``--simplify`` they were made with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

CLASS_NAMES_TAG = "DRSEG_CLASS_NAMES"
MASK_NODATA = 255
MASK_BAND_DESCRIPTION = "class"
MIN_AREA_TAG = "DRSEG_MIN_AREA"
SIMPLIFY_TAG = "DRSEG_SIMPLIFY"
#: Set on polygon layers and masks cut to an area of interest (``--aoi``): polygon edges
#: follow the AOI there, off the pixel grid.
CLIPPED_TAG = "DRSEG_CLIPPED"


def class_names_tag(names: Sequence[str]) -> dict[str, str]:
    """Dataset tags that record the class names of a mask."""
    return {CLASS_NAMES_TAG: json.dumps(list(names), ensure_ascii=False)}


def class_names_from_tags(tags: Mapping[str, str]) -> list[str] | None:
    """The class names recorded in a mask's tags, or None for a mask drseg did not write."""
    raw = tags.get(CLASS_NAMES_TAG)
    if raw is None:
        return None
    try:
        names = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    return names


def class_band_tags(names: Sequence[str]) -> dict[str, str]:
    """Band tags naming each class value (``CLASS_<i>``), for tools that read band metadata."""
    return {f"CLASS_{i}": n for i, n in enumerate(names)}


def class_name_for(names: Sequence[str], class_id: int) -> str:
    """The name a polygon of ``class_id`` carries: the mask's name, else ``class_<id>``."""
    return names[class_id] if 0 <= class_id < len(names) else f"class_{class_id}"


def vector_layer_tags(
    names: Sequence[str], min_area: float, simplify: float, clipped: bool = False
) -> dict[str, str]:
    """Layer metadata of a polygon layer: its class list and how it was made."""
    tags = {MIN_AREA_TAG: repr(float(min_area)), SIMPLIFY_TAG: repr(float(simplify))}
    if clipped:
        tags[CLIPPED_TAG] = "aoi"
    return tags | (class_names_tag(names) if names else {})
