"""The training loop of DR-Seg's trained mode (docs/TRAIN.md).

Reproducibility is by construction: the sample stream (which image, which crop, which
augmentation) is a pure function of ``(seed, position)``, and ``--batch-size`` is the global
batch of one optimizer step, split into ``world × accum`` equal micro-batches. The loss is
the mean over samples of each sample's mean pixel loss, so one process, N processes (DDP:
gloo on CPU, nccl on GPU, through ``torchrun``) and gradient accumulation all take the same
steps, and a resumed run continues exactly where the checkpoint left it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from drseg_cli.classes import ClassSpec, holdout_indices
from drseg_cli.errors import InputError, UsageError
from drseg_cli.evaluate.datasets import Dataset, load_dataset
from drseg_cli.evaluate.metrics import ConfusionMatrix, SegMetrics, seen_unseen
from drseg_cli.evaluate.runner import EvalConfig, evaluate_dataset
from drseg_cli.pipeline.runtime import TilePredictor, resolve_device, resolve_precision
from drseg_cli.train.augment import AugmentConfig, CropDataset
from drseg_cli.train.checkpoint import (
    ModelSpec,
    checkpoint_payload,
    load_into,
    read_checkpoint,
    save_checkpoint,
)
from drseg_cli.train.recipes import get_recipe

log = logging.getLogger(__name__)

LOSSES = ("ce", "bce")
#: Options that may change when a run is resumed; all others must match the saved run.
RUNTIME_KEYS = {
    "output",  # a run folder may have been moved
    "steps",
    "epochs",
    "eval_every",
    "save_every",
    "log_every",
    "workers",
    "device",
    "tensorboard",
    "eval_batch_size",
}


@dataclass
class TrainConfig:
    """Every choice of a training run (saved in ``config.json`` and in checkpoints)."""

    data: str
    output: str
    classes: str | None = None  # class file or list; default: the benchmark layout's
    layout: str = "auto"
    split: str | None = None  # default: "train" (or the generic folder itself)
    val_data: str | None = None  # default: --data
    val_split: str | None = None  # default: the layout's evaluation split
    no_val: bool = False
    ignore_index: int = 255
    reduce_zero_label: bool | None = None
    limit: int | None = None
    # model
    model: str = "vit-b16"
    clip_model: str | None = None
    clip_pretrained: str | None = None
    dino_model: str | None = None
    dino_checkpoint: str | None = None
    drseg_options: dict[str, Any] = field(default_factory=dict)
    head: dict[str, Any] = field(default_factory=dict)
    recipe: str = "drseg"  # drseg | soft-guided (train/recipes.py)
    soft_guided: dict[str, Any] = field(default_factory=dict)  # SoftGuidedConfig fields
    holdout_classes: list[str] | None = None  # classes never trained on (seen/unseen split)
    # crops and augmentation
    crop_size: int | None = None  # default: the model's tile size
    scale_min: float = 0.75
    scale_max: float = 1.5
    flip: bool = True
    rotate: bool = True
    photometric: float = 0.2
    # optimisation
    steps: int = 2000
    epochs: float | None = None  # if set: steps = ceil(epochs · images / batch)
    batch_size: int = 8  # global batch per optimizer step
    accum_steps: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_steps: int = 50
    loss: str = "ce"
    clip_grad: float = 1.0
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    workers: int = 2
    # evaluation and logs
    eval_every: int = 500
    save_every: int | None = None  # default: eval_every
    log_every: int = 10
    eval_overlap: float = 0.25
    eval_batch_size: int = 4
    tensorboard: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def validate(self) -> None:
        from drseg_cli.train.recipes import get_recipe

        get_recipe(self.recipe)
        if self.recipe == "soft-guided":
            from drseg_cli.train.softguided import SoftGuidedConfig

            SoftGuidedConfig.from_dict(self.soft_guided)  # a bad value is a UsageError
        elif self.soft_guided:
            raise UsageError(
                "soft-guided options (--tune, --no-guidance, ...) need --recipe soft-guided"
            )
        if self.loss not in LOSSES:
            raise UsageError(f"--loss: choose one of {', '.join(LOSSES)}")
        for name in ("steps", "batch_size", "accum_steps", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"{option_flag(name)}: must be >= 1")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UsageError("--lr must be > 0 and --min-lr in [0, lr]")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.clip_grad < 0:
            raise UsageError("--warmup-steps, --weight-decay and --clip-grad must be >= 0")
        if not 0 < self.scale_min <= self.scale_max:
            raise UsageError("--scale-min/--scale-max: need 0 < min <= max")
        if self.epochs is not None and self.epochs <= 0:
            raise UsageError("--epochs: must be > 0")


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_spec: str) -> tuple[DistInfo, torch.device]:
    """torchrun environment → process group (nccl on GPU, gloo on CPU) and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return DistInfo(), resolve_device(device_spec)
    device = resolve_device(device_spec)
    if device.type == "cuda":
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    initialised = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        initialised = True
    return DistInfo(rank, world, local, initialised), device


