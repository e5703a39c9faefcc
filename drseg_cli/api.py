"""Python API for notebooks and scripts: ``segment``, ``refer`` and ``vectorize`` with the
options of ``drseg segment``, ``drseg refer`` and ``drseg vectorize``.

The options, their checks and the model set-up are the CLI's own (``commands/_model.py``);
errors are raised as the ``DrsegError`` whose message the CLI prints. The last built model
is kept, so calling ``segment`` again with the same model options does not rebuild it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drseg_cli.commands._model import (
    ModelChoice,
    check_scene_plan,
    load_model,
    prepare_segmenter,
    segment_config,
)
from drseg_cli.errors import UsageError

if TYPE_CHECKING:
    import numpy as np
    from affine import Affine

    from drseg_cli.model.base import SegmentationModel
    from drseg_cli.pipeline.segment import SceneResult
    from drseg_cli.raster.vectorize import VectorSummary

__all__ = ["ReferApiResult", "SegmentResult", "clear_model_cache", "refer", "segment", "vectorize"]

#: ``segment``'s keyword options and their defaults: ``drseg segment``'s options of the same
#: name (batch-only ones left out). ``tests/test_api.py`` checks them against the CLI.
SCENE_OPTIONS: dict[str, Any] = {
    "tile_size": None,
    "bands": None,
    "allow_no_crs": False,
    "percentiles": "2,98",
    "batch_size": 0,
    "no_cog": False,
    "probs_dtype": "uint8",
    "min_area": 0.0,
    "simplify": 0.0,
    "dst_crs": None,
    "overwrite": False,
    "logit_scale": 1,
    "threshold": 0.0,
    "background": "background",
    "overlap": None,
    "blend": None,
    "aoi": None,
    "aoi_crs": None,
}
MODEL_OPTIONS: dict[str, Any] = {f.name: f.default for f in fields(ModelChoice)}
RUNTIME_OPTIONS: dict[str, Any] = {
    "device": "auto",
    "precision": "auto",
    "compile_model": False,
    "channels_last": False,
    "quiet": False,
}
OPTIONS = SCENE_OPTIONS | MODEL_OPTIONS | RUNTIME_OPTIONS


@dataclass
class SegmentResult:
    """What one ``segment`` call produced: files written, the mask's class names and, when
    asked for (or when nothing is written), the arrays read back from the outputs."""

    input: Path
    class_names: list[str]  # mask value i is class_names[i]
    outputs: dict[str, Path] = field(default_factory=dict)  # kind (mask, vector...) → file
    mask: np.ndarray | None = None  # [H, W] uint8 class values (255: nodata)
    probs: np.ndarray | None = None  # [K, H, W] per-class probabilities (as written)
    uncertainty: np.ndarray | None = None  # [H, W]
    polygons: Any = None  # GeoDataFrame of the vector output (read back like the arrays)
    proposals: Any = None  # GeoDataFrame of the per-proposal polygons (``proposals=``)
    crs: str | None = None
    transform: Affine | None = None
    summary: SceneResult | None = None  # tiles, size, seconds, pixels per class


_cached: tuple[tuple, SegmentationModel] | None = None


def clear_model_cache() -> None:
    """Forget the model kept between calls (frees its memory)."""
    global _cached
    _cached = None
    _REFER_CACHE.clear()


def _identity(value: object) -> object:
    """A weights file by path, size and mtime (a replaced file is a new model); else as is."""
    if value is not None and Path(str(value)).is_file():
        stat = Path(str(value)).stat()
        return (str(Path(str(value)).resolve()), stat.st_size, stat.st_mtime_ns)
    return value


def _cached_model(choice: ModelChoice, device: str) -> SegmentationModel:
    """The model for ``choice`` on ``device``: the last one built if they are the same."""
    global _cached
    key = (
        tuple((f.name, _identity(getattr(choice, f.name))) for f in fields(ModelChoice)),
        device,
    )
    if _cached is not None and _cached[0] == key:
        return _cached[1]
    _cached = None  # release the old model before building the next
    net = load_model(choice, device)
    _cached = (key, net)
    return net


def _settings(config: str | Path | None, given: dict[str, Any]) -> dict[str, Any]:
    """Options in force: given ones, else the ``config`` file's (``drseg tune``), else the
    defaults; an unknown name is a UsageError listing the known ones."""
    from drseg_cli.commands._config import option_defaults, read_config

    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise UsageError(
            f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(OPTIONS))}"
        )
    from_file = option_defaults(read_config(Path(config))) if config is not None else {}
    return OPTIONS | from_file | {k: v for k, v in given.items() if v is not None}


def _extra_path(
    value: str | Path | bool | None, base: Path, suffix: str, ext: str = ".tif"
) -> Path | None:
    """``probs=``/``uncertainty=``/``proposals=``: a file name, True (beside ``base``), or
    None/False."""
    if value is None or value is False:
        return None
    if value is True:
        return base.with_name(f"{base.stem.removesuffix('_mask')}_{suffix}{ext}")
    return Path(value)


def _read_raster(path: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as ds:
        return ds.read()


def segment(
    image: str | Path,
    classes: str | list[str],
    output: str | Path | None = None,
    *,
    model: str | None = None,
    method: str | None = None,
    device: str | None = None,
    precision: str | None = None,
    config: str | Path | None = None,
    return_array: bool = False,
    vector: bool = False,
    probs: str | Path | bool | None = None,
    uncertainty: str | Path | bool | None = None,
    proposals: str | Path | bool | None = None,
    **options: Any,
) -> SegmentResult:
    """Segment one scene into ``classes`` like ``drseg segment``, with its options as keywords
    (``rho=0.7``, ``tile_size=448``, ``threshold=0.3``...; ``config`` a ``drseg tune`` file).

    ``output``: a ``.tif`` mask or a ``.gpkg/.shp/.geojson/.parquet`` vector file; without it
    nothing is written and the arrays (and polygons, with ``vector=True``) are returned.
    ``probs``/``uncertainty``: a file name, or True (beside the output). ``proposals``
    (``method="dglrsis"``): the classified mask proposals as polygons, a file name or True
    (``<stem>_proposals.gpkg`` beside the output); read back as ``result.proposals``. Errors
    are the ``DrsegError`` subclasses with the CLI's one-line messages.
    """
    from drseg_cli.classes import parse_classes
    from drseg_cli.pipeline.batch import expand_inputs
    from drseg_cli.pipeline.segment import OutputPlan, class_table, segment_scene

    given = dict(options, model=model, method=method, device=device, precision=precision)
    opts = _settings(config, given)
    if isinstance(classes, list | tuple):
        classes = ",".join(classes)
    class_specs = parse_classes(classes)
    scene_config = segment_config(**{k: opts[k] for k in SCENE_OPTIONS})
    mask_names, _ = class_table(
        [c.name for c in class_specs], scene_config.threshold, scene_config.background
    )
    scenes = expand_inputs([image])
    if len(scenes) != 1:
        raise UsageError(f"{image}: segment() takes one scene, this names {len(scenes)}")
    scene = scenes[0]
    with tempfile.TemporaryDirectory(prefix="drseg-api-") as tmp:
        in_memory = output is None
        if in_memory:
            target = Path(tmp) / f"{scene.stem}_mask.tif"
        else:
            target = Path(output)
            if not target.suffix:
                raise UsageError(f"{target}: give a file (.tif or .gpkg...), not a folder")
        if in_memory:  # extras too stay in the temporary folder
            probs, uncertainty = bool(probs), bool(uncertainty)
            proposals = bool(proposals)
        from drseg_cli.commands.options import check_proposals

        check_proposals(proposals or None, opts["method"])
        plan = OutputPlan.from_output(
            target,
            vector=vector,
            probs=_extra_path(probs, target, "probs"),
            uncertainty=_extra_path(uncertainty, target, "uncertainty"),
            proposals=_extra_path(proposals, target, "proposals", ".gpkg"),
        )
        check_scene_plan(scene, plan, scene_config)
        choice = {k: opts[k] for k in MODEL_OPTIONS}
        for name in ("checkpoint", "dino_checkpoint"):  # files, as typer hands them over
            choice[name] = None if choice[name] is None else Path(choice[name])
        pairs = choice["dglrsis"]  # DGL-RSIS KEY=VALUE options: one string or several
        if pairs:
            choice["dglrsis"] = (pairs,) if isinstance(pairs, str) else tuple(pairs)
        segmenter = prepare_segmenter(
            ModelChoice(**choice),
            class_specs,
            scene_config,
            device=opts["device"],
            precision=opts["precision"],
            overlap=opts["overlap"],
            blend=opts["blend"],
            compile_model=opts["compile_model"],
            channels_last=opts["channels_last"],
            warn=not opts["quiet"],
            load=_cached_model,
        )
        summary = segment_scene(
            scene,
            plan,
            segmenter.predictor,
            class_specs,
            scene_config,
            tile_multiple=segmenter.net.preprocess.multiple,
            default_tile_size=segmenter.net.preprocess.tile_size,
        )
        result = SegmentResult(
            input=scene,
            class_names=mask_names,
            outputs={} if in_memory else {k: Path(v) for k, v in summary.outputs.items()},
            crs=summary.crs,
            summary=summary,
        )
        if in_memory or return_array:
            _read_back(result, plan)
    return result


def _read_back(result: SegmentResult, plan: Any) -> None:
    """Fill ``result``'s arrays (and polygons) from the files just written."""
    import rasterio

    if plan.mask is not None:
        with rasterio.open(plan.mask) as ds:
            result.mask, result.transform = ds.read(1), ds.transform
    if plan.probs is not None:
        result.probs = _read_raster(plan.probs)
    if plan.uncertainty is not None:
        result.uncertainty = _read_raster(plan.uncertainty)[0]
    if plan.vector is not None:
        result.polygons = _read_layer(plan.vector)
    if plan.proposals is not None:
        result.proposals = _read_layer(plan.proposals)


