"""drseg: open-vocabulary semantic segmentation of geospatial imagery (DR-Seg).

``from drseg_cli import segment, refer, vectorize`` is the Python API (``drseg_cli.api``,
docs/API.md); it is imported on first use, so ``import drseg_cli`` (and the CLI's start-up)
stays light.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: torch's CPU kernels run on OpenMP, whose idle threads spin for a while after every
#: parallel region by default: on a few shared cores that spinning takes the cores the
#: reader and stitch threads need (and other users'); a run under load measured ~4x fewer
#: tiles/s with it (idle, it costs loops of many tiny ops such as the naive peer loop
#: 10-25 %: benchmarks/README.md). Passive waiting changes no result. It must be set before torch
#: loads libgomp (torch is imported lazily, after this); a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if TYPE_CHECKING:
    from drseg_cli.api import (
        ReferApiResult,
        SegmentResult,
        clear_model_cache,
        refer,
        segment,
        vectorize,
    )

__all__ = [
    "ReferApiResult",
    "SegmentResult",
    "__version__",
    "clear_model_cache",
    "refer",
    "segment",
    "vectorize",
]
_API = ("ReferApiResult", "SegmentResult", "clear_model_cache", "refer", "segment", "vectorize")


def __getattr__(name: str) -> Any:
    """The API's names, imported from ``drseg_cli.api`` when first asked for."""
    if name in _API:
        from drseg_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'drseg_cli' has no attribute {name!r}")