# --------------------------------------------------------------------------- data stream


class SampleStream:
    """The global sample order: epoch permutations of the images, a pure function of the seed.

    Position ``p`` is sample ``perm_e[p mod N]`` of epoch ``e = p // N``; optimizer step ``s``
    uses positions ``[s·B, (s+1)·B)``. Micro-batch ``m`` of rank ``r`` is the slice
    ``[(m·world + r)·b, … + b)`` of the step, ``b = B / (world · accum)``.
    """

    def __init__(self, num_images: int, seed: int) -> None:
        self.n, self.seed = num_images, seed
        self._perms: dict[int, np.ndarray] = {}

    def key(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.n)
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch, 7]).permutation(self.n)
            self._perms = {epoch: perm}
        return int(perm[offset]), epoch

    def micro_keys(
        self, step: int, micro: int, rank: int, world: int, batch: int, accum: int
    ) -> list[tuple[int, int]]:
        b = batch // (world * accum)
        start = step * batch + (micro * world + rank) * b
        return [self.key(p) for p in range(start, start + b)]


class _StreamSampler(torch.utils.data.Sampler):
    """Yields this rank's sample keys from ``start_step`` on, micro-batch after micro-batch."""

    def __init__(self, stream: SampleStream, cfg: TrainConfig, dist_info: DistInfo, start: int):
        self.stream, self.cfg, self.dist, self.start = stream, cfg, dist_info, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        c = self.cfg
        for step in range(self.start, c.steps):
            for m in range(c.accum_steps):
                yield from self.stream.micro_keys(
                    step, m, self.dist.rank, self.dist.world, c.batch_size, c.accum_steps
                )

    def __len__(self) -> int:
        b = self.cfg.batch_size // (self.dist.world * self.cfg.accum_steps)
        return (self.cfg.steps - self.start) * self.cfg.accum_steps * b


