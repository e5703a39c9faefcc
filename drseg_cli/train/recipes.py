"""Training recipes: what differs between ``drseg train --recipe drseg`` and ``soft-guided``.

The trainer (``trainer.py``) owns everything they share: data, augmentation, the sample
stream, AMP, accumulation, DDP, evaluation, checkpoints, resume and logs. A recipe says
which model to build, which parameters the optimiser gets (and at what learning rate), how
a micro-batch becomes per-sample losses, and whether DDP must look for unused parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from drseg_cli.errors import UsageError

if TYPE_CHECKING:
    from drseg_cli.train.checkpoint import ModelSpec

RECIPES = ("drseg", "soft-guided")


def _decay_groups(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> list[dict]:
    """Weight decay on weights (ndim > 1), none on biases and scalars; empty groups dropped."""
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "lr": lr},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": lr},
    ]
    return [g for g in groups if g["params"]]


class Recipe:
    """DR-Seg's trained mode: frozen CLIP + DINO, learnable heads (docs/TRAIN.md)."""

    name = "drseg"

    def build(self, spec: ModelSpec, device: torch.device) -> torch.nn.Module:
        from drseg_cli.train.checkpoint import build_trained_model

        return build_trained_model(spec, device)

    def param_groups(self, model: torch.nn.Module, cfg: Any) -> list[dict]:
        params = [p for p in model.parameters() if p.requires_grad]
        return _decay_groups(params, cfg.lr, cfg.weight_decay)

    def find_unused(self, model: torch.nn.Module) -> bool:
        opt = model.options
        return not (opt.spsd and 0 < opt.rho < 1) or not opt.pdgr or not opt.ugaf

    def forward(
        self, net: torch.nn.Module, images: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(logits, extra per-sample loss terms [B] by name)`` of a micro-batch."""
        return net(images, text), {}

    def loss_weights(self, cfg: Any) -> dict[str, float]:
        """Weight of the segmentation loss (``seg``) and of each extra term."""
        return {"seg": 1.0}


class SoftGuidedRecipe(Recipe):
    """Soft-guided fine-tuning of CLIP's image encoder (train/softguided.py)."""

    name = "soft-guided"

    def param_groups(self, model: torch.nn.Module, cfg: Any) -> list[dict]:
        from drseg_cli.train.softguided import SoftGuidedConfig

        scale = SoftGuidedConfig.from_dict(cfg.soft_guided).encoder_lr_scale
        heads, encoder = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (encoder if name.startswith("clip.") else heads).append(p)
        # heads first: the logged lr is the heads'
        return _decay_groups(heads, cfg.lr, cfg.weight_decay) + _decay_groups(
            encoder, cfg.lr * scale, cfg.weight_decay
        )

    def find_unused(self, model: torch.nn.Module) -> bool:
        return False  # every tuned tensor and head takes part in every step

    def forward(self, net, images, text):
        return net(images, text, train_outputs=True)

    def loss_weights(self, cfg: Any) -> dict[str, float]:
        from drseg_cli.train.softguided import SoftGuidedConfig

        c = SoftGuidedConfig.from_dict(cfg.soft_guided)
        return {
            "seg": c.seg_weight,
            "feature": c.feature_weight,
            "cost": c.cost_weight,
            "output": c.output_weight,
        }


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; a UsageError naming the valid ones otherwise."""
    if name == "drseg":
        return Recipe()
    if name == "soft-guided":
        return SoftGuidedRecipe()
    raise UsageError(f"--recipe {name!r}: choose one of {', '.join(RECIPES)}")
