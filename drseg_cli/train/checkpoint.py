"""Self-describing trained checkpoints: save, inspect, and load as a SegmentationModel.

A checkpoint records everything needed to rebuild the model without the command line that
trained it: the model preset and its overrides, the DR-Seg options, the head config, the
class names (with synonyms), the training tile size, and the learnable weights. Frozen
backbones are not stored (they come from the preset's weights) unless they are random
(``test-tiny``), which could not be rebuilt otherwise. ``last.pt`` also carries the optimizer,
scheduler and step for ``--resume``; ``best.pt`` only what inference needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from drseg_cli.errors import InputError, UsageError

log = logging.getLogger(__name__)

FORMAT = "drseg-trained"
VERSION = 1


@dataclass
class ModelSpec:
    """How to rebuild the frozen part: a preset of ``drseg_cli.model.factory`` + overrides."""

    preset: str = "vit-b16"
    clip_model: str | None = None
    clip_pretrained: str | None = None
    dino_model: str | None = None
    dino_checkpoint: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # DRSegOptions fields
    head: dict[str, Any] = field(default_factory=dict)  # HeadConfig fields
    tile_size: int | None = None  # None: the preset's tile size
    recipe: str = "drseg"  # drseg | soft-guided (train/recipes.py)
    recipe_config: dict[str, Any] = field(default_factory=dict)  # e.g. SoftGuidedConfig fields

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def build_trained_model(
    spec: ModelSpec, device: str | torch.device = "cpu", *, drseg_model=None
):  # -> TrainedDRSeg
    """A fresh trained model for ``spec`` (heads initialised by the current seed): a
    :class:`TrainedDRSeg`, or a ``SoftGuidedCLIP`` for the soft-guided recipe."""
    from drseg_cli.model.drseg import DRSegModel, DRSegOptions
    from drseg_cli.train.modules import HeadConfig, TrainedDRSeg

    if spec.recipe == "soft-guided":
        from drseg_cli.train.softguided import build_softguided_model

        return build_softguided_model(spec, device)
    if spec.recipe != "drseg":
        raise InputError(f"unknown training recipe {spec.recipe!r} (drseg or soft-guided)")
    options = DRSegOptions(**spec.options) if spec.options else DRSegOptions()
    if drseg_model is None:
        from drseg_cli.model.factory import build_model

        drseg_model = build_model(
            spec.preset,
            method="drseg",
            clip_model=spec.clip_model,
            clip_pretrained=spec.clip_pretrained,
            dino_model=spec.dino_model,
            dino_checkpoint=Path(spec.dino_checkpoint) if spec.dino_checkpoint else None,
            device=str(device),
            drseg_options=options,
        )
    if not isinstance(drseg_model, DRSegModel):
        raise UsageError(f"model preset {spec.preset!r} does not build a DR-Seg model")
    model = TrainedDRSeg(
        drseg_model.clip,
        drseg_model.dino,
        options,
        HeadConfig.from_dict(spec.head),
        tile_size=spec.tile_size or drseg_model.preprocess.tile_size,
    )
    return model.to(device)


def checkpoint_payload(
    model,
    spec: ModelSpec,
    classes: list[dict[str, Any]],
    *,
    eval_settings: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The dict written to ``*.pt`` (plain types + tensors: loadable with weights_only)."""
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model": spec.to_dict(),
        "classes": classes,
        "eval": eval_settings,
        "random_weights": bool(model.random_weights),
        "state_dict": {k: v.detach().cpu() for k, v in model.trainable_state_dict().items()},
    }
    if model.random_weights:  # random backbones cannot be rebuilt from a preset: keep them
        payload["backbones"] = {k: v.detach().cpu() for k, v in model.backbone_state_dict().items()}
    if train_state is not None:
        payload["train"] = train_state
        payload["holdout"] = list(train_state.get("config", {}).get("holdout_classes") or [])
    return payload


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Atomic save (temp file + rename): a killed run never leaves a half-written checkpoint."""
    from drseg_cli.atomic import atomic_output

    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint dict; one-line errors for missing/corrupt/foreign files."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt/foreign pickles
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a readable checkpoint ({first[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"{path}: not a drseg trained checkpoint (made by drseg train)")
    if int(payload.get("version", 0)) > VERSION:
        raise InputError(
            f"{path}: checkpoint version {payload['version']} is newer than this drseg "
            f"supports ({VERSION}); upgrade drseg"
        )
    return payload


def read_checkpoint_info(path: Path) -> dict[str, Any]:
    """What a checkpoint describes (classes, tile size, model spec), without building it."""
    payload = read_checkpoint(path)
    spec = ModelSpec.from_dict(payload["model"])
    return {
        "classes": payload.get("classes", []),
        "tile_size": int(payload.get("eval", {}).get("tile_size", spec.tile_size)),
        "overlap": payload.get("eval", {}).get("overlap"),
        "model": spec.to_dict(),
        "metrics": payload.get("train", {}).get("metrics"),
        "step": payload.get("train", {}).get("step"),
        "holdout": list(payload.get("holdout") or []),
    }


def load_into(model, payload: dict[str, Any], path: Path) -> None:
    """Load a checkpoint's weights into ``model`` (strict on the learnable parts)."""
    state = dict(payload["state_dict"])
    if "backbones" in payload:
        state.update(payload["backbones"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [
        k
        for k in missing
        if not k.startswith(("clip.", "dino.", "guide.")) or k in getattr(model, "tuned_names", ())
    ]
    if missing or unexpected:
        what = missing[:3] or unexpected[:3]
        raise InputError(
            f"{path}: weights do not match the model it describes ({', '.join(what)} ...)"
        )


def load_trained_model(
    path: Path,
    device: str | torch.device = "cpu",
    *,
    clip_branch: bool = False,
    drseg_options=None,
):
    """A trained checkpoint as a ready ``SegmentationModel`` in eval mode on ``device``.

    This is what ``drseg evaluate --checkpoint`` and ``drseg segment --checkpoint`` use: the
    model's ``preprocess.tile_size`` is the training tile size. ``clip_branch``: the tuned CLIP
    of a soft-guided checkpoint as the CLIP branch of training-free DR-Seg (``drseg_options``).
    """
    payload = read_checkpoint(path)
    spec = ModelSpec.from_dict(payload["model"])
    if clip_branch and spec.recipe != "soft-guided":
        raise UsageError(
            f"{path}: --as-clip-branch needs a soft-guided checkpoint (this one is {spec.recipe})"
        )
    if drseg_options is not None and not clip_branch:
        raise UsageError("DR-Seg options (--rho, ...) come from the checkpoint; drop them")
    model = build_trained_model(spec, "cpu")
    load_into(model, payload, Path(path))
    if clip_branch:
        from drseg_cli.train.softguided import as_drseg

        return as_drseg(model, spec, drseg_options, device)
    return model.to(device).eval()
