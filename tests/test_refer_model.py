"""RSRefSeg 2 model: shapes, text once, public checkpoint key layout (strict), SAM loading."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from torch import nn  # noqa: E402

from drseg_cli.errors import ModelUnavailableError  # noqa: E402
from drseg_cli.model import rsrefseg2 as rr  # noqa: E402
from drseg_cli.model.sam import build_sam  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return rr.build_rsrefseg2("test-tiny")


def test_tiny_forward_shapes_and_pairs(tiny):
    enc = tiny.encode_expressions(["the white building", "a ship near the bridge"])
    images = torch.rand(3, 3, 128, 128)
    with torch.no_grad():
        out = tiny(images, enc)
    assert out.scores.shape == (3, 2)
    assert out.mask_logits.shape == (3, 2, 32, 32)  # SAM low-res masks: input / 4
    assert ((out.scores > 0) & (out.scores < 1)).all()
    # Window b, expression e of the batch == the same pair alone (no mixing across pairs).
    one = tiny.encode_expressions(["a ship near the bridge"])
    with torch.no_grad():
        alone = tiny(images[2:3], one)
    torch.testing.assert_close(alone.mask_logits[0, 0], out.mask_logits[2, 1], atol=1e-4, rtol=0)
    torch.testing.assert_close(alone.scores[0, 0], out.scores[2, 1], atol=1e-5, rtol=0)


class _Wrap(nn.Module):
    """The public code's HF wrappers: the tower under ``.model`` (+ SigLIP's logit params)."""

    def __init__(self, model: nn.Module, scale=None, bias=None):
        super().__init__()
        self.model = model
        if scale is not None:
            self.logit_scale, self.logit_bias = scale, bias


def _public_state(seed: int = 3, arch_name: str = "test-tiny") -> dict[str, torch.Tensor]:
    """A random state dict in the released checkpoint's layout, made by peft's own
    ``get_peft_model`` on the public module tree (RefSegEncoderDecoder, SAM 1 branch)."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    arch = rr.get_arch(arch_name)
    sig = SiglipModel(SiglipConfig(text_config=arch.siglip_text, vision_config=arch.siglip_vision))
    if arch_name == "test-tiny-sam2":  # RefSegSam's SAM 2 branch: only the used parts
        from drseg_cli.model.sam import build_sam2_image_model

        sam = build_sam2_image_model(arch.sam, seed=seed + 1)
    else:
        sam = build_sam("test-tiny", seed=seed + 1)

    def lora(module: nn.Module, pattern: str) -> nn.Module:
        cfg = peft.LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules=pattern)
        wrapped = peft.get_peft_model(module, cfg)
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; random B tests the merge
                nn.init.normal_(p, std=0.05)
        return wrapped

    root = nn.Module()
    root.backbone = nn.Module()
    root.backbone.model = sam
    if arch_name == "test-tiny-sam2":
        pattern = r"^(trunk\.blocks\.\d+\.attn\.(qkv|proj)|neck\.convs\.\d+\.conv)$"
        sam.image_encoder = lora(sam.image_encoder, pattern)
    else:
        pattern = r"^(layers\.\d+\.attn\.(qkv|proj)|neck\.conv[12])$"
        sam.vision_encoder = lora(sam.vision_encoder, pattern)
    vis = r"^(model\.head\.(attention\.out_proj|mlp\.fc[12])|model\.encoder\.layers\.\d+\.self_attn\.(k_proj|v_proj|q_proj|out_proj))$"  # noqa: E501
    txt = r"^(model\.head|model\.encoder\.layers\.\d+\.self_attn\.(k_proj|v_proj|q_proj|out_proj))$"
    root.clip_vision_encoder = lora(_Wrap(sig.vision_model), vis)
    root.clip_text_encoder = lora(_Wrap(sig.text_model, sig.logit_scale, sig.logit_bias), txt)
    root.prompter = rr.CascadedPrompter(arch)
    head = nn.Module()
    for k in ("logit_scale1", "logit_scale2", "logit_bias1", "logit_bias2"):
        setattr(head, k, nn.Parameter(torch.randn(())))
    root.decode_head = head
    return {k: v.detach().clone() for k, v in root.state_dict().items()}


def test_public_layout_loads_strictly_with_lora_merged(tmp_path):
    state = _public_state()
    assert any(k.startswith("backbone.model.vision_encoder.base_model.model.") for k in state)
    assert "clip_text_encoder.base_model.model.logit_scale" in state
    assert (
        "clip_vision_encoder.base_model.model.model.encoder.layers.0.self_attn.q_proj.lora_A.default.weight"
        in state
    )  # noqa: E501
    path = tmp_path / "rsrefseg2-rrsisd.pth"
    torch.save({"meta": {"epoch": 1}, "state_dict": state}, path)
    model = rr.build_rsrefseg2("test-tiny", checkpoint=path)
    assert model.random_weights is False
    ours = model.state_dict()
    pre = "backbone.model.vision_encoder.base_model.model.layers.0.attn.qkv."
    merged = state[pre + "base_layer.weight"] + (
        state[pre + "lora_B.default.weight"] @ state[pre + "lora_A.default.weight"]
    )
    torch.testing.assert_close(ours["sam.vision_encoder.layers.0.attn.qkv.weight"], merged)
    conv = "backbone.model.vision_encoder.base_model.model.neck.conv2."  # 3×3 conv LoRA
    assert not torch.equal(
        ours["sam.vision_encoder.neck.conv2.weight"], state[conv + "base_layer.weight"]
    )  # noqa: E501
    torch.testing.assert_close(
        ours["prompter.prompt_queries2_img_attn_layers.1.cross_attn_prompt_img_1.q_proj.weight"],
        state["prompter.prompt_queries2_img_attn_layers.1.cross_attn_prompt_img_1.q_proj.weight"],
    )
    torch.testing.assert_close(
        ours["logit_bias"], state["clip_text_encoder.base_model.model.logit_bias"]
    )
    torch.testing.assert_close(
        ours["sam.mask_decoder.iou_token.weight"],
        state["backbone.model.mask_decoder.iou_token.weight"],
    )


