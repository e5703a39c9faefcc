"""RSRefSeg 2 (Chen et al. 2025, arXiv 2507.06231): referring segmentation as SigLIP
localisation → cascaded second-order prompter → SAM mask decoder.

Our own implementation of the architecture of the public code (KyanChen/RSRefSeg2,
``refseg/models/models.py`` and ``configs_RSRefSeg2/*``, commit 7cda8cd; see docs/REFER.md):

1. SigLIP encodes the window (resized to the SigLIP input size) into patch tokens
   ``[B, N, C]`` and each expression into tokens ``[E, L, C]`` + a pooled vector ``[E, C]``.
2. The *cascaded prompter*: two sets of ``num_text_queries`` queries, both pooled from the
   text tokens, attend to themselves, to the text and to each other (``TwoQueryBlock``);
   queries 1 then refine the image tokens (step 1), queries 2 and the learnable sparse
   prompts refine them again and read them (step 2). Attention order, norms and MLPs follow
   the released configs' op lists, which also give the parameter names.
3. A dense prompt: cosine of the refined image map (3×3 conv, upsampled to SAM's mask-input
   size) with the pooled text, × SigLIP's logit scale + bias → SAM's mask prompt.
4. SAM: image embedding of the window, the ``num_prompts`` sparse prompts + the dense
   prompt → mask decoder → low-res mask logits (256² for a 1024² window).

LoRA (``peft``) sits on SAM's image-encoder attention and neck, SigLIP's attention
projections and heads (``LORA_TARGETS``); ``merge_lora``/:func:`map_public_state` fold the
released LoRA factors into plain weights for inference. ``loss`` reproduces the released
training objective (BCE + Dice ×5, query decorrelation ×0.5, per-batch image-text
contrast ×0.5).

Window score (what the pipeline ranks windows by): SigLIP's own image-text match
probability ``sigmoid(scale·cos(image, text) + bias)`` of the window and the expression.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from drseg_cli.errors import ModelUnavailableError, UsageError
from drseg_cli.model.base import Preprocess, ReferOutput, ReferringModel
from drseg_cli.model.sam import (
    SAM_MEAN,
    SAM_STD,
    TINY_SAM,
    TINY_SAM2,
    build_sam,
    build_sam2_image_model,
    is_sam2,
)

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# The op lists of the released configs (rrsisd/refsegrs/risbench_{training,infer}.py).
TWO_QUERY_OPS = (
    "self_attn_query_query1", "norm_query1_1",
    "self_attn_query_query2", "norm_query2_1",
    "cross_attn_query_text_query1_text", "norm_query1_2", "mlp_query1_2", "norm_query1_3",
    "cross_attn_query_text_query2_text", "norm_query2_2", "mlp_query2_2", "norm_query2_3",
    "cross_attn_query_query_query1_query2", "norm_query1_4", "mlp_query1_3", "norm_query1_5",
    "cross_attn_query_query_query2_query1", "norm_query2_4", "mlp_query2_3", "norm_query2_5",
)  # fmt: skip
STEP1_OPS = (
    "self_attn_text_text_1", "norm_text_1",
    "cross_attn_img_text_1", "norm_img_1", "mlp_img_1", "norm_img_2",
)  # fmt: skip
STEP2_OPS = (
    "self_attn_text_1", "norm_text_1",
    "cross_attn_img_text_1", "norm_img_1", "mlp_img_1", "norm_img_2",
    "self_attn_prompt_1", "norm_prompt_1",
    "cross_attn_prompt_text_1", "norm_prompt_2", "mlp_prompt_2", "norm_prompt_3",
    "cross_attn_prompt_img_1", "norm_prompt_4", "mlp_prompt_3", "norm_prompt_5",
)  # fmt: skip

#: LoRA placement of the released configs (regexes on names inside each wrapped module).
LORA_TARGETS = {
    "sam.vision_encoder": r"^(layers\.\d+\.attn\.(qkv|proj)|neck\.conv[12])$",
    "sam.image_encoder": r"^(trunk\.blocks\.\d+\.attn\.(qkv|proj)|neck\.convs\.\d+\.conv)$",
    "vision": r"^(head\.(attention\.out_proj|mlp\.fc[12])|encoder\.layers\.\d+\.self_attn\."
    r"(k_proj|v_proj|q_proj|out_proj))$",
    "text": r"^(head|encoder\.layers\.\d+\.self_attn\.(k_proj|v_proj|q_proj|out_proj))$",
}
LORA_RANK = 16
LORA_ALPHA = 16


# ----------------------------------------------------------------------------- building blocks


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections through ``internal_dim``
    (SAM's decoder attention; the key/value width may differ from the query's)."""

    def __init__(self, dim: int, heads: int, internal_dim: int, kv_dim: int | None = None):
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads = heads
        self.q_proj = nn.Linear(dim, internal_dim)
        self.k_proj = nn.Linear(kv_dim, internal_dim)
        self.v_proj = nn.Linear(kv_dim, internal_dim)
        self.out_proj = nn.Linear(internal_dim, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        def split(x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            return x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.q_proj(q)), split(self.k_proj(k)), split(self.v_proj(v))
        )
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class MLP(nn.Module):
    """``layers`` of Linear with GELU between them."""

    def __init__(self, dim: int, hidden: int, out: int, num_layers: int = 2):
        super().__init__()
        sizes = [dim] + [hidden] * (num_layers - 1) + [out]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return x


