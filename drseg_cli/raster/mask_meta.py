"""How a drseg class mask describes itself, so ``vectorize``/``check`` can read it back.

Class masks are single-band uint8 GeoTIFFs: value i is class i, 255 is nodata; the class
names are stored as a JSON list in the dataset tag ``DRSEG_CLASS_NAMES``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

CLASS_NAMES_TAG = "DRSEG_CLASS_NAMES"
MASK_NODATA = 255
MASK_BAND_DESCRIPTION = "class"


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