def test_wrong_key_is_reported_by_name(tmp_path):
    state = _public_state()
    key = "prompter.sparse_prompt_mlp.layers.1.weight"
    state["prompter.sparse_prompt_mlp.layers.9.weight"] = state.pop(key)
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ModelUnavailableError) as err:
        rr.build_rsrefseg2("test-tiny", checkpoint=path)
    msg = str(err.value)
    assert "missing keys prompter.sparse_prompt_mlp.layers.1.weight" in msg
    assert "unexpected keys prompter.sparse_prompt_mlp.layers.9.weight" in msg
    assert "\n" not in msg


def test_released_sam2_layout_loads_strictly_and_runs(tmp_path):
    """The released checkpoints' branch: SAM 2.1 (sam2 package) under peft LoRA."""
    pytest.importorskip("sam2")
    state = _public_state(5, "test-tiny-sam2")
    pre = "backbone.model.image_encoder.base_model.model.trunk.blocks.1.attn.qkv."
    assert pre + "lora_A.default.weight" in state and "backbone.model.no_mem_embed" in state
    assert not any(k.startswith("backbone.model.memory_attention") for k in state)
    path = tmp_path / "rsrefseg2-risbench.pth"
    torch.save({"state_dict": state}, path)
    model = rr.build_rsrefseg2("test-tiny-sam2", checkpoint=path)
    merged = state[pre + "base_layer.weight"] + (
        state[pre + "lora_B.default.weight"] @ state[pre + "lora_A.default.weight"]
    )
    ours = model.state_dict()
    torch.testing.assert_close(ours["sam.image_encoder.trunk.blocks.1.attn.qkv.weight"], merged)
    torch.testing.assert_close(
        ours["sam.sam_mask_decoder.iou_token.weight"],
        state["backbone.model.sam_mask_decoder.iou_token.weight"],
    )
    enc = model.encode_expressions(["the ship", "the pier"])
    with torch.no_grad():
        out = model(torch.rand(2, 3, 256, 256), enc)
    assert out.scores.shape == (2, 2) and out.mask_logits.shape == (2, 2, 64, 64)


def test_released_weights_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DRSEG_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError) as err:
        rr.build_rsrefseg2(checkpoint="rsrefseg2-rrsisd", cache_dir=tmp_path)
    assert "drseg models download rsrefseg2-rrsisd" in str(err.value)
    with pytest.raises(ModelUnavailableError, match="needs trained weights"):
        rr.build_rsrefseg2()


def test_sam_safetensors_loads_strictly_and_names_bad_keys(tmp_path):
    from safetensors.torch import save_file

    src = build_sam("test-tiny", seed=7)
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    state.pop("prompt_encoder.shared_embedding.positional_embedding")  # hub files keep one copy
    save_file(state, tmp_path / "sam.safetensors")
    got = build_sam("test-tiny", checkpoint=tmp_path / "sam.safetensors")
    torch.testing.assert_close(
        got.state_dict()["mask_decoder.iou_token.weight"], state["mask_decoder.iou_token.weight"]
    )
    state["mask_decoder.extra"] = torch.zeros(1)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ModelUnavailableError, match="unexpected keys mask_decoder.extra"):
        build_sam("test-tiny", checkpoint=tmp_path / "bad.safetensors")


def test_lora_sits_where_the_released_configs_put_it():
    model = rr.build_rsrefseg2("test-tiny")
    model.requires_grad_(True)
    rr.add_lora(model, r=4, alpha=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "sam.vision_encoder.layers.0.attn.qkv.lora_A.default.weight" in trainable
    assert "sam.vision_encoder.neck.conv2.lora_B.default.weight" in trainable
    assert "vision.encoder.layers.1.self_attn.q_proj.lora_A.default.weight" in trainable
    assert "text.head.lora_A.default.weight" in trainable
    assert "vision.head.mlp.fc1.lora_A.default.weight" in trainable
    # frozen: the encoders' own weights; trained in full: prompter, SAM decoder, logit scale
    assert not any(n.startswith(("vision.", "text.", "sam.vision_encoder.")) and "lora_" not in n
                   for n in trainable)  # fmt: skip
    assert "prompter.prompt_embedding" in trainable and "logit_scale" in trainable
    assert "sam.mask_decoder.iou_token.weight" in trainable


def test_refer_registry_agrees_with_the_model_and_builds_through_it():
    from drseg_cli.errors import UsageError
    from drseg_cli.model.factory import REFER_METHODS, build_referring_model

    method = REFER_METHODS["rsrefseg2"]
    assert method.models[0] == rr.DEFAULT_ARCH
    assert set(method.models) == set(rr.ARCHS)
    assert all(method.window[v] == rr.ARCHS[v].window for v in method.models)
    model = build_referring_model("rsrefseg2", "test-tiny")
    assert model.preprocess.tile_size == 128 and model.random_weights
    with pytest.raises(UsageError, match="unknown rsrefseg2 model 'nope'"):
        build_referring_model("rsrefseg2", "nope")
