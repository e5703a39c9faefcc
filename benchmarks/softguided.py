"""Soft-guided fine-tuning: speed/memory, and collapse on a synthetic task (not a test).

``speed``: full-size CLIP (ViT-B/16 for vit-b16) with seeded random weights (the cost does not
depend on the weights), ``SoftGuidedCLIP`` per ``--tune`` mode, random images and labels,
AdamW steps as ``drseg train`` takes them (recipe forward with the guide pass, CE + guidance
losses, backward, clip, step). Reports steps/s, the forward/backward split, trainable
parameters, the memory the guide adds (tensors it does not share with the tuned encoder) and
the memory a batch costs (CPU: RSS growth sampled by a thread; GPU: peak allocated).

``synthetic``: the four-class textured dataset of ``tests/test_softguided.py`` with ``water``
held out; the frozen VLM is a test-tiny CLIP pretrained on all four classes in another
(tinted) domain (``--vlm pretrained``, the default: it knows ``water``, as a real VLM knows
its concepts) or the random test-tiny CLIP (``--vlm random``: nothing to keep); zero-shot
(the frozen CLIP), plain fine-tuning (no guide), guided fine-tuning, plain + bias + decoder
and the full soft-guided recipe, each scored like ``drseg evaluate --class-split all``: mIoU
of the seen and unseen classes, harmonic mean.

    .venv/bin/python benchmarks/softguided.py speed --steps 3 --batch-size 2 --crop 224
    .venv/bin/python benchmarks/softguided.py synthetic --steps 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_speed import RssSampler, _sync, peak_rss_mib, rss_mib  # noqa: E402

from drseg_cli.train.trainer import per_sample_loss  # noqa: E402


def _tensor_mib(tensors) -> float:
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total / 2**20


def speed(args: argparse.Namespace, tune: str) -> dict:
    from drseg_cli.model.factory import build_model
    from drseg_cli.train.modules import HeadConfig
    from drseg_cli.train.softguided import SoftGuidedCLIP, SoftGuidedConfig

    torch.manual_seed(0)
    device = torch.device(args.device)
    base = build_model(
        args.preset, method="clip", random_weights=True, tile_size=args.crop, device="cpu"
    )
    config = SoftGuidedConfig(tune=tune, tune_blocks=args.tune_blocks if tune != "full" else 0)
    head = HeadConfig(decoder_stride=4, channels=32)
    model = SoftGuidedCLIP(base.clip, config, head, tile_size=args.crop).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    clip_ids = {id(t) for t in list(model.clip.parameters()) + list(model.clip.buffers())}
    guide_own = []
    if model.guide is not None:
        guide_own = [
            t
            for t in list(model.guide.parameters()) + list(model.guide.buffers())
            if id(t) not in clip_ids
        ]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    text = model.encode_text([[f"class {i}"] for i in range(args.classes)]).to(device)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch_size, 3, args.crop, args.crop, generator=gen).to(device)
    labels = torch.randint(0, args.classes, (args.batch_size, args.crop, args.crop), generator=gen)
    labels = labels.to(device)
    rss_before = rss_mib()
    sampler = RssSampler().__enter__()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
    times: dict[str, list[float]] = {"forward": [], "backward": [], "step": []}
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        logits, parts = model(images, text, train_outputs=True)
        loss = per_sample_loss(logits, labels, "ce", 255).mean()
        loss = loss + sum(v.mean() for v in parts.values())
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        _sync(device)
        t2 = time.perf_counter()
        if i >= args.warmup:
            for key, value in zip(times, (t1 - t0, t2 - t1, t2 - t0), strict=True):
                times[key].append(value)
    sampler.__exit__()
    step_s = statistics.median(times["step"])
    result = {
        "tune": tune if tune == "full" else f"{tune} (last {args.tune_blocks} blocks)",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "crop": args.crop,
        "batch_size": args.batch_size,
        "trainable_params": sum(p.numel() for p in params),
        "guide_extra_mib": round(_tensor_mib(guide_own), 1),
        "steps_per_s": round(1.0 / step_s, 4),
        "split_seconds": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "batch_memory_mib": round(sampler.peak - rss_before, 1),
    }
    if device.type == "cuda":
        result["batch_memory_mib"] = round(
            (torch.cuda.max_memory_allocated(device) - base_alloc) / 2**20, 1
        )
    return result


def synthetic(args: argparse.Namespace) -> list[dict]:
    from drseg_cli.train.trainer import run_training
    from tests.test_softguided import _cfg, make_textures, pretrain_tiny_clip
    from tests.test_train import drseg

    tmp = Path(tempfile.mkdtemp(prefix="drseg-softguided-"))
    root = make_textures(tmp / "data", n=args.images)
    vlm: list = []  # the frozen VLM: random test-tiny CLIP, or one that knows the classes
    if args.vlm == "pretrained":
        source = make_textures(tmp / "source", n=args.images, seed=1, tint=args.tint)
        weights = pretrain_tiny_clip(source, tmp / "vlm.pt", steps=args.pretrain_steps)
        vlm = ["--clip-pretrained", weights]
    parts_off = {"scene_bias": False, "decoder": False}
    runs = {
        "plain fine-tune": {"guidance": False, **parts_off},
        "guided (a only)": parts_off,
        "plain + bias + decoder": {"guidance": False},
        "soft-guided (a+b+c)": {},
    }
    rows = []
    zero_shot = ["--model", "test-tiny", "--method", "clip", *vlm]
    r = drseg("evaluate", "--data", root, "-c", root / "classes.txt", *zero_shot,
              "--holdout-classes", "water", "--json")  # fmt: skip
    rows.append({"model": "zero-shot (frozen CLIP)", **_split(r), **_seen_only(root, zero_shot)})
    for index, (name, recipe) in enumerate(runs.items()):
        t0 = time.process_time()
        recipe = {"tune": args.tune, "encoder_lr_scale": 1.0, **recipe}
        out = tmp / f"run{index}"
        run_training(
            _cfg(
                root,
                out,
                soft_guided=recipe,
                holdout_classes=["water"],
                steps=args.steps,
                lr=args.lr,
                seed=args.seed,
                clip_pretrained=str(vlm[1]) if vlm else None,
            )  # fmt: skip
        )
        cpu_s = time.process_time() - t0
        r = drseg("evaluate", "--data", root, "--checkpoint", out / "last.pt", "--json")
        seen_only = _seen_only(root, ["--checkpoint", out / "last.pt"])
        rows.append({"model": name, **_split(r), **seen_only, "train_cpu_s": round(cpu_s, 1)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def _seen_only(root: Path, model: list) -> dict:
    """mIoU with only the seen classes as candidates (``--class-split seen``)."""
    from tests.test_train import drseg

    r = drseg("evaluate", "--data", root, "-c", root / "classes.txt", *model,
              "--holdout-classes", "water", "--class-split", "seen", "--json")  # fmt: skip
    if r.exit_code:
        raise SystemExit(r.output)
    return {"mIoU_seen_only": json.loads(r.stdout)["mIoU"]}


def _split(result) -> dict:
    if result.exit_code:
        raise SystemExit(result.output)
    split = json.loads(result.stdout)["class_split"]
    return {k: split[k] for k in ("mIoU_seen", "mIoU_unseen", "hIoU")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("speed", "synthetic"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="vit-b16")
    parser.add_argument("--tunes", default="lora,last,full", help="speed: tune modes")
    parser.add_argument("--tune-blocks", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--images", type=int, default=8, help="synthetic: images")
    parser.add_argument("--tune", default="full", help="synthetic: tune mode")
    parser.add_argument("--lr", type=float, default=5e-3, help="synthetic: lr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--vlm", choices=("pretrained", "random"), default="pretrained",
        help="synthetic: frozen VLM = a test-tiny CLIP pretrained on the four classes in "
        "another (tinted) domain, or the random test-tiny CLIP",
    )  # fmt: skip
    parser.add_argument("--tint", type=float, default=0.4, help="synthetic: source domain tint")
    parser.add_argument("--pretrain-steps", type=int, default=30, help="synthetic: VLM steps")
    args = parser.parse_args()
    if args.what == "speed":
        for tune in args.tunes.split(","):
            print(json.dumps(speed(args, tune)), flush=True)
    else:
        print(json.dumps(synthetic(args), indent=2))


if __name__ == "__main__":
    main()
