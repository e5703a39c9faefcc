"""``drseg tune`` speed: configurations/s from cached features vs recomputing (not a test).

A synthetic labelled set (``--images`` RGB tiles of ``--tile-size`` px, generic layout) and
``--configs`` DR-Seg configurations drawn from tune's default space (CLIP baseline fixed).

- cached:     features computed once (``FeatureCache``, timed apart), then every configuration
              scored on every image by ``Scorer`` (DR-Seg's head only) — what tune does;
- recompute:  every configuration through ``run_evaluation`` (backbones + head per image),
              i.e. what a loop of ``drseg evaluate --rho ...`` runs would cost.

Both count configurations × whole set per second. Random weights (the cost does not depend
on them): ``--preset vit-b16`` is CLIP ViT-B/16 + DINO ViT-B/8.

    .venv/bin/python benchmarks/tune_speed.py --json
    .venv/bin/python benchmarks/tune_speed.py --preset vit-b16 --tile-size 448 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drseg_cli.evaluate.datasets import load_dataset  # noqa: E402
from drseg_cli.evaluate.runner import EvalConfig, run_evaluation  # noqa: E402
from drseg_cli.model.drseg import DRSegOptions  # noqa: E402
from drseg_cli.model.factory import build_model  # noqa: E402
from drseg_cli.pipeline.runtime import TilePredictor, resolve_device  # noqa: E402
from drseg_cli.tune.features import FeatureCache  # noqa: E402
from drseg_cli.tune.search import (  # noqa: E402
    SPACE,
    Scorer,
    Trial,
    default_params,
    sample_configurations,
)
from tests.helpers import write_geotiff  # noqa: E402

NAMES = ["background", "road", "tree", "water"]


def make_dataset(root: Path, images: int, size: int) -> None:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(images):
        label = np.kron(rng.integers(0, len(NAMES), (size // 16, size // 16)), np.ones((16, 16)))
        img = np.stack([label * 50 + rng.integers(0, 50, label.shape)] * 3).astype(np.uint8)
        write_geotiff(root / "images" / f"s{i}.tif", img, crs=None)
        write_geotiff(root / "labels" / f"s{i}.png", label.astype(np.uint8), driver="PNG", crs=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="test-tiny")
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--configs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    space = {k: v for k, v in SPACE.items() if k not in ("clip_baseline", "threshold")}
    base = DRSegOptions()
    configs = sample_configurations(space, args.configs, default_params(space, base, 0.0), 0)
    net = build_model(
        args.preset, method="drseg", random_weights=True, tile_size=args.tile_size, device="cpu"
    )
    prompts = [[n] for n in NAMES]
    predictor = TilePredictor(net, prompts, device)
    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(Path(tmp) / "data", args.images, args.tile_size)
        dataset = load_dataset(Path(tmp) / "data")
        models, texts = {"clearclip": predictor.model}, {"clearclip": predictor.text}
        cache = FeatureCache(
            Path(tmp) / "cache",
            dataset,
            models,
            len(NAMES),
            tile_size=args.tile_size,
            device=device,
            dtype="float16",
            batch_size=args.batch_size,
        )
        t0 = time.perf_counter()
        cache.ensure()
        feature_s = time.perf_counter() - t0
        scorer = Scorer(cache, models, texts, base, background=None, device=device)
        trials = [Trial(c) for c in configs]
        t0 = time.perf_counter()
        scorer.score(trials, 0, len(dataset))
        cached_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        for params in configs:
            predictor.model.options = replace(base, **params)
            run_evaluation(
                dataset,
                predictor,
                NAMES,
                EvalConfig(tile_size=args.tile_size, batch_size=args.batch_size),
                tile_multiple=net.preprocess.multiple,
                default_tile_size=args.tile_size,
            )
        recompute_s = time.perf_counter() - t0
    result = {
        "preset": args.preset,
        "tile_size": args.tile_size,
        "images": args.images,
        "configs": len(configs),
        "device": str(device),
        "feature_seconds": round(feature_s, 3),
        "cached_seconds": round(cached_s, 3),
        "recompute_seconds": round(recompute_s, 3),
        "cached_configs_per_s": round(len(configs) / cached_s, 3),
        "recompute_configs_per_s": round(len(configs) / recompute_s, 3),
        "speedup": round(recompute_s / cached_s, 2),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v}")


if __name__ == "__main__":
    main()
