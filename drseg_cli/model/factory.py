"""Model presets and ``build_model``: the one place that turns ``--model/--method`` into a model.

Presets (``drseg models list`` shows them with their files):

``vit-b16``   CLIP ViT-B/16 (OpenAI) + DINO ViT-B/8, 448 px tiles (default)
``vit-l14``   CLIP ViT-L/14 (OpenAI) + DINO ViT-B/8, 448 px tiles (448 = 32·14 = 56·8)
``vit-b16-cpu`` CLIP ViT-B/16 (OpenAI) + DINO ViT-S/8 on the tile at half resolution: DR-Seg
              on a CPU, ≈ 4.5× faster per tile than ``vit-b16`` (docs/METHOD.md §CPU preset)
``test-tiny`` tiny random CLIP + tiny random DINO, 224 px tiles, for tests only
``test-tiny-cpu`` ``test-tiny`` with ``vit-b16-cpu``'s half-resolution DINO, for tests only

Tile sizes are multiples of every patch size involved (lcm 16·8 → 16, lcm 14·8 → 56).
Models come back frozen (eval mode, no gradients) on the requested device.

Methods: ``drseg`` (DR-Seg on a CLIP baseline branch, ``DRSegOptions.clip_baseline``),
``clip`` (the ``clearclip`` baseline alone) and ``segearth`` (SegEarth-OV reproduced; its
224 px tiles unless ``tile_size`` is given). See :mod:`.clipseg` for the baselines.
``dglrsis``: DGL-RSIS mask classification (:mod:`.dglrsis`; ``dglrsis_options``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from drseg_cli.errors import UsageError
from drseg_cli.model.weights import TINY_CLIP, TINY_DINO

METHODS = ("drseg", "clip", "segearth", "dglrsis")
DEFAULT_PRESET = "vit-b16"
#: The preset ``drseg segment`` suggests for DR-Seg on a CPU.
CPU_PRESET = "vit-b16-cpu"


@dataclass(frozen=True)
class Preset:
    """A named backbone combination and its default tile size."""

    name: str
    clip_model: str
    clip_pretrained: str | None
    dino_model: str
    tile_size: int
    description: str
    random_weights: bool = False
    dino_downsample: int = 1  # DINO sees the tile box-averaged this many times smaller

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _presets() -> dict[str, Preset]:
    return {
        p.name: p
        for p in (
            Preset(
                "vit-b16",
                "ViT-B-16",
                "openai",
                "vit_base_patch8_224.dino",
                448,
                "CLIP ViT-B/16 (OpenAI) + DINO ViT-B/8 (default)",
            ),
            Preset(
                "vit-l14",
                "ViT-L-14",
                "openai",
                "vit_base_patch8_224.dino",
                448,
                "CLIP ViT-L/14 (OpenAI) + DINO ViT-B/8; 448 = 32·14 = 56·8",
            ),
            Preset(
                "vit-b16-cpu",
                "ViT-B-16",
                "openai",
                "vit_small_patch8_224.dino",
                448,
                "CLIP ViT-B/16 (OpenAI) + DINO ViT-S/8 at half resolution: DR-Seg on a CPU",
                dino_downsample=2,
            ),
            Preset(
                "test-tiny",
                TINY_CLIP,
                None,
                TINY_DINO,
                224,
                "tiny random CLIP + DINO for tests: results are meaningless",
                random_weights=True,
            ),
            Preset(
                "test-tiny-cpu",
                TINY_CLIP,
                None,
                TINY_DINO,
                224,
                "test-tiny with vit-b16-cpu's half-resolution DINO, for tests only",
                random_weights=True,
                dino_downsample=2,
            ),
        )
    }


def list_presets() -> list[Preset]:
    """Every preset, the default first."""
    return list(_presets().values())


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a UsageError naming the valid ones otherwise."""
    presets = _presets()
    if name not in presets:
        raise UsageError(f"unknown model preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]


#: The tiling each method prefers (tile edge, overlap), the tile edge None meaning the preset's:
#: the ``Preprocess`` its models are built with (clipseg.BASELINES, base.Preprocess). Kept here
#: too, free of torch, so that ``drseg info`` answers at once; a test checks the two agree.
METHOD_TILING: dict[str, tuple[int | None, float]] = {
    "drseg": (None, 0.25),
    "clip": (None, 0.25),
    "segearth": (224, 0.5),
    "dglrsis": (None, 0.25),
}


def default_tiling(preset: str = DEFAULT_PRESET, method: str = "drseg") -> tuple[int, float]:
    """Tile edge (px) and overlap a ``segment`` run of ``preset`` and ``method`` uses unless
    told otherwise, without building the model; UsageError for an unknown preset or method."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    tile, overlap = METHOD_TILING[method]
    return tile or get_preset(preset).tile_size, overlap


def build_model(
    preset: str = DEFAULT_PRESET,
    *,
    method: str = "clip",
    clip_model: str | None = None,
    clip_pretrained: str | Path | None = None,
    dino_model: str | None = None,
    dino_checkpoint: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    drseg_options: Any = None,
    random_weights: bool = False,
    tile_size: int | None = None,
    clip_attention: str | None = None,
    dglrsis_options: Any = None,
):  # -> SegmentationModel
    """A frozen segmentation model for ``preset`` and ``method`` (see ``METHODS``).

    Overrides replace the preset's CLIP model/weights (``clip_pretrained``: open_clip tag or
    a file), DINO model or DINO checkpoint file. ``random_weights`` builds the preset's
    full-size backbones with seeded random weights (benchmarks; nothing is loaded).
    ``clip_attention`` overrides the baseline's last-block attention (``qq``, ``csa``,
    ``segearth``...; see :mod:`.backbones`): e.g. ``segearth`` with ``csa`` is SCLIP's block
    under SegEarth-OV's head.
    """
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "dglrsis":
        from drseg_cli.model.dglrsis.model import build_dglrsis

        return build_dglrsis(
            preset,
            clip_model=clip_model,
            clip_pretrained=clip_pretrained,
            cache_dir=cache_dir,
            device=device,
            options=dglrsis_options,
            random_weights=random_weights,
            tile_size=tile_size,
        )
    p = get_preset(preset)
    from drseg_cli.model.backbones import load_clip, load_dino
    from drseg_cli.model.clipseg import ClipSegModel, get_baseline

    if method == "drseg":
        from drseg_cli.model.drseg import DRSegOptions

        drseg_options = drseg_options or DRSegOptions()
        baseline = get_baseline(drseg_options.clip_baseline)
    else:
        baseline = get_baseline("segearth" if method == "segearth" else "clearclip")

    random = random_weights or p.random_weights
    clip_name = clip_model or p.clip_model
    if random and clip_pretrained is None:
        clip_weights = None
    else:
        clip_weights = clip_pretrained if clip_pretrained is not None else p.clip_pretrained
    size = tile_size or (baseline.tile_size if method != "drseg" else None) or p.tile_size
    clip = load_clip(
        clip_name,
        clip_weights,
        cache_dir=cache_dir,
        device="cpu",
        attention=clip_attention or baseline.attention,
        templates=baseline.templates,
    )
    if method != "drseg":
        model = ClipSegModel.from_baseline(clip, baseline, tile_size=size)
    else:
        dino = load_dino(
            dino_model or p.dino_model,
            dino_checkpoint,
            pretrained=not random,
            cache_dir=cache_dir,
            device="cpu",
        )
        from drseg_cli.model.drseg import DRSegModel

        model = DRSegModel(
            clip, dino, drseg_options, tile_size=size, guide_downsample=p.dino_downsample
        )
    model.random_weights = bool(
        getattr(clip, "random_weights", False) or getattr(model, "random_weights", False)
    )
    model.eval().requires_grad_(False)
    return model.to(device)


# --------------------------------------------------------------------------- referring methods


@dataclass(frozen=True)
class ReferMethod:
    """One referring-expression method of ``drseg refer``: its variants and how to build it.

    ``build(model, checkpoint=..., cache_dir=..., random_weights=..., device=...)`` returns a
    frozen ``ReferringModel`` (model/base.py); ``models`` lists its variant names, the
    first the default; ``window``: the window edge of each variant, known without torch.
    """

    name: str
    description: str
    models: tuple[str, ...]
    window: dict[str, int]
    builder: str  # "module:function", imported when the method is built

    def build(self, model: str | None = None, **kwargs: Any):  # -> ReferringModel
        import importlib

        module, _, fn = self.builder.partition(":")
        variant = model or self.models[0]
        if variant not in self.models:
            raise UsageError(
                f"unknown {self.name} model {variant!r}; choose one of {', '.join(self.models)}"
            )
        return getattr(importlib.import_module(module), fn)(variant, **kwargs)


#: ``drseg refer --method``: one entry per method, the default first.
REFER_METHODS: dict[str, ReferMethod] = {
    m.name: m
    for m in (
        ReferMethod(
            "rsrefseg2",
            "RSRefSeg 2: SigLIP localisation → cascaded prompter → SAM (trained weights)",
            (
                "siglip2-so400m-sam2.1-hiera-large",
                "siglip2-so400m-sam-vit-large",
                "test-tiny",
                "test-tiny-sam2",
            ),
            {
                "siglip2-so400m-sam2.1-hiera-large": 1024,
                "siglip2-so400m-sam-vit-large": 1024,
                "test-tiny": 128,
                "test-tiny-sam2": 256,
            },
            "drseg_cli.model.rsrefseg2:build_rsrefseg2",
        ),
        ReferMethod(
            "dglrsis",
            "DGL-RSIS: proposals, cross-scale Grad-CAM + modifier priors (training-free, CLIP)",
            ("vit-b16", "vit-l14", "test-tiny"),
            {"vit-b16": 448, "vit-l14": 448, "test-tiny": 224},
            "drseg_cli.model.dglrsis.model:build_dglrsis_refer",
        ),
    )
}
DEFAULT_REFER_METHOD = "rsrefseg2"


def get_refer_method(name: str) -> ReferMethod:
    """The referring method called ``name``; a UsageError naming the valid ones otherwise."""
    if name not in REFER_METHODS:
        raise UsageError(
            f"unknown referring method {name!r}; choose one of {', '.join(REFER_METHODS)}"
        )
    return REFER_METHODS[name]


def build_referring_model(
    method: str = DEFAULT_REFER_METHOD, model: str | None = None, **kwargs: Any
):  # -> ReferringModel
    """A frozen ``ReferringModel`` of ``method`` (``REFER_METHODS``), variant ``model``;
    ``kwargs`` (checkpoint, cache_dir, random_weights, device...) go to the method's builder."""
    return get_refer_method(method).build(model, **kwargs)
