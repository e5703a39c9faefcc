"""Semantics-Preserving Subspace Decoupling (SPSD), as reconstructed (docs/METHOD.md §SPSD).

CLIP's dense feature channels are not one uniform semantic space: some separate the queried
classes, others mostly carry layout. SPSD scores every channel per image and query,

    s_c = Var_k(T_kc) · mean_p(F_pc²)

(how much channel c separates the K class embeddings × how strongly this image uses it),
keeps the top ⌈ρ·D⌉ channels as the semantics-dominated subspace (mask m_s) and the rest as
the structure-dominated one (m_t = 1 − m_s). The split is exact: F⊙m_s + F⊙m_t == F, so
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


def channel_scores(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Per-image channel scores ``[B, D]`` (fp32) for features ``[B, D, h, w]``, text ``[K, D]``.

    With a single class Var_k is identically zero and says nothing; the score then falls back
    to the image energy mean_p(F_pc²) alone, so the ranking stays meaningful and deterministic.
    """
    if features.ndim != 4 or text.ndim != 2 or text.shape[1] != features.shape[1]:
        raise ValueError(
            f"expected features [B, D, h, w] and text [K, D]; got {tuple(features.shape)} "
            f"and {tuple(text.shape)}"
        )
    energy = features.float().pow(2).mean(dim=(2, 3))  # [B, D]
    if text.shape[0] < 2:
        return energy
    spread = text.float().var(dim=0, unbiased=False)  # [D]
    return energy * spread.unsqueeze(0)


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

    The top ⌈ρ·D⌉ scores are semantic. Ties are broken by the lower channel index (stable
    sort), so the split is deterministic.
    """
    batch, channels = features.shape[:2]
    n_sem = semantic_count(channels, rho)
    order = torch.sort(channel_scores(features, text), dim=1, descending=True, stable=True).indices
    semantic_index = order[:, :n_sem].sort(dim=1).values
    structural_index = order[:, n_sem:].sort(dim=1).values
    mask = torch.zeros(batch, channels, dtype=torch.bool, device=features.device)
    mask.scatter_(1, semantic_index, True)
    return SubspaceSplit(semantic_index, structural_index, mask)
