"""Training speed and memory of DR-Seg's trained mode (not a test; not run by CI).

Full-size frozen backbones with seeded random weights (``build_model(..., random_weights=True)``:
CLIP ViT-B/16 + DINO ViT-B/8 for vit-b16; the cost does not depend on the weights), the
learnable heads of ``drseg_cli.train.modules``, random images and labels, AdamW steps exactly
as ``drseg train`` takes them (forward, CE loss, backward, clip, step). Reports steps/s,
samples/s, the forward/backward/optimizer split, and the memory a batch costs (CPU: growth
of the current RSS over the steps, sampled by a thread; GPU: peak allocated).

    .venv/bin/python benchmarks/train_speed.py --steps 3 --batch-size 2 --crop 224
    .venv/bin/python benchmarks/train_speed.py --device cuda --batch-size 8 --crop 448 --json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drseg_cli.model.drseg import _normalise  # noqa: E402
from drseg_cli.train.modules import HeadConfig, TrainedDRSeg  # noqa: E402
from drseg_cli.train.trainer import per_sample_loss  # noqa: E402


def build_base(args: argparse.Namespace):
    """The training-free DR-Seg of the preset with seeded random full-size backbones."""
    from drseg_cli.model.factory import build_model

    return build_model(
        args.preset, method="drseg", random_weights=True, tile_size=args.crop, device="cpu"
    )


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def rss_mib() -> float:
    """Current resident memory (Linux /proc; falls back to the peak elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return peak_rss_mib()
    return pages * resource.getpagesize() / 2**20


class RssSampler:
    """Highest current RSS seen by a background thread (ru_maxrss cannot be reset)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak = interval, rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_mib())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    base = build_base(args)
    head = HeadConfig(decoder_stride=args.decoder_stride, channels=args.channels)
    model = TrainedDRSeg.from_drseg(base, head).to(device)
    source = f"{args.preset} (random weights)"
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    text = model.encode_text([[f"class {i}"] for i in range(args.classes)]).to(device)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch_size, 3, args.crop, args.crop, generator=gen).to(device)
    labels = torch.randint(0, args.classes, (args.batch_size, args.crop, args.crop), generator=gen)
    labels = labels.to(device)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    rss_before = rss_mib()
    sampler = RssSampler().__enter__()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
    times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "step": []}
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(images, text)
        loss = per_sample_loss(logits, labels, "ce", 255).mean()
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        _sync(device)
        t3 = time.perf_counter()
        if i >= args.warmup:
            for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
                times[key].append(value)
    sampler.__exit__()
    step_s = statistics.median(times["step"])
    backbone_times = []
    with torch.no_grad():
        for _ in range(max(1, args.steps)):
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                model.clip(_normalise(images, model.clip))
                model.dino(_normalise(images, model.dino))
            _sync(device)
            backbone_times.append(time.perf_counter() - t0)
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "crop": args.crop,
        "batch_size": args.batch_size,
        "classes": args.classes,
        "decoder_stride": args.decoder_stride,
        "encoders": source,
        "trainable_params": sum(p.numel() for p in params),
        "frozen_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "steps_measured": args.steps,
        "seconds_per_step": round(step_s, 3),
        "steps_per_s": round(1.0 / step_s, 4),
        "samples_per_s": round(args.batch_size / step_s, 3),
        "split_seconds": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "frozen_backbones_seconds": round(statistics.median(backbone_times), 3),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "batch_memory_mib": round(sampler.peak - rss_before, 1),
    }
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base_alloc
        result["batch_memory_mib"] = round(peak / 2**20, 1)
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="vit-b16", help="vit-b16 | vit-l14 (random init)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--decoder-stride", type=int, default=4)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.crop % 16:
        parser.error("--crop must be a multiple of 16")
    result = measure(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    split = result["split_seconds"]
    print(
        f"{result['device']} ({result['threads']} threads), {result['precision']}, crop "
        f"{args.crop}, batch {args.batch_size}, K={args.classes}; encoders: {result['encoders']}"
    )
    print(
        f"  {result['steps_per_s']:.3f} steps/s ({result['samples_per_s']:.2f} samples/s): "
        f"forward {split['forward']:.2f} s, backward {split['backward']:.2f} s, "
        f"optimizer {split['optimizer']:.3f} s; of the forward, the frozen backbones take "
        f"{result['frozen_backbones_seconds']:.2f} s"
    )
    print(
        f"  trainable {result['trainable_params']:,} / frozen {result['frozen_params']:,} "
        f"parameters; memory per batch {result['batch_memory_mib']:.0f} MiB "
        f"(peak RSS {result['peak_rss_mib']:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
