"""Backbones, text embeddings, the CLIP baseline and the factory, on the test-tiny models.

The tiny models are real open_clip / timm networks built by the same loaders as the full-size
ones, so the dense-feature surgery, weight loading and text ensemble are checked for real
(against open_clip's own forward and a hand-written reference), just small and random.
"""

from __future__ import annotations

import argparse
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from drseg_cli.errors import ModelUnavailableError, UsageError
from drseg_cli.model import backbones as bb
from drseg_cli.model import text as text_mod
from drseg_cli.model.clipseg import ClipSegModel
from drseg_cli.model.factory import build_model, get_preset, list_presets


@pytest.fixture(scope="module")
def clip() -> bb.ClipDenseEncoder:
    return bb.load_clip(bb.TINY_CLIP, None)


@pytest.fixture(scope="module")
def dino() -> bb.DinoEncoder:
    return bb.load_dino(bb.TINY_DINO)


def images(b: int = 2, h: int = 64, w: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def perturbed_state(module: torch.nn.Module, seed: int = 5) -> dict[str, torch.Tensor]:
    """The module's state with every float tensor shifted: loading it must change weights."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
        for k, v in module.state_dict().items()
    }


# --------------------------------------------------------------------------- tiny models


def test_tiny_models_are_deterministic_and_leave_the_rng_alone() -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    c1, c2 = bb.load_clip(bb.TINY_CLIP, None), bb.load_clip(bb.TINY_CLIP, None)
    d1, d2 = bb.load_dino(bb.TINY_DINO), bb.load_dino(bb.TINY_DINO)
    assert torch.equal(torch.get_rng_state(), before)
    assert same_weights(c1, c2) and same_weights(d1, d2)
    # ...and the seed matters (the equality above is not vacuous).
    assert not same_weights(c1, bb.load_clip(bb.TINY_CLIP, None, seed=1))
    assert not same_weights(d1, bb.load_dino(bb.TINY_DINO, seed=1))
    for enc in (c1, d1):
        assert enc.random_weights and not enc.training
        assert not any(p.requires_grad for p in enc.parameters())
    assert (c1.patch_size, c1.embed_dim, d1.patch_size, d1.embed_dim) == (16, 32, 8, 64)
    # Real open_clip text tower with the BPE tokenizer's vocabulary.
    assert c1.model.token_embedding.num_embeddings == 49408


def test_dense_feature_shapes_for_non_square_inputs(clip, dino) -> None:
    x = images(2, 64, 96)
    assert clip(x).shape == (2, 32, 4, 6)
    assert dino(x).shape == (2, 64, 8, 12)
    assert clip(images(1, 32, 160)).shape == (1, 32, 2, 10)
    # Batch elements are independent.
    torch.testing.assert_close(clip(x)[1:], clip(x[1:]))
    with pytest.raises(ValueError, match="multiples of 16"):
        clip(images(1, 64, 72))
    with pytest.raises(ValueError, match="multiples of 8"):
        dino(images(1, 64, 60))


def test_standard_mode_reproduces_open_clip_tokens(clip) -> None:
    """With the trained last block, our embedding path is open_clip's, bit for bit."""
    standard = bb.ClipDenseEncoder(clip.model, model_name=bb.TINY_CLIP, attention="standard")
    x = images(2, 64, 64)  # the native grid: no resampling
    visual = clip.visual
    visual.output_tokens = True
    try:
        pooled, tokens = visual(x)
    finally:
        visual.output_tokens = False
    global_feat, dense = standard.forward_tokens(x)
    torch.testing.assert_close(dense.flatten(2).transpose(1, 2), tokens @ visual.proj)
    torch.testing.assert_close(global_feat, pooled)


def reference_dense(clip: bb.ClipDenseEncoder, x: torch.Tensor, mode: str) -> torch.Tensor:
    """ClearCLIP's last block written out by hand: per-head softmax(a aᵀ/√d)·v (summed over
    q-q, k-k, v-v as the mode says), out_proj, no residual, no FFN, then ln_post and proj on
    the patch tokens; the positional embedding sampled at scale (g + 0.1)/g₀ as ClearCLIP and
    SegEarth-OV do."""
    v = clip.visual
    b, _, H, W = x.shape
    h, w = H // 16, W // 16
    tok = v.conv1(x).flatten(2).transpose(1, 2)
    tok = torch.cat([v.class_embedding.expand(b, 1, -1), tok], dim=1)
    gh, gw = v.grid_size
    grid = v.positional_embedding[1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / gh, (w + 0.1) / gw), mode="bicubic")
    pos = torch.cat([v.positional_embedding[:1], grid.flatten(2)[0].T])
    tok = v.ln_pre(tok + pos)
    for block in v.transformer.resblocks[:-1]:
        tok = block(tok)
    last = v.transformer.resblocks[-1]
    y = last.ln_1(tok)
    width, heads = y.shape[-1], last.attn.num_heads
    d = width // heads
    wq, wk, wv = last.attn.in_proj_weight.split(width)
    bq, bk, bv = last.attn.in_proj_bias.split(width)
    q, k, val = y @ wq.T + bq, y @ wk.T + bk, y @ wv.T + bv
    outs = []
    for i in range(heads):
        sl = slice(i * d, (i + 1) * d)
        qi, ki, vi = q[..., sl], k[..., sl], val[..., sl]
        attn = torch.softmax(qi @ qi.transpose(1, 2) / math.sqrt(d), dim=-1)
        if mode in ("csa", "segearth"):
            attn = attn + torch.softmax(ki @ ki.transpose(1, 2) / math.sqrt(d), dim=-1)
        if mode == "segearth":
            attn = attn + torch.softmax(vi @ vi.transpose(1, 2) / math.sqrt(d), dim=-1)
        outs.append(attn @ vi)
    out = last.attn.out_proj(torch.cat(outs, dim=-1))  # no residual, no FFN
    out = v.ln_post(out) @ v.proj
    return out[:, 1:].transpose(1, 2).reshape(b, -1, h, w)


