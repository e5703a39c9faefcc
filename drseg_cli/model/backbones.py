"""Frozen backbones: CLIP dense features (open_clip) and DINO patch features (timm).

``ClipDenseEncoder`` gives per-patch features in CLIP's joint image-text space the
training-free way of ClearCLIP (Lan et al., ECCV 2024) and SegEarth-OV (Li et al., 2024):
every vision block runs as trained except the last, which becomes

    x = out_proj(Attn_self(ln_1(x)))            no residual, no FFN
    F = ln_post(x)[patches] @ proj              [B, D, H/p, W/p], not normalised

where Attn_self is q-q attention, softmax(q qᵀ/√d) v (ClearCLIP; "kk", "vv", SCLIP's
"csa" = q-q + k-k and SegEarth-OV's "segearth" = q-q + k-k + v-v, the softmaxes summed, not
averaged, are options; "standard" keeps the trained block for comparison). The class token
goes through the same block, so ``forward_tokens`` also returns the image-level token that
SegEarth-OV's cls-token correction needs.

The positional embedding is resampled (bicubic) to any grid of the input and cached per grid.
By default it is sampled as ClearCLIP, SCLIP and SegEarth-OV sample it (``pos_interp=
"reference"``: ``F.interpolate(scale_factor=(g + 0.1)/g₀)``, DINO's recipe; the source grid
is stretched by g/(g + 0.1), i.e. ≤ 0.05 native cells at the far edge), so dense features
equal theirs at every tile size; ``"resize"`` samples the exact grid (``size=g``,
antialiased when shrinking).

``DinoEncoder`` returns the last-layer patch tokens of a timm ViT (after its final norm,
without CLS/register tokens) as ``[B, E, H/p, W/p]``; timm's ``dynamic_img_size`` resamples
its positional embedding.

Weights come through :mod:`drseg_cli.model.weights` (explicit file → cache → hub → clear
error). The ``test-tiny`` models are small random networks built by the same classes and
code paths with a fixed seed (inside a forked RNG, so callers' RNG state is untouched).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from drseg_cli.errors import DrsegError, ModelUnavailableError, UsageError
from drseg_cli.model import weights
from drseg_cli.model.text import TEMPLATES, TextEmbeddingCache, embed_classes, embed_queries

log = logging.getLogger(__name__)

#: open_clip model name of the tiny random CLIP (registered on first use), and the
#: load_dino name of the tiny random DINO.
TINY_CLIP, TINY_DINO = weights.TINY_CLIP, weights.TINY_DINO
#: Seed of every random initialisation (tiny models, benchmarks): same seed → same weights.
DEFAULT_SEED = 0

#: Vision: width 64, 2 layers, 2 heads (head_width 32), patch 16, native 64 px (4×4 grid).
#: Text: the open_clip BPE tokenizer's vocabulary (49408) and context (77), width 64.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
#: timm architecture and overrides of the tiny DINO: embed 64, depth 2, 2 heads, patch 8.
TINY_DINO_ARCH = (
    "vit_small_patch8_224",
    {"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 64},
)

ATTENTION_MODES = ("qq", "kk", "vv", "csa", "segearth", "standard")
#: How the positional embedding reaches another grid (see the module docstring).
POS_INTERP_MODES = ("reference", "resize")

_lock = threading.Lock()
_tokenizers: dict[str, Any] = {}


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with ``torch.manual_seed(seed)`` and restore the caller's CPU RNG after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class _DropRecords(logging.Filter):
    """Hides open_clip's 'initialized randomly' warnings: drseg loads the weights itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "open_clip" not in record.pathname


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    root, flt = logging.getLogger(), _DropRecords()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _freeze(module: nn.Module) -> None:
    module.eval()
    module.requires_grad_(False)


def _check_input(images: torch.Tensor, patch: int, who: str) -> tuple[int, int]:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{who}: images must be [B, 3, H, W], got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h % patch or w % patch:
        raise ValueError(f"{who}: H, W must be multiples of {patch}, got {h}×{w}")
    return h // patch, w // patch


