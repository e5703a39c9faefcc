"""Model choice and scene options shared by ``segment``, ``evaluate``, ``train`` and the Python
API (``drseg_cli.api``): preset or trained checkpoint, DR-Seg overrides, ``SegmentConfig``."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from drseg_cli.errors import UsageError

if TYPE_CHECKING:
    from drseg_cli.classes import ClassSpec
    from drseg_cli.model.base import SegmentationModel
    from drseg_cli.pipeline.runtime import TilePredictor
    from drseg_cli.pipeline.segment import OutputPlan, SceneResult, SegmentConfig


def build_model_for(
    *,
    model: str,
    method: str,
    checkpoint: Path | None,
    clip_model: str | None,
    clip_pretrained: str | None,
    dino_model: str | None,
    dino_checkpoint: Path | None,
    drseg_options,
    device: str,
    clip_branch: bool = False,
    dglrsis: Sequence[str] | None = None,
):
    """The model to evaluate: a trained checkpoint, or a preset built by the model factory.

    Returns ``(model, info)``; ``info`` carries a checkpoint's classes and tile size.
    ``clip_branch``: a soft-guided checkpoint's tuned CLIP as DR-Seg's CLIP branch.
    """
    if checkpoint is not None:
        from drseg_cli.train.checkpoint import load_trained_model, read_checkpoint_info

        if drseg_options is not None and not clip_branch:
            raise UsageError("DR-Seg options (--rho, ...) come from the checkpoint; drop them")
        info = read_checkpoint_info(checkpoint)
        net = load_trained_model(
            checkpoint, device, clip_branch=clip_branch, drseg_options=drseg_options
        )
        return net, info
    if clip_branch:
        raise UsageError("--as-clip-branch needs a soft-guided --checkpoint")
    from drseg_cli.model.factory import build_model

    if method != "drseg" and drseg_options is not None:
        raise UsageError(
            "DR-Seg options (--rho, --k, ... --no-ugaf, --clip-baseline) need --method drseg"
        )
    dglrsis_options = None
    if dglrsis:
        if method != "dglrsis":
            raise UsageError("--dglrsis options need --method dglrsis")
        from drseg_cli.model.dglrsis.options import parse_options

        dglrsis_options = parse_options(dglrsis)
    net = build_model(
        model,
        method=method,
        clip_model=clip_model,
        clip_pretrained=clip_pretrained,
        dino_model=dino_model,
        dino_checkpoint=dino_checkpoint,
        device=device,
        drseg_options=drseg_options,
        dglrsis_options=dglrsis_options,
    )
    return net, {}


def tiling_defaults(overlap: float | None, blend: str | None, model=None) -> tuple[float, str]:
    """``--overlap``/``--blend`` as given, else the model's preferred tiling (its preprocess:
    SegEarth-OV's is overlap 0.5 with a flat window); a bad value is a one-line UsageError.
    Without a model (checking options before loading one) the defaults are drseg's."""
    from drseg_cli.model.base import Preprocess
    from drseg_cli.raster.tiling import BLEND_MODES

    prefer = model.preprocess if model is not None else Preprocess
    overlap = prefer.overlap if overlap is None else overlap  # (class attributes: defaults)
    blend = prefer.blend if blend is None else blend
    if not 0 <= overlap < 0.9:
        raise UsageError("--overlap: must be in [0, 0.9)")
    if blend not in BLEND_MODES:
        raise UsageError(f"--blend {blend!r}: choose one of {', '.join(BLEND_MODES)}")
    return overlap, blend


def background_option(threshold: float, background: str) -> str | None:
    """``--threshold``/``--background`` checked: the background class name, None for nodata."""
    if not 0.0 <= threshold < 1.0:
        raise UsageError(f"--threshold {threshold}: must be in [0, 1) (a probability)")
    name = background.strip()
    if not name:
        raise UsageError("--background: give a class name, or 'nodata'")
    return None if name.lower() == "nodata" else name


