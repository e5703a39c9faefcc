"""The training-free CLIP baseline (``--method clip``): cosine logits of dense CLIP features.

    F   = ClipDenseEncoder((x − mean)/std)          [B, D, h, w] (ClearCLIP-style last block)
    F'  = F − λ·g                                   optional global-bias removal (λ = 0: off)
    S   = s · (F'/‖F'‖) Tᵀ                           [B, K, h, w], s = 100 (CLIP's logit scale)

``g`` is the class token of the same forward (after ln_post and proj): SegEarth-OV (Li et
al., 2024) subtracts it with λ = 0.3 to remove the image-wide bias every patch shares. It
costs nothing extra, but it is off by default here so that the baseline is plain
ClearCLIP and matches the DR-Seg original branch exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from drseg_cli.errors import UsageError
from drseg_cli.model.backbones import ClipDenseEncoder
from drseg_cli.model.base import Preprocess, SegmentationModel

#: SegEarth-OV's global-bias weight, for reference (``global_bias=SEGEARTH_OV_LAMBDA``).
SEGEARTH_OV_LAMBDA = 0.3


def normalise_images(images: torch.Tensor, encoder: torch.nn.Module) -> torch.Tensor:
    """(x − mean) / std with the encoder's own statistics; images in [0, 1]."""
    mean = torch.tensor(encoder.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(encoder.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


class ClipSegModel(SegmentationModel):
    """Training-free open-vocabulary segmentation with CLIP dense features alone.

    ``forward`` returns fp32 logits on the CLIP patch grid ``[B, K, H/p, W/p]``; the head
    runs with autocast off (the backbone runs under the caller's autocast).
    """

    name = "clip"

    def __init__(
        self,
        clip: ClipDenseEncoder,
        *,
        tile_size: int = 448,
        logit_scale: float = 100.0,
        global_bias: float = 0.0,
    ) -> None:
        super().__init__()
        if tile_size <= 0 or tile_size % clip.patch_size:
            raise UsageError(f"tile size {tile_size} must be a multiple of {clip.patch_size}")
        if not logit_scale > 0:
            raise UsageError(f"logit scale must be > 0 (got {logit_scale})")
        if not 0.0 <= global_bias <= 1.0:
            raise UsageError(f"global bias λ must be in [0, 1] (got {global_bias})")
        self.clip = clip
        self.logit_scale = float(logit_scale)
        self.global_bias = float(global_bias)
        self.random_weights = bool(getattr(clip, "random_weights", False))
        self.preprocess = Preprocess(
            tile_size=tile_size, mean=clip.mean, std=clip.std, multiple=clip.patch_size
        )

    def encode_text(self, class_prompts: Sequence[Sequence[str]]) -> torch.Tensor:
        """Class text embeddings ``[K, D]`` (L2-normalised) from the CLIP encoder."""
        return self.clip.encode_text(class_prompts)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised dense features ``[B, D, h, w]`` (fp32) of images in [0, 1]."""
        x = normalise_images(images, self.clip)
        if self.global_bias:
            global_feat, dense = self.clip.forward_tokens(x)
        else:
            global_feat, dense = None, self.clip(x)
        with torch.autocast(images.device.type, enabled=False):
            dense = dense.float()
            if global_feat is not None:
                dense = dense - self.global_bias * global_feat.float()[:, :, None, None]
            return F.normalize(dense, dim=1)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K, H/p, W/p]`` = logit_scale · cos(F, T), fp32."""
        unit = self.features(images)
        with torch.autocast(images.device.type, enabled=False):
            classes = text.to(device=unit.device, dtype=torch.float32)
            return self.logit_scale * torch.einsum("bdhw,kd->bkhw", unit, classes)