@pytest.mark.parametrize("mode", ["qq", "csa", "segearth"])
def test_modified_last_block_matches_hand_written_reference(clip, mode) -> None:
    enc = bb.ClipDenseEncoder(clip.model, model_name=bb.TINY_CLIP, attention=mode)
    x = images(2, 64, 96)  # non-native grid: positional embedding resampled
    with torch.no_grad():
        torch.testing.assert_close(enc(x), reference_dense(enc, x, mode), atol=1e-5, rtol=1e-4)


def test_positional_embedding_sampling_modes(clip) -> None:
    """``reference`` samples at scale (g + 0.1)/g₀ (ClearCLIP, SegEarth-OV), ``resize`` the
    exact grid: same shape, different tables, and the default is the reference's."""
    default = bb.ClipDenseEncoder(clip.model, model_name=bb.TINY_CLIP)
    resize = bb.ClipDenseEncoder(clip.model, model_name=bb.TINY_CLIP, pos_interp="resize")
    assert clip.pos_interp == default.pos_interp == "reference"
    ref = default.positional_embedding((8, 6), torch.float32)
    exact = resize.positional_embedding((8, 6), torch.float32)
    assert ref.shape == exact.shape == (1 + 48, 64)
    torch.testing.assert_close(ref[0], exact[0])  # the class position is never resampled
    assert (ref[1:] - exact[1:]).abs().max() > 1e-3
    native = clip.visual.positional_embedding[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    scaled = F.interpolate(native, scale_factor=(8.1 / 4, 6.1 / 4), mode="bicubic")
    torch.testing.assert_close(ref[1:], scaled.flatten(2)[0].T)
    sized = F.interpolate(native, size=(8, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(exact[1:], sized.flatten(2)[0].T)
    with pytest.raises(UsageError, match="pos_interp"):
        bb.ClipDenseEncoder(clip.model, model_name=bb.TINY_CLIP, pos_interp="nearest")


def test_modified_last_block_differs_from_the_trained_one(clip) -> None:
    standard = bb.ClipDenseEncoder(clip.model, model_name=bb.TINY_CLIP, attention="standard")
    x = images(2, 64, 96)
    ours, theirs = clip(x), standard(x)
    assert ours.shape == theirs.shape
    rel = (ours - theirs).norm() / theirs.norm()
    assert rel > 0.1, rel  # residual + FFN removed: a different function, not a rounding


def test_positional_embedding_resampled_once_per_grid(clip) -> None:
    clip._pos_cache.clear()
    a = clip.positional_embedding((4, 6), torch.float32)
    assert clip.positional_embedding((4, 6), torch.float32) is a
    assert clip.positional_embedding((5, 6), torch.float32).shape == (1 + 30, 64)
    assert len(clip._pos_cache) == 2
    native = clip.positional_embedding((4, 4), torch.float32)
    torch.testing.assert_close(native, clip.visual.positional_embedding)


def test_bf16_autocast_stays_finite_and_close(clip, dino) -> None:
    x = images(2, 64, 96)
    model = ClipSegModel(clip, tile_size=64)
    text = model.encode_text([["road"], ["water"], ["tree"]])
    ref_c, ref_d, ref_l = clip(x), dino(x), model(x.sigmoid(), text)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_c, got_d, got_l = clip(x), dino(x), model(x.sigmoid(), text)
    for got, ref in ((got_c, ref_c), (got_d, ref_d), (got_l, ref_l)):
        assert torch.isfinite(got).all()
        assert ((got.float() - ref).norm() / ref.norm()) < 0.05
    assert got_l.dtype == torch.float32


# --------------------------------------------------------------------------- text


def test_text_embeddings_normalised_and_sensitive_to_names(clip) -> None:
    classes = [["road"], ["building"], ["water"]]
    emb = clip.encode_text(classes)
    assert emb.shape == (3, clip.embed_dim) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    # Permuting classes permutes rows.
    perm = clip.encode_text([classes[2], classes[0], classes[1]])
    torch.testing.assert_close(perm, emb[[2, 0, 1]])
    # A synonym changes that class's embedding and only that one.
    syn = clip.encode_text([["road"], ["building", "roof"], ["water"]])
    assert not torch.allclose(syn[1], emb[1], atol=1e-4)
    torch.testing.assert_close(syn[[0, 2]], emb[[0, 2]])


def test_text_embedding_is_the_renormalised_mean_over_names_and_templates(clip) -> None:
    names = ["building", "roof"]
    raw = clip.encode_prompts([t.format(n) for n in names for t in text_mod.TEMPLATES])
    assert raw.shape == (2 * len(text_mod.TEMPLATES), clip.embed_dim)
    expected = F.normalize(F.normalize(raw, dim=-1).mean(0), dim=0)
    torch.testing.assert_close(clip.encode_text([names])[0], expected, atol=1e-5, rtol=1e-5)
    assert 10 <= len(text_mod.TEMPLATES) <= 20 and all("{}" in t for t in text_mod.TEMPLATES)


def test_text_embeddings_are_computed_once_per_prompt_set(clip, monkeypatch) -> None:
    enc = bb.ClipDenseEncoder(clip.model, model_name=bb.TINY_CLIP)
    calls = []
    real = enc.encode_prompts
    monkeypatch.setattr(enc, "encode_prompts", lambda p: calls.append(len(p)) or real(p))
    a = enc.encode_text([["road"], ["tree"]])
    b = enc.encode_text([["road"], ["tree"]])
    assert len(calls) == 1 and torch.equal(a, b)
    b.zero_()  # callers get copies: the cache cannot be corrupted through them
    assert torch.equal(enc.encode_text([["road"], ["tree"]]), a) and len(calls) == 1
    enc.encode_text([["road"], ["grass"]])
    assert len(calls) == 2


def test_embed_classes_batches_prompts_without_changing_results() -> None:
    gen = torch.Generator().manual_seed(0)
    table: dict[str, torch.Tensor] = {}

    def encode(prompts: list[str]) -> torch.Tensor:
        return torch.stack([table.setdefault(p, torch.randn(8, generator=gen)) for p in prompts])

    classes = [["a", "b"], ["c"], ["d", "e", "f"]]
    whole = text_mod.embed_classes(encode, classes, batch_size=1000)
    chunked = text_mod.embed_classes(encode, classes, batch_size=7)
    torch.testing.assert_close(whole, chunked)
    with pytest.raises(ValueError):
        text_mod.embed_classes(encode, [[]])


# --------------------------------------------------------------------------- CLIP baseline


def test_clip_baseline_logits_are_scaled_cosines(clip) -> None:
    model = ClipSegModel(clip, tile_size=64)
    assert model.preprocess.multiple == 16 and model.preprocess.mean == clip.mean
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    text = model.encode_text([["road"], ["building", "roof"], ["water"], ["tree"]])
    logits = model(x, text)
    assert logits.shape == (2, 4, 4, 6) and torch.isfinite(logits).all()
    mean = torch.tensor(clip.mean).view(1, 3, 1, 1)
    std = torch.tensor(clip.std).view(1, 3, 1, 1)
    feats = F.normalize(clip((x - mean) / std), dim=1)
    torch.testing.assert_close(logits, 100 * torch.einsum("bdhw,kd->bkhw", feats, text))
    assert logits.abs().max() <= 100 + 1e-3


def test_cls_token_correction_is_in_logit_space(clip) -> None:
    """SegEarth-OV: logits + λ·cls_logits (λ = −0.3), cosines of the normalised patch and
    class tokens; not a feature-space subtraction before normalising."""
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    text = clip.encode_text([["road"], ["water"], ["tree"]])
    plain = ClipSegModel(clip, tile_size=64, logit_scale=50)
    corrected = ClipSegModel(clip, tile_size=64, logit_scale=50, cls_lambda=-0.3)
    g, dense = clip.forward_tokens(
        (x - torch.tensor(clip.mean).view(1, 3, 1, 1)) / torch.tensor(clip.std).view(1, 3, 1, 1)
    )
    cls_logits = F.normalize(g, dim=-1) @ text.T  # [1, K]
    expected = plain(x, text) + 50 * -0.3 * cls_logits[:, :, None, None]
    torch.testing.assert_close(corrected(x, text), expected, atol=1e-5, rtol=1e-5)
    assert (corrected(x, text) - plain(x, text)).abs().max() > 1e-3
    with pytest.raises(UsageError):
        ClipSegModel(clip, tile_size=100)
    with pytest.raises(UsageError, match="λ"):
        ClipSegModel(clip, tile_size=64, cls_lambda=-2)


def test_per_name_queries_are_merged_by_max(clip) -> None:
    """A class's logit is the max over its names' logits, so its argmax is the reference's
    max over softmax probabilities; repeated names (padding) change nothing."""
    model = ClipSegModel(clip, tile_size=64, logit_scale=50, synonyms="max")
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(6))
    classes = [["road", "street", "highway"], ["water"], ["building", "roof"]]
    text = model.encode_text(classes)
    assert text.shape == (3, 3, clip.embed_dim)
    names = [n for c in classes for n in c]
    single = ClipSegModel(clip, tile_size=64, logit_scale=50)(
        x, torch.stack([clip.encode_text([[n]], text_mod.TEMPLATES)[0] for n in names])
    )
    owner = [0, 0, 0, 1, 2, 2]
    expected = torch.stack(
        [single[:, [i for i, o in enumerate(owner) if o == k]].amax(1) for k in range(3)], 1
    )
    torch.testing.assert_close(model(x, text), expected, atol=1e-5, rtol=1e-5)
    probs = single.softmax(1)  # the reference: softmax over all queries, max per class
    ref_probs = torch.stack(
        [probs[:, [i for i, o in enumerate(owner) if o == k]].amax(1) for k in range(3)], 1
    )
    assert torch.equal(model(x, text).argmax(1), ref_probs.argmax(1))


# --------------------------------------------------------------------------- weights loading


@pytest.mark.parametrize(
    "layout",
    ["teacher+backbone", "teacher+module.backbone", "student+module.backbone", "model", "plain"],
)
def test_dino_checkpoint_layouts_load_identical_weights(dino, tmp_path, layout) -> None:
    target = perturbed_state(dino.vit)
    head = {"head.mlp.0.weight": torch.zeros(4, 64), "head.last_layer.weight_g": torch.ones(1)}
    if layout == "plain":
        payload = dict(target)
    elif layout == "model":
        payload = {"model": {f"module.{k}": v for k, v in target.items()}, "epoch": 3}
    else:
        where, prefix = layout.split("+")
        inner = {f"{prefix}.{k}": v for k, v in {**target, **head}.items()}
        payload = {where: inner, "epoch": 100, "args": argparse.Namespace(arch="vit_small")}
        if where == "student":  # DINO keeps both; only the student here
            payload["teacher"] = "not a dict"
    path = tmp_path / "dino.pth"
    torch.save(payload, path)
    loaded = bb.load_dino(bb.TINY_DINO, path)
    assert not loaded.random_weights
    got = loaded.vit.state_dict()
    assert got.keys() == target.keys()
    assert all(torch.equal(got[k], target[k]) for k in target)
    assert not same_weights(loaded, dino)


def test_dino_checkpoint_safetensors(dino, tmp_path) -> None:
    target = perturbed_state(dino.vit)
    save_file(target, tmp_path / "d.safetensors")
    loaded = bb.load_dino(bb.TINY_DINO, tmp_path / "d.safetensors")
    assert all(torch.equal(loaded.vit.state_dict()[k], v) for k, v in target.items())


def test_mismatched_dino_checkpoint_is_a_clear_error(dino, tmp_path) -> None:
    deeper = {**dino.vit.state_dict()}
    deeper.update(
        {k.replace("blocks.1.", "blocks.2."): v for k, v in deeper.items() if "blocks.1." in k}
    )
    torch.save({"teacher": deeper}, tmp_path / "deeper.pth")
    with pytest.raises(ModelUnavailableError, match=r"unexpected keys blocks\.2\.") as err:
        bb.load_dino(bb.TINY_DINO, tmp_path / "deeper.pth")
    assert "deeper.pth" in str(err.value) and "\n" not in str(err.value)

    partial = {k: v for k, v in dino.vit.state_dict().items() if not k.startswith("norm.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ModelUnavailableError, match=r"missing keys norm\.(weight|bias)"):
        bb.load_dino(bb.TINY_DINO, tmp_path / "partial.pth")

    full = dino.vit.state_dict()
    wide = {k: torch.cat([v, v], dim=-1) if k == "norm.weight" else v for k, v in full.items()}
    torch.save(wide, tmp_path / "wide.pth")
    with pytest.raises(ModelUnavailableError, match="shape mismatch norm.weight"):
        bb.load_dino(bb.TINY_DINO, tmp_path / "wide.pth")

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelUnavailableError, match="junk.pth"):
        bb.load_dino(bb.TINY_DINO, tmp_path / "junk.pth")
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        bb.load_dino(bb.TINY_DINO, tmp_path / "absent.pth")


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "torchscript"])
def test_clip_weights_file_loads_in_every_format(clip, tmp_path, fmt) -> None:
    target = perturbed_state(clip.model)
    path = tmp_path / f"clip.{'pt' if fmt == 'torchscript' else fmt}"
    if fmt == "pth":
        torch.save({"state_dict": {f"module.{k}": v for k, v in target.items()}}, path)
    elif fmt == "safetensors":
        save_file(target, path)
    else:  # the OpenAI releases are TorchScript archives
        donor = bb.load_clip(bb.TINY_CLIP, None).model
        donor.load_state_dict(target)
        with warnings.catch_warnings():  # torch.jit.script is deprecated, still what OpenAI shipped
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.script(donor).save(str(path))
    loaded = bb.load_clip(bb.TINY_CLIP, str(path))
    assert not loaded.random_weights
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], target[k]) for k in target)
    # TorchScript = an OpenAI release = QuickGELU; the tiny config already uses it.
    assert type(loaded.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_mismatched_clip_weights_are_a_clear_error(clip, tmp_path) -> None:
    state = {k: v for k, v in clip.model.state_dict().items() if not k.startswith("ln_final")}
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ModelUnavailableError, match="missing keys ln_final") as err:
        bb.load_clip(bb.TINY_CLIP, str(tmp_path / "bad.pt"))
    assert "unexpected keys extra.weight" in str(err.value)