def drseg_options_from(values: dict, *, no_spsd: bool, no_pdgr: bool, no_ugaf: bool):
    """``DRSegOptions`` with the options given on the command line, or None if none were."""
    given = {name: value for name, value in values.items() if value is not None}
    given |= {
        n: False for n, off in (("spsd", no_spsd), ("pdgr", no_pdgr), ("ugaf", no_ugaf)) if off
    }
    if not given:
        return None
    from drseg_cli.model.drseg import DRSegOptions

    return DRSegOptions(**given)  # a bad value is a one-line UsageError


def segment_config(
    *,
    tile_size: int | None = None,
    bands: str | Sequence[int] | None = None,
    allow_no_crs: bool = False,
    percentiles: str | Sequence[float] = "2,98",
    batch_size: int = 0,
    no_cog: bool = False,
    probs_dtype: str = "uint8",
    min_area: float = 0.0,
    simplify: float = 0.0,
    dst_crs: str | None = None,
    overwrite: bool = False,
    logit_scale: int = 1,
    threshold: float = 0.0,
    background: str = "background",
    overlap: float | None = None,
    blend: str | None = None,
    aoi: str | None = None,
    aoi_crs: str | None = None,
) -> SegmentConfig:
    """``segment``'s scene options checked into a ``SegmentConfig`` (CLI and Python API alike):
    a bad value is a one-line UsageError before any model loads."""
    from drseg_cli.commands.segment import parse_int_list, parse_percentiles
    from drseg_cli.pipeline.segment import SegmentConfig

    if probs_dtype not in ("uint8", "float16"):
        raise UsageError("--probs-dtype: choose uint8 or float16")
    tiling_defaults(overlap, blend)  # a bad --overlap/--blend fails before any model loads
    if logit_scale < 1:
        raise UsageError(f"--logit-scale {logit_scale}: must be at least 1")
    if batch_size < 0:
        raise UsageError(f"--batch-size {batch_size}: must be 0 (from memory) or more")
    if not isinstance(bands, str) and bands is not None:
        bands = ",".join(str(b) for b in bands)
    if not isinstance(percentiles, str):
        percentiles = ",".join(str(p) for p in percentiles)
    if aoi is not None:  # bad WKT, an unreadable file: fail before any scene or model
        from drseg_cli.raster.aoi import read_aoi

        read_aoi(str(aoi), aoi_crs)
    return SegmentConfig(
        tile_size=tile_size,
        bands=parse_int_list(bands, "--bands"),
        allow_no_crs=allow_no_crs,
        percentiles=parse_percentiles(percentiles),
        batch_size=batch_size,
        cog=not no_cog,
        probs_dtype=probs_dtype,
        min_area=min_area,
        simplify=simplify,
        dst_crs=dst_crs,
        overwrite=overwrite,
        logit_scale=logit_scale,
        threshold=threshold,
        background=background_option(threshold, background),
        aoi=None if aoi is None else str(aoi),
        aoi_crs=None if aoi_crs is None else str(aoi_crs),
    )


@dataclasses.dataclass(frozen=True)
class ModelChoice:
    """Every option that selects and builds the model (and nothing else): what a built model
    depends on, so the Python API can reuse one while these stay the same."""

    model: str = "vit-b16"
    method: str = "drseg"
    checkpoint: Path | None = None
    clip_model: str | None = None
    clip_pretrained: str | None = None
    dino_model: str | None = None
    dino_checkpoint: Path | None = None
    rho: float | None = None
    k: int | None = None
    alpha: float | None = None
    steps: int | None = None
    gamma: float | None = None
    window: int | None = None
    tau: float | None = None
    clip_baseline: str | None = None
    no_spsd: bool = False
    no_pdgr: bool = False
    no_ugaf: bool = False
    as_clip_branch: bool = False  # soft-guided checkpoint: its tuned CLIP under DR-Seg
    dglrsis: tuple[str, ...] | None = None  # DGL-RSIS KEY=VALUE options

    def drseg_options(self):
        """The DR-Seg overrides given, as ``DRSegOptions`` (None if none were)."""
        names = ("rho", "k", "alpha", "steps", "gamma", "window", "tau", "clip_baseline")
        return drseg_options_from(
            {name: getattr(self, name) for name in names},
            no_spsd=self.no_spsd,
            no_pdgr=self.no_pdgr,
            no_ugaf=self.no_ugaf,
        )


