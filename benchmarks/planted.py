"""Planted-structure experiment: does DINO visibly help DR-Seg? (not a test; the fast
assertions are tests/test_planted.py, the tiles and encoders tests/planted_case.py).

Synthetic tiles with known Voronoi boundaries; CLIP stand-in features that separate the
classes but are coarse (patch 16, blurred), DINO stand-in features that carry the cell
boundaries but not the classes (patch 8), or uninformative DINO (pure or smooth noise).
Pixel mIoU of --method clip, DR-Seg with α = 0 and DR-Seg, each through the pipeline's own
resampling; mean (and worst seed) over seeds. Options override DR-Seg's defaults.

    .venv/bin/python benchmarks/planted.py --seeds 8
    .venv/bin/python benchmarks/planted.py --seeds 8 --option rho=0.25 --option ugaf=false --json
    .venv/bin/python benchmarks/planted.py --seeds 8 --dino-downsample 2   # the CPU preset
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drseg_cli.model.drseg import DRSegOptions  # noqa: E402
from tests.planted_case import DINO_KINDS, METHODS, PlantedConfig, run_seed  # noqa: E402


def parse_options(pairs: list[str]) -> DRSegOptions:
    """``name=value`` pairs → DRSegOptions (values typed like the defaults)."""
    defaults = DRSegOptions()
    given: dict[str, object] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if not hasattr(defaults, name):
            raise SystemExit(f"unknown DR-Seg option {name!r}")
        kind = type(getattr(defaults, name))
        given[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return dataclasses.replace(defaults, **given)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8, help="seeds 0..N-1 (default 8)")
    parser.add_argument("--tiles", type=int, default=PlantedConfig.tiles, help="tiles per seed")
    parser.add_argument("--option", action="append", default=[], help="DR-Seg name=value")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--dino-downsample", type=int, default=1, help="DINO on the tile N× smaller (CPU preset: 2)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = parse_options(args.option)
    cfg = PlantedConfig(tiles=args.tiles)
    start = time.perf_counter()
    runs = [run_seed(cfg, seed, options, args.dino_downsample) for seed in range(args.seeds)]
    table = {}
    for kind in DINO_KINDS:
        scores = {m: np.array([r[kind][m] for r in runs]) for m in METHODS}
        gain = scores["drseg"] - scores["drseg_alpha0"]
        table[kind] = {m: float(v.mean()) for m, v in scores.items()}
        table[kind] |= {"gain": float(gain.mean()), "worst_gain": float(gain.min())}
    result = {
        "config": dataclasses.asdict(cfg),
        "seeds": args.seeds,
        "options": options.as_dict(),
        "dino_downsample": args.dino_downsample,
        "miou": table,
        "seconds": time.perf_counter() - start,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"planted mIoU (%), mean over {args.seeds} seeds × {cfg.tiles} tiles of {cfg.tile} px")
    print(f"{'DINO':<12} {'clip':>7} {'α = 0':>7} {'DR-Seg':>7} {'gain':>7} {'worst':>7}")
    for kind, row in table.items():
        cells = [row[m] for m in METHODS] + [row["gain"], row["worst_gain"]]
        print(f"{kind:<12} " + " ".join(f"{v:7.2f}" for v in cells))
    print(f"({result['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
