"""Parameters and per-window latency of RSRefSeg 2, stage by stage (not a test; not in CI).

Full-size variant with seeded random weights (the cost does not depend on the weights):
SigLIP 2 so400m/16 at 512 px + SAM ViT-L at 1024 px, one 1024 px window, E expressions.
Stages: text (once per run), siglip (window → tokens), sam (window → image embedding),
decode (prompter + dense prompt + SAM mask decoder, per expression); ``window`` is one full
``forward`` call. Peak resident memory is the process's (``ru_maxrss``).

    .venv/bin/python benchmarks/refer_speed.py --repeats 2
    .venv/bin/python benchmarks/refer_speed.py --device cuda --batch-size 4 --json
    .venv/bin/python benchmarks/refer_speed.py --model test-tiny
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drseg_cli.model.rsrefseg2 import build_rsrefseg2  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="siglip2-so400m-sam-vit-large")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--expressions", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    model = build_rsrefseg2(args.model, random_weights=True, device=str(device))
    build_s = time.perf_counter() - t0
    parts = {
        name: sum(p.numel() for p in getattr(model, name).parameters())
        for name in ("vision", "text", "sam", "prompter")
    }
    parts["sam.vision_encoder"] = sum(p.numel() for p in model.sam.vision_encoder.parameters())
    total = sum(p.numel() for p in model.parameters())
    size = model.preprocess.tile_size
    images = torch.rand(args.batch_size, 3, size, size, device=device)
    texts = [
        f"the large white building number {i} next to the river" for i in range(args.expressions)
    ]  # noqa: E501
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else torch.no_grad()
    with torch.inference_mode(), ctx:
        t_text, enc = _time(lambda: model.encode_expressions(texts), device, args.repeats)
        t_siglip, (tok, _) = _time(lambda: model._siglip(images), device, args.repeats)
        t_sam, emb = _time(lambda: model._sam_embed(images), device, args.repeats)
        e = len(texts)

        def decode():
            return model.decode(
                tok.repeat_interleave(e, 0),
                emb.repeat_interleave(e, 0),
                enc.tokens.repeat(args.batch_size, 1, 1),
                enc.pooled.repeat(args.batch_size, 1),
            )

        t_decode, _ = _time(decode, device, args.repeats)
        t_window, out = _time(lambda: model(images, enc), device, args.repeats)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    report = {
        "model": args.model,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "window_px": size,
        "batch_size": args.batch_size,
        "expressions": e,
        "params": total,
        "params_by_part": parts,
        "build_seconds": round(build_s, 2),
        "seconds": {
            "text_once": round(t_text, 4),
            "siglip": round(t_siglip, 4),
            "sam_image_encoder": round(t_sam, 4),
            "decode": round(t_decode, 4),
            "window_forward": round(t_window, 4),
            "per_window": round(t_window / args.batch_size, 4),
        },
        "mask_logits": list(out.mask_logits.shape),
        "peak_rss_gb": round(peak_gb, 2),
    }
    if device.type == "cuda":
        report["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated(device) / 1024**3, 2)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.model}: {total / 1e6:.1f} M params " + ", ".join(
        f"{k} {v / 1e6:.1f} M" for k, v in parts.items()))  # fmt: skip
    for k, v in report["seconds"].items():
        print(f"  {k:18s} {v:8.3f} s")
    print(f"  peak RSS {report['peak_rss_gb']} GB, build {report['build_seconds']} s")


if __name__ == "__main__":
    main()
