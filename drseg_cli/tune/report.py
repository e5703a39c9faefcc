"""What ``drseg tune`` writes besides the configuration: the trials table and the plot."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from drseg_cli.atomic import atomic_output
from drseg_cli.tune.search import Trial

log = logging.getLogger(__name__)


def write_trials(csv_path: Path, json_path: Path, trials: Sequence[Trial]) -> None:
    """Every trial, best first, as CSV and as a JSON list (atomic writes)."""
    rows = [t.row() for t in trials]
    with atomic_output(csv_path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    with atomic_output(json_path) as tmp:
        payload = json.dumps(_nan_to_none(rows), indent=1) + "\n"
        tmp.write_text(payload, encoding="utf-8")


def _nan_to_none(rows: list[dict]) -> list[dict]:
    return [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
        for r in rows
    ]


def plot_path(folder: Path, p1: str, p2: str) -> Path:
    """``mIoU_<p1>_<p2>.png`` in ``folder``."""
    return folder / f"mIoU_{p1}_{p2}.png"


def write_plot(path: Path, trials: Sequence[Trial], p1: str, p2: str) -> bool:
    """Mean first-rung mIoU over the (p1, p2) values as a heat map PNG; False (and a warning)
    when matplotlib is not installed (``pip install drseg-cli[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'drseg-cli[plot]'): no plot")
        return False
    scored = [t for t in trials if not math.isnan(t.first_miou)]
    xs = sorted({t.params[p1] for t in scored}, key=_order)
    ys = sorted({t.params[p2] for t in scored}, key=_order)
    grid = np.full((len(ys), len(xs)), np.nan)
    for j, y in enumerate(ys):
        for i, x in enumerate(xs):
            vals = [t.first_miou for t in scored if t.params[p1] == x and t.params[p2] == y]
            if vals:
                grid[j, i] = float(np.mean(vals))
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 2.5, 0.8 * len(ys) + 2))
    image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_yticks(range(len(ys)), [str(y) for y in ys])
    ax.set_xlabel(p1)
    ax.set_ylabel(p2)
    for j in range(len(ys)):
        for i in range(len(xs)):
            if not np.isnan(grid[j, i]):
                ax.text(i, j, f"{grid[j, i]:.1f}", ha="center", va="center", color="w")
    fig.colorbar(image, ax=ax, label="mean mIoU (first rung)")
    ax.set_title(f"drseg tune: mIoU vs {p1} and {p2}")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True


def _order(value: object) -> tuple:
    return (0, value, "") if isinstance(value, int | float) else (1, 0, str(value))
