"""SAM (Segment Anything) built through ``transformers``' ``SamModel``, reusable by any method.

``build_sam(name)`` returns a ``transformers.SamModel`` for one of the released SAM 1 configs
(``facebook/sam-vit-base``, ``-large``, ``-huge``; the hub's ``model.safetensors``, loaded
strictly through the weights registry/cache/offline machinery of :mod:`.weights`) or for
``test-tiny`` (a tiny random SAM: 128 px input, 8×8 image embedding, 32×32 low-res masks)
built by the same code. ``random_weights=True`` builds a full-size config with seeded random
weights (benchmarks). Nothing here reads a file except through ``weights.resolve``.

The model comes back in eval mode; callers decide about gradients (LoRA fine-tuning).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drseg_cli.errors import ModelUnavailableError, UsageError

if TYPE_CHECKING:
    from transformers import SamConfig, SamModel

#: The tiny random SAM used by tests (never downloaded).
TINY_SAM = "test-tiny"
#: SAM's own input normalisation (ImageNet statistics, images in [0, 1]).
SAM_MEAN = (0.485, 0.456, 0.406)
SAM_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SamArch:
    """The vision-encoder shape of one released SAM 1 model (the rest is SAM's default)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    weights: str | None = None  # registry name in model/weights.py


#: Released SAM 1 models (Kirillov et al. 2023; the ``facebook/sam-vit-*`` hub configs).
SAM_ARCHS: dict[str, SamArch] = {
    "facebook/sam-vit-base": SamArch(768, 12, 12, (2, 5, 8, 11), weights="facebook/sam-vit-base"),
    "facebook/sam-vit-large": SamArch(
        1024, 24, 16, (5, 11, 17, 23), weights="facebook/sam-vit-large"
    ),
    "facebook/sam-vit-huge": SamArch(
        1280, 32, 16, (7, 15, 23, 31), weights="facebook/sam-vit-huge"
    ),
    TINY_SAM: SamArch(32, 2, 2, (1,), image_size=128),
}


def sam_names() -> list[str]:
    return list(SAM_ARCHS)


def sam_config(name: str) -> SamConfig:
    """The ``SamConfig`` of ``name`` (see ``SAM_ARCHS``); UsageError naming the valid ones."""
    from transformers import SamConfig

    if name not in SAM_ARCHS:
        raise UsageError(f"unknown SAM model {name!r}; choose one of {', '.join(SAM_ARCHS)}")
    a = SAM_ARCHS[name]
    if name == TINY_SAM:
        vision = dict(
            hidden_size=a.hidden_size,
            num_hidden_layers=a.num_hidden_layers,
            num_attention_heads=a.num_attention_heads,
            global_attn_indexes=list(a.global_attn_indexes),
            image_size=a.image_size,
            patch_size=16,
            output_channels=32,
            mlp_dim=64,
            window_size=4,
            num_pos_feats=16,
        )
        prompt = dict(hidden_size=32, image_size=a.image_size, patch_size=16)
        decoder = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64)
        decoder["iou_head_hidden_dim"] = 32
        return SamConfig(
            vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder
        )
    vision = dict(
        hidden_size=a.hidden_size,
        num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads,
        global_attn_indexes=list(a.global_attn_indexes),
        image_size=a.image_size,
    )
    return SamConfig(vision_config=vision)


def build_sam(
    name: str = "facebook/sam-vit-base",
    *,
    checkpoint: str | Path | None = None,
    random_weights: bool = False,
    cache_dir: str | Path | None = None,
    allow_download: bool = True,
    seed: int = 0,
) -> SamModel:
    """A ``transformers.SamModel`` for ``name``: released weights (cache → download → clear
    error), ``checkpoint`` (a local safetensors/torch file of the same layout), or random
    weights (``test-tiny`` always; any config with ``random_weights``)."""
    import torch
    from transformers import SamModel

    config = sam_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SamModel(config)
    model.eval()
    if checkpoint is None and (random_weights or name == TINY_SAM):
        return model
    from drseg_cli.model import weights

    spec = SAM_ARCHS[name].weights
    if checkpoint is None and spec is None:
        raise ModelUnavailableError(f"SAM model {name} has no released weights")
    path = weights.resolve(spec, checkpoint, cache=cache_dir, allow_download=allow_download)
    load_sam_state(model, weights.read_checkpoint(path), str(path))
    return model


