"""DR-Seg trained mode: learnable SPSD scoring, PDGR gate, UGAF gate and a DINO-guided decoder.

Design notes §4 "Trained mode", as reconstructed (docs/TRAIN.md): CLIP and DINO stay frozen;
the training-free pieces (``spsd.channel_scores``, ``pdgr.build_graph``/``propagate``,
``ugaf.normalized_entropy``, ``drseg.resize``) are reused, and each closed-form choice gets a
small learnable replacement that starts at (or next to) the closed form:

- SPSD: the hard top-⌈ρ·D⌉ channel mask becomes a soft mask
  m_s = σ((a·ẑ_c + b_c − q_ρ)/t), ẑ = the standardised log of the training-free score
  s_c = 1/(Var_k(T_kc)·Var_p(F_pc) + ε), q_ρ its per-image (1−ρ) quantile; a = 1, b = 0 at start.
- PDGR: X = X₀ + g ⊙ (PDGR(X₀) − X₀) with a per-pixel gate g = σ(w·Ĝ + β) from the DINO
  features (β = 3 at start: g ≈ 0.95, close to the training-free propagation).
- UGAF: w_r = σ((U_o − U_r)/γ + δ), the training-free weight plus a correction δ from a small
  conv on [U_o, U_r, max p_o, max p_r, Σ_k p_o p_r] (zero at start: exactly the closed form).
- Decoder: class-agnostic weights run once per class (so any class list works, as in
  open-vocabulary segmentation): input = the fused score, a learned DINO–text cost
  ⟨A·Ĝ(p), B·T_k⟩ and the projected DINO features; then ×2 upsampling stages down to
  ``decoder_stride``, each guided by image features at that resolution and their cosine cost
  against the class text (sharp, class-specific boundary evidence). Output
  τ·S + residual, residual zero at start, so the initial argmax is the training-free one.

No BatchNorm anywhere: batch statistics would make multi-process results differ from one
process with the same global batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from drseg_cli.errors import UsageError
from drseg_cli.model.clipseg import normalise_images
from drseg_cli.model.drseg import DRSegModel, DRSegOptions, resize
from drseg_cli.model.pdgr import build_graph, propagate
from drseg_cli.model.spsd import channel_scores
from drseg_cli.model.ugaf import normalized_entropy


@dataclass(frozen=True)
class HeadConfig:
    """Sizes and initial values of the learnable parts (saved in checkpoints)."""

    channels: int = 32  # decoder width C
    guide_channels: int = 16  # image-guidance channels per upsampling stage
    decoder_stride: int = 4  # output stride (a power of two dividing the DINO patch size)
    gate_hidden: int = 16  # UGAF gate width
    init_scale: float = 10.0  # initial temperature τ on the fused cosine scores
    spsd_temperature: float = 0.5  # initial softness t of the SPSD mask
    pdgr_gate_bias: float = 3.0  # initial PDGR gate logit β (σ(3) ≈ 0.95)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HeadConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class LearnableSPSD(nn.Module):
    """Soft, learnable channel split built on the training-free SPSD score."""

    def __init__(self, channels: int, rho: float, temperature: float = 0.5) -> None:
        super().__init__()
        self.rho = rho
        self.weight = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    def forward(self, unit: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Semantic mask ``[B, D]`` in (0, 1) for unit features ``[B,D,h,w]``, text ``[K,D]``."""
        batch, channels = unit.shape[:2]
        if self.rho >= 1.0:
            return unit.new_ones(batch, channels)
        if self.rho <= 0.0:
            return unit.new_zeros(batch, channels)
        with torch.no_grad():
            z = torch.log(channel_scores(unit, text).clamp_min(1e-20))
            z = (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True).clamp_min(1e-6)
        z = self.weight * z + self.bias
        threshold = torch.quantile(z.detach(), 1.0 - self.rho, dim=1, keepdim=True)
        return torch.sigmoid((z - threshold) / self.log_temperature.exp())


class PDGRGate(nn.Module):
    """Per-pixel gate from DINO features on how much of the propagation to take."""

    def __init__(self, guide_dim: int, bias: float = 3.0) -> None:
        super().__init__()
        self.proj = nn.Conv2d(guide_dim, 1, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, bias)

    def forward(
        self, start: torch.Tensor, propagated: torch.Tensor, guide: torch.Tensor
    ) -> torch.Tensor:
        gate = torch.sigmoid(self.proj(guide))
        return start + gate * (propagated - start)