def test_missing_weights_offline_name_the_file_and_the_command(tmp_path, monkeypatch) -> None:
    cache = tmp_path / "empty-cache"
    monkeypatch.setenv("DRSEG_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError) as err:
        bb.load_clip("ViT-B-16", "openai")
    msg = str(err.value)
    assert "ViT-B-16.pt" in msg and str(cache) in msg and "\n" not in msg
    assert "`drseg models download ViT-B-16/openai`" in msg and "HF_HUB_OFFLINE=1" in msg
    with pytest.raises(ModelUnavailableError) as err:
        bb.load_dino("vit_base_patch8_224.dino")
    msg = str(err.value)
    assert "vit_base_patch8_224.dino.safetensors" in msg and str(cache) in msg
    assert "`drseg models download vit_base_patch8_224.dino`" in msg and "copy" in msg


def test_unknown_backbone_names_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="unknown open_clip model 'ViT-Q-99'"):
        bb.load_clip("ViT-Q-99", None)
    with pytest.raises(UsageError, match="no weights 'ViT-B-16/nonsense'.*openai"):
        bb.load_clip("ViT-B-16", "nonsense")
    with pytest.raises(UsageError, match="unknown timm model 'not_a_vit'"):
        bb.load_dino("not_a_vit")
    with pytest.raises(UsageError, match="attention"):
        bb.ClipDenseEncoder(bb.load_clip(bb.TINY_CLIP, None).model, model_name="x", attention="?")


