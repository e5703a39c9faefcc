"""Soft-guided fine-tuning of CLIP's image encoder (An, Wang & Chen, IEEE TGRS 2025),
reconstructed from the paper's roles (docs/TRAIN.md §Soft-guided):

(a) Generalisation compensation: a frozen copy of the image encoder runs beside the tuned
    one, and what the model evaluates is kept close to it *softly* (loss terms, not a hard
    constraint): ``feature`` = ‖u − n(F_f)‖² per pixel (u: the tuned unit features after
    the visual scene bias; n: L2 normalisation), ``cost`` = KL(softmax(s·C_f) ‖ softmax(s·C))
    per pixel on the (biased) class cost maps and ``output`` = KL(softmax(τ·C_f) ‖
    softmax(logits)) on the final output (decoder + bias). All exactly 0 while the tuned
    model equals the frozen one. The guide shares every frozen tensor with the tuned
    encoder: with LoRA it *is* the tuned encoder with its adapters switched off; with
    ``last``-N tuning only the N tuned blocks are copied (the frozen prefix is run once and
    feeds both); ``full`` tuning copies the image tower.
(b) Bias-guided image–text collaborative optimisation: a global scene embedding (the
    encoder's class token) drives two zero-initialised heads that shift the dense visual
    features (relative to their norm) and the class text embeddings of that image, before
    both are normalised into the cosine cost map. Zero heads reproduce the un-biased model
    bit for bit (the same operations run with zero shifts).
(c) Upsampling decoder: ``CostDecoder`` refines and upsamples every class's cost maps (the
    final one and one per tapped block: multi-scale text–image cosines) with shared weights,
    beside class-agnostic multi-scale visual features, then guided by the image at each ×2
    stage. A class enters only through its cost maps (no class prior can be learned). Its
    residual starts at 0: τ·cost at first.

Which encoder parameters are tuned: ``full`` (the image tower; the last block's unused MLP
excepted), ``last`` (the last N blocks + ``ln_post`` + ``proj``) or ``lora`` (``peft`` LoRA
on the MLPs of the last N blocks and on the modified last block's output projection).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from drseg_cli.errors import UsageError
from drseg_cli.model.base import Preprocess, SegmentationModel
from drseg_cli.model.clipseg import normalise_images
from drseg_cli.model.drseg import resize
from drseg_cli.train.modules import HeadConfig, conv_gelu

TUNE_MODES = ("full", "last", "lora")


@dataclass(frozen=True)
class SoftGuidedConfig:
    """The soft-guided recipe's switches and loss weights (saved in checkpoints)."""

    tune: str = "lora"  # full | last | lora
    tune_blocks: int = 0  # last N blocks tuned (last, lora); 0: every block
    lora_rank: int = 8
    lora_alpha: float = 16.0
    guidance: bool = True  # (a) generalisation compensation
    scene_bias: bool = True  # (b) bias-guided image–text optimisation
    decoder: bool = True  # (c) upsampling decoder
    seg_weight: float = 1.0  # segmentation loss (--loss) weight
    feature_weight: float = 1.0  # guidance: feature consistency weight
    cost_weight: float = 1.0  # guidance: cost-map KL weight
    output_weight: float = 1.0  # guidance: KL of the final output (decoder + bias)
    cost_scale: float = 50.0  # logit scale of the cost maps inside the KL
    bias_hidden: int = 64  # scene-bias MLP width
    encoder_lr_scale: float = 0.1  # encoder learning rate = --lr × this

    def __post_init__(self) -> None:
        if self.tune not in TUNE_MODES:
            raise UsageError(f"--tune {self.tune!r}: choose one of {', '.join(TUNE_MODES)}")
        if self.tune_blocks < 0 or self.lora_rank < 1 or self.bias_hidden < 1:
            raise UsageError("--tune-blocks must be >= 0 and --lora-rank >= 1")
        weights = (self.seg_weight, self.feature_weight, self.cost_weight, self.output_weight)
        if min(weights) < 0 or self.cost_scale <= 0 or self.encoder_lr_scale < 0:
            raise UsageError("loss weights and --encoder-lr-scale must be >= 0, scales > 0")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> SoftGuidedConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


