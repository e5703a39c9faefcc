"""``drseg segment``: classes in plain words → georeferenced mask and/or polygons."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path

import typer

from drseg_cli import __version__
from drseg_cli.commands._common import err_console, print_json, report_errors
from drseg_cli.commands._config import config_option
from drseg_cli.errors import UsageError


def parse_int_list(text: str | None, option: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UsageError(f"{option}: expected comma-separated integers, got {text!r}") from None


def parse_percentiles(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--percentiles: expected 'LOW,HIGH', got {text!r}") from None
    if not 0 <= low < high <= 100:
        raise UsageError(f"--percentiles: need 0 <= LOW < HIGH <= 100, got {text!r}")
    return low, high


def default_output(input_path: Path) -> Path:
    return Path(f"{input_path.stem}_mask.tif")


class _Progress:
    """A rich progress bar on a terminal; silent otherwise (scripts, --quiet, --json)."""

    def __init__(self, enabled: bool, label: str) -> None:
        self.bar, self.label, self.task = None, label, None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                ProgressColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.text import Text

            class TilesPerSecond(ProgressColumn):
                def render(self, task) -> Text:
                    return Text(f"{task.speed:.2f} tiles/s" if task.speed else "… tiles/s")

            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("tiles"),
                TilesPerSecond(),
                TimeRemainingColumn(),
                console=err_console,
                transient=True,
            )

    def __enter__(self) -> _Progress:
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar:
            self.bar.stop()

    def __call__(self, advance: int, total: int) -> None:
        if self.bar is None:
            return
        if self.task is None:
            self.task = self.bar.add_task(self.label, total=total)
        self.bar.update(self.task, advance=advance)


@report_errors
def command(
    inputs: list[str] = typer.Argument(..., help="Files, folders, globs, URLs, STAC Items."),
    classes: str = typer.Option(
        ..., "--classes", "-c", help="'road,building:house|roof,water' or a class file."
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="*.tif mask, or *.gpkg/.shp/.geojson/.parquet polygons."
    ),
    vector: bool = typer.Option(False, "--vector", help="Also write polygons (.gpkg)."),
    config: Path | None = config_option(),
    model: str = typer.Option("vit-b16", "--model", "-m", help="Model preset (drseg models)."),
    method: str = typer.Option("drseg", "--method", help="drseg | clip | segearth."),
    clip_model: str | None = typer.Option(None, help="open_clip model name override."),
    clip_pretrained: str | None = typer.Option(None, help="open_clip weights tag or file."),
    dino_model: str | None = typer.Option(None, help="timm DINO model name override."),
    dino_checkpoint: Path | None = typer.Option(None, help="Local DINO checkpoint file."),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="A trained model (drseg train: run/best.pt)."
    ),
    rho: float | None = typer.Option(None, help="DR-Seg semantic channel ratio."),
    k: int | None = typer.Option(None, "--k", help="DR-Seg graph sparsity (neighbours)."),
    alpha: float | None = typer.Option(None, help="DR-Seg propagation strength."),
    steps: int | None = typer.Option(None, help="DR-Seg propagation steps."),
    gamma: float | None = typer.Option(None, help="DR-Seg fusion temperature."),
    window: int | None = typer.Option(None, help="DR-Seg graph search radius (DINO patches)."),
    tau: float | None = typer.Option(None, help="DR-Seg graph edge temperature."),
    clip_baseline: str | None = typer.Option(None, help="DR-Seg CLIP branch: clearclip|segearth."),
    no_spsd: bool = typer.Option(False, "--no-spsd", help="Ablate channel decoupling."),
    no_pdgr: bool = typer.Option(False, "--no-pdgr", help="Ablate graph rectification."),
    no_ugaf: bool = typer.Option(False, "--no-ugaf", help="Ablate uncertainty fusion."),
    threshold: float = typer.Option(
        0.0, help="Best class probability below this → --background (SegEarth-OV prob_thd)."
    ),
    background: str = typer.Option(
        "background", help="Class for pixels below --threshold (new or listed); 'nodata': none."
    ),
    bands: str | None = typer.Option(None, help="Bands used as R,G,B, e.g. '3,2,1'."),
    assets: str | None = typer.Option(None, help="STAC Item: RGB asset or R,G,B band assets."),
    tile_size: int | None = typer.Option(None, help="Tile edge in pixels (model default)."),
    overlap: float | None = typer.Option(
        None, help="Tile overlap as a fraction of the tile (model default: 0.25; segearth 0.5)."
    ),
    blend: str | None = typer.Option(
        None, help="Blend of overlapping tiles: linear | flat (model default; segearth flat)."
    ),
    logit_scale: int = typer.Option(
        1, min=1, help="Stitch logits N× coarser (less memory/time), upsample when writing."
    ),
    batch_size: int = typer.Option(0, min=0, help="Tiles per model call (0: from memory)."),
    compile_model: bool = typer.Option(
        False, "--compile", help="torch.compile the model (pays off on long GPU runs)."
    ),
    channels_last: bool = typer.Option(False, help="Feed tiles in channels-last layout."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    precision: str = typer.Option("auto", help="auto | fp32 | bf16 | fp16."),
    probs: Path | None = typer.Option(None, help="Also write per-class probabilities here."),
    probs_dtype: str = typer.Option("uint8", help="uint8 (0-254) | float16."),
    uncertainty: Path | None = typer.Option(None, help="Also write per-pixel uncertainty."),
    min_area: float = typer.Option(0.0, help="Drop polygons smaller than this (m²)."),
    simplify: float = typer.Option(0.0, help="Simplify polygons (map units, topology kept)."),
    dst_crs: str | None = typer.Option(
        None, help="Polygons in this CRS (default: the scene's; GeoJSON: WGS 84)."
    ),
    percentiles: str = typer.Option("2,98", help="Scene-wide stretch for non-8-bit data."),
    no_cog: bool = typer.Option(False, "--no-cog", help="Plain tiled GeoTIFF, not COG."),
    allow_no_crs: bool = typer.Option(False, help="Accept rasters without georeferencing."),
    overwrite: bool = typer.Option(False, help="Replace existing outputs."),
    fmt: str = typer.Option("tif", "--format", help="Batch output type: tif|gpkg|shp|geojson."),
    resume: bool = typer.Option(False, help="Batch: skip scenes already done and valid."),
    fail_fast: bool = typer.Option(False, help="Batch: stop at the first failed scene."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary."),
    json_: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Segment a scene into the given classes; outputs keep the input's CRS and grid."""
    from drseg_cli.atomic import folder_lock
    from drseg_cli.classes import parse_classes
    from drseg_cli.commands._model import (
        ModelChoice,
        check_scene_plan,
        prepare_segmenter,
        segment_config,
    )
    from drseg_cli.pipeline.batch import (
        MANIFEST_NAME,
        Manifest,
        SceneRecord,
        expand_inputs,
        file_identity,
        plan_outputs,
        run_batch,
    )
    from drseg_cli.pipeline.segment import (
        OutputPlan,
        SceneResult,
        class_table,
        segment_scene,
    )

    started = time.perf_counter()
    class_specs = parse_classes(classes)
    config = segment_config(
        tile_size=tile_size,
        bands=bands,
        allow_no_crs=allow_no_crs,
        percentiles=percentiles,
        batch_size=batch_size,
        no_cog=no_cog,
        probs_dtype=probs_dtype,
        min_area=min_area,
        simplify=simplify,
        dst_crs=dst_crs,
        overwrite=overwrite,
        logit_scale=logit_scale,
        threshold=threshold,
        background=background,
        overlap=overlap,
        blend=blend,
    )
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    mask_names, _ = class_table([c.name for c in class_specs], threshold, config.background)
    scenes = expand_inputs(inputs, assets.split(",") if assets else None)
    batch_mode = len(scenes) > 1 or is_output_dir(output)
    if batch_mode:
        if output is None:
            raise UsageError("several inputs need -o OUTDIR/ (one output set per scene)")
        if probs and probs.suffix or uncertainty and uncertainty.suffix:
            raise UsageError("with several inputs give --probs/--uncertainty without a file name")
        output.mkdir(parents=True, exist_ok=True)
        plans = plan_outputs(
            scenes,
            output,
            fmt=fmt if fmt.startswith(".") else f".{fmt}",
            vector=vector,
            probs=probs is not None,
            uncertainty=uncertainty is not None,
        )
    else:
        if resume:
            raise UsageError("--resume needs -o OUTDIR/ (it reads the run's manifest there)")
        plans = [
            OutputPlan.from_output(
                output or default_output(scenes[0]),
                vector=vector,
                probs=probs,
                uncertainty=uncertainty,
            )
        ]
    with contextlib.ExitStack() as held:
        if batch_mode:
            held.enter_context(folder_lock(output))  # one run per folder, until the end
        else:  # fail on a bad input or output now, before loading any model
            check_scene_plan(scenes[0], plans[0], config)
        segmenter = prepare_segmenter(
            ModelChoice(
                model=model,
                method=method,
                checkpoint=checkpoint,
                clip_model=clip_model,
                clip_pretrained=clip_pretrained,
                dino_model=dino_model,
                dino_checkpoint=dino_checkpoint,
                rho=rho,
                k=k,
                alpha=alpha,
                steps=steps,
                gamma=gamma,
                window=window,
                tau=tau,
                clip_baseline=clip_baseline,
                no_spsd=no_spsd,
                no_pdgr=no_pdgr,
                no_ugaf=no_ugaf,
            ),
            class_specs,
            config,
            device=device,
            precision=precision,
            overlap=overlap,
            blend=blend,
            compile_model=compile_model,
            channels_last=channels_last,
            warn=not quiet,
        )
        net, predictor, batch_size = segmenter.net, segmenter.predictor, config.batch_size
        show = not (quiet or json_) and sys.stderr.isatty()
        run_info = {
            "classes": [c.name for c in class_specs],
            "model": model,
            "method": method,
            "device": segmenter.device,
            "precision": segmenter.precision,
            "batch_size": batch_size,
        }

        def run_scene(path: Path, plan: OutputPlan, replace: bool) -> SceneResult:
            cfg = dataclasses.replace(config, overwrite=replace)
            with _Progress(show, path.name) as progress:
                return segment_scene(
                    path,
                    plan,
                    predictor,
                    class_specs,
                    cfg,
                    tile_multiple=net.preprocess.multiple,
                    default_tile_size=net.preprocess.tile_size,
                    progress=progress,
                )

        if not batch_mode:
            result = run_scene(scenes[0], plans[0], overwrite)
            summary = run_info | {
                "inputs": [result.input],
                "outputs": result.outputs,
                "tiles": {
                    "total": result.tiles_total,
                    "run": result.tiles_run,
                    "skipped_nodata": result.tiles_skipped,
                },
                "size": [result.width, result.height],
                "crs": result.crs,
                "class_pixels": result.class_pixels,
                "seconds": round(time.perf_counter() - started, 3),
            }
            if json_:
                print_json(summary)
            elif not quiet:
                outs = ", ".join(result.outputs.values())
                err_console.print(
                    f"{result.input}: {result.tiles_run} tiles in {result.seconds:.1f} s → {outs}",
                    markup=False,
                )
            return

        manifest = Manifest.load(output / MANIFEST_NAME, run_info)

        def weights(value: str | Path | None) -> object:
            """A weights file by identity (path, size, mtime), a name or tag as given."""
            is_file = value is not None and Path(value).is_file()
            return file_identity(Path(value)) if is_file else value

        options = getattr(net, "options", None)
        settings = {  # everything that shapes the outputs: a change redoes scenes on --resume
            "drseg": __version__,
            "model": model,
            "method": method,
            "checkpoint": weights(checkpoint),
            "clip_model": clip_model,
            "clip_pretrained": weights(clip_pretrained),
            "dino_model": dino_model,
            "dino_checkpoint": weights(dino_checkpoint),
            "drseg_options": dataclasses.asdict(options)
            if dataclasses.is_dataclass(options)
            else None,
            "classes": [list(c.prompt_names) for c in class_specs],
            "scene": config.output_settings()
            | {"tile_size": tile_size or net.preprocess.tile_size},
            "precision": run_info["precision"],
            "outputs": [str(k) for k, v in dataclasses.asdict(plans[0]).items() if v is not None],
            "format": fmt,
        }

        def report(record: SceneRecord) -> None:
            if quiet or json_:
                return
            if record.status == "failed":
                err_console.print(f"drseg: failed: {record.error}", markup=False)
            else:
                note = f" ({record.note})" if record.note else ""
                err_console.print(f"{record.input}: {record.status}{note}", markup=False)

        batch = run_batch(
            scenes,
            plans,
            run_scene,
            manifest,
            class_names=mask_names,
            settings=settings,
            resume=resume,
            overwrite=overwrite,
            keep_going=not fail_fast,
            on_scene=report,
        )
        summary = run_info | {
            "inputs": [str(p) for p in scenes],
            "manifest": str(manifest.path),
            "done": batch.done,
            "skipped": batch.skipped,
            "failed": batch.failed,
            **{f"redone_{reason}": n for reason, n in batch.redone.items()},
            "interrupted": batch.interrupted,
            "failures": [{"input": r.input, "error": r.error} for r in batch.records if r.error],
            "seconds": round(time.perf_counter() - started, 3),
        }
        if json_:
            print_json(summary)
        elif not quiet:
            redone = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in batch.redone.items() if n)
            err_console.print(
                f"{batch.done} done"
                + (f" (redone: {redone})" if redone else "")
                + f", {batch.skipped} already done, {batch.failed} failed"
                + (" (interrupted)" if batch.interrupted else "")
                + f"; manifest {manifest.path}",
                markup=False,
            )
        if batch.exit_code:
            raise typer.Exit(batch.exit_code)


def is_output_dir(output: Path | None) -> bool:
    """``-o`` names a folder: it exists as one, ends with a slash, or has no file suffix."""
    if output is None:
        return False
    return output.is_dir() or str(output).endswith(("/", "\\")) or not output.suffix