# --------------------------------------------------------------------------- factory


def test_factory_builds_frozen_tiny_models_for_both_methods() -> None:
    from drseg_cli.model.drseg import DRSegModel

    clip_model = build_model("test-tiny", method="clip")
    assert isinstance(clip_model, ClipSegModel) and clip_model.random_weights
    assert clip_model.preprocess.tile_size == get_preset("test-tiny").tile_size
    drseg = build_model("test-tiny", method="drseg")
    assert isinstance(drseg, DRSegModel) and drseg.random_weights
    assert drseg.preprocess.multiple == 16
    for model in (clip_model, drseg):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    text = drseg.encode_text([["road"], ["water"]])
    assert clip_model(x, text).shape == (1, 2, 4, 6)
    out = drseg(x, text)
    assert out.shape == (1, 2, 64, 96) and torch.isfinite(out).all()  # on the pixel grid
    # Same backbones as the CLIP-only model: the baseline branch shares its weights.
    assert same_weights(clip_model.clip, drseg.clip)


def test_factory_rejects_unknown_presets_and_methods_and_needs_weights(tmp_path) -> None:
    with pytest.raises(
        UsageError, match="'nope'.*vit-b16, vit-l14, vit-b16-cpu, test-tiny, test-tiny-cpu"
    ):
        build_model("nope")
    with pytest.raises(UsageError, match="method 'magic'.*drseg, clip"):
        build_model("test-tiny", method="magic")
    with pytest.raises(ModelUnavailableError, match="drseg models download ViT-B-16/openai"):
        build_model("vit-b16", method="clip")
    names = [p.name for p in list_presets()]
    assert names[0] == "vit-b16" and set(names) == {
        "vit-b16",
        "vit-l14",
        "vit-b16-cpu",
        "test-tiny",
        "test-tiny-cpu",
    }
    for p in list_presets():  # tile sizes suit every patch size involved
        patch = 14 if "L-14" in p.clip_model else 16
        assert p.tile_size % math.lcm(patch, 8) == 0


