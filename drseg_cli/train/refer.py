"""``drseg train --task refer``: fine-tune RSRefSeg 2 on a referring dataset (docs/REFER.md).

The released recipe: LoRA (r 16, α 16) on SAM's image encoder and both SigLIP towers, the
prompter, SAM's prompt encoder and mask decoder and SigLIP's logit scale/bias trained in
full; AdamW, linear warmup then cosine decay (``trainer.lr_factor``); the loss of
``RSRefSeg2Model.loss``. From the segmentation trainer it reuses the run folder, config,
``metrics.jsonl/csv`` log (``MetricsLog``), AMP (bf16 autocast, fp16 with a grad scaler),
gradient clipping and accumulation, DDP under ``torchrun`` (``init_distributed``; the batch
is split over ranks), atomic ``last.pt``/``best.pt`` and ``--resume``.

Images are resized to the model's window (the released configs: 1024 px, keep-ratio resize
of square images); masks go with them (nearest), and a random horizontal flip swaps
"left"/"right" in the sentence, as the spatial words must follow the pixels.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from drseg_cli.errors import InputError, UsageError
from drseg_cli.evaluate.refer import (
    ReferDataset,
    ReferSample,
    evaluate_refer,
    load_refer_dataset,
    read_rgb,
)
from drseg_cli.pipeline.runtime import resolve_precision
from drseg_cli.train.checkpoint import save_checkpoint
from drseg_cli.train.trainer import (
    MetricsLog,
    TrainConfig,
    init_distributed,
    lr_factor,
    merge_resume_config,
)

FORMAT = "drseg-refer-checkpoint"
_SWAP = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def _swap_sides(text: str) -> str:
    def sub(m: re.Match[str]) -> str:
        word = "right" if m.group(0).lower() == "left" else "left"
        return word.capitalize() if m.group(0)[0].isupper() else word

    return _SWAP.sub(sub, text)


def _batch(
    samples: list[ReferSample], size: int, rng: np.random.Generator, flip: bool
) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    images, texts, masks = [], [], []
    for s in samples:
        img = torch.from_numpy(read_rgb(s.image))[None]
        mask = s.mask(tuple(img.shape[-2:]))
        label = torch.from_numpy(mask.astype(np.int64))[None, None].float()
        if label.shape[-2:] != img.shape[-2:]:
            raise InputError(f"{s.mask_file or s.image}: mask and image sizes differ ({s.where})")
        img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
        label = F.interpolate(label, size=(size, size), mode="nearest")
        text = s.sentence
        if flip and rng.random() < 0.5:
            img, label, text = img.flip(-1), label.flip(-1), _swap_sides(text)
        images.append(img[0])
        masks.append(label[0, 0].long())
        texts.append(text)
    return torch.stack(images), texts, torch.stack(masks)


def run_refer_training(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_record: Any = None,
    given: dict[str, Any] | None = None,
    lora_rank: int = 16,
    init_checkpoint: str | None = None,
) -> dict[str, Any]:
    """Train (or resume) a referring model in ``cfg.output``; a JSON-ready summary."""
    from drseg_cli.model.rsrefseg2 import add_lora, build_rsrefseg2

    run_dir = Path(cfg.output)
    last = run_dir / "last.pt"
    payload = None
    if resume:
        if not last.is_file():
            raise UsageError(f"{run_dir}: nothing to resume (no last.pt)")
        payload = _read(last)
        saved = TrainConfig.from_dict(payload["config"])
        cfg = merge_resume_config(saved, given) if given else replace(saved, device=cfg.device)
    elif last.exists() and not overwrite:
        raise UsageError(
            f"{run_dir}: a run exists here; pass --resume to continue or --overwrite to restart"
        )
    else:  # absolute data paths: the saved config still works from another folder
        cfg = replace(cfg, data=str(Path(cfg.data).resolve()))
    cfg.validate()
    dist_info, device = init_distributed(cfg.device)
    world, rank = dist_info.world, dist_info.rank
    if cfg.batch_size % (world * cfg.accum_steps):
        raise UsageError(
            f"--batch-size {cfg.batch_size} must be a multiple of processes × --accum-steps "
            f"({world} × {cfg.accum_steps})"
        )
    amp = resolve_precision(cfg.precision, device)
    train_ds = load_refer_dataset(Path(cfg.data), cfg.split or "train", cfg.layout, cfg.limit)
    val_ds: ReferDataset | None = None
    if not cfg.no_val:
        with contextlib.suppress(InputError):
            val_layout = cfg.layout if cfg.val_data is None else "auto"
            val_ds = load_refer_dataset(
                Path(cfg.val_data or cfg.data), cfg.val_split or "val", val_layout
            )
    variant = "siglip2-so400m-sam-vit-large" if cfg.model == "vit-b16" else cfg.model
    torch.manual_seed(cfg.seed)
    model = build_rsrefseg2(
        variant, checkpoint=init_checkpoint, pretrained_encoders=init_checkpoint is None
    )
    model.requires_grad_(True)
    add_lora(model, r=lora_rank, alpha=lora_rank)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    start, best = 0, -math.inf
    if payload is not None:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if scaler is not None and payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        start, best = int(payload["step"]), float(payload.get("best_gIoU", -math.inf))
    net: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        net = DDP(model, device_ids=ids, find_unused_parameters=True)
    log = None
    if dist_info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(run_dir, start if payload else None, cfg.tensorboard)
        doc = {"task": "refer", "config": asdict(cfg), "model": variant, "lora_rank": lora_rank,
               "dataset": train_ds.describe()}  # fmt: skip
        (run_dir / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
    size = model.preprocess.tile_size
    micro = cfg.batch_size // (world * cfg.accum_steps)
    history: list[float] = []
    started = time.perf_counter()

    def save(path: Path, step: int) -> None:
        state = {
            "format": FORMAT,
            "task": "refer",
            "config": asdict(cfg),
            "model_variant": variant,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "step": step,
            "best_gIoU": best,
        }
        save_checkpoint(state, path)

    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        # The step's global batch, a pure function of (seed, step): resume-exact.
        rng = np.random.default_rng([cfg.seed, step])
        order = rng.choice(len(train_ds), size=cfg.batch_size, replace=True)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for m in range(cfg.accum_steps):
            lo = (m * world + rank) * micro
            samples = [train_ds.samples[int(i)] for i in order[lo : lo + micro]]
            images, texts, masks = _batch(samples, size, rng, cfg.flip)
            images, masks = images.to(device), masks.to(device)
            sync = m == cfg.accum_steps - 1 or world == 1
            ctx = contextlib.nullcontext() if sync else net.no_sync()  # type: ignore[operator]
            autocast = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
            with ctx, autocast:
                inner = net.module if world > 1 else net
                loss, _ = inner.loss(images, texts, masks)  # type: ignore[union-attr,operator]
                loss = loss / cfg.accum_steps
            (scaler.scale(loss) if scaler is not None else loss).backward()
            total += float(loss.detach())
        if scaler is not None:
            scaler.unscale_(optimizer)
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        history.append(total)
        done = step + 1
        if log is not None and (done % cfg.log_every == 0 or done == cfg.steps):
            entry = {
                "kind": "train",
                "step": done,
                "loss": total,
                "lr": scheduler.get_last_lr()[0],
                "seconds": round(time.perf_counter() - started, 3),
                "step_seconds": round(time.perf_counter() - t0, 3),
            }
            log.write(entry)
            if on_record:
                on_record(entry)
        if (
            dist_info.main
            and val_ds is not None
            and (done % cfg.eval_every == 0 or done == cfg.steps)
        ):
            model.eval()
            metrics = evaluate_refer(model, val_ds, device)["metrics"]
            model.train()
            if log is not None:
                log.write({"kind": "eval", "step": done, **metrics})
            if metrics["gIoU"] > best:
                best = metrics["gIoU"]
                save(run_dir / "best.pt", done)
        if dist_info.main and (done % (cfg.save_every or cfg.eval_every) == 0 or done == cfg.steps):
            save(last, done)
    if log is not None:
        log.close()
    if dist_info.initialised_here:
        torch.distributed.destroy_process_group()
    return {
        "task": "refer",
        "layout": train_ds.layout,
        "run_dir": str(run_dir),
        "steps": cfg.steps,
        "losses": history,
        "best_gIoU": None if best == -math.inf else best,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _read(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt/foreign pickles raise many types
        raise InputError(f"{path}: not a readable checkpoint ({str(exc)[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"{path}: not a drseg referring checkpoint (drseg train --task refer)")
    return payload
