"""Parity of ``--method segearth`` with SegEarth-OV on a full-size, seeded random ViT-B/16.

The reference below is a port, written for this test, of SegEarth-OV (github.com/likyoo/
SegEarth-OV, commit 3e22a969b32c6d751bdbba64a88a0b670e630f55): ``open_clip/transformer.py``
(``VisionTransformer.forward`` with ``ignore_residual=True``, ``interpolate_pos_encoding``,
``custom_attn`` for model_type ClearCLIP / SCLIP / SegEarth) and ``segearth_segmentor.py``
(query features from ``openai_imagenet_template``, ``forward_feature`` with the cls-token
correction ``logits + cls_token_lambda · cls_logits``, λ = −0.3 from ``configs/base_config.py``,
and ``postprocess_result``: × logit_scale 50, softmax over queries, max over a class's
queries). It runs on the same open_clip module as drseg but calls none of drseg's encoder or
head code; SimFeatUp (``feature_up``) is not part of it (its weights are not available).

Patch logits must agree to ≤ 1e-4 relative (max abs difference / max abs value) and the
argmax to ≥ 99.9 % of patches, at 224 px (native grid) and 448 px (resampled positional
embedding), for each attention variant.
"""

from __future__ import annotations

import hashlib
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from drseg_cli.classes import parse_classes
from drseg_cli.model import backbones as bb
from drseg_cli.model.clipseg import BASELINES, ClipSegModel
from drseg_cli.model.text import IMAGENET_TEMPLATES, embed_queries

#: sha256 of the reference's 80 ``openai_imagenet_template`` strings ('{c}' → '{}'),
#: joined by newlines, at the commit above.
REFERENCE_TEMPLATES_SHA256 = "4f976686fb651bb5803d4689dcd849f75efe0ef19a3c801355bc9a6f03c8a5af"
#: A SegEarth-OV class file: first name per line is the class, the rest its synonyms.
CLASS_LINES = [
    "road,parking lot",
    "building",
    "low vegetation",
    "tree",
    "car",
    "clutter,background",
]
VARIANTS = {"qq": "ClearCLIP", "csa": "SCLIP", "segearth": "SegEarth"}


# --------------------------------------------------------------------------- the reference


def ref_interpolate_pos_encoding(visual, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
    """transformer.py ``interpolate_pos_encoding``: scale_factor (w0 + 0.1)/√N, bicubic."""
    npatch = x.shape[1] - 1
    n = visual.positional_embedding.shape[0] - 1
    if npatch == n and w == h:
        return visual.positional_embedding
    class_pos_embed = visual.positional_embedding[[0]]
    patch_pos_embed = visual.positional_embedding[1:]
    dim = x.shape[-1]
    w0, h0 = w // visual.patch_size[0] + 0.1, h // visual.patch_size[1] + 0.1
    side = int(math.sqrt(n))
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def ref_custom_attn(attn_layer, x: torch.Tensor, model_type: str) -> torch.Tensor:
    """transformer.py ``custom_attn`` on ``[L, B, E]`` tokens (ClearCLIP, SCLIP, SegEarth)."""
    num_heads = attn_layer.num_heads
    num_tokens, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    scale = head_dim**-0.5
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    q = q.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    qq = F.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, dim=-1)
    if model_type == "ClearCLIP":
        attn_weights = qq
    elif model_type == "SCLIP":
        attn_weights = qq + F.softmax(torch.bmm(k, k.transpose(1, 2)) * scale, dim=-1)
    else:  # SegEarth
        attn_weights = (
            qq
            + F.softmax(torch.bmm(k, k.transpose(1, 2)) * scale, dim=-1)
            + F.softmax(torch.bmm(v, v.transpose(1, 2)) * scale, dim=-1)
        )
    attn_output = torch.bmm(attn_weights, v)
    attn_output = attn_output.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    return attn_layer.out_proj(attn_output)