class SceneBias(nn.Module):
    """Scene embedding → (visual shift [B, D], text shift [B, D]); both heads start at 0."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU())
        self.visual = nn.Linear(hidden, dim)
        self.text = nn.Linear(hidden, dim)
        for layer in (self.visual, self.text):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, scene: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(scene)
        return self.visual(h), self.text(h)


class CostDecoder(nn.Module):
    """The upsampling decoder (c): every class's cost maps through the same weights.

    Per class k the input is its cost maps only — the final cosine cost and one per tapped
    block (the block's tokens through the encoder's own ``ln_post``/``proj``: how well the
    class text matches the image at that depth) — beside class-agnostic guidance features
    (the multi-scale visual features), then ×2 stages guided by the image. The text embedding
    enters only through its cosine with the image, never as a free input: a learned function
    of the raw embedding could memorise "the training classes" and score any other class
    below them whatever the image (a class prior, the collapse the recipe must avoid). Output
    τ·cost + residual, the residual's last layer zero at start (identity: τ·cost).
    """

    def __init__(self, n_costs: int, guide_dim: int, patch: int, cfg: HeadConfig) -> None:
        super().__init__()
        stride = cfg.decoder_stride
        if stride < 1 or patch % stride or (patch // stride) & (patch // stride - 1):
            raise UsageError(
                f"decoder stride {stride} must be a power-of-two divisor of the patch size {patch}"
            )
        c, cg = cfg.channels, cfg.guide_channels
        self.guide_proj = nn.Sequential(nn.Conv2d(guide_dim, c, 1), nn.GELU())
        self.log_scale = nn.Parameter(torch.tensor(math.log(cfg.init_scale)))
        self.stage0 = nn.Sequential(conv_gelu(n_costs + c, c), conv_gelu(c, c))
        n_up = int(round(math.log2(patch // stride)))
        self.image_guides = nn.ModuleList(conv_gelu(3, cg) for _ in range(n_up))
        self.up_blocks = nn.ModuleList(conv_gelu(c + cg, c) for _ in range(n_up))
        # no bias: a shift shared by every class leaves the softmax unchanged (float noise)
        self.out = nn.Conv2d(c, 1, 1, bias=False)
        nn.init.zeros_(self.out.weight)

    def forward(
        self, costs: torch.Tensor, guide: torch.Tensor, images: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``[B, K, H/stride, W/stride]`` from cosine ``costs [B, K, n, h, w]`` (the
        final cost first) and class-agnostic ``guide [B, G, h, w]``."""
        batch, k, n, h, w = costs.shape
        g = self.guide_proj(guide)
        x = torch.cat([costs.reshape(batch * k, n, h, w), g.repeat_interleave(k, dim=0)], 1)
        x = self.stage0(x)
        centred = images - 0.5
        for guide_conv, block in zip(self.image_guides, self.up_blocks, strict=True):
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            img = guide_conv(F.adaptive_avg_pool2d(centred, x.shape[-2:]))
            x = block(torch.cat([x, img.repeat_interleave(k, dim=0)], dim=1))
        size = x.shape[-2:]
        residual = self.out(x).view(batch, k, *size)
        return self.scale() * resize(costs[:, :, 0], size) + residual

    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()


def _tap_blocks(depth: int) -> list[int]:
    """Blocks whose outputs feed the decoder: about 1/3 and 2/3 of the depth."""
    return sorted({min(depth - 2, max(0, round(depth * f) - 1)) for f in (1 / 3, 2 / 3)})