def _add(x: torch.Tensor, pe: torch.Tensor | None) -> torch.Tensor:
    return x if pe is None else x + pe


class TwoQueryBlock(nn.Module):
    """Second-order text decomposition: queries 1 and 2 attend to themselves, to the text and
    to each other, in ``ops`` order (each op named by what it does; ``norm`` replaces,
    everything else is residual)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, internal_dim: int, ops: Sequence[str]):
        super().__init__()
        self.ops = tuple(ops)
        for op in self.ops:
            if op.startswith(("self_attn_query", "cross_attn_query")):
                module: nn.Module = Attention(dim, heads, internal_dim)
            elif op.startswith("mlp_query"):
                module = MLP(dim, mlp_dim, dim)
            elif op.startswith("norm_query"):
                module = nn.LayerNorm(dim)
            else:
                raise ValueError(f"unknown op {op}")
            setattr(self, op, module)

    def forward(self, q1, q2, text, pe1, pe2):  # noqa: ANN001, ANN201 - tensors
        for op in self.ops:
            m = getattr(self, op)
            second = op in ("self_attn_query_query2", "cross_attn_query_text_query2_text")
            second |= op == "cross_attn_query_query_query2_query1"
            second |= op.startswith(("mlp_query2", "norm_query2"))
            if op == "self_attn_query_query1":
                out = m(q1 + pe1, q1 + pe1, q1)
            elif op == "self_attn_query_query2":
                out = m(q2 + pe2, q2 + pe2, q2)
            elif op == "cross_attn_query_text_query1_text":
                out = m(q1 + pe1, text, text)
            elif op == "cross_attn_query_text_query2_text":
                out = m(q2 + pe2, text, text)
            elif op == "cross_attn_query_query_query1_query2":
                out = m(q1 + pe1, q2 + pe2, q2)
            elif op == "cross_attn_query_query_query2_query1":
                out = m(q2 + pe2, q1 + pe1, q1)
            else:
                out = m(q2 if second else q1)
            residual = not op.startswith("norm")
            if second:
                q2 = q2 + out if residual else out
            else:
                q1 = q1 + out if residual else out
        return q1, q2


class PromptBlock(nn.Module):
    """Prompt ↔ text ↔ image attention in ``ops`` order (``*_text`` ops update the text
    queries, ``*_img*`` ops with the image as query update the image tokens, ``*_prompt*``
    ops update the sparse prompts)."""

    def __init__(
        self,
        text_dim: int,
        img_dim: int,
        prompt_dim: int,
        heads: int,
        mlp_dim: int,
        internal_dim: int,
        ops: Sequence[str],
    ):
        super().__init__()
        self.ops = tuple(ops)
        for op in self.ops:
            if op.startswith("self_attn_prompt"):
                module: nn.Module = Attention(prompt_dim, heads, internal_dim)
            elif op.startswith("self_attn_text"):
                module = Attention(text_dim, heads, internal_dim)
            elif op.startswith("cross_attn_img_text"):
                module = Attention(img_dim, heads, internal_dim, kv_dim=text_dim)
            elif op.startswith("cross_attn_prompt_text"):
                module = Attention(prompt_dim, heads, internal_dim, kv_dim=text_dim)
            elif op.startswith("cross_attn_prompt_img"):
                module = Attention(prompt_dim, heads, internal_dim, kv_dim=img_dim)
            elif op.startswith("norm_"):
                dim = {"prompt": prompt_dim, "img": img_dim, "text": text_dim}[op.split("_")[1]]
                module = nn.LayerNorm(dim)
            elif op.startswith("mlp_"):
                dim = {"prompt": prompt_dim, "img": img_dim, "text": text_dim}[op.split("_")[1]]
                module = MLP(dim, mlp_dim, dim)
            else:
                raise ValueError(f"unknown op {op}")
            setattr(self, op, module)

    def forward(self, text, img, prompts=None, text_pe=None, img_pe=None, prompt_pe=None):  # noqa: ANN001, ANN201
        for op in self.ops:
            m = getattr(self, op)
            if op.startswith("self_attn_prompt"):
                target, out = "prompt", m(prompts + prompt_pe, prompts + prompt_pe, prompts)
            elif op.startswith("self_attn_text"):
                t = _add(text, text_pe)
                target, out = "text", m(t, t, text)
            elif op.startswith("cross_attn_img_text"):
                target, out = "img", m(_add(img, img_pe), _add(text, text_pe), text)
            elif op.startswith("cross_attn_prompt_text"):
                target, out = "prompt", m(prompts + prompt_pe, _add(text, text_pe), text)
            elif op.startswith("cross_attn_prompt_img"):
                target, out = "prompt", m(prompts + prompt_pe, _add(img, img_pe), img)
            else:
                target = op.split("_")[1]
                out = m({"prompt": prompts, "img": img, "text": text}[target])
            if not op.startswith("norm"):
                out = out + {"prompt": prompts, "img": img, "text": text}[target]
            if target == "prompt":
                prompts = out
            elif target == "img":
                img = out
            else:
                text = out
        return prompts, img, text


class CascadedPrompter(nn.Module):
    """Text tokens + image tokens → sparse prompts ``[P, prompt_dim]`` and the dense-prompt
    ingredients, for each (window, expression) pair."""

    def __init__(self, arch: RSRefSeg2Arch):
        super().__init__()
        c, p, n = arch.clip_dim, arch.prompt_dim, arch.num_text_queries
        h, mlp, inner = arch.num_heads, arch.mlp_dim, arch.internal_dim
        self.num_text_queries = n
        self.text_query_pe_embedding1 = nn.Parameter(torch.randn(n, c))
        self.text_query_pe_embedding2 = nn.Parameter(torch.randn(n, c))
        self.two_queries_text_attn_layers = nn.ModuleList(
            TwoQueryBlock(c, h, mlp, inner, TWO_QUERY_OPS) for _ in range(arch.depth)
        )
        self.img_pe = nn.Parameter(torch.randn(1, c, arch.clip_grid, arch.clip_grid))
        self.queries1_to_img_attn_layers = nn.ModuleList(
            PromptBlock(c, c, 0, h, mlp, inner, STEP1_OPS) for _ in range(arch.depth)
        )
        self.prompt_queries2_img_attn_layers = nn.ModuleList(
            PromptBlock(c, c, p, h, mlp, inner, STEP2_OPS) for _ in range(arch.depth)
        )
        self.prompt_pe_embedding = nn.Parameter(torch.randn(arch.num_prompts, p))
        self.prompt_embedding = nn.Parameter(torch.randn(arch.num_prompts, p))
        self.sparse_prompt_mlp = MLP(p, mlp, p)
        self.dense_prompt_conv = nn.Sequential(
            nn.Conv2d(c, c // 2, 3, padding=1),
            nn.BatchNorm2d(c // 2),
            nn.GELU(),
            nn.Conv2d(c // 2, c, 3, padding=1),
        )

    def forward(self, img: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """``img [N, HW, C]`` and ``text [N, L, C]`` of N (window, expression) pairs."""
        b = img.shape[0]
        pe1 = self.text_query_pe_embedding1.expand(b, -1, -1)
        pe2 = self.text_query_pe_embedding2.expand(b, -1, -1)
        pooled = F.adaptive_avg_pool1d(text.transpose(1, 2), self.num_text_queries)
        q1 = q2 = pooled.transpose(1, 2)
        for layer in self.two_queries_text_attn_layers:
            q1, q2 = layer(q1, q2, text, pe1, pe2)
        queries1, queries2 = q1, q2
        grid = int(math.isqrt(img.shape[1]))
        img_pe = self.img_pe
        if img_pe.shape[-1] != grid:
            img_pe = F.interpolate(img_pe, size=(grid, grid), mode="bicubic", align_corners=True)
        img_pe = img_pe.flatten(2).transpose(1, 2)
        refined = img
        for layer in self.queries1_to_img_attn_layers:  # step 1: queries 1 → image
            _, refined, q1 = layer(q1, refined, text_pe=pe1, img_pe=img_pe)
        prompt_pe = self.prompt_pe_embedding.expand(b, -1, -1)
        prompts = self.prompt_embedding.expand(b, -1, -1)
        for layer in self.prompt_queries2_img_attn_layers:  # step 2: queries 2, prompts
            prompts, refined, q2 = layer(q2, refined, prompts, pe2, img_pe, prompt_pe)
        refined_map = refined.transpose(1, 2).reshape(b, -1, grid, grid)
        return {
            "sparse": self.sparse_prompt_mlp(prompts),
            "refined_map": refined_map,
            "queries1": queries1,
            "queries2": queries2,
        }


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class RSRefSeg2Arch:
    """Sizes of one RSRefSeg 2 variant (the released configs: SigLIP 2 so400m/16 at 512 px,
    1024 px windows, 3 text queries, 9 sparse prompts, depth 2, 8 heads, MLP/internal 512)."""

    name: str
    siglip_vision: dict[str, Any]
    siglip_text: dict[str, Any]
    sam: str
    window: int = 1024  # SAM's input edge = the pipeline's window
    clip_size: int = 512  # SigLIP input edge (the window is resized to it)
    num_text_queries: int = 3
    num_prompts: int = 9
    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 512
    internal_dim: int = 512
    max_text_tokens: int = 64
    tokenizer: str | None = None  # registry name of the tokenizer file
    siglip_weights: str | None = None  # registry name of the SigLIP weights
    random_weights: bool = False
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def clip_dim(self) -> int:
        return int(self.siglip_vision["hidden_size"])

    @property
    def clip_grid(self) -> int:
        return self.clip_size // int(self.siglip_vision["patch_size"])

    @property
    def prompt_dim(self) -> int:
        return 32 if self.sam == TINY_SAM else 256


_TINY_ARCH = RSRefSeg2Arch(
    "test-tiny",
    dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    | dict(image_size=64, patch_size=16),
    dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    | dict(vocab_size=512, max_position_embeddings=16, projection_size=32)
    | dict(bos_token_id=1, eos_token_id=511, pad_token_id=0),
    TINY_SAM,
    window=128,
    clip_size=64,
    num_heads=2,
    mlp_dim=32,
    internal_dim=32,
    max_text_tokens=16,
    random_weights=True,
    description="tiny random SigLIP + SAM for tests: results are meaningless",
)


_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27)
_SO400M["num_attention_heads"] = 16

ARCHS: dict[str, RSRefSeg2Arch] = {
    a.name: a
    for a in (
        RSRefSeg2Arch(
            "siglip2-so400m-sam2.1-hiera-large",
            dict(_SO400M, image_size=512, patch_size=16),
            dict(_SO400M, vocab_size=256000, max_position_embeddings=64, projection_size=1152),
            "facebook/sam2.1-hiera-large",
            tokenizer="google/siglip2-so400m-patch16-512/tokenizer",
            siglip_weights="google/siglip2-so400m-patch16-512",
            description="the released configs: SigLIP 2 so400m/16 (512 px) + SAM 2.1 Hiera-L",
        ),
        RSRefSeg2Arch(
            "siglip2-so400m-sam-vit-large",
            dict(_SO400M, image_size=512, patch_size=16),
            dict(_SO400M, vocab_size=256000, max_position_embeddings=64, projection_size=1152),
            "facebook/sam-vit-large",
            tokenizer="google/siglip2-so400m-patch16-512/tokenizer",
            siglip_weights="google/siglip2-so400m-patch16-512",
            description="SigLIP 2 so400m/16 (512 px) + SAM ViT-L (transformers), 1024 px windows",
        ),
        _TINY_ARCH,
        replace(
            _TINY_ARCH,
            name="test-tiny-sam2",
            sam=TINY_SAM2,
            window=256,
            description="tiny random SigLIP + SAM 2.1 for tests: results are meaningless",
        ),
    )
}
DEFAULT_ARCH = "siglip2-so400m-sam2.1-hiera-large"


def get_arch(name: str) -> RSRefSeg2Arch:
    if name not in ARCHS:
        raise UsageError(f"unknown RSRefSeg 2 model {name!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[name]


# ----------------------------------------------------------------------------- tokenizers


class HashTokenizer:
    """Deterministic word → id tokenizer of the tiny test model (no vocabulary file)."""

    def __init__(self, vocab_size: int, max_length: int):
        self.vocab_size, self.max_length = vocab_size, max_length

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        import zlib

        rows = [
            [1 + zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in t.lower().split()][
                : self.max_length - 1
            ]
            + [self.vocab_size - 1]
            for t in texts
        ]
        n = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), n, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return {"input_ids": ids}


class FileTokenizer:
    """A ``tokenizer.json`` (SigLIP 2's Gemma tokenizer) through ``tokenizers``; padded to the
    longest expression and cut at the text model's positions, as the public code does."""

    def __init__(self, path: Path, max_length: int):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        self.max_length = max_length

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        rows = [e.ids[: self.max_length] for e in self.tok.encode_batch(list(texts))]
        n = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), n, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