def ensure_tiny_clip_config() -> None:
    """Register the tiny CLIP config with open_clip (its public ``add_model_config``)."""
    import open_clip

    with _lock:
        if TINY_CLIP in open_clip.list_models():
            return
        # open_clip keeps the parsed config once read, so the file is only needed this moment.
        with tempfile.TemporaryDirectory(prefix="drseg-open_clip-") as tmp:
            path = Path(tmp) / f"{TINY_CLIP}.json"
            path.write_text(json.dumps(TINY_CLIP_CONFIG))
            open_clip.add_model_config(path)
    if TINY_CLIP not in open_clip.list_models():  # pragma: no cover - open_clip changed
        raise DrsegError("could not register the test-tiny CLIP config with open_clip")


def _tokenizer(model_name: str):
    import open_clip

    with _lock:
        if model_name not in _tokenizers:
            _tokenizers[model_name] = open_clip.get_tokenizer(model_name)
        return _tokenizers[model_name]


# --------------------------------------------------------------------------- CLIP


class ClipDenseEncoder(nn.Module):
    """Dense CLIP image features in the joint space, and class text embeddings.

    ``forward(images)``: normalised images ``[B, 3, H, W]`` (H, W multiples of
    ``patch_size``, any size) → ``[B, embed_dim, H/p, W/p]``, not L2-normalised.
    ``encode_text(class_prompts)``: ``[K, embed_dim]`` L2-normalised, cached per prompts.
    """

    patch_size: int
    embed_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    random_weights: bool

    def __init__(
        self,
        model: nn.Module,
        *,
        model_name: str,
        mean: Sequence[float] = weights.OPENAI_MEAN,
        std: Sequence[float] = weights.OPENAI_STD,
        attention: str = "qq",
        pos_interp: str = "reference",
        templates: Sequence[str] = TEMPLATES,
        random_weights: bool = False,
    ) -> None:
        super().__init__()
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        visual = getattr(model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise UsageError(
                f"CLIP model {model_name!r}: dense features need an open_clip ViT image tower "
                f"(got {type(visual).__name__})"
            )
        last = visual.transformer.resblocks[-1]
        if (
            not isinstance(last, ResidualAttentionBlock)
            or not isinstance(last.attn, nn.MultiheadAttention)
            or last.attn.in_proj_weight is None
            or visual.attn_pool is not None
            or visual.proj is None
            or visual.pool_type != "tok"
        ):
            raise UsageError(
                f"CLIP model {model_name!r}: unsupported ViT variant for dense features "
                "(needs standard blocks, a class token and a projection)"
            )
        if attention not in ATTENTION_MODES:
            raise UsageError(f"attention {attention!r}: choose one of {', '.join(ATTENTION_MODES)}")
        if pos_interp not in POS_INTERP_MODES:
            raise UsageError(
                f"pos_interp {pos_interp!r}: choose one of {', '.join(POS_INTERP_MODES)}"
            )
        ph, pw = visual.patch_size
        if ph != pw:
            raise UsageError(f"CLIP model {model_name!r}: non-square patches are not supported")
        self.model = model
        self.model_name = model_name
        self.patch_size = int(ph)
        self.embed_dim = int(visual.proj.shape[1])
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.attention = attention
        self.pos_interp = pos_interp
        self.templates = tuple(templates)
        self.random_weights = random_weights
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self._text_cache = TextEmbeddingCache()

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    # ---- image side

    def positional_embedding(self, grid: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """``[1 + h·w, width]``: the class position plus the patch grid resampled to ``grid``."""
        pos = self.visual.positional_embedding
        native = tuple(self.visual.grid_size)
        if tuple(grid) == native:
            return pos.to(dtype)
        key = (
            grid,
            self.pos_interp,
            dtype,
            pos.device,
            pos.data_ptr(),
            pos._version,
            torch.is_inference_mode_enabled(),
        )
        cached = self._pos_cache.get(key)
        if cached is not None:
            return cached
        cls_pos, patch_pos = pos[:1], pos[1:]
        width = patch_pos.shape[-1]
        patch_pos = patch_pos.float().reshape(1, native[0], native[1], width).permute(0, 3, 1, 2)
        if self.pos_interp == "reference":  # SegEarth-OV transformer.py interpolate_pos_encoding
            scale = ((grid[0] + 0.1) / native[0], (grid[1] + 0.1) / native[1])
            patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic")
            if tuple(patch_pos.shape[-2:]) != tuple(grid):  # pragma: no cover - float rounding
                raise ValueError(f"positional embedding resampled to {patch_pos.shape[-2:]}")
        else:  # the exact grid; antialiased only when shrinking (small tiles)
            shrink = grid[0] < native[0] or grid[1] < native[1]
            patch_pos = F.interpolate(
                patch_pos, size=grid, mode="bicubic", align_corners=False, antialias=shrink
            )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], width)
        out = torch.cat([cls_pos.float(), patch_pos]).to(dtype)
        if not pos.requires_grad:  # a frozen table: safe to reuse
            if len(self._pos_cache) >= 16:
                self._pos_cache.clear()
            self._pos_cache[key] = out
        return out

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, 1 + h·w, width]`` entering the last block (all others run as trained)."""
        return self.run_blocks(self.stem(images), 0, len(self.visual.transformer.resblocks) - 1)

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, 1 + h·w, width]`` entering the first block (patch embedding, class
        token, resampled positional embedding, ``ln_pre``)."""
        visual = self.visual
        grid = _check_input(images, self.patch_size, "ClipDenseEncoder")
        x = visual.conv1(images)  # [B, width, h, w]
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding(grid, x.dtype)
        x = visual.patch_dropout(x)
        return visual.ln_pre(x)

    def run_blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks ``start … stop − 1`` as trained on batch-first tokens ``[B, L, width]``
        (fine-tuning recipes run the frozen prefix once and the rest twice)."""
        transformer = self.visual.transformer
        if not transformer.batch_first:  # open_clip < 2.25 keeps [L, B, width]
            x = x.transpose(0, 1)
        for block in transformer.resblocks[start:stop]:
            x = block(x)
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        return x

    def last_block(self, x: torch.Tensor) -> torch.Tensor:
        """The modified last block on ``[B, L, width]`` tokens (see the module docstring)."""
        block = self.visual.transformer.resblocks[-1]
        if self.attention == "standard":
            return (
                block(x)
                if self.visual.transformer.batch_first
                else block(x.transpose(0, 1)).transpose(0, 1)
            )
        attn: nn.MultiheadAttention = block.attn
        b, n, width = x.shape
        heads = attn.num_heads
        y = block.ln_1(x)
        qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        if self.attention == "qq":
            out = F.scaled_dot_product_attention(q, q, v)
        elif self.attention == "kk":
            out = F.scaled_dot_product_attention(k, k, v)
        elif self.attention == "vv":
            out = F.scaled_dot_product_attention(v, v, v)
        elif self.attention == "csa":  # (softmax(q qᵀ) + softmax(k kᵀ)) v
            out = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
        else:  # "segearth": (softmax(q qᵀ) + softmax(k kᵀ) + softmax(v vᵀ)) v
            out = (
                F.scaled_dot_product_attention(q, q, v)
                + F.scaled_dot_product_attention(k, k, v)
                + F.scaled_dot_product_attention(v, v, v)
            )
        out = out.transpose(1, 2).reshape(b, n, width)
        return block.ls_1(attn.out_proj(out))

    def forward_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(global [B, D], dense [B, D, h, w])`` in the joint space: the class token and
        the patch tokens after the modified last block, ``ln_post`` and ``proj``."""
        b = images.shape[0]
        h, w = _check_input(images, self.patch_size, "ClipDenseEncoder")
        x = self.last_block(self.tokens(images))
        x = self.visual.ln_post(x) @ self.visual.proj
        dense = x[:, 1:].transpose(1, 2).reshape(b, self.embed_dim, h, w)
        return x[:, 0], dense

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Dense features ``[B, D, H/p, W/p]`` (joint space, not normalised)."""
        return self.forward_tokens(images)[1]

    # ---- text side

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Raw CLIP text embeddings ``[n, D]`` (fp32, autocast off) of literal prompts."""
        device = self.visual.conv1.weight.device
        tokens = _tokenizer(self.model_name)(prompts).to(device)
        with torch.autocast(device.type, enabled=False):
            return self.model.encode_text(tokens).float()

    def encode_text(
        self, class_prompts: Sequence[Sequence[str]], templates: Sequence[str] | None = None
    ) -> torch.Tensor:
        """``[K, D]`` float32, L2-normalised: the prompt ensemble of :mod:`.text` per class."""
        templates = tuple(templates or self.templates)
        return self._text_cache.get(
            class_prompts,
            templates,
            lambda: embed_classes(self.encode_prompts, class_prompts, templates),
            extra=self._weights_version(),
        )

    def encode_queries(
        self, class_prompts: Sequence[Sequence[str]], templates: Sequence[str] | None = None
    ) -> torch.Tensor:
        """``[K, S, D]`` float32, L2-normalised: one query per name (SegEarth-OV's per-synonym
        queries, :func:`.text.embed_queries`), cached per prompts."""
        templates = tuple(templates or self.templates)
        return self._text_cache.get(
            class_prompts,
            templates,
            lambda: embed_queries(self.encode_prompts, class_prompts, templates),
            extra=("queries", self._weights_version()),
        )

    def _weights_version(self) -> int:
        """Changes when weights are loaded or edited in place (keys the text cache)."""
        return sum(p._version for p in self.model.parameters())

    def _apply(self, fn, recurse: bool = True):  # .to()/.half() invalidate derived tensors
        self._pos_cache.clear()
        self._text_cache.clear()
        return super()._apply(fn, recurse)


