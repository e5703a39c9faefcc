"""End-to-end throughput, model-only throughput, a naive baseline, and peak memory vs scene size.

    python benchmarks/throughput.py --model vit-b16 --random-weights --size 2048 --json
    python benchmarks/throughput.py --model test-tiny --memory-sizes 2000,20000
    python benchmarks/throughput.py --model free --size 4096 --batch-size 16   # host cost only

Figures (not a test; CI does not run it):
- pipeline_tiles_per_s: ``segment_scene`` end to end (read, stretch, predict, stitch, write COG)
- model_tiles_per_s: the bare model forward, same batch and precision, tensors already on device
- efficiency = pipeline / model
- naive_tiles_per_s: the common peer loop — batch 1, fp32, each window read synchronously,
  logits upsampled and averaged into a whole-scene array; speedup = pipeline / naive
- peak_rss_mb for a small and a large scene (separate processes), and their ratio
- *_cpu_ms_per_tile: CPU seconds (all threads of this process) per tile; on a shared,
  oversubscribed machine these move far less than wall-clock rates; host_cpu_ms_per_tile =
  pipeline − model is what the pipeline adds around the model
Full-size backbones with random weights have the same compute as the real ones.
``--model free`` is a stand-in that costs next to nothing (a 16 px average pool and a
3-channel dot product, test-tiny's tiling): the pipeline's rate with it is the host side's
own cost, which no model load on a shared machine hides.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# isort: split
import drseg_cli  # noqa: F401  (first, as in the CLI: its OpenMP setting precedes torch)

# isort: split
import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from rasterio.transform import from_origin
from rasterio.windows import Window

from drseg_cli.classes import parse_classes
from drseg_cli.model.factory import build_model
from drseg_cli.pipeline.runtime import (
    TilePredictor,
    auto_batch_size,
    resolve_device,
    resolve_precision,
)
from drseg_cli.pipeline.segment import OutputPlan, SegmentConfig, segment_scene
from drseg_cli.raster.tiling import TileGrid

CLASSES = parse_classes("water,building,road,tree,grass,bare soil")


def make_scene(path: Path, size: int, block: int = 1024) -> Path:
    """A smooth synthetic RGB scene written block by block (never whole in memory)."""
    profile = dict(
        driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32633",
        transform=from_origin(500000, 4600000, 1.0, 1.0), tiled=True, blockxsize=512,
        blockysize=512, compress="deflate", BIGTIFF="IF_SAFER",
    )  # fmt: skip
    with rasterio.open(path, "w", **profile) as ds:
        for y0 in range(0, size, block):
            h = min(block, size - y0)
            yy, xx = np.mgrid[y0 : y0 + h, 0:size].astype(np.float32)
            bands = [127 + 100 * np.sin(xx / 97.0 + c) * np.cos(yy / 61.0 - c) for c in range(3)]
            ds.write(np.stack(bands).astype(np.uint8), window=Window(0, y0, size, h))
    return path


class FreeModel(torch.nn.Module):
    """Logits for next to no compute, on test-tiny's tiling (224 px tiles, patch 16)."""

    name = "free"
    random_weights = True

    def __init__(self) -> None:
        super().__init__()
        from drseg_cli.model.base import Preprocess

        self.preprocess = Preprocess(224, (0.0,) * 3, (1.0,) * 3, 16)

    def encode_text(self, class_prompts) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        return torch.randn(len(class_prompts), 3, generator=gen)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,kc->bkhw", F.avg_pool2d(images, 16), text.float()) * 8.0


def build(args: argparse.Namespace):
    if args.model == "free":
        return FreeModel()
    return build_model(
        args.model, method=args.method, device="cpu", random_weights=args.random_weights
    )


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def model_only(predictor: TilePredictor, tile: int, batch: int, repeats: int) -> float:
    x = torch.rand(batch, 3, tile, tile, device=predictor.device)
    with torch.inference_mode(), predictor._autocast():
        predictor.model(x, predictor.text)  # warm-up
        _sync(predictor.device)
        start = time.perf_counter()
        for _ in range(repeats):
            predictor.model(x, predictor.text)
        _sync(predictor.device)
    return batch * repeats / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def naive(model, text, scene: Path, tile: int, overlap: float, device) -> float:
    """Batch 1, fp32, synchronous window reads, whole-scene logits in memory."""
    with rasterio.open(scene) as ds:
        grid = TileGrid.from_fraction(ds.width, ds.height, tile, overlap)
        acc = np.zeros((text.shape[0], ds.height, ds.width), np.float32)
        start = time.perf_counter()
        with torch.inference_mode():
            for t in grid:
                data = ds.read(window=Window(t.x0, t.y0, t.width, t.height))
                x = torch.from_numpy(data.astype(np.float32) / 255.0)[None].to(device)
                logits = F.interpolate(model(x, text), size=(t.height, t.width), mode="bilinear")
                acc[:, t.y0 : t.y0 + t.height, t.x0 : t.x0 + t.width] += logits[0].cpu().numpy()
        acc.argmax(0)
        return len(grid) / (time.perf_counter() - start)