class UGAFGate(nn.Module):
    """Training-free uncertainty weights plus a learned, class-agnostic correction."""

    def __init__(self, gamma: float, hidden: int = 16) -> None:
        super().__init__()
        self.gamma = gamma
        self.net = nn.Sequential(
            nn.Conv2d(5, hidden, 3, padding=1), nn.GELU(), nn.Conv2d(hidden, 1, 3, padding=1)
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, original: torch.Tensor, refined: torch.Tensor) -> torch.Tensor:
        """Fused logits ``[B,K,h,w]`` of two branches on the same grid."""
        u_o, u_r = normalized_entropy(original), normalized_entropy(refined)
        p_o, p_r = original.softmax(1), refined.softmax(1)
        stats = torch.cat(
            [
                u_o,
                u_r,
                p_o.amax(1, keepdim=True),
                p_r.amax(1, keepdim=True),
                (p_o * p_r).sum(1, keepdim=True),
            ],
            dim=1,
        )
        w_r = torch.sigmoid((u_o - u_r) / self.gamma + self.net(stats))
        return original + w_r * (refined - original)


def conv_gelu(cin: int, cout: int) -> nn.Sequential:
    """3×3 conv + GELU. No normalisation: per-class maps must keep their absolute scale
    (GroupNorm over one class's map would erase how strong that class's evidence is)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GELU())


class GuidedDecoder(nn.Module):
    """Per-class (shared weights) refinement and upsampling of the fused scores."""

    def __init__(self, text_dim: int, guide_dim: int, dino_patch: int, cfg: HeadConfig) -> None:
        super().__init__()
        stride = cfg.decoder_stride
        if stride < 1 or dino_patch % stride or (dino_patch // stride) & (dino_patch // stride - 1):
            raise UsageError(
                f"decoder stride {stride} must be a power-of-two divisor of the DINO patch "
                f"size {dino_patch}"
            )
        c, cg = cfg.channels, cfg.guide_channels
        self.guide_proj = nn.Sequential(nn.Conv2d(guide_dim, c, 1), nn.GELU())
        self.text_proj = nn.Linear(text_dim, c)
        self.log_scale = nn.Parameter(torch.tensor(math.log(cfg.init_scale)))
        self.stage0 = nn.Sequential(conv_gelu(2 + c, c), conv_gelu(c, c))
        n_up = int(round(math.log2(dino_patch // stride)))
        self.image_guides = nn.ModuleList(conv_gelu(3, cg) for _ in range(n_up))
        self.image_text = nn.ModuleList(nn.Linear(text_dim, cg) for _ in range(n_up))
        self.up_blocks = nn.ModuleList(conv_gelu(c + cg + 1, c) for _ in range(n_up))
        # A class prior from the class's text embedding (zero at start). Neither this nor
        # ``out`` has a constant bias: a shift shared by every class leaves the softmax
        # unchanged, so its gradient is float noise that Adam would amplify into steps.
        self.class_bias = nn.Linear(text_dim, 1, bias=False)
        nn.init.zeros_(self.class_bias.weight)
        self.out = nn.Conv2d(c, 1, 1, bias=False)
        nn.init.zeros_(self.out.weight)

    def forward(
        self, scores: torch.Tensor, guide: torch.Tensor, text: torch.Tensor, images: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``[B, K, H/stride, W/stride]`` from cosine-scale ``scores [B,K,h,w]``."""
        batch, k, h, w = scores.shape
        g = self.guide_proj(guide)  # [B, C, h, w]
        t = self.text_proj(text * math.sqrt(text.shape[1]))  # unit-variance input; [K, C]
        # a cosine cost (in [-1, 1] whatever the widths), so it is as strong as the score
        cost = torch.einsum("bchw,kc->bkhw", F.normalize(g, dim=1), F.normalize(t, dim=1))
        x = torch.cat(
            [
                scores.reshape(batch * k, 1, h, w),
                cost.reshape(batch * k, 1, h, w),
                g.repeat_interleave(k, dim=0),
            ],
            dim=1,
        )
        x = self.stage0(x)
        centred = images - 0.5
        scaled_text = text * math.sqrt(text.shape[1])
        stages = zip(self.image_guides, self.image_text, self.up_blocks, strict=True)
        for guide_conv, text_conv, block in stages:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            size = x.shape[-2:]
            img = guide_conv(F.adaptive_avg_pool2d(centred, size))  # [B, Cg, H', W']
            # image–text cost at this resolution: sharp, class-specific boundary evidence
            img_cost = torch.einsum(
                "bchw,kc->bkhw", F.normalize(img, dim=1), F.normalize(text_conv(scaled_text), dim=1)
            )
            parts = [x, img.repeat_interleave(k, dim=0), img_cost.reshape(batch * k, 1, *size)]
            x = block(torch.cat(parts, dim=1))
        size = x.shape[-2:]
        residual = self.out(x).view(batch, k, *size) + self.class_bias(text).view(1, k, 1, 1)
        return self.log_scale.exp() * resize(scores, size) + residual


