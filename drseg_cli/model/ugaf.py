"""Uncertainty-Guided Adaptive Fusion (UGAF), as reconstructed (docs/METHOD.md §UGAF).

Each branch's per-pixel uncertainty is the entropy of its class distribution normalised by
log K, U_b ∈ [0, 1]. Branches are mixed per pixel with weights w_b ∝ exp(−U_b/γ) (summing to
1): where the rectified branch is confident it dominates, where it is not the original CLIP
branch does. Identical branches give back that branch. All of it runs in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def normalized_entropy(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Entropy of softmax(``logits``) along ``dim`` over log K, in [0, 1], fp32, dim kept.

    0 = certain, 1 = uniform. A single class (K = 1) is certain by definition: zeros.
    """
    num_classes = logits.shape[dim]
    if num_classes < 2:
        return torch.zeros_like(logits.float().narrow(dim, 0, 1))
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logp = torch.log_softmax(logits.float(), dim=dim)
        ent = -(logp.exp() * logp).sum(dim=dim, keepdim=True)
    return (ent / math.log(num_classes)).clamp_(0.0, 1.0)


@dataclass(frozen=True)
class FusionResult:
    """Fused ``logits`` ``[B, K, h, w]`` and ``uncertainty`` ``[B, 1, h, w]`` (normalised
    entropy of the fused logits, as the pipeline would compute it), plus per-branch
    ``branch_uncertainty`` and fusion ``weights`` ``[B, n_branches, h, w]``."""

    logits: torch.Tensor
    uncertainty: torch.Tensor
    branch_uncertainty: torch.Tensor
    weights: torch.Tensor


def fuse(branches: Sequence[torch.Tensor], gamma: float = 0.2) -> FusionResult:
    """Per-pixel mix of branch logits (each ``[B, K, h, w]``, same shape) by exp(−U_b/γ).

    Small γ approaches picking the least uncertain branch; large γ approaches the mean.
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if not branches:
        raise ValueError("fuse needs at least one branch")
    shape = branches[0].shape
    if any(b.shape != shape for b in branches):
        raise ValueError(f"branch shapes differ: {[tuple(b.shape) for b in branches]}")
    with torch.autocast(device_type=branches[0].device.type, enabled=False):
        stacked = torch.stack([b.float() for b in branches], dim=1)  # [B, n, K, h, w]
        unc = normalized_entropy(stacked, dim=2).squeeze(2)  # [B, n, h, w]
        weights = torch.softmax(-unc / gamma, dim=1)
        fused = (weights.unsqueeze(2) * stacked).sum(dim=1)
    return FusionResult(fused, normalized_entropy(fused), unc, weights)