def load_model(choice: ModelChoice, device: str):
    """The model ``choice`` names, built on ``device`` (a resolved torch device string)."""
    net, _ = build_model_for(
        model=choice.model,
        method=choice.method,
        checkpoint=choice.checkpoint,
        clip_model=choice.clip_model,
        clip_pretrained=choice.clip_pretrained,
        dino_model=choice.dino_model,
        dino_checkpoint=choice.dino_checkpoint,
        drseg_options=choice.drseg_options(),
        device=device,
        clip_branch=choice.as_clip_branch,
        dglrsis=choice.dglrsis,
    )
    return net


@dataclasses.dataclass
class Segmenter:
    """A model ready to segment scenes into given classes, and the runtime it chose."""

    net: SegmentationModel
    predictor: TilePredictor
    device: str
    precision: str  # fp32 | bf16 | fp16


def suggest_cpu_preset(choice: ModelChoice, device_type: str) -> None:
    """On a CPU, DR-Seg with a full-resolution DINO costs seconds a tile: name the CPU preset
    (once per run)."""
    from drseg_cli.model.factory import CPU_PRESET, get_preset
    from drseg_cli.raster.reader import warn_once

    if device_type != "cpu" or choice.method != "drseg" or choice.checkpoint is not None:
        return
    try:
        preset = get_preset(choice.model)
    except UsageError:  # a trained checkpoint or unknown name: not ours to suggest
        return
    # test models get their own CPU twin (both random), real ones the real CPU preset
    target = "test-tiny-cpu" if preset.random_weights else CPU_PRESET
    if preset.dino_downsample <= 1 and choice.dino_model is None:
        warn_once(
            f"DR-Seg on a CPU: --model {target} (DINO ViT-S/8 at half resolution) is "
            "about 4.5x faster per tile, at a cost in boundary quality (docs/METHOD.md §CPU preset)"
        )


def prepare_segmenter(
    choice: ModelChoice,
    class_specs: Sequence,
    config: SegmentConfig,
    *,
    device: str = "auto",
    precision: str = "auto",
    overlap: float | None = None,
    blend: str | None = None,
    compile_model: bool = False,
    channels_last: bool = False,
    warn: bool = True,
    load: Callable[[ModelChoice, str], SegmentationModel] = load_model,
    gpu_share: float = 1.0,
) -> Segmenter:
    """Device, precision and model for ``segment`` (CLI and Python API share it); completes
    ``config`` with the model's tiling and, if not given, a batch size from device memory.

    ``load`` builds the model (the API passes a cached one); ``gpu_share``: the fraction of
    the GPU this process has (Ray workers), which bounds the automatic batch size."""
    from drseg_cli.pipeline.runtime import (
        TilePredictor,
        auto_batch_size,
        resolve_device,
        resolve_precision,
    )
    from drseg_cli.pipeline.segment import tile_size_for

    torch_device = resolve_device(device)
    amp = resolve_precision(precision, torch_device)
    net = load(choice, str(torch_device))
    tile_size_for(config, net.preprocess.multiple, net.preprocess.tile_size)  # fail early
    config.overlap, config.blend = tiling_defaults(overlap, blend, net)
    if net.random_weights and warn:
        logging.getLogger("drseg").warning(
            "model %r has random weights: results are meaningless (for tests only)", choice.model
        )
    if warn:
        suggest_cpu_preset(choice, torch_device.type)
    predictor = TilePredictor(
        net,
        [c.prompt_names for c in class_specs],
        torch_device,
        amp,
        compile_model=compile_model,
        channels_last=channels_last,
    )
    if not config.batch_size:
        size = config.tile_size or net.preprocess.tile_size
        config.batch_size = auto_batch_size(torch_device, size, gpu_share)
    name = "fp32" if amp is None else str(amp).removeprefix("torch.")
    return Segmenter(net, predictor, str(torch_device), name)