def _read_layer(path: Path) -> Any:
    """The polygon layer of a file drseg wrote (a GeoPackage's style table left aside)."""
    import geopandas
    import pyogrio

    if path.suffix.lower() == ".parquet":
        return geopandas.read_parquet(path)
    layers = [name for name, _ in pyogrio.list_layers(path) if name != "layer_styles"]
    return geopandas.read_file(path, layer=layers[0])


#: ``refer``'s keyword options and their defaults: ``drseg refer``'s options of the same name.
REFER_OPTIONS: dict[str, Any] = {
    "method": "rsrefseg2",
    "model": None,
    "checkpoint": None,
    "dglrsis": None,
    "top_k": 1,
    "min_score": 0.0,
    "max_windows": 16,
    "overlap": None,
    "batch_size": 1,
    "device": "auto",
    "precision": "auto",
    "bands": None,
    "percentiles": "2,98",
    "allow_no_crs": False,
    "overwrite": False,
    "quiet": False,
}
_REFER_CACHE: dict[tuple, Any] = {}


@dataclass
class ReferApiResult:
    """What one ``refer`` call produced: files written, the objects found (expression, score,
    area_m2, bounding boxes) and, when asked for (or when nothing is written), the class mask
    (value i + 1 = expression i, 0 background, 255 nodata) and the polygons read back."""

    input: Path
    expressions: list[str]
    objects: list[dict[str, Any]]
    outputs: dict[str, Path] = field(default_factory=dict)
    mask: np.ndarray | None = None
    polygons: Any = None
    transform: Affine | None = None
    summary: Any = None  # the pipeline's ReferResult (windows run, seconds...)