class _CheckedCrops(CropDataset):
    """Crops whose label values are checked against the class count (error names the file)."""

    def __init__(self, *args, num_classes: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_classes = num_classes

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = super().__getitem__(key)
        labelled = label != self.dataset.ignore_index
        bad = labelled & ((label < 0) | (label >= self.num_classes))
        if bad.any():
            values = sorted({int(v) for v in label[bad].unique()[:8]})
            path = self.dataset.samples[key[0]].label
            raise InputError(
                f"{path}: label values {values} are outside the {self.num_classes} classes "
                f"and not the ignore index {self.dataset.ignore_index}"
            )
        return image, label


# --------------------------------------------------------------------------- loss, schedule


def per_sample_loss(
    logits: torch.Tensor, labels: torch.Tensor, kind: str, ignore_index: int
) -> torch.Tensor:
    """Mean pixel loss of each sample ``[B]`` (logits resampled to the label size).

    ``ce``: softmax cross-entropy; ``bce``: per-class sigmoid BCE on one-hot targets (mean
    over classes). Ignored pixels do not count; a sample with none labelled contributes 0.
    """
    logits = F.interpolate(
        logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False
    )
    valid = labels != ignore_index
    target = torch.where(valid, labels, torch.zeros_like(labels))
    if kind == "ce":
        pix = F.cross_entropy(logits, target, reduction="none")
    else:
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
        pix = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none").mean(1)
    pix = pix * valid
    return pix.sum((1, 2)) / valid.sum((1, 2)).clamp_min(1)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- the run


class MetricsLog:
    """``metrics.jsonl`` (every record) + ``metrics.csv`` (flat columns); TensorBoard if asked."""

    COLUMNS = ("kind", "step", "epoch", "loss", "lr", "mIoU", "mACC", "aAcc", "fwIoU", "seconds")

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool) -> None:
        self.jsonl, self.csv = run_dir / "metrics.jsonl", run_dir / "metrics.csv"
        records = []
        if resume_step is not None and self.jsonl.exists():  # drop what the lost run logged
            records = [json.loads(x) for x in self.jsonl.read_text().splitlines() if x.strip()]
            records = [r for r in records if r.get("step", 0) <= resume_step]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
        with self.csv.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(self.COLUMNS)
            writer.writerows(self._row(r) for r in records)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.warning("--tensorboard: the tensorboard package is not installed; skipped")

    def _row(self, record: dict) -> list:
        return [record.get(c, "") for c in self.COLUMNS]

    def write(self, record: dict) -> None:
        with self.jsonl.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        with self.csv.open("a", newline="") as fh:
            csv.writer(fh).writerow(self._row(record))
        if self.tb is not None:
            for key in ("loss", "lr", "mIoU", "mACC", "aAcc", "fwIoU"):
                if isinstance(record.get(key), int | float):
                    self.tb.add_scalar(f"{record['kind']}/{key}", record[key], record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _class_dicts(specs: list[ClassSpec]) -> list[dict[str, Any]]:
    return [{"name": c.name, "synonyms": list(c.synonyms)} for c in specs]


def _load_train_dataset(cfg: TrainConfig) -> Dataset:
    kwargs = dict(reduce_zero_label=cfg.reduce_zero_label, ignore_index=cfg.ignore_index)
    if cfg.split is not None:
        return load_dataset(Path(cfg.data), cfg.layout, cfg.split, limit=cfg.limit, **kwargs)
    try:
        return load_dataset(Path(cfg.data), cfg.layout, "train", limit=cfg.limit, **kwargs)
    except InputError:
        ds = load_dataset(Path(cfg.data), cfg.layout, None, limit=cfg.limit, **kwargs)
        if ds.layout.tree != "generic":
            raise
        return ds


def _load_val_dataset(cfg: TrainConfig, train: Dataset, warn: bool = True) -> Dataset | None:
    if cfg.no_val:
        return None
    root = Path(cfg.val_data or cfg.data)
    kwargs = dict(reduce_zero_label=cfg.reduce_zero_label, ignore_index=cfg.ignore_index)
    val = load_dataset(
        root, cfg.layout if cfg.val_data is None else "auto", cfg.val_split, **kwargs
    )
    if warn and {s.image for s in val.samples} & {s.image for s in train.samples}:
        log.warning("validation images overlap the training images (%s)", root)
    return val


def resolve_train_classes(cfg: TrainConfig, layout) -> list[ClassSpec]:
    from drseg_cli.classes import parse_classes

    if cfg.classes:
        return parse_classes(cfg.classes)
    if layout.classes:
        return layout.class_specs()
    raise UsageError(f"--classes is required for the {layout.name} layout")


def option_flag(key: str) -> str:
    """The ``drseg train`` option of a config key (``steps`` is ``--max-steps``: ``--steps``
    is DR-Seg's PDGR steps in every command)."""
    return "--max-steps" if key == "steps" else "--" + key.replace("_", "-")


def merge_resume_config(saved: TrainConfig, given: dict[str, Any]) -> TrainConfig:
    """The saved run's config, with runtime options the user set again (others must match)."""
    merged = asdict(saved)
    for key, value in given.items():
        if key in RUNTIME_KEYS:
            merged[key] = value
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            saved_part = {k: merged[key].get(k) for k in value}  # given settings only
            if value != saved_part:
                raise UsageError(
                    f"{value} differs from the run being resumed ({saved_part}); "
                    "start a new run or drop the option"
                )
        elif _norm(value, key) != _norm(merged.get(key), key):
            flag = option_flag(key)
            raise UsageError(
                f"{flag} {value!r} differs from the run being resumed ({merged.get(key)!r}); "
                "start a new run or drop the option"
            )
    return TrainConfig.from_dict(merged)


def _norm(value: Any, key: str) -> Any:
    """Paths compared (and saved) absolute; a class file too, a class list as is."""
    if key in ("data", "val_data", "dino_checkpoint") and value:
        return str(Path(value).resolve())
    if key == "classes" and value and "," not in value and Path(value).is_file():
        return str(Path(value).resolve())
    return value


def run_training(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_record: Callable[[dict], None] | None = None,
    given: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train (or resume) the run in ``cfg.output``; returns a JSON-ready summary.

    ``given`` lists options set on the command line (checked against a resumed run).
    """
    run_dir = Path(cfg.output)
    last_path = run_dir / "last.pt"
    payload = None
    if resume:
        if not last_path.is_file():
            raise UsageError(f"{run_dir}: nothing to resume (no last.pt)")
        payload = read_checkpoint(last_path)
        if "train" not in payload or "optimizer" not in payload["train"]:
            raise InputError(f"{last_path}: checkpoint has no training state to resume")
        saved = TrainConfig.from_dict(payload["train"]["config"])
        if given is None:  # programmatic resume: runtime options from ``cfg``, rest saved
            given = {k: v for k, v in asdict(cfg).items() if k in RUNTIME_KEYS}
        cfg = merge_resume_config(saved, given)
    elif last_path.exists() and not overwrite:
        raise UsageError(
            f"{run_dir}: a run exists here; pass --resume to continue or --overwrite to restart"
        )
    else:  # absolute data paths: the saved config still works from another folder
        cfg = replace(
            cfg,
            data=str(Path(cfg.data).resolve()),
            val_data=str(Path(cfg.val_data).resolve()) if cfg.val_data else None,
            classes=_norm(cfg.classes, "classes"),
        )
        if cfg.recipe == "soft-guided":  # every setting saved, defaults included
            from drseg_cli.train.softguided import SoftGuidedConfig

            cfg.soft_guided = SoftGuidedConfig.from_dict(cfg.soft_guided).as_dict()
    cfg.validate()

    dist_info, device = init_distributed(cfg.device)
    try:
        return _train(cfg, run_dir, payload, dist_info, device, on_record)
    finally:
        if dist_info.initialised_here:
            dist.destroy_process_group()


def _train(cfg, run_dir, payload, dist_info, device, on_record) -> dict[str, Any]:
    started = time.perf_counter()
    world, rank = dist_info.world, dist_info.rank
    if cfg.batch_size % (world * cfg.accum_steps):
        raise UsageError(
            f"--batch-size {cfg.batch_size} must be a multiple of processes × --accum-steps "
            f"({world} × {cfg.accum_steps})"
        )
    amp = resolve_precision(cfg.precision, device)
    train_ds = _load_train_dataset(cfg)
    val_ds = _load_val_dataset(cfg, train_ds, warn=dist_info.main)
    class_specs = resolve_train_classes(cfg, train_ds.layout)
    names = [c.name for c in class_specs]
    prompts = [c.prompt_names for c in class_specs]
    held = holdout_indices(cfg.holdout_classes, names)
    seen = [i for i in range(len(names)) if i not in held]
    if held:  # held-out pixels ignored, the seen classes renumbered 0… in training
        train_ds = train_ds.restricted(seen, len(names))
    train_prompts = [prompts[i] for i in seen]
    recipe = get_recipe(cfg.recipe)

    torch.manual_seed(cfg.seed)
    from drseg_cli.model.drseg import DRSegOptions

    spec = ModelSpec(
        preset=cfg.model,
        clip_model=cfg.clip_model,
        clip_pretrained=cfg.clip_pretrained,
        dino_model=cfg.dino_model,
        dino_checkpoint=cfg.dino_checkpoint,
        options=DRSegOptions(**cfg.drseg_options).as_dict(),
        head=cfg.head,
        tile_size=cfg.crop_size,
        recipe=cfg.recipe,
        recipe_config=cfg.soft_guided if cfg.recipe == "soft-guided" else {},
    )
    model = recipe.build(spec, device)
    crop = model.preprocess.tile_size
    spec.tile_size, spec.head = crop, model.head_config.as_dict()
    if cfg.epochs is not None:
        cfg.steps = max(1, math.ceil(cfg.epochs * len(train_ds) / cfg.batch_size))
    save_every = cfg.save_every or cfg.eval_every

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(recipe.param_groups(model, cfg), lr=cfg.lr)
    weights = recipe.loss_weights(cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    start_step, best = 0, -math.inf
    if payload is not None:
        load_into(model, payload, run_dir / "last.pt")
        state = payload["train"]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_step = int(state["step"])
        best = float(state.get("best_miou") if state.get("best_miou") is not None else -math.inf)

    net: torch.nn.Module = model
    if world > 1:
        ddp_kwargs: dict[str, Any] = dict(
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=recipe.find_unused(model),
        )
        try:  # frozen backbones: no per-step buffer broadcasts
            net = DDP(model, forward_sync_buffers=False, **ddp_kwargs)
        except TypeError:  # torch without forward_sync_buffers
            net = DDP(model, broadcast_buffers=False, **ddp_kwargs)

    aug = AugmentConfig(
        crop_size=crop,
        scale_min=cfg.scale_min,
        scale_max=cfg.scale_max,
        flip=cfg.flip,
        rotate=cfg.rotate,
        brightness=cfg.photometric,
        contrast=cfg.photometric,
        saturation=cfg.photometric,
        gamma=cfg.photometric,
    )
    crops = _CheckedCrops(train_ds, aug, seed=cfg.seed, num_classes=len(seen))
    stream = SampleStream(len(train_ds), cfg.seed)
    micro = cfg.batch_size // (world * cfg.accum_steps)
    loader = torch.utils.data.DataLoader(
        crops,
        batch_size=micro,
        sampler=_StreamSampler(stream, cfg, dist_info, start_step),
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    with torch.no_grad():
        text = model.encode_text(train_prompts).to(device)

    eval_settings = {
        "tile_size": crop,
        "overlap": cfg.eval_overlap,
        "batch_size": cfg.eval_batch_size,
        "precision": cfg.precision,
    }
    classes_meta = _class_dicts(class_specs)
    metrics_log = None
    if dist_info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_log = MetricsLog(run_dir, start_step if payload else None, cfg.tensorboard)
        config_doc = {"config": asdict(cfg), "model": spec.to_dict(), "classes": classes_meta}
        (run_dir / "config.json").write_text(json.dumps(config_doc, indent=2) + "\n")

    def record(entry: dict) -> None:
        if metrics_log is not None:
            metrics_log.write(entry)
            if on_record:
                on_record(entry)

    def validate(step: int) -> dict | None:
        if val_ds is None:
            return None
        predictor = TilePredictor(model, prompts, device, amp)
        conf, _, _ = evaluate_dataset(
            val_ds,
            predictor,
            names,
            EvalConfig(tile_size=crop, overlap=cfg.eval_overlap, batch_size=cfg.eval_batch_size),
            tile_multiple=model.preprocess.multiple,
            default_tile_size=crop,
            shard=(rank, world),
        )
        model.train()
        if world > 1:
            _all_reduce_confusion(conf, device)
        m = SegMetrics.from_confusion(conf, names)
        entry = {
            "kind": "eval",
            "step": step,
            "mIoU": _r(m.miou),
            "mACC": _r(m.macc),
            "aAcc": _r(m.pixel_accuracy),
            "fwIoU": _r(m.fwiou),
            "per_class_iou": {n: _r(v) for n, v in zip(names, m.iou, strict=True)},
            "seconds": round(time.perf_counter() - started, 3),
        }
        if held:
            split = seen_unseen(m, [names[i] for i in held])
            entry |= {k: split[k] for k in ("mIoU_seen", "mIoU_unseen", "hIoU")}
        return entry

    def save(step: int, metrics: dict | None, is_best: bool) -> None:
        if not dist_info.main:
            return
        state = {
            "step": step,
            "config": asdict(cfg),
            "best_miou": None if best == -math.inf else best,
            "metrics": metrics,
        }
        full = state | {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
        }
        common = dict(eval_settings=eval_settings)
        save_checkpoint(
            checkpoint_payload(model, spec, classes_meta, train_state=full, **common), last_path
        )
        if is_best:
            save_checkpoint(
                checkpoint_payload(model, spec, classes_meta, train_state=state, **common),
                best_path,
            )

    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if dist_info.main and payload is None:
        best_path.unlink(missing_ok=True)  # --overwrite: no stale best from an older run
    model.train()
    window: list[float] = []
    part_window: list[list[float]] = []
    last_eval: dict | None = None
    loss_value = math.nan
    batches = iter(loader)
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        step_parts = torch.zeros(len(weights), device=device)
        for m in range(cfg.accum_steps):
            images, labels = next(batches)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            sync = m == cfg.accum_steps - 1 or world == 1
            ctx = contextlib.nullcontext() if sync else net.no_sync()  # type: ignore[operator]
            with ctx:
                autocast = (
                    torch.autocast(device.type, dtype=amp)
                    if amp is not None
                    else contextlib.nullcontext()
                )
                with autocast:
                    logits, extra = recipe.forward(net, images, text)
                terms = {"seg": per_sample_loss(logits, labels, cfg.loss, train_ds.ignore_index)}
                terms |= {k: v.float() for k, v in extra.items()}
                per = sum(weights[k] * terms[k] for k in terms)
                loss = per.sum() * (world / cfg.batch_size)
                (scaler.scale(loss) if scaler is not None else loss).backward()
            step_loss += per.detach().sum() / cfg.batch_size
            step_parts += (
                torch.stack(
                    [
                        terms[k].detach().sum() if k in terms else step_loss.new_zeros(())
                        for k in weights
                    ]
                )
                / cfg.batch_size
            )
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
        if world > 1:
            dist.all_reduce(step_loss)
            dist.all_reduce(step_parts)
        loss_value = float(step_loss)
        if not math.isfinite(loss_value):
            raise UsageError(f"step {step + 1}: loss is {loss_value}; lower --lr or use fp32")
        window.append(loss_value)
        part_window.append(step_parts.tolist())
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            record(
                {
                    "kind": "train",
                    "step": done,
                    "epoch": round(done * cfg.batch_size / len(train_ds), 4),
                    "loss": round(sum(window) / len(window), 6),
                    "lr": optimizer.param_groups[0]["lr"],
                    **_part_means(weights, part_window),
                    "step_seconds": round(time.perf_counter() - t0, 4),
                    "seconds": round(time.perf_counter() - started, 3),
                }
            )
            window.clear()
            part_window.clear()
        evaluating = done % cfg.eval_every == 0 or done == cfg.steps
        if evaluating:
            last_eval = validate(done)
            # with held-out classes the model is chosen on the seen ones only
            key = "mIoU_seen" if held else "mIoU"
            is_best = last_eval is None or last_eval[key] is not None and (last_eval[key] > best)
            if last_eval is not None:
                record(last_eval)
                if is_best:
                    best = last_eval[key]
            save(done, last_eval, is_best)
        elif done % save_every == 0:
            save(done, last_eval, False)
        if world > 1 and (evaluating or done % save_every == 0):
            dist.barrier()
    if start_step >= cfg.steps and dist_info.main:  # nothing left: still write a checkpoint
        save(cfg.steps, last_eval, not best_path.exists())
    if metrics_log is not None:
        metrics_log.close()
    return {
        "run_dir": str(run_dir),
        "steps": cfg.steps,
        "resumed_from": start_step if payload is not None else None,
        "world_size": world,
        "device": str(device),
        "precision": "fp32" if amp is None else str(amp).removeprefix("torch."),
        "train_images": len(train_ds),
        "val_images": len(val_ds) if val_ds is not None else 0,
        "classes": names,
        "recipe": cfg.recipe,
        "holdout_classes": [names[i] for i in held],
        "final_loss": round(loss_value, 6) if math.isfinite(loss_value) else None,
        "last_eval": last_eval,
        "best_mIoU": None if best == -math.inf else best,
        "checkpoints": {"last": str(last_path), "best": str(best_path)},
        "seconds": round(time.perf_counter() - started, 3),
    }


def _part_means(weights: dict[str, float], window: list[list[float]]) -> dict[str, float]:
    """Mean of each loss term over the log window (``loss_seg``, ``loss_feature``...), when
    the recipe has more than the segmentation loss."""
    if len(weights) < 2 or not window:
        return {}
    means = np.mean(np.asarray(window), axis=0)
    return {f"loss_{k}": round(float(v), 6) for k, v in zip(weights, means, strict=True)}


def _all_reduce_confusion(conf: ConfusionMatrix, device: torch.device) -> None:
    flat = torch.from_numpy(np.append(conf.matrix.ravel(), [conf.ignored, conf.unpredicted]))
    flat = flat.to(device)
    dist.all_reduce(flat)
    values = flat.cpu().numpy()
    conf.matrix = values[:-2].reshape(conf.matrix.shape).astype(np.int64)
    conf.ignored, conf.unpredicted = int(values[-2]), int(values[-1])


def _r(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 4)