def test_factory_segearth_method_is_the_reference_configuration() -> None:
    from drseg_cli.model.clipseg import SEGEARTH_OV_LAMBDA

    model = build_model("test-tiny", method="segearth")
    assert isinstance(model, ClipSegModel) and model.name == "segearth"
    assert (model.clip.attention, model.clip.pos_interp) == ("segearth", "reference")
    assert model.clip.templates == text_mod.IMAGENET_TEMPLATES
    assert (model.logit_scale, model.cls_lambda, model.synonyms) == (50.0, -0.3, "max")
    assert SEGEARTH_OV_LAMBDA == -0.3
    p = model.preprocess
    assert (p.tile_size, p.overlap, p.blend) == (224, 0.5, "flat")  # crop 224, stride 112
    assert build_model("test-tiny", method="segearth", tile_size=448).preprocess.tile_size == 448
    sclip = build_model("test-tiny", method="segearth", clip_attention="csa")
    assert sclip.clip.attention == "csa"
    plain = build_model("test-tiny", method="clip")
    assert (plain.clip.attention, plain.logit_scale, plain.cls_lambda) == ("qq", 100.0, 0.0)
    assert (plain.preprocess.overlap, plain.preprocess.blend) == (0.25, "linear")


def test_drseg_can_run_on_the_segearth_branch() -> None:
    """``clip_baseline="segearth"``: SegEarth-OV's encoder and cls correction under DR-Seg;
    with nothing to rectify (ρ = 1) its output is 100·(F̂ − 0.3·ĝ)Tᵀ."""
    from drseg_cli.model.clipseg import unit_features
    from drseg_cli.model.drseg import DRSegOptions

    with pytest.raises(UsageError, match="clip_baseline"):
        DRSegOptions(clip_baseline="maskclip")
    model = build_model(
        "test-tiny", method="drseg", drseg_options=DRSegOptions(rho=1.0, clip_baseline="segearth")
    )
    assert model.clip.attention == "segearth"
    assert model.clip.templates == text_mod.IMAGENET_TEMPLATES
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    text = model.encode_text([["road"], ["water"]])
    unit = unit_features(model.clip, x, -0.3)
    expected = 100 * torch.einsum("bdhw,kd->bkhw", unit, text)
    torch.testing.assert_close(model(x, text), expected)
    plain = unit_features(model.clip, x, 0.0)
    assert (unit - plain).abs().max() > 1e-3


def test_embed_queries_pads_with_the_first_name() -> None:
    table: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(1)

    def encode(prompts: list[str]) -> torch.Tensor:
        return torch.stack([table.setdefault(p, torch.randn(8, generator=gen)) for p in prompts])

    q = text_mod.embed_queries(encode, [["a", "b", "c"], ["d"], ["e", "f"]], ("{}", "x {}"))
    assert q.shape == (3, 3, 8)
    single = text_mod.embed_classes(encode, [[n] for n in "abcdef"], ("{}", "x {}"))
    torch.testing.assert_close(q[0], single[:3])
    torch.testing.assert_close(q[1], single[[3, 3, 3]])
    torch.testing.assert_close(q[2], single[[4, 5, 4]])
    with pytest.raises(ValueError):
        text_mod.embed_queries(encode, ["abc"])