def pipeline(predictor, net, scene: Path, out: Path, config: SegmentConfig) -> tuple[float, int]:
    start = time.perf_counter()
    result = segment_scene(
        scene, OutputPlan(out), predictor, CLASSES, config,
        tile_multiple=net.preprocess.multiple, default_tile_size=net.preprocess.tile_size,
    )  # fmt: skip
    return result.tiles_run / (time.perf_counter() - start), result.tiles_run


def peak_rss(size: int, model: str, workdir: Path) -> float:
    """Peak RSS (MB) of a separate ``drseg segment`` process on a ``size``² scene."""
    scene = make_scene(workdir / f"mem_{size}.tif", size)
    cmd = [
        sys.executable, "-m", "drseg_cli", "segment", str(scene), "-c", "water,field,road",
        "-o", str(workdir / f"mem_{size}_mask.tif"), "--model", model, "--device", "cpu",
        "--quiet", "--overwrite", "--method", "clip",
    ]  # fmt: skip
    code = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="test-tiny")
    p.add_argument("--method", default="drseg")
    p.add_argument("--random-weights", action="store_true", help="full-size, random weights")
    p.add_argument("--size", type=int, default=1344, help="scene edge (px) for throughput")
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--memory-sizes", default="", help="e.g. 2000,20000 (test-tiny is enough)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    device = resolve_device(args.device)
    amp = resolve_precision(args.precision, device)
    net = build(args)
    tile = net.preprocess.tile_size
    batch = args.batch_size or auto_batch_size(device, tile)
    predictor = TilePredictor(net, [c.prompt_names for c in CLASSES], device, amp)
    figures: dict = {
        "model": args.model, "method": args.method, "device": str(device),
        "precision": "fp32" if amp is None else str(amp).removeprefix("torch."),
        "batch_size": batch, "tile": tile, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="drseg-bench-") as tmp:
        work = Path(tmp)
        scene = make_scene(work / "scene.tif", args.size)
        config = SegmentConfig(batch_size=batch, overwrite=True)
        cpu0 = cpu_seconds()
        pipe, tiles = pipeline(predictor, net, scene, work / "mask.tif", config)
        cpu1 = cpu_seconds()
        model = model_only(predictor, tile, batch, args.repeats)
        cpu2 = cpu_seconds()
        pipe_cpu = 1000 * (cpu1 - cpu0) / tiles
        model_cpu = 1000 * (cpu2 - cpu1) / (batch * (args.repeats + 1))  # + the warm-up
        figures |= {
            "scene_px": args.size, "tiles": tiles,
            "pipeline_tiles_per_s": round(pipe, 3), "model_tiles_per_s": round(model, 3),
            "efficiency": round(pipe / model, 3),
            "pipeline_cpu_ms_per_tile": round(pipe_cpu, 3),
            "model_cpu_ms_per_tile": round(model_cpu, 3),
            "host_cpu_ms_per_tile": round(pipe_cpu - model_cpu, 3),
        }  # fmt: skip
        if not args.skip_naive:
            net32 = net.to(device).float()
            naive_rate = naive(net32, predictor.text.float(), scene, tile, 0.25, device)
            figures |= {
                "naive_tiles_per_s": round(naive_rate, 3),
                "speedup": round(pipe / naive_rate, 2),
            }
        sizes = [int(s) for s in args.memory_sizes.split(",") if s]
        if sizes:
            rss = {s: round(peak_rss(s, "test-tiny", work), 1) for s in sizes}
            figures["peak_rss_mb"] = rss
            figures["peak_rss_ratio"] = round(rss[max(sizes)] / rss[min(sizes)], 3)
    figures["self_peak_rss_mb"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
    )
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for k, v in figures.items():
            print(f"{k:>24}: {v}")


if __name__ == "__main__":
    main()