# ----------------------------------------------------------------------------- the model


@dataclass
class EncodedExpressions:
    """What ``encode_expressions`` hands to ``forward``: tokens ``[E, L, C]``, pooled
    ``[E, C]`` and the expressions themselves."""

    expressions: tuple[str, ...]
    tokens: torch.Tensor
    pooled: torch.Tensor


class RSRefSeg2Model(ReferringModel):
    """RSRefSeg 2 behind ``ReferringModel`` (see the module docstring)."""

    name = "rsrefseg2"

    def __init__(self, arch: RSRefSeg2Arch, tokenizer: Callable[[Sequence[str]], dict], sam):  # noqa: ANN001
        super().__init__()
        from transformers import SiglipConfig, SiglipModel

        self.arch = arch
        self.tokenizer = tokenizer
        self.random_weights = arch.random_weights
        self.preprocess = Preprocess(
            tile_size=arch.window, mean=SAM_MEAN, std=SAM_STD, multiple=1, overlap=0.25
        )
        siglip = SiglipModel(
            SiglipConfig(text_config=arch.siglip_text, vision_config=arch.siglip_vision)
        )
        self.vision = siglip.vision_model
        self.text = siglip.text_model
        self.logit_scale = siglip.logit_scale
        self.logit_bias = siglip.logit_bias
        self.prompter = CascadedPrompter(arch)
        self.sam = sam
        self.is_sam2 = is_sam2(arch.sam)
        # The released decode head's contrastive temperatures (training only).
        self.decode_head = nn.ParameterDict(
            {
                k: nn.Parameter(torch.tensor(v))
                for k, v in (
                    ("logit_scale1", math.log(1 / 0.07)),
                    ("logit_scale2", math.log(1 / 0.07)),
                    ("logit_bias1", math.log(0.5)),
                    ("logit_bias2", math.log(0.5)),
                )
            }
        )
        self.register_buffer("_sam_mean", torch.tensor(SAM_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("_sam_std", torch.tensor(SAM_STD).view(1, 3, 1, 1), False)

    # -- text -----------------------------------------------------------------------------
    def encode_expressions(self, expressions: Sequence[str]) -> EncodedExpressions:
        exprs = tuple(str(e) for e in expressions)
        if not exprs or any(not e.strip() for e in exprs):
            raise UsageError("referring expressions must be non-empty text")
        batch = {k: v.to(self._sam_mean.device) for k, v in self.tokenizer(exprs).items()}
        out = self.text(**batch)
        return EncodedExpressions(exprs, out.last_hidden_state, out.pooler_output)

    # -- images ---------------------------------------------------------------------------
    def _siglip(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.arch.clip_size
        x = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        out = self.vision(pixel_values=(x - 0.5) / 0.5)
        return out.last_hidden_state, out.pooler_output

    def _sam_embed(self, images: torch.Tensor) -> Any:
        """SAM's image embedding ``[B, 256, h, w]``; for SAM 2 a tuple with the two
        high-resolution feature maps its decoder also reads."""
        sam = self.sam
        size = sam.image_size if self.is_sam2 else sam.config.vision_config.image_size
        x = images
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = (x - self._sam_mean) / self._sam_std
        if not self.is_sam2:
            return sam.vision_encoder(x).last_hidden_state
        backbone = sam.forward_image(x)
        _, feats, _, sizes = sam._prepare_backbone_features(backbone)
        if sam.directly_add_no_mem_embed:
            feats[-1] = feats[-1] + sam.no_mem_embed
        maps = [
            f.permute(1, 2, 0).reshape(x.shape[0], -1, h, w)
            for f, (h, w) in zip(feats, sizes, strict=True)
        ]
        return maps[-1], tuple(maps[:-1])

    def decode(
        self,
        img_tokens: torch.Tensor,
        sam_embed: torch.Tensor,
        text_tokens: torch.Tensor,
        text_pooled: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Mask logits of N (window, expression) pairs given per-pair encoder outputs."""
        p = self.prompter(img_tokens, text_tokens)
        if self.is_sam2:
            mask_size = self.sam.sam_prompt_encoder.mask_input_size[0]
        else:
            mask_size = self.sam.config.prompt_encoder_config.image_size // 4
        fmap = self.prompter.dense_prompt_conv(p["refined_map"])
        fmap = F.interpolate(fmap, size=(mask_size, mask_size), mode="bilinear", align_corners=True)
        dense = torch.einsum(
            "bchw,bc->bhw", F.normalize(fmap, dim=1), F.normalize(text_pooled, dim=-1)
        ).unsqueeze(1)
        dense = dense * self.logit_scale.exp() + self.logit_bias
        if self.is_sam2:
            embed, high_res = sam_embed
            encoder = self.sam.sam_prompt_encoder
            _, dense_embed = encoder(points=None, boxes=None, masks=dense)
            masks = self.sam.sam_mask_decoder(
                image_embeddings=embed,
                image_pe=encoder.get_dense_pe(),
                sparse_prompt_embeddings=p["sparse"],
                dense_prompt_embeddings=dense_embed,
                multimask_output=False,
                repeat_image=False,
                high_res_features=list(high_res),
            )[0]
            return {"mask_logits": masks[:, 0], "dense": dense, **p}
        _, dense_embed = self.sam.prompt_encoder(None, None, None, dense)
        masks, _ = self.sam.mask_decoder(
            image_embeddings=sam_embed,
            image_positional_embeddings=self.sam.get_image_wide_positional_embeddings().expand(
                sam_embed.shape[0], -1, -1, -1
            ),
            sparse_prompt_embeddings=p["sparse"].unsqueeze(1),
            dense_prompt_embeddings=dense_embed,
            multimask_output=False,
        )
        return {"mask_logits": masks[:, 0, 0], "dense": dense, **p}

    def pair_outputs(
        self, images: torch.Tensor, enc: EncodedExpressions
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Decoder outputs of every (window, expression) pair (window-major) and the window
        scores ``[B, E]``; each encoder runs once per window and once per expression."""
        b, e = images.shape[0], len(enc.expressions)
        img_tokens, img_pooled = self._siglip(images)
        sam_embed = self._sam_embed(images)
        scores = torch.sigmoid(
            F.normalize(img_pooled, dim=-1)
            @ F.normalize(enc.pooled, dim=-1).T
            * self.logit_scale.exp()
            + self.logit_bias
        )
        out = self.decode(
            img_tokens.repeat_interleave(e, 0),
            _repeat(sam_embed, e),
            enc.tokens.repeat(b, 1, 1),
            enc.pooled.repeat(b, 1),
        )
        return out, scores

    def forward(self, images: torch.Tensor, expressions: object) -> ReferOutput:
        if not isinstance(expressions, EncodedExpressions):
            raise TypeError("forward takes what encode_expressions returned")
        out, scores = self.pair_outputs(images, expressions)
        logits = out["mask_logits"]
        return ReferOutput(scores, logits.reshape(images.shape[0], -1, *logits.shape[-2:]))

    # -- training ---------------------------------------------------------------------------
    def loss(
        self, images: torch.Tensor, expressions: Sequence[str], masks: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The released objective on a batch of (image, expression, mask ``[B,H,W]`` in {0,1},
        255 ignored) triples: BCE + Dice on SAM's logits (×5 each), squared cosine between
        the two query sets (×0.5), and the per-batch contrast of mask-pooled SigLIP features
        with queries 2 (×0.5)."""
        batch = {k: v.to(images.device) for k, v in self.tokenizer(list(expressions)).items()}
        text = self.text(**batch)
        img_tokens, _ = self._siglip(images)
        out = self.decode(
            img_tokens, self._sam_embed(images), text.last_hidden_state, text.pooler_output
        )
        logits = F.interpolate(
            out["mask_logits"].unsqueeze(1), size=masks.shape[-2:], mode="bilinear"
        )[:, 0]
        valid = (masks != 255).float()
        target = (masks == 1).float()
        bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid).sum()
        bce = bce / valid.sum().clamp_min(1)
        prob = torch.sigmoid(logits) * valid
        inter = (prob * target).flatten(1).sum(1)
        denom = (prob.pow(2)).flatten(1).sum(1) + (target * valid).pow(2).flatten(1).sum(1)
        dice = (1 - (2 * inter + 1) / (denom + 1)).mean()
        q1 = F.normalize(out["queries1"].mean(1), dim=-1)
        q2 = F.normalize(out["queries2"].mean(1), dim=-1)
        decor = (q1 * q2).sum(-1).pow(2).mean()
        g = self.arch.clip_grid
        fmap = img_tokens.transpose(1, 2).reshape(img_tokens.shape[0], -1, g, g)
        small = F.interpolate(target.unsqueeze(1), size=(g, g), mode="bilinear")[:, 0] > 0.5
        pooled = F.normalize((fmap * small.unsqueeze(1)).mean((2, 3)), dim=-1)
        scale = self.decode_head["logit_scale2"].exp()
        logits_it = scale * pooled @ q2.T + self.decode_head["logit_bias2"]
        labels = torch.arange(len(pooled), device=pooled.device)
        contrast = (F.cross_entropy(logits_it, labels) + F.cross_entropy(logits_it.T, labels)) / 2
        total = 5 * bce + 5 * dice + 0.5 * decor + 0.5 * contrast
        parts = {"bce": bce, "dice": dice, "decor": decor, "contrast": contrast}
        return total, {k: float(v.detach()) for k, v in parts.items()}


def _repeat(embed: Any, e: int) -> Any:
    """Repeat each window's SAM embedding (or SAM 2's tuple of maps) for ``e`` expressions."""
    if isinstance(embed, torch.Tensor):
        return embed.repeat_interleave(e, 0)
    return tuple(_repeat(x, e) for x in embed)


# ----------------------------------------------------------------------------- LoRA


def add_lora(model: RSRefSeg2Model, r: int = LORA_RANK, alpha: int = LORA_ALPHA) -> None:
    """Wrap SAM's image encoder and both SigLIP towers with LoRA (``peft``) at the released
    placement; only LoRA factors, the prompter, SigLIP's logit scale/bias and the decode
    head's temperatures are trained then (SAM's prompt encoder and mask decoder too, as in
    the public code, which leaves them trainable)."""
    from peft import LoraConfig, inject_adapter_in_model

    sam_part = "sam.image_encoder" if model.is_sam2 else "sam.vision_encoder"
    for where, pattern in LORA_TARGETS.items():
        if where.startswith("sam.") and where != sam_part:
            continue
        module = model.get_submodule(where)
        module.requires_grad_(False)
        inject_adapter_in_model(
            LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=pattern), module
        )


def merge_lora(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Fold peft LoRA factors into plain weights: ``W + scale·B·A`` (Linear) or its 1×1/k×k
    convolution analogue; ``…base_layer.X`` becomes ``…X``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    for key in state:
        if ".lora_A." not in key or not key.endswith(".weight"):
            continue
        stem, _, rest = key.partition(".lora_A.")
        b_key = f"{stem}.lora_B.{rest}"
        a, b = state[key].float(), state[b_key].float()
        w = out[f"{stem}.weight"]
        if a.ndim == 2:
            delta = b @ a
        else:  # conv: A [r, in, kh, kw], B [out, r, 1, 1]
            delta = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
        out[f"{stem}.weight"] = (w.float() + scale * delta).to(w.dtype)
    return out


# ----------------------------------------------------------------------------- public checkpoints

#: Public (mmseg ``RefSegEncoderDecoder``) prefix → ours, first match wins.
PUBLIC_PREFIXES = (
    ("backbone.model.vision_encoder.base_model.model.", "sam.vision_encoder."),
    ("backbone.model.image_encoder.base_model.model.", "sam.image_encoder."),
    ("backbone.model.", "sam."),
    ("clip_vision_encoder.base_model.model.model.", "vision."),
    ("clip_vision_encoder.model.", "vision."),
    ("clip_text_encoder.base_model.model.model.", "text."),
    ("clip_text_encoder.model.", "text."),
    ("clip_text_encoder.base_model.model.logit_", "logit_"),
    ("clip_text_encoder.logit_", "logit_"),
    ("prompter.", "prompter."),
    ("decode_head.", "decode_head."),
    # drseg's own layout (checkpoints of `drseg train --task refer`, LoRA merged or not)
    ("sam.", "sam."),
    ("vision.", "vision."),
    ("text.", "text."),
    ("logit_", "logit_"),
)


def map_public_state(
    state: dict[str, torch.Tensor], lora_scale: float = LORA_ALPHA / LORA_RANK
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A released RSRefSeg 2 state dict → our key layout (LoRA merged); also ours → public
    names for messages. Keys of no known part are kept under ``?public-name`` so a strict
    load reports them by their own name."""
    renamed: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for key, value in state.items():
        for old, new in PUBLIC_PREFIXES:
            if key.startswith(old):
                ours = new + key[len(old) :]
                break
        else:
            ours = "?" + key
        renamed[ours] = value
        names[ours] = key
    merged = merge_lora(renamed, lora_scale)
    back = {k.replace(".base_layer.", "."): v for k, v in names.items()}
    return merged, back


def load_public_checkpoint(model: RSRefSeg2Model, obj: Any, where: str) -> None:
    """Load a released checkpoint (mmengine ``{'state_dict': …}`` or a bare dict) strictly;
    a ModelUnavailableError naming missing keys (ours) and unexpected ones (theirs)."""
    from drseg_cli.model import weights

    state = weights.unwrap_state_dict(obj, ("state_dict", "model"), lambda: where)
    state = weights.strip_prefixes(state, ("module.",))
    mapped, public = map_public_state(state)
    # The prompt encoder shares SAM's positional embedding; either copy may be stored.
    tied = ("sam.shared_image_embedding.positional_embedding",)
    tied += ("sam.prompt_encoder.shared_embedding.positional_embedding",)
    for a, b in (tied, tied[::-1]):
        if a in mapped and b not in mapped:
            mapped[b] = mapped[a]
    own = model.state_dict()
    missing = [k for k in own if k not in mapped]
    unexpected = [public.get(k, k) for k in mapped if k not in own]
    if missing or unexpected:
        detail = weights.describe_key_mismatch(missing, unexpected)
        raise ModelUnavailableError(
            f"{where}: not an RSRefSeg 2 checkpoint of this model ({detail})"
        )
    for k, v in own.items():
        if tuple(v.shape) != tuple(mapped[k].shape):
            raise ModelUnavailableError(
                f"{where}: {public.get(k, k)} has shape {tuple(mapped[k].shape)}, the model "
                f"expects {tuple(v.shape)} (another RSRefSeg 2 variant?)"
            )
    model.load_state_dict(mapped, strict=True)


# ----------------------------------------------------------------------------- building


def lora_regex(where: str) -> re.Pattern[str]:
    return re.compile(LORA_TARGETS[where])


def build_rsrefseg2(
    arch: str | RSRefSeg2Arch = DEFAULT_ARCH,
    *,
    checkpoint: str | Path | None = None,
    random_weights: bool = False,
    cache_dir: str | Path | None = None,
    allow_download: bool = True,
    device: str = "cpu",
    seed: int = 0,
    pretrained_encoders: bool = False,
) -> RSRefSeg2Model:
    """An RSRefSeg 2 model in eval mode without gradients: a released/trained ``checkpoint``
    (registry name or file; it holds every weight), else random weights (``test-tiny``
    always, any variant with ``random_weights``)."""
    from drseg_cli.model import weights

    a = get_arch(arch) if isinstance(arch, str) else arch
    random = random_weights or a.random_weights
    if checkpoint is None and not random and not pretrained_encoders:
        raise ModelUnavailableError(
            "RSRefSeg 2 needs trained weights: pass a checkpoint (e.g. --checkpoint "
            "rsrefseg2-rrsisd, fetched by `drseg models download rsrefseg2-rrsisd`) or train "
            "one with `drseg train --task refer`"
        )
    path = None if checkpoint is None else _checkpoint_path(checkpoint, cache_dir, allow_download)
    if a.tokenizer is None:
        tokenizer: Callable = HashTokenizer(int(a.siglip_text["vocab_size"]), a.max_text_tokens)
    elif random and checkpoint is None and not pretrained_encoders:
        tokenizer = HashTokenizer(int(a.siglip_text["vocab_size"]), a.max_text_tokens)
    else:
        tok_path = weights.resolve(a.tokenizer, cache=cache_dir, allow_download=allow_download)
        tokenizer = FileTokenizer(tok_path, a.max_text_tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init_sam = pretrained_encoders and path is None and a.sam not in (TINY_SAM, TINY_SAM2)
        build = build_sam2_image_model if is_sam2(a.sam) else build_sam
        sam = build(
            a.sam,
            random_weights=not init_sam,
            seed=seed,
            cache_dir=cache_dir,
            allow_download=allow_download,
        )
        model = RSRefSeg2Model(a, tokenizer, sam)
    if pretrained_encoders and path is None and a.siglip_weights is not None:
        siglip = weights.resolve(a.siglip_weights, cache=cache_dir, allow_download=allow_download)
        load_siglip(model, weights.read_checkpoint(siglip), str(siglip))
    if path is not None:
        load_public_checkpoint(model, weights.read_checkpoint(path), str(path))
    model.random_weights = path is None and not (pretrained_encoders and a.siglip_weights)
    model.eval().requires_grad_(False)
    return model.to(device)


def load_siglip(model: RSRefSeg2Model, state: dict[str, Any], where: str) -> None:
    """SigLIP hub weights (``vision_model.*``, ``text_model.*``, ``logit_scale/bias``) into
    the two towers (strict per tower): the starting point of ``drseg train --task refer``."""
    for prefix, module in (("vision_model.", model.vision), ("text_model.", model.text)):
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        own = module.state_dict()
        missing = [prefix + k for k in own if k not in part]
        unexpected = [prefix + k for k in part if k not in own]
        if missing or unexpected:
            from drseg_cli.model.weights import describe_key_mismatch

            detail = describe_key_mismatch(missing, unexpected)
            raise ModelUnavailableError(f"{where}: not the SigLIP of this model ({detail})")
        module.load_state_dict(part, strict=True)
    with torch.no_grad():
        model.logit_scale.copy_(state["logit_scale"].reshape(model.logit_scale.shape))
        model.logit_bias.copy_(state["logit_bias"].reshape(model.logit_bias.shape))


def _checkpoint_path(checkpoint: str | Path, cache: Any, allow_download: bool) -> Path:
    from drseg_cli.model import weights

    name = str(checkpoint)
    if name in weights.REGISTRY:
        return weights.resolve(name, cache=cache, allow_download=allow_download)
    return weights.explicit_file(checkpoint, "RSRefSeg 2 checkpoint")


def with_window(arch: RSRefSeg2Arch, window: int) -> RSRefSeg2Arch:
    """The same variant at another window edge (SAM's input resizes to its own)."""
    return replace(arch, window=window)