def load_sam_state(model: SamModel, state: Any, where: str) -> None:
    """Load a SAM state dict strictly (hub safetensors or a ``model.``-prefixed pickle);
    a ModelUnavailableError naming the keys that do not fit."""
    from drseg_cli.model import weights

    state = weights.unwrap_state_dict(state, ("state_dict", "model"), lambda: where)
    state = weights.strip_prefixes(state, ("module.", "sam."))
    # The prompt encoder shares SAM's positional embedding; files may carry either copy.
    shared = "shared_image_embedding.positional_embedding"
    tied = "prompt_encoder.shared_embedding.positional_embedding"
    if shared in state and tied not in state:
        state[tied] = state[shared]
    if tied in state and shared not in state:
        state[shared] = state[tied]
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        detail = weights.describe_key_mismatch(missing, unexpected)
        raise ModelUnavailableError(f"{where}: not a SAM checkpoint of this model ({detail})")
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        k = bad[0]
        raise ModelUnavailableError(
            f"{where}: {k} has shape {tuple(state[k].shape)}, the model expects "
            f"{tuple(own[k].shape)} (a different SAM size?)"
        )
    model.load_state_dict(state, strict=True)


def image_embeddings(sam: SamModel, images: Any) -> Any:
    """SAM image embeddings ``[B, 256, h, w]`` for ``images`` already normalised and resized
    to SAM's input size; what a caller then feeds ``sam.mask_decoder`` (or ``sam(...)``)."""
    return sam.vision_encoder(images).last_hidden_state


# ----------------------------------------------------------------------------- SAM 2.1


@dataclass(frozen=True)
class Sam2Arch:
    """A SAM 2.1 model of the ``sam2`` package: its hydra config and overrides."""

    config: str
    overrides: tuple[str, ...] = ()
    weights: str | None = None


#: SAM 2.1 image models (the public RSRefSeg 2 configs use ``facebook/sam2.1-hiera-large``).
TINY_SAM2 = "sam2-test-tiny"
SAM2_ARCHS: dict[str, Sam2Arch] = {
    "facebook/sam2.1-hiera-large": Sam2Arch(
        "configs/sam2.1/sam2.1_hiera_l.yaml", weights="facebook/sam2.1-hiera-large"
    ),
    "facebook/sam2.1-hiera-base-plus": Sam2Arch("configs/sam2.1/sam2.1_hiera_b+.yaml"),
    "facebook/sam2.1-hiera-small": Sam2Arch("configs/sam2.1/sam2.1_hiera_s.yaml"),
    "facebook/sam2.1-hiera-tiny": Sam2Arch("configs/sam2.1/sam2.1_hiera_t.yaml"),
    # Hiera of width 8 and 6 blocks at 256 px (16×16 embedding, 64² mask input): tests only.
    TINY_SAM2: Sam2Arch(
        "configs/sam2.1/sam2.1_hiera_t.yaml",
        (
            "++model.image_size=256",
            "++model.image_encoder.trunk.embed_dim=8",
            "++model.image_encoder.trunk.num_heads=1",
            "++model.image_encoder.trunk.stages=[1,2,2,1]",
            "++model.image_encoder.trunk.global_att_blocks=[2,4]",
            "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]",
        ),
    ),
}
#: The parts of SAM 2 an image model uses (the public code deletes the video memory parts).
SAM2_USED = ("no_mem_embed", "image_encoder", "sam_mask_decoder", "sam_prompt_encoder")


def is_sam2(name: str) -> bool:
    return name in SAM2_ARCHS


def build_sam2_image_model(
    name: str,
    *,
    checkpoint: str | Path | None = None,
    random_weights: bool = False,
    cache_dir: str | Path | None = None,
    allow_download: bool = True,
    seed: int = 0,
) -> Any:
    """A SAM 2.1 ``SAM2Base`` (``sam2`` package) without its video memory modules; weights
    from the registry (Meta's ``{"model": …}`` file) unless random."""
    import torch

    if name not in SAM2_ARCHS:
        raise UsageError(f"unknown SAM 2 model {name!r}; choose one of {', '.join(SAM2_ARCHS)}")
    try:
        from sam2.build_sam import build_sam2
    except ImportError:
        raise ModelUnavailableError(
            f"{name} needs the sam2 package: pip install 'drseg[refer]'"
        ) from None
    arch = SAM2_ARCHS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_sam2(
            arch.config,
            None,
            device="cpu",
            mode="eval",
            hydra_overrides_extra=list(arch.overrides),
            apply_postprocessing=False,
        )
    for part in {n.split(".")[0] for n, _ in model.named_parameters()} - set(SAM2_USED):
        delattr(model, part)
    if checkpoint is None and (random_weights or arch.weights is None):
        return model
    from drseg_cli.model import weights

    path = weights.resolve(arch.weights, checkpoint, cache=cache_dir, allow_download=allow_download)
    state = weights.unwrap_state_dict(weights.read_checkpoint(path), ("model",), lambda: str(path))
    state = {k: v for k, v in state.items() if k.split(".")[0] in SAM2_USED}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        detail = weights.describe_key_mismatch(list(missing), list(unexpected))
        raise ModelUnavailableError(f"{path}: not a SAM 2.1 checkpoint of {name} ({detail})")
    return model
