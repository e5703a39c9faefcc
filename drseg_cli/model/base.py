"""The model interface the pipeline relies on; any segmentation method plugs in behind it.

A model takes a batch of RGB tiles scaled to [0, 1] (it normalises them itself) and the
class text embeddings it made once per run, and returns per-class logits on its own
(usually coarser) grid; the pipeline resamples them to the tile and stitches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Preprocess:
    """What a model expects of its input tiles."""

    tile_size: int  # the tile edge (px) the pipeline uses by default
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    multiple: int  # tile edges must be a multiple of this (the patch size)
    overlap: float = 0.25  # preferred tile overlap (fraction of the tile)
    blend: str = "linear"  # preferred blend window of overlapping tiles (raster.tiling)


@dataclass
class TileProposals:
    """The classified mask proposals of one tile (a mask-classification model's side output).

    Proposals may overlap (a hierarchy, SAM masks), so they come as ``layers`` of label maps
    ``[L, H, W]`` int32 on the tile's pixel grid: in each layer value ``i + 1`` marks proposal
    ``i`` and 0 none; a proposal lies in exactly one layer. ``classes [N]``: the class each
    proposal got; ``scores [N]``: the probability of that class.
    """

    layers: np.ndarray
    classes: np.ndarray
    scores: np.ndarray


class SegmentationModel(nn.Module):
    """Base class: ``encode_text`` once per run, then ``forward`` per batch of tiles.

    Mask-classification models also say which proposals they classified: with
    ``has_proposals`` True, ``keep_proposals(True)`` makes every ``forward`` record its tiles'
    ``TileProposals``, and ``last_proposals()`` hands those of the latest call over.
    """

    name: str = "model"
    preprocess: Preprocess
    #: True where the weights are random (test-tiny, benchmarks): results are meaningless.
    random_weights: bool = False
    #: True where the model classifies mask proposals and can report them.
    has_proposals: bool = False

    def keep_proposals(self, on: bool) -> None:
        """Record (or stop recording) each forward's proposals."""
        raise NotImplementedError(f"{self.name} makes no mask proposals")

    def last_proposals(self) -> list[TileProposals]:
        """The proposals of each image of the latest ``forward`` (recording on)."""
        raise NotImplementedError(f"{self.name} makes no mask proposals")

    def encode_text(self, class_prompts: Sequence[Sequence[str]]) -> torch.Tensor:
        """Class text embeddings ``[K, D]``, L2-normalised; one entry of names per class."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K, h, w]`` for images ``[B, 3, H, W]`` in [0, 1]."""
        raise NotImplementedError


@dataclass
class ReferOutput:
    """What a referring model says about a batch of windows, for each expression.

    ``scores [B, E]``: the model's own evidence that expression *e* is present in window *b*
    (higher is more likely; the pipeline ranks windows by it). ``mask_logits [B, E, h, w]``:
    the target's mask logits on the model's grid (the pipeline resamples them to the window).
    """

    scores: torch.Tensor
    mask_logits: torch.Tensor


class ReferringModel(nn.Module):
    """Base class of referring-expression methods (RSRefSeg 2, DGL-RSIS): encode the
    expressions once per run, then ``forward`` per batch of windows of ``preprocess.tile_size``.
    """

    name: str = "refer"
    preprocess: Preprocess
    random_weights: bool = False

    def encode_expressions(self, expressions: Sequence[str]) -> object:
        """Whatever the model needs of the expressions, computed once per run."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, expressions: object) -> ReferOutput:
        """Window scores and mask logits for images ``[B, 3, H, W]`` in [0, 1]."""
        raise NotImplementedError