def block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An open_clip ``ResidualAttentionBlock`` on batch-first tokens, attention written out
    as in ``ClipDenseEncoder.last_block``. ``nn.MultiheadAttention`` picks its kernels by
    whether its weights need gradients, so a tuned block and its frozen copy would round
    differently; written out, equal weights give equal features (zero guidance loss)."""
    attn = block.attn
    b, n, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, width)
    x = x + block.ls_1(attn.out_proj(out))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def frozen_copy(encoder: nn.Module, tuned: Sequence[nn.Parameter]) -> nn.Module:
    """A frozen copy of ``encoder`` that shares every tensor but ``tuned`` with it (deepcopy
    with the shared tensors pre-seeded in the memo): no second copy of the frozen weights."""
    tuned_ids = {id(p) for p in tuned}
    memo: dict[int, object] = {
        id(t): t
        for t in itertools.chain(encoder.parameters(), encoder.buffers())
        if id(t) not in tuned_ids
    }
    for name, value in vars(encoder).items():  # derived caches: fresh ones in the copy
        if name.endswith("_cache"):
            memo[id(value)] = type(value)()
    guide = copy.deepcopy(encoder, memo)
    guide.requires_grad_(False)
    return guide.eval()


class SoftGuidedCLIP(SegmentationModel):
    """A CLIP dense segmenter whose image encoder is fine-tuned softly (module docstring).

    ``forward(images, text) → logits [B, K, H/s, W/s]`` (s = decoder stride, or the patch
    size without the decoder): the ``SegmentationModel`` contract, so segment, evaluate and
    train use it unchanged. ``forward(..., train_outputs=True)`` also returns the per-sample
    guidance terms (through the module's forward, so DDP sees them).
    """

    name = "soft-guided"

    def __init__(
        self,
        clip: nn.Module,
        config: SoftGuidedConfig | None = None,
        head: HeadConfig | None = None,
        *,
        tile_size: int = 448,
    ) -> None:
        super().__init__()
        self.config = config or SoftGuidedConfig()
        self.head_config = head or HeadConfig()
        cfg = self.config
        self.clip = clip
        depth = len(clip.visual.transformer.resblocks)
        n = cfg.tune_blocks or depth
        if n > depth:
            raise UsageError(f"--tune-blocks {n}: the CLIP image encoder has {depth} blocks")
        self.depth = depth
        self.first_tuned = 0 if cfg.tune == "full" else depth - n
        clip.requires_grad_(False)
        if cfg.tune == "lora":
            self._inject_lora()
        else:
            for p in self._tuned_parameters():
                p.requires_grad_(True)
        self.tuned_names = {
            f"clip.{name}" for name, p in clip.named_parameters() if p.requires_grad
        }
        self.guide: nn.Module | None = None
        if cfg.guidance and cfg.tune != "lora":
            tuned = [p for p in clip.parameters() if p.requires_grad]
            self.guide = frozen_copy(clip, tuned)
        self.random_weights = bool(getattr(clip, "random_weights", False))
        if tile_size % clip.patch_size:
            raise UsageError(f"tile size {tile_size} must be a multiple of {clip.patch_size}")
        self.preprocess = Preprocess(
            tile_size=tile_size, mean=clip.mean, std=clip.std, multiple=int(clip.patch_size)
        )
        dim, width = int(clip.embed_dim), int(clip.visual.transformer.width)
        self.taps = _tap_blocks(depth) if depth > 1 else []
        self.scene_bias = SceneBias(dim, cfg.bias_hidden) if cfg.scene_bias else None
        self.decoder: CostDecoder | None = None
        self.log_scale: nn.Parameter | None = None
        if cfg.decoder:
            guide_dim = len(self.taps) * width + dim
            self.decoder = CostDecoder(
                1 + len(self.taps), guide_dim, int(clip.patch_size), self.head_config
            )
        else:
            self.log_scale = nn.Parameter(torch.tensor(math.log(self.head_config.init_scale)))

    # ---- which parameters are tuned

    def _tuned_parameters(self) -> list[nn.Parameter]:
        visual = self.clip.visual
        blocks = visual.transformer.resblocks
        params: list[nn.Parameter] = [visual.ln_post.weight, visual.ln_post.bias, visual.proj]
        for i in range(self.first_tuned, self.depth - 1):
            params += list(blocks[i].parameters())
        last = blocks[-1]  # the modified last block uses ln_1, attention and ls_1 only
        params += list(last.ln_1.parameters()) + list(last.attn.parameters())
        params += list(last.ls_1.parameters())
        if self.config.tune == "full":
            stem = [visual.conv1, visual.ln_pre]
            params += [p for m in stem for p in m.parameters()]
            params += [visual.class_embedding, visual.positional_embedding]
        return params

    def _inject_lora(self) -> None:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise UsageError(
                "--tune lora needs the peft package: pip install 'drseg[lora]' "
                "(or choose --tune last / --tune full)"
            ) from None

        base = "model.visual.transformer.resblocks"
        targets = [
            f"{base}.{i}.mlp.{name}"
            for i in range(self.first_tuned, self.depth - 1)
            for name in ("c_fc", "c_proj")
        ] + [f"{base}.{self.depth - 1}.attn.out_proj"]
        config = LoraConfig(
            r=self.config.lora_rank,
            lora_alpha=self.config.lora_alpha,
            lora_dropout=0.0,
            target_modules=targets,
            bias="none",
        )
        inject_adapter_in_model(config, self.clip)

    @contextlib.contextmanager
    def adapters_off(self) -> Iterator[None]:
        """The LoRA-tuned encoder as the frozen guide: adapters switched off for a block."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.clip.modules() if isinstance(m, BaseTunerLayer)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    def train(self, mode: bool = True) -> SoftGuidedCLIP:
        """Encoders always in eval mode (no dropout; the guide is frozen)."""
        super().train(mode)
        self.clip.eval()
        if self.guide is not None:
            self.guide.eval()
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Tuned encoder tensors and the heads (the rest comes from the preset's weights)."""
        return {
            k: v
            for k, v in self.state_dict().items()
            if k in self.tuned_names or not k.startswith(("clip.", "guide."))
        }

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen encoder tensors (stored only for random test backbones)."""
        return {
            k: v
            for k, v in self.state_dict().items()
            if k.startswith("clip.") and k not in self.tuned_names
        }

    @torch.no_grad()
    def encode_text(self, class_prompts: Sequence[Sequence[str]]) -> torch.Tensor:
        return self.clip.encode_text(class_prompts)

    # ---- forward

    def _prefix(self, x: torch.Tensor) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """Tokens entering the first tuned block, run once for both encoders (frozen)."""
        if self.config.tune == "full":
            return None, {}
        taps: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            tokens = self.clip.stem(x)
            for i in range(self.first_tuned):
                tokens = self.clip.run_blocks(tokens, i, i + 1)
                if i in self.taps:
                    taps[i] = tokens
        return tokens, taps

    def _encode(
        self, encoder: nn.Module, x: torch.Tensor, prefix: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """``(global [B, D], dense [B, D, h, w], taps)`` from the tuned part of ``encoder``."""
        taps: dict[int, torch.Tensor] = {}
        start = self.first_tuned
        if prefix is None:
            tokens, start = encoder.stem(x), 0
        else:
            tokens = prefix
        blocks = encoder.visual.transformer.resblocks
        for i in range(start, self.depth - 1):
            tokens = block_forward(blocks[i], tokens)
            if i in self.taps:
                taps[i] = tokens
        out = encoder.last_block(tokens)
        out = encoder.visual.ln_post(out) @ encoder.visual.proj
        b, (h, w) = (
            x.shape[0],
            (x.shape[-2] // self.clip.patch_size, x.shape[-1] // self.clip.patch_size),
        )
        dense = out[:, 1:].transpose(1, 2).reshape(b, out.shape[-1], h, w)
        return out[:, 0], dense, taps

    def _guide(self, x: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
        """The frozen encoder's dense features (no gradients)."""
        with torch.no_grad():
            if self.guide is not None:
                return self._encode(self.guide, x, prefix)[1]
            with self.adapters_off():
                return self._encode(self.clip, x, prefix)[1]

    def cost_map(
        self, scene: torch.Tensor, dense: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(cosine cost [B, K, h, w], unit visual features, unit texts [B, K, D])`` with the
        scene biases.

        Without scene bias the same operations run with zero shifts, so a zero-initialised
        bias reproduces the un-biased model exactly."""
        b, d = dense.shape[:2]
        dense, classes = dense.float(), text.float()
        if self.scene_bias is not None:
            visual_shift, text_shift = self.scene_bias(F.normalize(scene.float(), dim=-1))
        else:
            visual_shift = text_shift = dense.new_zeros(b, d)
        return _biased_cost(dense, classes, visual_shift, text_shift)

    def forward(
        self, images: torch.Tensor, text: torch.Tensor, train_outputs: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = normalise_images(images, self.clip)
        prefix, prefix_taps = self._prefix(x)
        frozen = None
        if train_outputs and self.config.guidance:  # before the tuned pass (LoRA toggling)
            frozen = self._guide(x, prefix)
        scene, dense, taps = self._encode(self.clip, x, prefix)
        classes = text.to(device=dense.device, dtype=torch.float32)
        with torch.autocast(device_type=dense.device.type, enabled=False):
            cost, unit, unit_text = self.cost_map(scene, dense, classes)
            if self.decoder is None:
                scale = self.log_scale.exp()
                logits = scale * cost
            else:
                tokens = [(prefix_taps | taps)[i].float() for i in self.taps]
                grid = unit.shape[-2:]
                maps = [self._grid(F.layer_norm(t, t.shape[-1:]), grid) for t in tokens]
                guide = torch.cat([*maps, unit * math.sqrt(unit.shape[1])], dim=1)
                costs = [cost, *(self._tap_cost(t, unit_text, grid) for t in tokens)]
                costs = torch.stack(costs, dim=2)  # [B, K, 1 + taps, h, w]
        if self.decoder is not None:  # the decoder may run under the caller's autocast
            logits = self.decoder(costs, guide, images).float()
            scale = self.decoder.scale()
        if not train_outputs:
            return logits
        parts: dict[str, torch.Tensor] = {}
        if frozen is not None:
            with torch.autocast(device_type=dense.device.type, enabled=False):
                parts = self.guidance_terms(unit, cost, logits, scale, frozen, classes)
        return logits, parts

    def _tap_cost(
        self, tokens: torch.Tensor, unit_text: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """Cosine cost of a tapped block's tokens (through the encoder's own ``ln_post`` and
        ``proj``) against the class texts: the class's match at that depth."""
        visual = self.clip.visual
        feats = F.normalize(visual.ln_post(tokens[:, 1:]) @ visual.proj, dim=-1)
        cost = torch.einsum("bnd,bkd->bkn", feats.float(), unit_text)
        return cost.reshape(*cost.shape[:2], *grid)

    @staticmethod
    def _grid(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, _, width = tokens.shape
        return tokens[:, 1:].transpose(1, 2).reshape(b, width, *size)

    def guidance_terms(
        self,
        unit: torch.Tensor,
        cost: torch.Tensor,
        logits: torch.Tensor,
        scale: torch.Tensor,
        frozen: torch.Tensor,
        text: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Per-sample guidance losses [B], all exactly 0 while the tuned model (encoder, scene
        bias and decoder) still equals the frozen one:

        ``feature``: ‖u − u_f‖² per pixel, u the tuned unit features *after* the visual scene
        bias; ``cost``: KL(softmax(s·C_f) ‖ softmax(s·C)), C the biased cost map; ``output``:
        KL(softmax(τ·C_f) ‖ softmax(logits)) on the output grid, τ the model's own (detached)
        temperature — the guide constrains what is evaluated, so neither the bias nor the
        decoder can drift from the frozen model's per-pixel class ranking unchecked."""
        zeros = frozen.new_zeros(frozen.shape[:2]).float()
        frozen_cost, frozen_unit, _ = _biased_cost(frozen.float(), text.float(), zeros, zeros)
        feature = (unit - frozen_unit).pow(2).sum(1).mean((1, 2))
        s = self.config.cost_scale
        target = scale.detach() * resize(frozen_cost, logits.shape[-2:])
        return {
            "feature": feature,
            "cost": _kl(s * frozen_cost, s * cost),
            "output": _kl(target, logits),
        }


def _biased_cost(
    dense: torch.Tensor, classes: torch.Tensor, visual_shift: torch.Tensor, text_shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(cost, unit features, unit texts)``: the features shifted by ``visual_shift [B, D]``
    relative to their norm, the texts by ``text_shift [B, D]``, both normalised."""
    shifted = dense + visual_shift[:, :, None, None] * dense.norm(dim=1, keepdim=True)
    unit = F.normalize(shifted, dim=1)
    unit_text = F.normalize(classes[None] + text_shift[:, None, :], dim=-1)
    return torch.einsum("bdhw,bkd->bkhw", unit, unit_text), unit, unit_text


def _kl(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over pixels of KL(softmax(target) ‖ softmax(logits)) over classes."""
    log_f = target_logits.log_softmax(1)
    log_t = logits.log_softmax(1)
    return (log_f.exp() * (log_f - log_t)).sum(1).mean((1, 2))


def build_softguided_model(spec, device: str | torch.device = "cpu") -> SoftGuidedCLIP:
    """A fresh :class:`SoftGuidedCLIP` for a ``ModelSpec`` (heads from the current seed)."""
    from drseg_cli.model.factory import build_model

    clip_model = build_model(
        spec.preset,
        method="clip",
        clip_model=spec.clip_model,
        clip_pretrained=spec.clip_pretrained,
        device="cpu",
    )
    model = SoftGuidedCLIP(
        clip_model.clip,
        SoftGuidedConfig.from_dict(spec.recipe_config),
        HeadConfig.from_dict(spec.head),
        tile_size=spec.tile_size or clip_model.preprocess.tile_size,
    )
    return model.to(device)


def as_drseg(model: SoftGuidedCLIP, spec, options=None, device: str | torch.device = "cpu"):
    """DR-Seg's training-free modules on the tuned CLIP (the tuned CLIP as DR-Seg's CLIP
    branch): a ``DRSegModel`` with the preset's DINO."""
    from drseg_cli.model.backbones import load_dino
    from drseg_cli.model.drseg import DRSegModel, DRSegOptions
    from drseg_cli.model.factory import get_preset

    preset = get_preset(spec.preset)
    dino = load_dino(
        spec.dino_model or preset.dino_model,
        spec.dino_checkpoint,
        pretrained=not preset.random_weights,
    )
    clip = model.clip.eval().requires_grad_(False)
    net = DRSegModel(clip, dino, options or DRSegOptions(), tile_size=model.preprocess.tile_size)
    net.random_weights = model.random_weights or net.random_weights
    return net.eval().to(device)
