"""``drseg refer``: the objects a sentence refers to, in a GeoTIFF of any size (docs/REFER.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from drseg_cli.commands import options as opt
from drseg_cli.commands._common import err_console, print_json, report_errors


@report_errors
def command(
    scene: Path = typer.Argument(..., help="Input GeoTIFF (any size)."),
    expression: str | None = typer.Argument(
        None, help='What to find, e.g. "the large white building next to the river".'
    ),
    output: list[Path] = typer.Option(
        ...,
        "-o",
        "--output",
        metavar="FILE",
        help="Mask (.tif, COG) and/or polygons (.gpkg/.geojson/.parquet); repeat for both.",
    ),
    expressions: Path | None = opt.expressions_file(),
    method: str = opt.refer_method(),
    model: str | None = opt.refer_model(),
    checkpoint: str | None = opt.refer_checkpoint(),
    dglrsis: list[str] | None = opt.dglrsis(),
    top_k: int = opt.top_k(),
    min_score: float = opt.min_score(),
    max_windows: int = opt.max_windows(),
    overlap: float | None = opt.overlap("0.25"),
    batch_size: int = opt.batch_size(1, "Windows per model call."),
    device: str = opt.device(),
    precision: str = opt.precision(),
    bands: str | None = opt.bands(),
    percentiles: str = opt.percentiles(),
    allow_no_crs: bool = opt.flag(
        "--allow-no-crs", help="Accept rasters without georeferencing.", panel=opt.INPUT
    ),
    overwrite: bool = opt.overwrite(),
    quiet: bool = opt.quiet(),
    json_: bool = opt.json_(),
) -> None:
    """Segment what each expression refers to: windows of the model's size are scored, the
    best are segmented, masks are merged across window seams into objects, and the --top-k
    best objects per expression are written as a class mask and/or polygons with
    expression, score and area_m2."""
    from drseg_cli.pipeline.refer import read_expressions

    texts = read_expressions(expression, expressions)
    result = run_refer(
        scene,
        texts,
        output,
        method=method,
        model=model,
        checkpoint=checkpoint,
        dglrsis=dglrsis,
        top_k=top_k,
        min_score=min_score,
        max_windows=max_windows,
        overlap=overlap,
        batch_size=batch_size,
        device=device,
        precision=precision,
        bands=bands,
        percentiles=percentiles,
        allow_no_crs=allow_no_crs,
        overwrite=overwrite,
        warn=not quiet,
    )
    if json_:
        print_json(result.to_dict())
        return
    if quiet:
        return
    found = ", ".join(f"{o['expression']!r} {o['score']:.3f}" for o in result.objects) or "none"
    Console(highlight=False, soft_wrap=True).print(
        f"{scene}: {len(result.objects)} object(s) ({found}); "
        f"{result.windows_run}/{result.windows_total} windows, {result.seconds:.2f} s → "
        + ", ".join(result.outputs.values()),
        markup=False,
    )


def run_refer(
    scene: Path,
    texts: list[str],
    outputs: list[Path],
    *,
    method: str,
    model: str | None,
    checkpoint: str | None,
    dglrsis: list[str] | tuple[str, ...] | None,
    top_k: int,
    min_score: float,
    max_windows: int,
    overlap: float | None,
    batch_size: int,
    device: str,
    precision: str,
    bands: str | None,
    percentiles: str,
    allow_no_crs: bool,
    overwrite: bool,
    warn: bool = True,
    load: Callable[..., Any] | None = None,
):  # -> ReferResult
    """One scene through ``refer_scene`` with the command's options: the CLI and the Python
    API (``drseg_cli.refer``) share it. ``load`` builds the model (the API's cache)."""
    from drseg_cli.errors import UsageError
    from drseg_cli.pipeline.refer import ReferConfig, refer_scene, split_outputs
    from drseg_cli.raster.reader import inspect_raster

    _, vector = split_outputs(outputs)
    if vector is not None and vector.suffix.lower() == ".shp":
        raise UsageError(f"{vector}: write referring polygons as .gpkg, .geojson or .parquet")
    band_list = _ints(bands, "--bands") if bands else None
    low, high = _ints(percentiles, "--percentiles", float)
    info = inspect_raster(scene, band_list, allow_no_crs=allow_no_crs)

    from drseg_cli.model.factory import build_referring_model
    from drseg_cli.pipeline.runtime import resolve_device, resolve_precision

    dev = resolve_device(device)
    extra = {}
    if dglrsis:
        if method != "dglrsis":
            raise UsageError("--dglrsis options need --method dglrsis")
        from drseg_cli.model.dglrsis.options import parse_options

        extra["options"] = parse_options(list(dglrsis))
    build = load or build_referring_model
    built = build(method, model, checkpoint=checkpoint, device=str(dev), **extra)
    if built.random_weights and warn:
        err_console.print("drseg: warning: random weights (test model): results are meaningless")
    config = ReferConfig(
        top_k=top_k,
        min_score=min_score,
        max_windows=max_windows,
        overlap=built.preprocess.overlap if overlap is None else overlap,
        batch_size=batch_size,
        percentiles=(low, high),
        overwrite=overwrite,
        device=str(dev),
        amp_dtype=resolve_precision(precision, dev),
    )
    return refer_scene(info, built, texts, outputs, config)


def _ints(text: str, name: str, kind: type = int) -> list:
    from drseg_cli.errors import UsageError

    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if name == "--percentiles" and (len(values) != 2 or not 0 <= values[0] < values[1] <= 100):
        raise UsageError(f"{name}: expected LOW,HIGH with 0 <= LOW < HIGH <= 100")
    return values