def load_clip(
    model_name: str,
    pretrained: str | Path | None,
    *,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    attention: str = "qq",
    pos_interp: str = "reference",
    templates: Sequence[str] = TEMPLATES,
    seed: int = DEFAULT_SEED,
) -> ClipDenseEncoder:
    """A frozen :class:`ClipDenseEncoder` for open_clip ``model_name``.

    ``pretrained``: an open_clip tag (``openai``, ``laion2b_s34b_b88k``...; found through the
    weights cache, downloaded unless offline), a local weights file, or None for random
    weights (seeded; benchmarks, ``TINY_CLIP``). ``attention``, ``pos_interp`` and
    ``templates`` configure the dense path and the prompt ensemble (:class:`ClipDenseEncoder`).
    """
    import open_clip

    if model_name == TINY_CLIP:  # random unless given a weights file (there is no download)
        ensure_tiny_clip_config()
    if model_name not in open_clip.list_models():
        raise UsageError(
            f"unknown open_clip model {model_name!r} (e.g. ViT-B-16, ViT-L-14; "
            "see open_clip.list_models())"
        )
    checkpoint: Path | None = None
    mean, std, quick_gelu = weights.OPENAI_MEAN, weights.OPENAI_STD, False
    if pretrained:
        if _looks_like_path(pretrained):
            checkpoint = weights.explicit_file(pretrained, "CLIP weights file")
            spec = weights.spec_for_file(checkpoint)
            if spec is not None and spec.kind == "clip":
                quick_gelu, mean, std = spec.quick_gelu, spec.mean, spec.std
            else:  # OpenAI's TorchScript releases are the QuickGELU ones
                quick_gelu = weights.file_format(checkpoint) == "torchscript"
        else:
            spec = weights.clip_spec(model_name, str(pretrained))
            checkpoint = weights.resolve(spec, cache=cache_dir)
            quick_gelu, mean, std = spec.quick_gelu, spec.mean, spec.std
    with seeded(seed), _quiet_open_clip():
        model = open_clip.create_model(
            model_name, pretrained=None, force_quick_gelu=quick_gelu, device="cpu"
        )
    if checkpoint is not None:
        load_clip_state(model, checkpoint, model_name)
    encoder = ClipDenseEncoder(
        model,
        model_name=model_name,
        mean=mean,
        std=std,
        attention=attention,
        pos_interp=pos_interp,
        templates=templates,
        random_weights=checkpoint is None,
    )
    _freeze(encoder)
    return encoder.to(device)


