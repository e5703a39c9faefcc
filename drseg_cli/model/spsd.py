"""Semantics-Preserving Subspace Decoupling (SPSD), as reconstructed (docs/METHOD.md §SPSD).

CLIP's dense feature channels are not one uniform semantic space: some carry what the image
is about (the same class contrast on every patch), others where things are (a class contrast
that changes across the image). SPSD measures, per image and query, each channel's
*spatial class-contrast energy*

    t_c = Var_k(T_kc) · Var_p(F_pc)

(how much channel c separates the K class embeddings × how much it varies over this image's
patches): t_c is channel c's share of the spatial variation of the class-contrast logits, i.e.
of where the class boundaries are drawn. The ⌈ρ·D⌉ channels of smallest t_c are the
semantics-dominated subspace (mask m_s), kept exactly; the rest, where the boundaries are
decided, are the structure-dominated one (m_t = 1 − m_s) that PDGR rectifies. (Propagation with
a row-stochastic graph leaves a spatially constant channel unchanged anyway: rectifying the
channels that vary is where DINO can help.) The split is exact: F⊙m_s + F⊙m_t == F, so
nothing is lost and ρ = 1 leaves the CLIP features untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def semantic_count(channels: int, rho: float) -> int:
    """Number of semantic channels ⌈ρ·D⌉ (robust to float noise such as 0.3·10 = 3.0000001)."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    return min(channels, max(0, math.ceil(rho * channels - 1e-9)))


def structural_scores(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Per-image spatial class-contrast energy t_c ``[B, D]`` (fp32, ≥ 0): high = structural.

    ``features`` ``[B, D, h, w]``, ``text`` ``[K, D]``. With a single class Var_k is zero and
    says nothing; t_c then falls back to the spatial variance Var_p(F_pc) alone.
    """
    if features.ndim != 4 or text.ndim != 2 or text.shape[1] != features.shape[1]:
        raise ValueError(
            f"expected features [B, D, h, w] and text [K, D]; got {tuple(features.shape)} "
            f"and {tuple(text.shape)}"
        )
    variation = features.float().var(dim=(2, 3), unbiased=False)  # [B, D]
    if text.shape[0] < 2:
        return variation
    return variation * text.float().var(dim=0, unbiased=False).unsqueeze(0)


def channel_scores(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Per-image semantic scores ``[B, D]`` (fp32, > 0; high = semantic): 1 / (t_c + ε).

    The reciprocal of :func:`structural_scores`, ε = 10⁻⁶ of its per-image mean (so channels
    that do not vary at all rank first, finitely); positive, so the trained mode can take its log.
    """
    structural = structural_scores(features, text)
    eps = 1e-6 * structural.mean(dim=1, keepdim=True) + 1e-30
    return 1.0 / (structural + eps)


@dataclass(frozen=True)
class SubspaceSplit:
    """Per-image channel partition: ``semantic_index`` ``[B, Ds]`` and ``structural_index``
    ``[B, D − Ds]`` (each sorted ascending), and ``mask`` ``[B, D]`` (True = semantic)."""

    semantic_index: torch.Tensor
    structural_index: torch.Tensor
    mask: torch.Tensor

    def semantic(self, features: torch.Tensor) -> torch.Tensor:
        """F ⊙ m_s for features ``[B, D, ...]`` (same shape and dtype)."""
        return features * self._broadcast(self.mask, features)

    def structural(self, features: torch.Tensor) -> torch.Tensor:
        """F ⊙ m_t = F ⊙ (1 − m_s)."""
        return features * self._broadcast(~self.mask, features)

    @staticmethod
    def _broadcast(mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return mask.to(features.dtype).view(*mask.shape, *([1] * (features.ndim - 2)))


def decouple(features: torch.Tensor, text: torch.Tensor, rho: float = 0.5) -> SubspaceSplit:
    """Split the D channels of ``features`` ``[B, D, h, w]`` per image for the queried ``text``.

    The ⌈ρ·D⌉ channels of highest :func:`channel_scores` (least spatial class contrast) are
    semantic. Ties are broken by the lower channel index (stable sort): the split is deterministic.
    """
    batch, channels = features.shape[:2]
    n_sem = semantic_count(channels, rho)
    order = torch.sort(channel_scores(features, text), dim=1, descending=True, stable=True).indices
    semantic_index = order[:, :n_sem].sort(dim=1).values
    structural_index = order[:, n_sem:].sort(dim=1).values
    mask = torch.zeros(batch, channels, dtype=torch.bool, device=features.device)
    mask.scatter_(1, semantic_index, True)
    return SubspaceSplit(semantic_index, structural_index, mask)