@dataclasses.dataclass
class SegmentRunner:
    """A picklable recipe for segmenting scenes: calling it loads the model once
    (``prepare_segmenter``) and returns a ``SceneSegmenter``. The CLI calls it in its own
    process; ``--ray`` ships it to each Ray actor (``pipeline/distributed.py``), so both run
    the same code on the same settings and write the same pixels."""

    choice: ModelChoice
    class_specs: Sequence[ClassSpec]
    config: SegmentConfig
    device: str = "auto"
    precision: str = "auto"
    overlap: float | None = None
    blend: str | None = None
    compile_model: bool = False
    channels_last: bool = False
    warn: bool = True

    def __call__(self, gpu_share: float = 1.0) -> SceneSegmenter:
        config = dataclasses.replace(self.config)  # completed with the model's tiling
        segmenter = prepare_segmenter(
            self.choice,
            self.class_specs,
            config,
            device=self.device,
            precision=self.precision,
            overlap=self.overlap,
            blend=self.blend,
            compile_model=self.compile_model,
            channels_last=self.channels_last,
            warn=self.warn,
            gpu_share=gpu_share,
        )
        return SceneSegmenter(segmenter, self.class_specs, config)


@dataclasses.dataclass
class SceneSegmenter:
    """A loaded model that segments one scene per call (``SegmentRunner`` builds it)."""

    segmenter: Segmenter
    class_specs: Sequence[ClassSpec]
    config: SegmentConfig

    @property
    def info(self) -> dict:
        """What the run reports and fingerprints: device, precision, batch size, the model's
        tiling and DR-Seg options, the scene settings once completed by the model."""
        net, config = self.segmenter.net, self.config
        options = getattr(net, "options", None)
        return {
            "device": self.segmenter.device,
            "precision": self.segmenter.precision,
            "batch_size": config.batch_size,
            "drseg_options": dataclasses.asdict(options)
            if dataclasses.is_dataclass(options)
            else None,
            "scene": config.output_settings()
            | {"tile_size": config.tile_size or net.preprocess.tile_size},
        }

    def __call__(
        self,
        path: Path,
        plan: OutputPlan,
        replace: bool,
        *,
        progress: Callable[[int, int], None] | None = None,
        stage: Callable[[str], None] | None = None,
    ) -> SceneResult:
        """Segment ``path`` into ``plan``'s outputs (``replace``: existing ones may go)."""
        from drseg_cli.pipeline.segment import segment_scene

        net = self.segmenter.net
        return segment_scene(
            path,
            plan,
            self.segmenter.predictor,
            self.class_specs,
            dataclasses.replace(self.config, overwrite=replace),
            tile_multiple=net.preprocess.multiple,
            default_tile_size=net.preprocess.tile_size,
            progress=progress,
            stage=stage,
        )


def check_scene_plan(scene: Path, plan: OutputPlan, config: SegmentConfig) -> None:
    """Fail on a bad input or output of one scene now, before loading any model; clear the
    temp files a killed run left beside the outputs."""
    from drseg_cli.atomic import check_writable, remove_stale_temps
    from drseg_cli.pipeline.segment import check_plan_crs, scene_aoi_of
    from drseg_cli.raster.reader import inspect_raster

    info = inspect_raster(scene, config.bands, config.allow_no_crs)
    check_plan_crs(plan, info, config.dst_crs)
    scene_aoi_of(config, info)  # an AOI that is unreadable or misses the scene fails now
    for folder in {p.parent for p in plan.final_paths()}:
        make_folder(folder)  # a missing output folder is created (as -o OUTDIR/ is)
    check_writable(plan.final_paths(), config.overwrite)
    for folder in {p.parent for p in plan.final_paths()}:
        remove_stale_temps(folder)  # e.g. the accumulator of a killed run


def make_folder(folder: Path) -> None:
    """Create an output folder (and its parents) that is missing; one error line if it can't.
    An object-store prefix needs none (objects are named by their full key)."""
    from drseg_cli.errors import OutputError
    from drseg_cli.raster.vsi import check_writable_prefix, is_vsi

    if is_vsi(folder):
        check_writable_prefix(f"{folder}/")
        return

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the output folder ({exc.strerror})") from None