def _embed_dim(encoder: nn.Module, images: torch.Tensor) -> int:
    for attr in ("embed_dim", "out_dim", "num_features"):
        value = getattr(encoder, attr, None)
        if isinstance(value, int):
            return value
    with torch.no_grad():
        return int(encoder(normalise_images(images, encoder)).shape[1])


class TrainedDRSeg(DRSegModel):
    """DR-Seg with the learnable heads; frozen CLIP/DINO shared with a training-free model.

    ``forward(images [B,3,H,W] in [0,1], text [K,D]) → logits [B,K,H/s,W/s]``
    (s = ``head.decoder_stride``), the :class:`SegmentationModel` contract, so the segment,
    evaluate and train loops all use it unchanged.
    """

    name = "drseg-trained"

    def __init__(
        self,
        clip: nn.Module,
        dino: nn.Module,
        options: DRSegOptions | None = None,
        head: HeadConfig | None = None,
        *,
        tile_size: int = 448,
    ) -> None:
        super().__init__(clip, dino, options, tile_size=tile_size)
        self.head_config = head or HeadConfig()
        for p in list(self.clip.parameters()) + list(self.dino.parameters()):
            p.requires_grad_(False)
        probe = torch.zeros(1, 3, self.preprocess.multiple, self.preprocess.multiple)
        text_dim, guide_dim = _embed_dim(self.clip, probe), _embed_dim(self.dino, probe)
        opt, cfg = self.options, self.head_config
        self.spsd = LearnableSPSD(text_dim, opt.rho, cfg.spsd_temperature)
        self.pdgr_gate = PDGRGate(guide_dim, cfg.pdgr_gate_bias)
        self.ugaf_gate = UGAFGate(opt.gamma, cfg.gate_hidden)
        self.decoder = GuidedDecoder(text_dim, guide_dim, int(self.dino.patch_size), cfg)

    @classmethod
    def from_drseg(cls, model: DRSegModel, head: HeadConfig | None = None) -> TrainedDRSeg:
        """Wrap the frozen encoders and options of a training-free DR-Seg model."""
        return cls(
            model.clip, model.dino, model.options, head, tile_size=model.preprocess.tile_size
        )

    def train(self, mode: bool = True) -> TrainedDRSeg:
        """Backbones always stay in eval mode (frozen; no dropout)."""
        super().train(mode)
        self.clip.eval()
        self.dino.eval()
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the learnable parts (checkpoints stay small: backbones come from presets)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("clip.", "dino."))}

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(("clip.", "dino."))}

    @torch.no_grad()
    def encode_text(self, class_prompts: Sequence[Sequence[str]]) -> torch.Tensor:
        return self.clip.encode_text(class_prompts)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        opt = self.options
        height, width = images.shape[-2:]
        multiple = self.preprocess.multiple
        if images.ndim != 4 or height % multiple or width % multiple:
            raise ValueError(
                f"images must be [B, 3, H, W] with H, W multiples of {multiple}; "
                f"got {tuple(images.shape)}"
            )
        with torch.no_grad():
            feats = self.clip(normalise_images(images, self.clip))
            guide = self.dino(normalise_images(images, self.dino)).float()
            unit = F.normalize(feats.float(), dim=1)
            # unit vectors scaled to unit variance per channel: well-sized conv inputs
            unit_guide = F.normalize(guide, dim=1) * math.sqrt(guide.shape[1])
            graph = None
            if opt.pdgr:
                graph = build_graph(
                    guide, k=opt.k, radius=opt.window, tau=opt.tau, self_loops=opt.self_loops
                )
        classes = text.to(device=unit.device, dtype=torch.float32)
        grid = tuple(guide.shape[-2:])
        with torch.autocast(device_type=unit.device.type, enabled=False):
            upsampled = resize(unit, grid)
            if opt.spsd:
                mask = self.spsd(unit, classes)[:, :, None, None]
                semantic, structural = upsampled * mask, upsampled * (1 - mask)
            else:
                semantic, structural = torch.zeros_like(upsampled), upsampled
            if graph is not None:
                moved = propagate(structural, graph, alpha=opt.alpha, steps=opt.steps)
                structural = self.pdgr_gate(structural, moved, unit_guide)
            refined_feats = semantic + structural
            if opt.renorm:
                target = upsampled.norm(dim=1, keepdim=True)
                refined_feats = refined_feats * (
                    target / refined_feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
                )
            scale = opt.logit_scale
            refined = scale * torch.einsum("bdhw,kd->bkhw", refined_feats, classes)
            original = resize(scale * torch.einsum("bdhw,kd->bkhw", unit, classes), grid)
            fused = self.ugaf_gate(original, refined) if opt.ugaf else refined
        # the decoder's convolutions may run under the caller's autocast (bf16 on GPU)
        return self.decoder(fused / scale, unit_guide, classes, images).float()