def ref_trunk(visual, img: torch.Tensor) -> torch.Tensor:
    """``VisionTransformer.forward`` up to the last block: tokens ``[L, B, E]``."""
    b, _, w, h = img.shape
    x = visual.conv1(img)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1)
    if x.shape[1] != visual.positional_embedding.shape[0]:
        x = x + ref_interpolate_pos_encoding(visual, x, w, h).to(x.dtype)
    else:
        x = x + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(x)
    batch_first = getattr(visual.transformer, "batch_first", False)
    for blk in visual.transformer.resblocks[:-1]:  # the installed open_clip's own layout
        x = blk(x) if batch_first else blk(x.transpose(0, 1)).transpose(0, 1)
    return x.permute(1, 0, 2)  # NLD -> LND


def ref_encode_image(visual, trunk: torch.Tensor, model_type: str):
    """The last block with ``ignore_residual=True`` (attention only: no residual, no FFN),
    then ``ln_post`` and ``proj``: ``(cls [B, D], patch tokens [B, N, D])``."""
    blk = visual.transformer.resblocks[-1]
    output = ref_custom_attn(blk.attn, blk.ln_1(trunk), model_type)
    x = visual.ln_post(output.permute(1, 0, 2))
    return x[:, 0] @ visual.proj, x[:, 1:] @ visual.proj


def ref_query_features(encode_text, query_words: list[str], templates: list[str]) -> torch.Tensor:
    """``SegEarthSegmentation.__init__``: per query word, the mean of the normalised
    embeddings of its template prompts, renormalised. ``encode_text``: prompts → ``[n, D]``."""
    out = []
    for qw in query_words:
        feature = encode_text([t.format(qw) for t in templates])
        feature = feature / feature.norm(dim=-1, keepdim=True)
        feature = feature.mean(dim=0)
        out.append((feature / feature.norm()).unsqueeze(0))
    return torch.cat(out, dim=0)


def ref_logits(visual, trunk, query_features, query_idx, model_type, h, w):
    """``forward_feature`` (patch grid) and ``postprocess_result``: per-query logits
    × 50 ``[Q, h, w]`` and the class map after softmax and max over a class's queries."""
    cls_token, feats = ref_encode_image(visual, trunk, model_type)
    cls_token = cls_token / cls_token.norm(dim=-1, keepdim=True)
    cls_logits = cls_token @ query_features.T
    feats = feats / feats.norm(dim=-1, keepdim=True)
    logits = feats @ query_features.T
    logits = logits + cls_logits * -0.3  # cls_token_lambda of configs/base_config.py
    logits = logits.permute(0, 2, 1).reshape(-1, logits.shape[-1], h, w)[0] * 50
    probs = logits.softmax(0)
    num_cls, num_queries = max(query_idx) + 1, len(query_idx)
    cls_index = F.one_hot(torch.tensor(query_idx)).T.view(num_cls, num_queries, 1, 1)
    merged = (probs.unsqueeze(0) * cls_index).max(1)[0]
    return logits, merged.argmax(0), cls_index[:, :, 0, 0].bool()


def fake_text_tower(dim: int):
    """A deterministic random embedding per prompt string: the text side without the cost
    of 640 ViT-B/16 text forwards (the real tower is compared on the tiny model)."""

    def encode(prompts: list[str]) -> torch.Tensor:
        seeds = [int(hashlib.sha256(p.encode()).hexdigest()[:15], 16) for p in prompts]
        return torch.stack(
            [torch.randn(dim, generator=torch.Generator().manual_seed(s)) for s in seeds]
        )

    return encode


def ref_query_words(lines: list[str]) -> tuple[list[str], list[int]]:
    """``get_cls_idx``: every comma-separated name is a query; its line is its class."""
    names, idx = [], []
    for i, line in enumerate(lines):
        parts = line.split(",")
        names += parts
        idx += [i] * len(parts)
    return names, idx


