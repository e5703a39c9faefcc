"""DGL-RSIS cost per window on CPU: proposals per megapixel and seconds per megapixel
(not a test; not run by CI).

Full-size random models (the cost does not depend on the weights): CLIP ViT-B/16 (the
``vit-b16`` preset built with random weights), and, with ``--sam``, a transformers
``SamModel`` of the default ``SamConfig`` (SAM ViT-B layout). Windows are real imagery:
448 px crops of ``tests/data/RGB.byte.tif`` (percentile-stretched). Stages timed per window:
superpixel proposals, local alignment (crops + CLIP + fusion: the whole ``segment`` forward
minus proposals), the referring forward (proposals + local + cross-scale Grad-CAM +
selection) for one expression, and SAM AMG proposals.

    .venv/bin/python benchmarks/dglrsis_speed.py --windows 2
    .venv/bin/python benchmarks/dglrsis_speed.py --windows 1 --sam --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drseg_cli.model.dglrsis.model import DGLRSISReferrer  # noqa: E402
from drseg_cli.model.dglrsis.options import DGLRSISOptions  # noqa: E402
from drseg_cli.model.dglrsis.proposals import sam_proposals, superpixel_proposals  # noqa: E402
from drseg_cli.model.factory import build_model  # noqa: E402


def windows(tile: int, count: int) -> list[torch.Tensor]:
    """``count`` real 3×tile×tile windows in [0, 1] from the rasterio test scene."""
    import rasterio

    with rasterio.open(ROOT / "tests/data/RGB.byte.tif") as ds:
        data = ds.read().astype(np.float32)
    lo, hi = np.percentile(data[data > 0], (2, 98))
    data = np.clip((data - lo) / (hi - lo), 0, 1)
    h, w = data.shape[1:]
    out = []
    for i in range(count):
        y = (h - tile) * (i % 2) // 2 + (h - tile) // 4
        x = (w - tile) * ((i + 1) % 2) // 2 + (w - tile) // 4
        out.append(torch.from_numpy(data[:, y : y + tile, x : x + tile].astype(np.float32)))
    return out


CPU: dict[str, list[float]] = {}


def timed(fn, name: str | None = None):
    """(result, wall seconds); the process CPU seconds (all threads) go to ``CPU[name]``:
    on a shared machine they move far less than wall time."""
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if name:
        CPU.setdefault(name, []).append(time.process_time() - cpu)
    return result, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tile", type=int, default=448)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    ap.add_argument("--sam", action="store_true", help="also SAM AMG (full-size random SAM)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = DGLRSISOptions()
    seg = build_model("vit-b16", method="dglrsis", random_weights=True, dglrsis_options=opts)
    ref = DGLRSISReferrer(seg.clip, opts, tile_size=args.tile)  # the same CLIP
    started = time.perf_counter()
    text = seg.encode_text([["building"], ["road"], ["water"], ["tree"], ["low vegetation"]])
    enc = ref.encode_expressions(["the largest building to the left of the river"])
    text_seconds = time.perf_counter() - started  # once per run: not per megapixel
    mp = args.tile * args.tile / 1e6
    rows: dict[str, list[float]] = {k: [] for k in ("superpixel", "local", "segment", "refer")}
    counts: list[int] = []
    for window in windows(args.tile, args.windows):
        rgb = window.permute(1, 2, 0).numpy()
        masks, t = timed(lambda rgb=rgb: superpixel_proposals(rgb, opts), "superpixel")
        rows["superpixel"].append(t)
        counts.append(len(masks))
        with torch.inference_mode():
            _, t = timed(lambda w=window: seg(w[None], text), "segment")
            rows["segment"].append(t)
            rows["local"].append(t - rows["superpixel"][-1])
            _, t = timed(lambda w=window: ref(w[None], enc), "refer")
            rows["refer"].append(t)
    report = {
        "tile": args.tile,
        "windows": args.windows,
        "threads": torch.get_num_threads(),
        "text_seconds_once": text_seconds,
        "superpixel_proposals_per_mp": statistics.mean(counts) / mp,
        "seconds_per_mp": {k: statistics.mean(v) / mp for k, v in rows.items()},
    }
    if args.sam:
        from transformers import SamConfig, SamModel

        torch.manual_seed(0)
        sam = SamModel(SamConfig()).eval()
        sam_opts = DGLRSISOptions(proposals="sam", pred_iou_thresh=0, stability_thresh=0)
        n, secs = [], []
        for window in windows(args.tile, args.windows):
            (masks, _), t = timed(lambda w=window: sam_proposals(sam, w, sam_opts), "sam")
            n.append(len(masks))
            secs.append(t)
        report["sam_proposals_per_mp"] = statistics.mean(n) / mp
        report["seconds_per_mp"]["sam"] = statistics.mean(secs) / mp
        report["sam_note"] = "random SAM with the IoU/stability filters off: an upper bound"
    report["cpu_seconds_per_mp"] = {k: statistics.mean(v) / mp for k, v in CPU.items()}
    cpu = report["cpu_seconds_per_mp"]
    cpu["local"] = cpu["segment"] - cpu["superpixel"]
    report["load_average"] = os.getloadavg()[0]
    report["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"window {args.tile} px, {report['threads']} torch threads, {args.windows} windows")
    print(f"superpixel proposals per MP: {report['superpixel_proposals_per_mp']:.0f}")
    if "sam_proposals_per_mp" in report:
        print(f"SAM proposals per MP: {report['sam_proposals_per_mp']:.0f} (filters off)")
    for k, v in report["seconds_per_mp"].items():
        print(f"{k:>10}: {v:8.2f} s/MP wall, {report['cpu_seconds_per_mp'][k]:8.2f} CPU-s/MP")
    print(f"peak RSS: {report['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
