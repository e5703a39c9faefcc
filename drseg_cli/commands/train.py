"""``drseg train``: DR-Seg trained mode on labelled images (docs/TRAIN.md).

Multi-GPU / multi-process: ``torchrun --nproc_per_node N -m drseg_cli train ...``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from drseg_cli.commands._common import err_console, print_json, report_errors


@report_errors
def command(
    data: Path = typer.Option(..., "--data", "-d", help="Training dataset folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Run folder (checkpoints, logs)."),
    classes: str | None = typer.Option(
        None, "--classes", "-c", help="Class file or 'a,b,c' (default: the benchmark's)."
    ),
    layout: str | None = typer.Option(None, help="Dataset layout (auto; see drseg evaluate)."),
    split: str | None = typer.Option(None, help="Training split (default: train)."),
    val_data: Path | None = typer.Option(None, help="Validation dataset (default: --data)."),
    val_split: str | None = typer.Option(None, help="Validation split (layout's default)."),
    no_val: bool | None = typer.Option(None, "--no-val", help="No periodic evaluation."),
    ignore_index: int | None = typer.Option(None, help="Label value not trained on (255)."),
    reduce_zero_label: bool | None = typer.Option(
        None, "--reduce-zero-label/--no-reduce-zero-label", help="0 → ignore, v → v-1."
    ),
    limit: int | None = typer.Option(None, min=1, help="Only the first N training images."),
    model: str | None = typer.Option(None, "--model", "-m", help="Model preset (vit-b16)."),
    clip_model: str | None = typer.Option(None, help="open_clip model name override."),
    clip_pretrained: str | None = typer.Option(None, help="open_clip weights tag or file."),
    dino_model: str | None = typer.Option(None, help="timm DINO model name override."),
    dino_checkpoint: Path | None = typer.Option(None, help="Local DINO checkpoint file."),
    rho: float | None = typer.Option(None, help="DR-Seg semantic channel ratio."),
    k: int | None = typer.Option(None, "--k", help="DR-Seg graph sparsity (neighbours)."),
    alpha: float | None = typer.Option(None, help="DR-Seg propagation strength."),
    steps_pdgr: int | None = typer.Option(None, "--pdgr-steps", help="DR-Seg propagation steps."),
    gamma: float | None = typer.Option(None, help="DR-Seg fusion temperature."),
    window: int | None = typer.Option(None, help="DR-Seg graph search radius."),
    tau: float | None = typer.Option(None, help="DR-Seg edge softmax temperature."),
    no_spsd: bool = typer.Option(False, "--no-spsd", help="Ablate channel decoupling."),
    no_pdgr: bool = typer.Option(False, "--no-pdgr", help="Ablate graph rectification."),
    no_ugaf: bool = typer.Option(False, "--no-ugaf", help="Ablate uncertainty fusion."),
    decoder_channels: int | None = typer.Option(None, help="Decoder width (32)."),
    decoder_stride: int | None = typer.Option(None, help="Decoder output stride (4)."),
    crop_size: int | None = typer.Option(None, help="Training crop / eval tile (model's)."),
    scale_min: float | None = typer.Option(None, help="Scale jitter: smallest zoom (0.75)."),
    scale_max: float | None = typer.Option(None, help="Scale jitter: largest zoom (1.5)."),
    no_flip: bool | None = typer.Option(None, "--no-flip", help="No random flips."),
    no_rotate: bool | None = typer.Option(None, "--no-rotate", help="No 90° rotations."),
    photometric: float | None = typer.Option(None, help="Colour jitter strength (0.2; 0 off)."),
    steps: int | None = typer.Option(None, help="Optimizer steps (2000)."),
    epochs: float | None = typer.Option(None, help="Train for N passes (overrides --steps)."),
    batch_size: int | None = typer.Option(None, help="Global batch per step (8)."),
    accum_steps: int | None = typer.Option(None, help="Gradient accumulation micro-steps (1)."),
    lr: float | None = typer.Option(None, help="AdamW peak learning rate (1e-3)."),
    min_lr: float | None = typer.Option(None, help="Cosine schedule floor (1e-5)."),
    weight_decay: float | None = typer.Option(None, help="AdamW weight decay (0.01)."),
    warmup_steps: int | None = typer.Option(None, help="Linear warmup steps (50)."),
    loss: str | None = typer.Option(None, help="ce | bce (per-class sigmoid)."),
    clip_grad: float | None = typer.Option(None, help="Gradient norm clip (1.0; 0 off)."),
    precision: str | None = typer.Option(None, help="auto | fp32 | bf16 | fp16."),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N."),
    seed: int | None = typer.Option(None, help="Random seed (0)."),
    workers: int | None = typer.Option(None, help="Data loader worker processes (2)."),
    eval_every: int | None = typer.Option(None, help="Evaluate every N steps (500)."),
    save_every: int | None = typer.Option(None, help="Write last.pt every N steps."),
    log_every: int | None = typer.Option(None, help="Log the loss every N steps (10)."),
    eval_batch_size: int | None = typer.Option(None, help="Tiles per call when evaluating."),
    tensorboard: bool | None = typer.Option(None, "--tensorboard", help="Also log there."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in -o from last.pt."),
    overwrite: bool = typer.Option(False, help="Start over in a run folder that has one."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
    json_: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Train DR-Seg's learnable parts (frozen CLIP + DINO) and write run/last.pt, run/best.pt."""
    from drseg_cli.commands._model import drseg_options_from
    from drseg_cli.errors import UsageError
    from drseg_cli.train.trainer import TrainConfig, run_training

    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    options = drseg_options_from(
        dict(rho=rho, k=k, alpha=alpha, steps=steps_pdgr, gamma=gamma, window=window, tau=tau),
        no_spsd=no_spsd,
        no_pdgr=no_pdgr,
        no_ugaf=no_ugaf,
    )
    head = {
        key: value
        for key, value in (("channels", decoder_channels), ("decoder_stride", decoder_stride))
        if value is not None
    }
    given: dict[str, Any] = {
        "data": str(data),
        "output": str(output),
        "classes": classes,
        "layout": layout,
        "split": split,
        "val_data": str(val_data) if val_data else None,
        "val_split": val_split,
        "no_val": no_val,
        "ignore_index": ignore_index,
        "reduce_zero_label": reduce_zero_label,
        "limit": limit,
        "model": model,
        "clip_model": clip_model,
        "clip_pretrained": clip_pretrained,
        "dino_model": dino_model,
        "dino_checkpoint": str(dino_checkpoint) if dino_checkpoint else None,
        "drseg_options": options.as_dict() if options is not None else None,
        "head": head or None,
        "crop_size": crop_size,
        "scale_min": scale_min,
        "scale_max": scale_max,
        "flip": False if no_flip else None,
        "rotate": False if no_rotate else None,
        "photometric": photometric,
        "steps": steps,
        "epochs": epochs,
        "batch_size": batch_size,
        "accum_steps": accum_steps,
        "lr": lr,
        "min_lr": min_lr,
        "weight_decay": weight_decay,
        "warmup_steps": warmup_steps,
        "loss": loss,
        "clip_grad": clip_grad,
        "precision": precision,
        "device": device,
        "seed": seed,
        "workers": workers,
        "eval_every": eval_every,
        "save_every": save_every,
        "log_every": log_every,
        "eval_batch_size": eval_batch_size,
        "tensorboard": tensorboard,
    }
    given = {key: value for key, value in given.items() if value is not None}
    cfg = TrainConfig.from_dict(given)
    main_rank = os.environ.get("RANK", "0") == "0"

    def show(record: dict) -> None:
        if quiet or json_ or not main_rank:
            return
        if record["kind"] == "train":
            err_console.print(
                f"step {record['step']:>6}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                f"{record['step_seconds']:.2f} s/step",
                markup=False,
            )
        else:
            err_console.print(
                f"step {record['step']:>6}  eval mIoU {record['mIoU']}  mACC {record['mACC']}",
                markup=False,
            )

    summary = run_training(cfg, resume=resume, overwrite=overwrite, on_record=show, given=given)
    if not main_rank:
        return
    if json_:
        print_json(summary)
    elif not quiet:
        err_console.print(
            f"done: {summary['steps']} steps in {summary['seconds']:.1f} s; best mIoU "
            f"{summary['best_mIoU']}; checkpoints in {summary['run_dir']}",
            markup=False,
        )
