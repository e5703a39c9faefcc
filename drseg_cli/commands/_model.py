"""Model choice shared by ``segment``, ``evaluate`` and ``train``: preset or trained checkpoint,
DR-Seg option overrides from the command line."""

from __future__ import annotations

from pathlib import Path

from drseg_cli.errors import UsageError


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
):
    """The model to evaluate: a trained checkpoint, or a preset built by the model factory.

    Returns ``(model, info)``; ``info`` carries a checkpoint's classes and tile size.
    """
    if checkpoint is not None:
        from drseg_cli.train.checkpoint import load_trained_model, read_checkpoint_info

        if drseg_options is not None:
            raise UsageError("DR-Seg options (--rho, ...) come from the checkpoint; drop them")
        info = read_checkpoint_info(checkpoint)
        return load_trained_model(checkpoint, device), info
    from drseg_cli.model.factory import build_model

    if method != "drseg" and drseg_options is not None:
        raise UsageError(
            "DR-Seg options (--rho, --k, ... --no-ugaf, --clip-baseline) need --method drseg"
        )
    net = build_model(
        model,
        method=method,
        clip_model=clip_model,
        clip_pretrained=clip_pretrained,
        dino_model=dino_model,
        dino_checkpoint=dino_checkpoint,
        device=device,
        drseg_options=drseg_options,
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
