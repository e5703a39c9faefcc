"""Memory and time of ``drseg refer``'s scene pipeline on a large scene (not a test; not in CI).

The model is a stand-in of the full-size window (1024 px) whose score and mask heads are
trivial (the bright pixels; score = the brightest pixel), so the figures are the pipeline's:
windowed reads, ranking, per-group seam merging, mask and polygon writing. A synthetic
uint8 GeoTIFF of ``--size``² px with bright squares is written first (to ``--dir``).

    .venv/bin/python benchmarks/refer_scene.py --size 8192 --json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drseg_cli.model.base import Preprocess, ReferOutput, ReferringModel  # noqa: E402
from drseg_cli.pipeline.refer import ReferConfig, refer_scene  # noqa: E402
from drseg_cli.raster.reader import inspect_raster  # noqa: E402


class BrightModel(ReferringModel):
    """Window score: brightest pixel; mask: pixels brighter than 0.5 (at 256², as SAM)."""

    name = "bright"
    preprocess = Preprocess(1024, (0.0,) * 3, (1.0,) * 3, 1)

    def encode_expressions(self, expressions):
        return list(expressions)

    def forward(self, images, expressions):
        grey = torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True), 4)[:, 0]
        e = len(expressions)
        scores = grey.flatten(1).max(1).values[:, None].expand(-1, e)
        logits = torch.where(grey > 0.5, 10.0, -10.0)[:, None].expand(-1, e, -1, -1)
        return ReferOutput(scores.contiguous(), logits.contiguous())


def write_scene(path: Path, size: int, n_objects: int = 40, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    profile = dict(
        driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32633",
        transform=from_origin(500000, 4600000, 0.5, 0.5), tiled=True, blockxsize=512,
        blockysize=512, compress="deflate",
    )  # fmt: skip
    boxes = [(int(rng.integers(0, size - 400)), int(rng.integers(0, size - 400)),
              int(rng.integers(50, 400)), float(rng.uniform(0.6, 1.0)))
             for _ in range(n_objects)]  # fmt: skip
    with rasterio.open(path, "w", **profile) as ds:
        for y0 in range(0, size, 1024):
            h = min(1024, size - y0)
            band = np.full((h, size), 40, np.uint8)
            for by, bx, s, v in boxes:
                a, b = max(by, y0), min(by + s, y0 + h)
                if a < b:
                    band[a - y0 : b - y0, bx : bx + s] = int(255 * v)
            ds.write(np.stack([band] * 3), window=rasterio.windows.Window(0, y0, size, h))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        scene = Path(tmp) / "scene.tif"
        t = time.perf_counter()
        write_scene(scene, args.size)
        write_s = time.perf_counter() - t
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t = time.perf_counter()
        result = refer_scene(
            inspect_raster(scene),
            BrightModel(),
            ["the bright roof"],
            [Path(tmp) / "out.tif", Path(tmp) / "out.gpkg"],
            ReferConfig(top_k=args.top_k, batch_size=4),
        )
        run_s = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {
        "scene_px": [args.size, args.size],
        "windows": result.windows_total,
        "objects": len(result.objects),
        "write_scene_seconds": round(write_s, 2),
        "refer_seconds": round(run_s, 2),
        "peak_rss_mb_before": round(rss0, 1),
        "peak_rss_mb": round(peak, 1),
    }
    print(json.dumps(report, indent=2) if args.json else report)


if __name__ == "__main__":
    main()
