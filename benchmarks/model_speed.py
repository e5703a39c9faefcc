"""Per-tile time of CLIP-only vs full DR-Seg, stage by stage (not a test; not run by CI).

Full-size, randomly initialised backbones (CLIP ViT-B/16 + DINO ViT-B/8: the cost does not
depend on the weights), a 448 px tile by default. Stages: clip backbone, dino backbone, SPSD,
PDGR (graph + propagation + renorm), UGAF, head (normalise, logits, resampling). The target
is PDGR + UGAF < 25 % of the two backbones.

    .venv/bin/python benchmarks/model_speed.py --repeats 3
    .venv/bin/python benchmarks/model_speed.py --device cuda --batch-size 8 --json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drseg_cli.model.drseg import DRSegModel, DRSegOptions  # noqa: E402

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
STAGES = ("clip", "dino", "spsd", "pdgr", "ugaf", "head")


class OpenClipDense(nn.Module):
    """Fallback CLIP ViT-B/16 dense encoder (random init) with the backbones interface."""

    patch_size, embed_dim, mean, std = 16, 512, OPENAI_MEAN, OPENAI_STD
    random_weights = True

    def __init__(self, tile_size: int) -> None:
        super().__init__()
        import open_clip

        model = open_clip.create_model("ViT-B-16", pretrained=None, force_image_size=tile_size)
        self.visual = model.visual
        self.visual.output_tokens = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, tokens = self.visual(x)
        feats = tokens @ self.visual.proj
        side_h, side_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return feats.transpose(1, 2).reshape(x.shape[0], -1, side_h, side_w)

    def encode_text(self, class_prompts) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        return F.normalize(torch.randn(len(class_prompts), self.embed_dim, generator=gen), dim=1)


class TimmDinoDense(nn.Module):
    """Fallback DINO ViT-B/8 patch encoder (random init) with the backbones interface."""

    patch_size, embed_dim, mean, std = 8, 768, IMAGENET_MEAN, IMAGENET_STD
    random_weights = True

    def __init__(self) -> None:
        super().__init__()
        import timm

        self.vit = timm.create_model(
            "vit_base_patch8_224", pretrained=False, dynamic_img_size=True, num_classes=0
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens :]
        side_h, side_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, side_h, side_w)


def build_encoders(tile_size: int) -> tuple[nn.Module, nn.Module, str]:
    """The project's loaders with random weights when they allow it, else the fallbacks."""
    try:
        from drseg_cli.model import backbones

        clip = backbones.load_clip("ViT-B-16", pretrained=None)
        dino = backbones.load_dino("vit_base_patch8_224", pretrained=None)
        return clip, dino, "drseg_cli.model.backbones"
    except Exception as err:  # noqa: BLE001 - any failure means: use the fallback wrappers
        print(f"(backbones loaders unavailable for random init: {err}; using fallbacks)")
        return OpenClipDense(tile_size), TimmDinoDense(), "benchmark fallback wrappers"


def measure(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    clip, dino, source = build_encoders(args.tile_size)
    model = DRSegModel(clip, dino, DRSegOptions(), tile_size=args.tile_size).to(device).eval()
    text = model.encode_text([[f"class {i}"] for i in range(args.classes)]).to(device)
    images = torch.rand(args.batch_size, 3, args.tile_size, args.tile_size, device=device)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

    def autocast():
        return torch.autocast(device.type, dtype=amp, enabled=amp is not None)

    def clip_only(timings: dict[str, float]) -> None:
        """The CLIP-only method: backbone + 100·F̂Tᵀ (what --method clip computes)."""
        start = time.perf_counter()
        feats = clip((images - _stat(clip.mean, device)) / _stat(clip.std, device))
        logits = 100.0 * torch.einsum("bdhw,kd->bkhw", F.normalize(feats.float(), dim=1), text)
        _sync(device)
        timings["total"] = time.perf_counter() - start
        assert torch.isfinite(logits).all()

    def drseg(timings: dict[str, float]) -> None:
        start = time.perf_counter()
        model.forward_details(images, text, timings=timings)
        _sync(device)
        timings["total"] = time.perf_counter() - start

    runs: dict[str, list[dict[str, float]]] = {"clip_only": [], "drseg": []}
    with torch.inference_mode(), autocast():
        for name, fn in (("clip_only", clip_only), ("drseg", drseg)):
            for i in range(args.warmup + args.repeats):
                timings: dict[str, float] = {}
                fn(timings)
                if i >= args.warmup:
                    runs[name].append(timings)

    def per_tile_ms(name: str, key: str) -> float:
        """Median over repeats (``--stat min`` for the best, steadier on a busy machine)."""
        pick = min if args.stat == "min" else statistics.median
        return 1000 * pick(r.get(key, 0.0) for r in runs[name]) / args.batch_size

    drseg_ms = {k: per_tile_ms("drseg", k) for k in (*STAGES, "total")}
    backbones_ms = drseg_ms["clip"] + drseg_ms["dino"]
    heads_ms = sum(drseg_ms[k] for k in ("spsd", "pdgr", "ugaf", "head"))
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "tile_size": args.tile_size,
        "batch_size": args.batch_size,
        "classes": args.classes,
        "repeats": args.repeats,
        "stat": args.stat,
        "encoders": source,
        "clip_only_ms_per_tile": per_tile_ms("clip_only", "total"),
        "drseg_ms_per_tile": drseg_ms,
        "pdgr_plus_ugaf_pct_of_backbones": 100
        * (drseg_ms["pdgr"] + drseg_ms["ugaf"])
        / backbones_ms,
        "spsd_pdgr_ugaf_head_pct_of_backbones": 100 * heads_ms / backbones_ms,
    }


def _stat(values, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, device=device).view(1, -1, 1, 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tile-size", type=int, default=448)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--stat", choices=("median", "min"), default="median")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tile_size % math.lcm(16, 8):
        parser.error("--tile-size must be a multiple of 16")
    result = measure(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    ms = result["drseg_ms_per_tile"]
    print(
        f"{result['device']} ({result['threads']} threads), {result['precision']}, "
        f"tile {args.tile_size}, batch {args.batch_size}, K={args.classes}, "
        f"{args.stat} of {args.repeats}; encoders: {result['encoders']}"
    )
    print(f"  CLIP-only      {result['clip_only_ms_per_tile']:9.1f} ms/tile")
    print(f"  DR-Seg total   {ms['total']:9.1f} ms/tile")
    for stage in STAGES:
        print(f"    {stage:<12}{ms[stage]:9.1f} ms")
    print(
        f"  PDGR + UGAF = {result['pdgr_plus_ugaf_pct_of_backbones']:.1f} % of the backbones "
        f"(target < 25 %); all DR-Seg heads = "
        f"{result['spsd_pdgr_ugaf_head_pct_of_backbones']:.1f} %"
    )


if __name__ == "__main__":
    main()