def _looks_like_path(value: str | Path) -> bool:
    if isinstance(value, Path):
        return True
    p = Path(value)
    return (
        any(sep in value for sep in ("/", "\\"))
        or p.suffix.lower() in (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
        or p.is_file()
    )


def load_clip_state(model: nn.Module, path: Path, model_name: str) -> None:
    """Load a CLIP weights file into an open_clip model (open_clip's own conversions)."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import (
        convert_to_custom_text_state_dict,
        resize_pos_embed,
        resize_text_pos_embed,
    )

    state = weights.unwrap_state_dict(
        weights.read_checkpoint(path), ("state_dict", "model"), lambda: str(path)
    )
    state = weights.strip_prefixes(dict(state), ("module.",))
    # Scalars of OpenAI's TorchScript archives, and buffers open_clip does not save
    # (``attn_mask``) but a scripted model's state dict includes.
    persistent = model.state_dict().keys()
    transient = {name for name, _ in model.named_buffers() if name not in persistent}
    for key in ("input_resolution", "context_length", "vocab_size", *transient):
        state.pop(key, None)
    try:
        state = convert_state_dict(model, state)
        if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
            state = convert_to_custom_text_state_dict(state)
        for key in ("logit_scale", "logit_bias"):
            own = getattr(model, key, None)
            if key in state and own is not None and own.ndim != state[key].ndim:
                state[key] = state[key].reshape(own.shape)
        if "logit_bias" in state and getattr(model, "logit_bias", None) is None:
            state.pop("logit_bias")
        resize_pos_embed(state, model)
        resize_text_pos_embed(state, model)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ModelUnavailableError(
            f"{path}: not weights for CLIP {model_name} ({_shape_error(exc)})"
        ) from None
    if missing or unexpected:
        raise ModelUnavailableError(
            f"{path}: not weights for CLIP {model_name} "
            f"({weights.describe_key_mismatch(list(missing), list(unexpected))})"
        )


def _shape_error(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "size mismatch" in ln), lines[-1] if lines else "")
    return detail[:300] or type(exc).__name__


# --------------------------------------------------------------------------- DINO


class DinoEncoder(nn.Module):
    """Last-layer patch tokens of a timm ViT as a feature map ``[B, E, H/p, W/p]``."""

    patch_size: int
    embed_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    random_weights: bool

    def __init__(
        self,
        vit: nn.Module,
        *,
        model_name: str,
        mean: Sequence[float] = weights.IMAGENET_MEAN,
        std: Sequence[float] = weights.IMAGENET_STD,
        random_weights: bool = False,
    ) -> None:
        super().__init__()
        patch = getattr(getattr(vit, "patch_embed", None), "patch_size", None)
        if patch is None or not hasattr(vit, "forward_features"):
            raise UsageError(f"timm model {model_name!r} is not a ViT with a patch embedding")
        ph, pw = patch if isinstance(patch, tuple) else (patch, patch)
        if ph != pw:
            raise UsageError(f"timm model {model_name!r}: non-square patches are not supported")
        self.vit = vit
        self.model_name = model_name
        self.patch_size = int(ph)
        self.embed_dim = int(vit.num_features)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.random_weights = random_weights

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features ``[B, E, H/p, W/p]`` of normalised images (no CLS/register tokens)."""
        h, w = _check_input(images, self.patch_size, "DinoEncoder")
        tokens = self.vit.forward_features(images)
        tokens = tokens[:, int(getattr(self.vit, "num_prefix_tokens", 1)) :]
        return tokens.transpose(1, 2).reshape(images.shape[0], -1, h, w)


#: Keys that hold the backbone in training checkpoints, tried in this order.
DINO_NESTING = ("teacher", "model", "state_dict", "student")
DINO_PREFIXES = ("module.", "backbone.")


def load_dino(
    model_name: str,
    checkpoint: str | Path | None = None,
    *,
    pretrained: bool | None = True,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    seed: int = DEFAULT_SEED,
) -> DinoEncoder:
    """A frozen :class:`DinoEncoder` for timm ``model_name`` (e.g. ``vit_base_patch8_224.dino``).

    ``checkpoint``: a local file (plain state dict, or nested under ``teacher``/``model``/
    ``state_dict``, ``module.``/``backbone.`` prefixes and DINO head keys dropped). Without
    one, the timm pretrained weights are found through the weights cache (downloaded unless
    offline); ``pretrained=False``/None gives seeded random weights. ``TINY_DINO`` is random.
    """
    import timm

    kwargs: dict[str, Any] = {}
    arch = model_name
    if model_name == TINY_DINO:
        arch, kwargs = TINY_DINO_ARCH[0], dict(TINY_DINO_ARCH[1])
        if checkpoint is None:
            pretrained = False
    elif not timm.is_model(model_name):
        raise UsageError(
            f"unknown timm model {model_name!r} (e.g. vit_base_patch8_224.dino, "
            "vit_small_patch8_224.dino)"
        )
    path: Path | None = None
    spec = None
    if checkpoint is not None:
        path = weights.explicit_file(checkpoint, "DINO checkpoint")
    elif pretrained:
        spec = weights.dino_spec(model_name)
        path = weights.resolve(spec, cache=cache_dir)
    with seeded(seed):
        vit = timm.create_model(
            arch, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs
        )
    if path is not None:
        load_dino_state(vit, path, model_name)
    cfg = getattr(vit, "pretrained_cfg", None) or {}
    mean = spec.mean if spec else cfg.get("mean") or weights.IMAGENET_MEAN
    std = spec.std if spec else cfg.get("std") or weights.IMAGENET_STD
    encoder = DinoEncoder(
        vit, model_name=model_name, mean=mean, std=std, random_weights=path is None
    )
    _freeze(encoder)
    return encoder.to(device)


def dino_state_dict(obj: Any, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The backbone state dict inside a DINO-style checkpoint (nesting, prefixes, head)."""
    state = weights.unwrap_state_dict(obj, DINO_NESTING, lambda: where)
    state = weights.strip_prefixes(state, DINO_PREFIXES)
    return {
        k: v
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and not k.startswith(("head.", "head_drop."))
    }


def load_dino_state(vit: nn.Module, path: Path, model_name: str) -> None:
    """Load a DINO checkpoint file into a timm ViT; a mismatch is one clear error."""
    state = dino_state_dict(weights.read_checkpoint(path), str(path))
    try:  # timm's own conversions (pos-embed resampling, original-release layouts)
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(state, vit)
    except Exception as exc:  # noqa: BLE001 - a filter failure means: not this architecture
        log.debug("timm checkpoint_filter_fn failed on %s: %s", path, exc)
    own = vit.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        detail = weights.describe_key_mismatch(missing, unexpected)
        if shapes:
            more = f" (+{len(shapes) - 2} more)" if len(shapes) > 2 else ""
            detail = "; ".join(
                filter(None, [detail, "shape mismatch " + ", ".join(shapes[:2]) + more])
            )
        raise ModelUnavailableError(f"{path}: not a {model_name} checkpoint ({detail})")
    vit.load_state_dict(state, strict=True)


def grid_multiple(*encoders: nn.Module) -> int:
    """The least tile-edge multiple that suits every encoder's patch size."""
    return math.lcm(*(int(e.patch_size) for e in encoders))
