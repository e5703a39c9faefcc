"""``drseg train``: DR-Seg trained mode on labelled images (docs/TRAIN.md).

Multi-GPU / multi-process: ``torchrun --nproc_per_node N -m drseg_cli train ...``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from drseg_cli.commands import options as opt
from drseg_cli.commands._common import err_console, print_json, report_errors

#: Propagation steps at or above this are taken for optimiser steps (``--steps`` before 0.2).
PDGR_STEPS_LIMIT = 100


def _train(default: None, name: str, help: str, shown: object = None) -> Any:
    """A training setting: None (the run's config, else ``TrainConfig``'s) unless given."""
    return opt.option(default, name, help=help, panel=opt.TRAINING, shown=shown)


@report_errors
def command(
    data: Path = opt.data("Training dataset folder."),
    task: str = opt.task(),
    output: Path = typer.Option(
        ...,
        "--output",
        "-o",
        help="Run folder (checkpoints, logs).",
        rich_help_panel=opt.OUTPUTS,
    ),
    layout: str | None = opt.layout(None, "Dataset layout (see drseg evaluate)."),
    split: str | None = opt.option(
        None, "--split", help="Training split.", panel=opt.DATA, shown="train"
    ),
    val_data: Path | None = opt.option(
        None, "--val-data", help="Validation dataset.", panel=opt.DATA, shown="--data"
    ),
    val_split: str | None = opt.option(
        None, "--val-split", help="Validation split.", panel=opt.DATA, shown="the layout's"
    ),
    no_val: bool | None = opt.flag(
        "--no-val", help="No periodic evaluation.", panel=opt.DATA, default=None
    ),
    ignore_index: int | None = opt.ignore_index(None, "Label value not trained on."),
    reduce_zero_label: bool = opt.reduce_zero_label(),
    keep_zero_label: bool = opt.keep_zero_label(),
    limit: int | None = opt.limit("Only the first N training images."),
    classes: str | None = opt.classes(required=False),
    holdout_classes: str | None = opt.holdout_classes(
        "Classes not trained on ('a,b'): their pixels are ignored, their names unseen."
    ),
    recipe: str | None = opt.recipe(),
    tune: str | None = opt.tune(),
    tune_blocks: int | None = opt.tune_blocks(),
    lora_rank: int | None = opt.lora_rank(),
    lora_alpha: float | None = opt.lora_alpha(),
    no_guidance: bool = opt.no_guidance(),
    no_scene_bias: bool = opt.no_scene_bias(),
    no_decoder: bool = opt.no_decoder(),
    seg_weight: float | None = opt.seg_weight(),
    guide_feature_weight: float | None = opt.guide_feature_weight(),
    guide_cost_weight: float | None = opt.guide_cost_weight(),
    guide_output_weight: float | None = opt.guide_output_weight(),
    guide_cost_scale: float | None = opt.guide_cost_scale(),
    scene_bias_hidden: int | None = opt.scene_bias_hidden(),
    encoder_lr_scale: float | None = opt.encoder_lr_scale(),
    model: str | None = opt.model(None),
    clip_model: str | None = opt.clip_model(),
    clip_pretrained: str | None = opt.clip_pretrained(),
    dino_model: str | None = opt.dino_model(),
    dino_checkpoint: Path | None = opt.dino_checkpoint(),
    rho: float | None = opt.rho(),
    k: int | None = opt.k(),
    alpha: float | None = opt.alpha(),
    steps: int | None = opt.steps(),
    gamma: float | None = opt.gamma(),
    window: int | None = opt.window(),
    tau: float | None = opt.tau(),
    no_spsd: bool = opt.no_spsd(),
    no_pdgr: bool = opt.no_pdgr(),
    no_ugaf: bool = opt.no_ugaf(),
    decoder_channels: int | None = _train(None, "--decoder-channels", "Decoder width.", 32),
    decoder_stride: int | None = _train(None, "--decoder-stride", "Decoder output stride.", 4),
    crop_size: int | None = _train(None, "--crop-size", "Training crop / eval tile.", "model's"),
    scale_min: float | None = _train(None, "--scale-min", "Scale jitter: smallest zoom.", 0.75),
    scale_max: float | None = _train(None, "--scale-max", "Scale jitter: largest zoom.", 1.5),
    no_flip: bool | None = opt.flag(
        "--no-flip", help="No random flips.", panel=opt.TRAINING, default=None
    ),
    no_rotate: bool | None = opt.flag(
        "--no-rotate", help="No 90° rotations.", panel=opt.TRAINING, default=None
    ),
    photometric: float | None = _train(
        None, "--photometric", "Colour jitter strength (0: off).", 0.2
    ),
    max_steps: int | None = _train(None, "--max-steps", "Optimizer steps.", 2000),
    epochs: float | None = _train(None, "--epochs", "Train for N passes (overrides --max-steps)."),
    batch_size: int | None = opt.option(
        None, "--batch-size", help="Global batch per step.", panel=opt.TRAINING, shown=8
    ),
    accum_steps: int | None = _train(
        None, "--accum-steps", "Gradient accumulation micro-steps.", 1
    ),
    lr: float | None = _train(None, "--lr", "AdamW peak learning rate.", "1e-3"),
    min_lr: float | None = _train(None, "--min-lr", "Cosine schedule floor.", "1e-5"),
    weight_decay: float | None = _train(None, "--weight-decay", "AdamW weight decay.", 0.01),
    warmup_steps: int | None = _train(None, "--warmup-steps", "Linear warmup steps.", 50),
    loss: str | None = _train(None, "--loss", "ce | bce (per-class sigmoid).", "ce"),
    clip_grad: float | None = _train(None, "--clip-grad", "Gradient norm clip (0: off).", 1.0),
    seed: int | None = _train(None, "--seed", "Random seed.", 0),
    precision: str | None = opt.precision(None),
    device: str | None = opt.device(None),
    workers: int | None = opt.option(
        None, "--workers", help="Data loader worker processes.", panel=opt.TILING, shown=2
    ),
    eval_every: int | None = _train(None, "--eval-every", "Evaluate every N steps.", 500),
    save_every: int | None = _train(
        None, "--save-every", "Write last.pt every N steps.", "--eval-every"
    ),
    log_every: int | None = _train(None, "--log-every", "Log the loss every N steps.", 10),
    eval_batch_size: int | None = opt.option(
        None, "--eval-batch-size", help="Tiles per call when evaluating.", panel=opt.TILING, shown=4
    ),
    tensorboard: bool | None = opt.flag(
        "--tensorboard", help="Also log to TensorBoard.", panel=opt.OUTPUTS, default=None
    ),
    resume: bool = opt.flag(
        "--resume", help="Continue the run in -o from last.pt.", panel=opt.OUTPUTS
    ),
    overwrite: bool = opt.overwrite("Start over in a run folder that has one."),
    quiet: bool = opt.quiet("No progress lines."),
    json_: bool = opt.json_(),
) -> None:
    """Train DR-Seg's learnable parts (frozen CLIP + DINO), or fine-tune CLIP softly
    (--recipe soft-guided); write run/last.pt, run/best.pt."""
    from drseg_cli.classes import parse_name_list
    from drseg_cli.commands._model import drseg_options_from
    from drseg_cli.errors import UsageError
    from drseg_cli.train.trainer import TrainConfig, run_training

    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if steps is not None and steps >= PDGR_STEPS_LIMIT:  # --steps was optimiser steps once
        raise UsageError(
            f"--steps {steps}: --steps is DR-Seg's propagation steps (default 10); "
            "optimiser steps are --max-steps"
        )
    options = drseg_options_from(
        dict(rho=rho, k=k, alpha=alpha, steps=steps, gamma=gamma, window=window, tau=tau),
        no_spsd=no_spsd,
        no_pdgr=no_pdgr,
        no_ugaf=no_ugaf,
    )
    head = {
        key: value
        for key, value in (("channels", decoder_channels), ("decoder_stride", decoder_stride))
        if value is not None
    }
    soft = {
        "tune": tune,
        "tune_blocks": tune_blocks,
        "lora_rank": lora_rank,
        "lora_alpha": lora_alpha,
        "guidance": False if no_guidance else None,
        "scene_bias": False if no_scene_bias else None,
        "decoder": False if no_decoder else None,
        "seg_weight": seg_weight,
        "feature_weight": guide_feature_weight,
        "cost_weight": guide_cost_weight,
        "output_weight": guide_output_weight,
        "cost_scale": guide_cost_scale,
        "bias_hidden": scene_bias_hidden,
        "encoder_lr_scale": encoder_lr_scale,
    }
    soft = {key: value for key, value in soft.items() if value is not None}
    given: dict[str, Any] = {
        "recipe": recipe,
        "soft_guided": soft or None,
        "holdout_classes": parse_name_list(holdout_classes) or None,
        "data": str(data),
        "output": str(output),
        "classes": classes,
        "layout": layout,
        "split": split,
        "val_data": str(val_data) if val_data else None,
        "val_split": val_split,
        "no_val": no_val,
        "ignore_index": ignore_index,
        "reduce_zero_label": opt.zero_label(reduce_zero_label, keep_zero_label),
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
        "steps": max_steps,
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
        elif "gIoU" in record:
            err_console.print(
                f"step {record['step']:>6}  eval gIoU {record['gIoU']:.2f}  "
                f"cIoU {record['cIoU']:.2f}",
                markup=False,
            )
        else:
            err_console.print(
                f"step {record['step']:>6}  eval mIoU {record['mIoU']}  mACC {record['mACC']}",
                markup=False,
            )

    if task not in ("segment", "refer"):
        raise UsageError(f"--task {task}: choose segment or refer")
    if task == "refer":
        from drseg_cli.train.refer import run_refer_training

        summary = run_refer_training(
            cfg, resume=resume, overwrite=overwrite, on_record=show, given=given
        )
        if main_rank and json_:
            print_json(summary)
        elif main_rank and not quiet:
            err_console.print(
                f"done: {summary['steps']} steps in {summary['seconds']:.1f} s; best gIoU "
                f"{summary['best_gIoU']}; checkpoints in {summary['run_dir']}",
                markup=False,
            )
        return
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
