"""Training-free CLIP dense prediction: ``--method clip`` and ``--method segearth``.

    F, g = ClipDenseEncoder((x − mean)/std)          dense [B, D, h, w], class token [B, D]
    U    = F/‖F‖ + λ · g/‖g‖                          λ: cls-token correction (0 = off)
    S_q  = s · U T_qᵀ                                 per query q (a class, or one of its names)
    S_k  = max_{q of class k} S_q                     a class's names merged by max

Two baselines (``BASELINES``) fill in the choices:

``clearclip`` (``--method clip``, DR-Seg's default branch): q-q last block, drseg's
remote-sensing templates, one embedding per class (mean over names × templates), λ = 0,
s = 100 (CLIP's own logit scale), drseg's tiling (448 px, 25 % overlap, linear blend).

``segearth`` (``--method segearth``): SegEarth-OV (Li et al., 2024; likyoo/SegEarth-OV at
3e22a969, ``segearth_segmentor.py``): q-q + k-k + v-v last block, the 80 ImageNet templates,
one query per name merged by max, λ = −0.3, s = 50, and its slide inference (224 px crops,
stride 112 = overlap 0.5, uniform averaging = the flat blend window). U Tᵀ = F̂Tᵀ + λ·ĝTᵀ is
its correction in logit space (``logits + cls_token_lambda · cls_logits``, λ = −0.3 in its
configs). The max over a class's logits picks the name its max over softmax probabilities
picks (one shared denominator); the pipeline's softmax then runs over classes, so reported
probabilities are the reference's renormalised to sum to one (docs/METHOD.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drseg_cli.errors import UsageError
from drseg_cli.model.backbones import ClipDenseEncoder
from drseg_cli.model.base import Preprocess, SegmentationModel
from drseg_cli.model.text import IMAGENET_TEMPLATES, TEMPLATES

#: SegEarth-OV's cls-token weight (``cls_token_lambda`` in its ``configs/base_config.py``).
SEGEARTH_OV_LAMBDA = -0.3
SYNONYM_MERGES = ("mean", "max")


@dataclass(frozen=True)
class ClipBaseline:
    """Every choice of one training-free CLIP baseline (see the module docstring)."""

    name: str
    attention: str  # the last block (backbones.ATTENTION_MODES)
    templates: tuple[str, ...]
    cls_lambda: float  # U = F̂ + λ·ĝ, i.e. logits + λ·cls_logits
    logit_scale: float
    synonyms: str  # "mean": one embedding per class; "max": one query per name, max-merged
    tile_size: int | None  # None: the model preset's
    overlap: float  # preferred tile overlap (fraction)
    blend: str  # preferred blend window (raster.tiling.BLEND_MODES)


BASELINES: dict[str, ClipBaseline] = {
    "clearclip": ClipBaseline(
        name="clearclip",
        attention="qq",
        templates=TEMPLATES,
        cls_lambda=0.0,
        logit_scale=100.0,
        synonyms="mean",
        tile_size=None,
        overlap=0.25,
        blend="linear",
    ),
    "segearth": ClipBaseline(
        name="segearth",
        attention="segearth",
        templates=IMAGENET_TEMPLATES,
        cls_lambda=SEGEARTH_OV_LAMBDA,
        logit_scale=50.0,
        synonyms="max",
        tile_size=224,  # slide_crop
        overlap=0.5,  # slide_stride 112 = 224 · (1 − 0.5)
        blend="flat",  # preds / count_mat: uniform averaging
    ),
}


def get_baseline(name: str) -> ClipBaseline:
    """The baseline called ``name``; a UsageError naming the valid ones otherwise."""
    if name not in BASELINES:
        raise UsageError(f"unknown CLIP baseline {name!r}; choose one of {', '.join(BASELINES)}")
    return BASELINES[name]


def normalise_images(images: torch.Tensor, encoder: torch.nn.Module) -> torch.Tensor:
    """(x − mean) / std with the encoder's own statistics; images in [0, 1]."""
    mean = torch.tensor(encoder.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(encoder.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean).div_(std)  # in place on the new tensor: one allocation less


def unit_features(
    clip: ClipDenseEncoder, images: torch.Tensor, cls_lambda: float = 0.0
) -> torch.Tensor:
    """U = F̂ + λ·ĝ ``[B, D, h, w]`` fp32 for images in [0, 1]: the features whose dot product
    with unit text embeddings is the (cls-corrected) cosine logit. Shared with DR-Seg."""
    x = normalise_images(images, clip)
    if cls_lambda:
        global_feat, dense = clip.forward_tokens(x)
    else:
        global_feat, dense = None, clip(x)
    with torch.autocast(images.device.type, enabled=False):
        unit = F.normalize(dense.float(), dim=1)
        if global_feat is not None:
            g = F.normalize(global_feat.float(), dim=-1)
            unit = unit + cls_lambda * g[:, :, None, None]
        return unit


class ClipSegModel(SegmentationModel):
    """Training-free open-vocabulary segmentation with CLIP dense features alone.

    ``forward`` returns fp32 logits on the CLIP patch grid ``[B, K, H/p, W/p]``; the head
    runs with autocast off (the backbone runs under the caller's autocast). ``text`` is
    ``[K, D]`` (one embedding per class) or ``[K, S, D]`` (per-name queries, max-merged).
    """

    name = "clip"

    def __init__(
        self,
        clip: ClipDenseEncoder,
        *,
        tile_size: int = 448,
        logit_scale: float = 100.0,
        cls_lambda: float = 0.0,
        synonyms: str = "mean",
        overlap: float = 0.25,
        blend: str = "linear",
        name: str = "clip",
    ) -> None:
        super().__init__()
        if tile_size <= 0 or tile_size % clip.patch_size:
            raise UsageError(f"tile size {tile_size} must be a multiple of {clip.patch_size}")
        if not logit_scale > 0:
            raise UsageError(f"logit scale must be > 0 (got {logit_scale})")
        if not -1.0 <= cls_lambda <= 1.0:
            raise UsageError(f"cls-token weight λ must be in [-1, 1] (got {cls_lambda})")
        if synonyms not in SYNONYM_MERGES:
            raise UsageError(f"synonyms {synonyms!r}: choose one of {', '.join(SYNONYM_MERGES)}")
        self.clip = clip
        self.name = name
        self.logit_scale = float(logit_scale)
        self.cls_lambda = float(cls_lambda)
        self.synonyms = synonyms
        self.random_weights = bool(getattr(clip, "random_weights", False))
        self.preprocess = Preprocess(
            tile_size=tile_size,
            mean=clip.mean,
            std=clip.std,
            multiple=clip.patch_size,
            overlap=overlap,
            blend=blend,
        )

    @classmethod
    def from_baseline(
        cls, clip: ClipDenseEncoder, baseline: ClipBaseline, *, tile_size: int
    ) -> ClipSegModel:
        """The model of ``baseline`` on ``clip`` (built with the baseline's attention)."""
        return cls(
            clip,
            tile_size=tile_size,
            logit_scale=baseline.logit_scale,
            cls_lambda=baseline.cls_lambda,
            synonyms=baseline.synonyms,
            overlap=baseline.overlap,
            blend=baseline.blend,
            name="clip" if baseline.name == "clearclip" else baseline.name,
        )

    def encode_text(self, class_prompts: Sequence[Sequence[str]]) -> torch.Tensor:
        """Class text embeddings, L2-normalised: ``[K, D]``, or ``[K, S, D]`` per name."""
        if self.synonyms == "max":
            return self.clip.encode_queries(class_prompts)
        return self.clip.encode_text(class_prompts)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """U = F̂ + λ·ĝ ``[B, D, h, w]`` (fp32) of images in [0, 1] (see ``unit_features``)."""
        return unit_features(self.clip, images, self.cls_lambda)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K, H/p, W/p]`` = s · U Tᵀ, per-name queries max-merged, fp32."""
        unit = self.features(images)
        with torch.autocast(images.device.type, enabled=False):
            queries = text.to(device=unit.device, dtype=torch.float32)
            if queries.ndim == 3:
                per_name = torch.einsum("bdhw,ksd->bkshw", unit, queries)
                return self.logit_scale * per_name.amax(dim=2)
            return self.logit_scale * torch.einsum("bdhw,kd->bkhw", unit, queries)
