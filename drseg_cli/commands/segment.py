"""``drseg segment``: classes in plain words → georeferenced mask and/or polygons."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path

import typer

from drseg_cli import __version__
from drseg_cli.commands import options as opt
from drseg_cli.commands._common import err_console, print_json, report_errors
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

    def stage(self, name: str) -> None:
        """Name the step after the tiles (writing the COG, polygons) in the bar's label."""
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, description=f"{self.label}: {name}")


#: Outputs that need an optional package: suffix → (module, what it writes).
OPTIONAL_WRITERS = {".parquet": ("pyarrow", "GeoParquet")}


def check_optional_dependencies(paths: list[Path]) -> None:
    """Fail before any tile is computed when an output needs a package that is missing."""
    import importlib.util

    for path in paths:
        module, what = OPTIONAL_WRITERS.get(path.suffix.lower(), (None, None))
        if module is None:
            continue
        try:
            missing = importlib.util.find_spec(module) is None
        except (ImportError, ValueError):
            missing = True
        if missing:
            raise UsageError(f"{path}: writing {what} needs {module} (pip install {module})")


@report_errors
def command(
    inputs: list[str] = typer.Argument(..., help="Files, folders, globs, URLs, STAC Items."),
    config: Path | None = opt.config(),
    bands: str | None = opt.bands(),
    assets: str | None = typer.Option(
        None, help="STAC Item: RGB asset or R,G,B band assets.", rich_help_panel=opt.INPUT
    ),
    percentiles: str = opt.percentiles(),
    aoi: str | None = opt.aoi(),
    aoi_crs: str | None = opt.aoi_crs(),
    allow_no_crs: bool = opt.allow_no_crs(),
    classes: str = opt.classes(),
    threshold: float = opt.threshold(),
    background: str = opt.background(),
    model: str = opt.model(),
    method: str = opt.method(),
    checkpoint: Path | None = opt.checkpoint(),
    clip_model: str | None = opt.clip_model(),
    clip_pretrained: str | None = opt.clip_pretrained(),
    dino_model: str | None = opt.dino_model(),
    dino_checkpoint: Path | None = opt.dino_checkpoint(),
    rho: float | None = opt.rho(),
    k: int | None = opt.k(),
    alpha: float | None = opt.alpha(),
    steps: int | None = opt.steps(),
    gamma: float | None = opt.gamma(),
    window: int | None = opt.window(),
    tau: float | None = opt.tau(),
    clip_baseline: str | None = opt.clip_baseline(),
    no_spsd: bool = opt.no_spsd(),
    no_pdgr: bool = opt.no_pdgr(),
    no_ugaf: bool = opt.no_ugaf(),
    as_clip_branch: bool = opt.as_clip_branch(),
    dglrsis: list[str] | None = opt.dglrsis(),
    tile_size: int | None = opt.tile_size(),
    overlap: float | None = opt.overlap(),
    blend: str | None = opt.blend(),
    logit_scale: int = typer.Option(
        1,
        "--logit-scale",
        min=1,
        help="Stitch logits N× coarser (less memory), upsample when writing.",
        rich_help_panel=opt.TILING,
    ),
    batch_size: int = opt.batch_size(0, "Tiles per model call (0: from memory).", min=0),
    compile_model: bool = opt.flag(
        "--compile", help="torch.compile the model (long GPU runs).", panel=opt.TILING
    ),
    channels_last: bool = opt.flag(
        "--channels-last", help="Feed tiles in channels-last layout.", panel=opt.TILING
    ),
    device: str = opt.device(),
    precision: str = opt.precision(),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help=opt.shown_default(
            "*.tif mask, or *."
            + "/.".join(opt.VECTOR_FORMATS)
            + " polygons; a folder for a batch.",
            "INPUT_mask.tif",
        ),
        rich_help_panel=opt.OUTPUTS,
    ),
    vector: bool = opt.flag("--vector", help="Also write polygons (.gpkg).", panel=opt.OUTPUTS),
    probs: Path | None = typer.Option(
        None, "--probs", help="Also write per-class probabilities.", rich_help_panel=opt.OUTPUTS
    ),
    probs_dtype: str = typer.Option(
        "uint8", "--probs-dtype", help="uint8 (0-254) | float16.", rich_help_panel=opt.OUTPUTS
    ),
    uncertainty: Path | None = typer.Option(
        None,
        "--uncertainty",
        help="Also write per-pixel uncertainty.",
        rich_help_panel=opt.OUTPUTS,
    ),
    proposals: Path | None = opt.proposals(),
    min_area: float = typer.Option(
        0.0, "--min-area", help="Drop polygons smaller than this (m²).", rich_help_panel=opt.OUTPUTS
    ),
    simplify: float = typer.Option(
        0.0,
        "--simplify",
        help="Simplify polygons (map units, topology kept).",
        rich_help_panel=opt.OUTPUTS,
    ),
    dst_crs: str | None = typer.Option(
        None,
        "--dst-crs",
        help=opt.shown_default("Polygons in this CRS.", "the scene's; GeoJSON: WGS 84"),
        rich_help_panel=opt.OUTPUTS,
    ),
    no_cog: bool = opt.flag("--no-cog", help="Plain tiled GeoTIFF, not COG.", panel=opt.OUTPUTS),
    overwrite: bool = opt.overwrite(),
    quiet: bool = opt.quiet(),
    json_: bool = opt.json_(),
    fmt: str = opt.output_format(),
    resume: bool = opt.resume(),
    fail_fast: bool = opt.fail_fast(),
    ray: str | None = opt.ray(),
    workers: int | None = opt.workers(),
    gpus_per_worker: float | None = opt.gpus_per_worker(),
    cpus_per_worker: float = opt.cpus_per_worker(),
) -> None:
    """Segment a scene into the given classes; outputs keep the input's CRS and grid."""
    from drseg_cli.atomic import folder_lock
    from drseg_cli.classes import parse_classes
    from drseg_cli.commands._model import (
        ModelChoice,
        SegmentRunner,
        check_scene_plan,
        make_folder,
        segment_config,
    )
    from drseg_cli.commands._ray import ClusterProgress, check_ray_inputs, ray_options
    from drseg_cli.pipeline.batch import (
        MANIFEST_NAME,
        Manifest,
        expand_inputs,
        file_identity,
        plan_outputs,
        run_batch,
    )
    from drseg_cli.pipeline.segment import OutputPlan, SceneResult, class_table
    from drseg_cli.raster.reader import forget_warnings
    from drseg_cli.raster.vsi import output_path

    started = time.perf_counter()
    ray_opts = ray_options(ray, workers, gpus_per_worker, cpus_per_worker, quiet=quiet or json_)
    forget_warnings()  # each warning once per run (a scene is opened more than once)
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
        aoi=aoi,
        aoi_crs=aoi_crs,
    )
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    mask_names, _ = class_table([c.name for c in class_specs], threshold, config.background)
    scenes = expand_inputs(inputs, assets.split(",") if assets else None)
    if output is not None:  # s3://b/k → /vsis3/b/k (outputs on object stores: docs/SCALE.md)
        output = output_path(output)
    batch_mode = len(scenes) > 1 or is_output_dir(output)
    proposals_format = opt.check_proposals(proposals, method, batch_mode)
    if ray_opts is not None:
        check_ray_inputs(scenes, output, batch_mode)
    if batch_mode:
        if output is None:
            raise UsageError("several inputs need -o OUTDIR/ (one output set per scene)")
        if probs and probs.suffix or uncertainty and uncertainty.suffix:
            raise UsageError("with several inputs give --probs/--uncertainty without a file name")
        make_folder(output)
        plans = plan_outputs(
            scenes,
            output,
            fmt=fmt if fmt.startswith(".") else f".{fmt}",
            vector=vector,
            probs=probs is not None,
            uncertainty=uncertainty is not None,
            proposals=proposals_format,
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
                proposals=proposals,
            )
        ]
    check_optional_dependencies([p for plan in plans for p in plan.final_paths()])
    known: dict = {"inputs": [str(p) for p in scenes]}  # for --json when the scene fails
    with contextlib.ExitStack() as held:
        if batch_mode:
            held.enter_context(folder_lock(output))  # one run per folder, until the end
        else:  # fail on a bad input or output now, before loading any model
            held.enter_context(_json_on_failure(json_, known, started))
            check_scene_plan(scenes[0], plans[0], config)
        runner = SegmentRunner(
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
                as_clip_branch=as_clip_branch,
                dglrsis=tuple(dglrsis) if dglrsis else None,
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
        show = not (quiet or json_) and sys.stderr.isatty()
        executor = None
        if ray_opts is not None:  # the model loads in each Ray worker, not here
            from drseg_cli.pipeline.distributed import RayExecutor

            executor = held.enter_context(RayExecutor(runner, ray_opts, max_workers=len(scenes)))
            info = executor.info
        else:
            loaded = runner()
            info = loaded.info
        run_info = {
            "classes": [c.name for c in class_specs],
            "model": model,
            "method": method,
            "device": info["device"],
            "precision": info["precision"],
            "batch_size": info["batch_size"],
        }
        known.update(run_info)
        position = {path: i for i, path in enumerate(scenes, 1)}

        def run_scene(path: Path, plan: OutputPlan, replace: bool) -> SceneResult:
            label = f"{path.name} [{position[path]}/{len(scenes)}]" if batch_mode else path.name
            with _Progress(show, label) as progress:
                return loaded(path, plan, replace, progress=progress, stage=progress.stage)

        if not batch_mode:
            result = run_scene(scenes[0], plans[0], overwrite)
            summary = run_info | {
                "inputs": [result.input],
                "outputs": result.outputs,
                "tiles": {
                    "total": result.tiles_total,
                    "run": result.tiles_run,
                    "skipped_nodata": result.tiles_skipped,
                    "outside_aoi": result.tiles_outside_aoi,
                },
                "size": [result.width, result.height],
                "crs": result.crs,
                "class_pixels": result.class_pixels,
                "failed": 0,
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
            try:  # a long WKT --aoi is no file name (ENAMETOOLONG)
                is_file = value is not None and Path(value).is_file()
            except OSError:
                is_file = False
            return file_identity(Path(value)) if is_file else value

        settings = {  # everything that shapes the outputs: a change redoes scenes on --resume
            "drseg": __version__,
            "model": model,
            "method": method,
            "checkpoint": weights(checkpoint),
            "clip_model": clip_model,
            "clip_pretrained": weights(clip_pretrained),
            "dino_model": dino_model,
            "dino_checkpoint": weights(dino_checkpoint),
            "drseg_options": info["drseg_options"],
            "classes": [list(c.prompt_names) for c in class_specs],
            "scene": info["scene"],
            "precision": run_info["precision"],
            "outputs": [str(k) for k, v in dataclasses.asdict(plans[0]).items() if v is not None],
            "format": fmt,
            "aoi": weights(config.aoi),  # a file by identity: an edited AOI redoes scenes
        }

        cluster = ClusterProgress(
            show and executor is not None, len(scenes), len(executor.actors) if executor else 0
        )
        if executor is not None:
            executor.on_progress = cluster
        with cluster:
            batch = run_batch(
                scenes,
                plans,
                executor or run_scene,
                manifest,
                class_names=mask_names,
                settings=settings,
                resume=resume,
                overwrite=overwrite,
                keep_going=not fail_fast,
                on_scene=lambda record: cluster.report(record, quiet or json_),
                clipped=config.aoi is not None,
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
        if executor is not None:
            summary |= cluster.summary()
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


@contextlib.contextmanager
def _json_on_failure(enabled: bool, known: dict, started: float):
    """With ``--json``, a scene that fails still prints its summary (``failed``, ``error``)
    on stdout before the error line, so scripts always get one JSON document."""
    try:
        yield
    except Exception as exc:
        if enabled:
            from drseg_cli.errors import DrsegError, describe_unexpected

            error = str(exc) if isinstance(exc, DrsegError) else describe_unexpected(exc)
            print_json(
                known
                | {
                    "outputs": {},
                    "failed": 1,
                    "error": error,
                    "seconds": round(time.perf_counter() - started, 3),
                }
            )
        raise


def is_output_dir(output: Path | None) -> bool:
    """``-o`` names a folder: it exists as one, ends with a slash, or has no file suffix."""
    if output is None:
        return False
    return output.is_dir() or str(output).endswith(("/", "\\")) or not output.suffix