def _cached_refer_model(method: str, model: str | None, **kwargs: Any):  # -> ReferringModel
    """The last referring model built with these arguments, else a new one (replacing it)."""
    from drseg_cli.model.factory import build_referring_model

    key = (method, model, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
    if key not in _REFER_CACHE:
        _REFER_CACHE.clear()
        _REFER_CACHE[key] = build_referring_model(method, model, **kwargs)
    return _REFER_CACHE[key]


def refer(
    image: str | Path,
    expressions: str | list[str],
    output: str | Path | list[str | Path] | None = None,
    *,
    return_array: bool = False,
    **options: Any,
) -> ReferApiResult:
    """Find what ``expressions`` refer to in one scene like ``drseg refer``, with its options
    as keywords (``method="dglrsis"``, ``top_k=3``, ``min_score=0.2``...).

    ``output``: a ``.tif`` mask and/or a ``.gpkg/.geojson/.parquet`` polygon file (a list for
    both); without it nothing is written and the mask and polygons are returned. Errors are
    the ``DrsegError`` subclasses with the CLI's one-line messages.
    """
    from drseg_cli.commands.refer import run_refer

    unknown = sorted(set(options) - set(REFER_OPTIONS))
    if unknown:
        raise UsageError(f"refer() got unknown option(s): {', '.join(unknown)}")
    opts = REFER_OPTIONS | options
    texts = [expressions] if isinstance(expressions, str) else list(expressions)
    pairs = opts["dglrsis"]
    if pairs:
        opts["dglrsis"] = (pairs,) if isinstance(pairs, str) else tuple(pairs)
    scene = Path(image)
    with tempfile.TemporaryDirectory(prefix="drseg-api-") as tmp:
        in_memory = output is None
        if in_memory:
            targets = [
                Path(tmp) / f"{scene.stem}_refer.tif",
                Path(tmp) / f"{scene.stem}_refer.gpkg",
            ]
        else:
            targets = [Path(o) for o in (output if isinstance(output, list | tuple) else [output])]
        summary = run_refer(
            scene,
            texts,
            targets,
            warn=not opts.pop("quiet"),
            load=_cached_refer_model,
            **opts,
        )
        result = ReferApiResult(
            input=scene,
            expressions=summary.expressions,
            objects=summary.objects,
            outputs={} if in_memory else {k: Path(v) for k, v in summary.outputs.items()},
            summary=summary,
        )
        if in_memory or return_array:
            for path in targets:
                if path.suffix.lower() in (".tif", ".tiff"):
                    import rasterio

                    with rasterio.open(path) as ds:
                        result.mask, result.transform = ds.read(1), ds.transform
                else:
                    import geopandas

                    result.polygons = geopandas.read_file(path)
    return result


def vectorize(
    mask: str | Path,
    output: str | Path,
    *,
    score: str | Path | None = None,
    min_area: float = 0.0,
    simplify: float = 0.0,
    dst_crs: str | None = None,
    overwrite: bool = False,
) -> VectorSummary:
    """Polygons of a drseg mask, like ``drseg vectorize`` (same options, same checks and
    errors): one polygon per region with class, geodesic area and mean score, styled."""
    from drseg_cli.raster.vectorize import open_mask, vector_format, vectorize_mask

    mask, output = Path(mask), Path(output)
    vector_format(output)  # an unknown extension fails before anything is read
    open_mask(mask).close()  # exists, readable, one uint8 band — or a one-line error
    return vectorize_mask(
        mask,
        output,
        score_path=None if score is None else Path(score),
        min_area=min_area,
        simplify=simplify,
        overwrite=overwrite,
        dst_crs=dst_crs,
    )