# --------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def vit_b16() -> bb.ClipDenseEncoder:
    return bb.load_clip("ViT-B-16", None, seed=0)  # full size, seeded random weights


def test_imagenet_templates_are_the_reference_ones() -> None:
    digest = hashlib.sha256("\n".join(IMAGENET_TEMPLATES).encode()).hexdigest()
    assert len(IMAGENET_TEMPLATES) == 80 and digest == REFERENCE_TEMPLATES_SHA256


def test_patch_logits_match_segearth_ov(vit_b16, tmp_path) -> None:
    visual, baseline = vit_b16.visual, BASELINES["segearth"]
    words, query_idx = ref_query_words(CLASS_LINES)
    encode = fake_text_tower(vit_b16.embed_dim)
    ref_queries = ref_query_features(encode, words, list(IMAGENET_TEMPLATES))
    # Ours: the class file read as a user's file, per-name queries, SegEarth-OV head.
    path = tmp_path / "cls_potsdam.txt"
    path.write_text("\n".join(CLASS_LINES) + "\n", "utf-8")
    specs = parse_classes(str(path))
    encoders = {
        mode: bb.ClipDenseEncoder(
            vit_b16.model, model_name="ViT-B-16", attention=mode, templates=IMAGENET_TEMPLATES
        )
        for mode in VARIANTS
    }
    models = {
        m: ClipSegModel.from_baseline(e, baseline, tile_size=224) for m, e in encoders.items()
    }
    text = embed_queries(encode, [s.prompt_names for s in specs], IMAGENET_TEMPLATES)
    figures = {}
    for size in (224, 448):
        image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size))
        mean = torch.tensor(vit_b16.mean).view(1, 3, 1, 1)
        std = torch.tensor(vit_b16.std).view(1, 3, 1, 1)
        with torch.inference_mode():
            trunk = ref_trunk(visual, (image - mean) / std)
        h = w = size // 16
        for mode, model_type in VARIANTS.items():
            with torch.inference_mode():
                ref, ref_classes, members = ref_logits(
                    visual, trunk, ref_queries, query_idx, model_type, h, w
                )
                ours = models[mode](image, text)[0]
            # Our logits are per class (max over its names): compare with the reference's.
            expected = torch.stack([ref[m].amax(0) for m in members])
            rel = ((ours - expected).abs().max() / expected.abs().max()).item()
            agree = (ours.argmax(0) == ref_classes).float().mean().item()
            figures[(mode, size)] = (rel, agree)
            assert rel <= 1e-4, (mode, size, rel)
            assert agree >= 0.999, (mode, size, agree)
    print({k: (f"{r:.1e}", f"{a:.4f}") for k, (r, a) in figures.items()})


def test_per_name_queries_match_the_reference_text_side(tmp_path) -> None:
    """The real (tiny) text tower: our per-name queries are the reference's query features,
    a class's names in file order, shorter classes padded with their first name."""
    tiny = bb.load_clip(bb.TINY_CLIP, None, templates=IMAGENET_TEMPLATES)
    words, query_idx = ref_query_words(CLASS_LINES)
    tokenizer = open_clip.get_tokenizer(bb.TINY_CLIP)
    with torch.inference_mode():
        ref = ref_query_features(
            lambda p: tiny.model.encode_text(tokenizer(p)), words, list(IMAGENET_TEMPLATES)
        )
        path = tmp_path / "cls.txt"
        path.write_text("\n".join(CLASS_LINES), "utf-8")
        ours = tiny.encode_queries([s.prompt_names for s in parse_classes(str(path))])
    assert ours.shape == (len(CLASS_LINES), 2, tiny.embed_dim)
    for k in range(len(CLASS_LINES)):
        own = [i for i, c in enumerate(query_idx) if c == k]
        expected = ref[own + own[:1] * (2 - len(own))]
        torch.testing.assert_close(ours[k], expected, atol=1e-6, rtol=1e-5)
