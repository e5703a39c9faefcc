"""``drseg refer``: the objects a sentence refers to, in a GeoTIFF of any size (docs/REFER.md)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from drseg_cli.commands import options as opt
from drseg_cli.commands._common import err_console, print_json, report_errors
from drseg_cli.commands.segment import parse_int_list, parse_percentiles

if TYPE_CHECKING:
    from drseg_cli.model.base import ReferringModel
    from drseg_cli.pipeline.distributed import RayOptions
    from drseg_cli.pipeline.refer import ReferConfig
    from drseg_cli.pipeline.segment import OutputPlan, SceneResult


@report_errors
def command(
    scene: Path = typer.Argument(
        ..., help="Input GeoTIFF (any size); a folder or quoted glob for a batch."
    ),
    expression: str | None = typer.Argument(
        None, help='What to find, e.g. "the large white building next to the river".'
    ),
    output: list[Path] = typer.Option(
        ...,
        "-o",
        "--output",
        metavar="FILE",
        help="Mask (.tif, COG) and/or polygons (.gpkg/.geojson/.parquet); repeat for both. "
        "A folder (OUTDIR/) for a batch: OUTDIR/<stem>_refer.<--format> per scene.",
    ),
    more: list[Path] | None = opt.more_inputs(),
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
    allow_no_crs: bool = opt.allow_no_crs(),
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
    """Segment what each expression refers to: windows of the model's size are scored, the
    best are segmented, masks are merged across window seams into objects, and the --top-k
    best objects per expression are written as a class mask and/or polygons with
    expression, score and area_m2."""
    from drseg_cli.commands._ray import check_ray_inputs, ray_options
    from drseg_cli.commands.segment import is_output_dir
    from drseg_cli.errors import UsageError
    from drseg_cli.pipeline.batch import expand_inputs
    from drseg_cli.pipeline.refer import read_expressions

    ray_opts = ray_options(ray, workers, gpus_per_worker, cpus_per_worker, quiet=quiet or json_)
    texts = read_expressions(expression, expressions)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    scenes = expand_inputs([scene, *(more or [])])
    options = {  # the run's settings, the same for one scene or a batch
        "method": method,
        "model": model,
        "checkpoint": checkpoint,
        "dglrsis": dglrsis,
        "top_k": top_k,
        "min_score": min_score,
        "max_windows": max_windows,
        "overlap": overlap,
        "batch_size": batch_size,
        "device": device,
        "precision": precision,
        "bands": bands,
        "percentiles": percentiles,
        "allow_no_crs": allow_no_crs,
        "overwrite": overwrite,
        "warn": not quiet,
    }
    from drseg_cli.raster.vsi import output_path

    output = [output_path(o) for o in output]  # s3://b/k → /vsis3/b/k, as segment
    batch_mode = len(scenes) > 1 or (len(output) == 1 and is_output_dir(output[0]))
    if ray_opts is not None:
        check_ray_inputs(scenes, output[0] if len(output) == 1 else None, batch_mode)
    if batch_mode:
        if len(output) != 1 or not is_output_dir(output[0]):
            raise UsageError("several inputs need one -o OUTDIR/ (one output per scene)")
        batch = run_refer_batch(
            scenes,
            texts,
            output[0],
            fmt=fmt,
            resume=resume,
            fail_fast=fail_fast,
            quiet=quiet or json_,
            ray=ray_opts,
            **options,
        )
        if json_:
            print_json(batch)
        elif not quiet:
            err_console.print(
                f"{batch['done']} done, {batch['skipped']} already done, {batch['failed']} failed"
                + (" (interrupted)" if batch["interrupted"] else "")
                + f"; manifest {batch['manifest']}",
                markup=False,
            )
        if batch["exit_code"]:
            raise typer.Exit(batch["exit_code"])
        return
    if resume:
        raise UsageError("--resume needs -o OUTDIR/ (it reads the run's manifest there)")
    result = run_refer(
        scenes[0],  # as given (a folder or glob of one raster: that raster)
        texts,
        output,
        **options,
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
    from drseg_cli.pipeline.refer import refer_scene, split_outputs
    from drseg_cli.raster.reader import inspect_raster

    _, vector = split_outputs(outputs)
    if vector is not None and vector.suffix.lower() == ".shp":
        raise UsageError(f"{vector}: write referring polygons as .gpkg, .geojson or .parquet")
    band_list = parse_int_list(bands, "--bands")
    low, high = parse_percentiles(percentiles)
    info = inspect_raster(scene, band_list, allow_no_crs=allow_no_crs)

    built, config = load_refer(
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
        percentiles=(low, high),
        overwrite=overwrite,
        warn=warn,
        load=load,
    )
    return refer_scene(info, built, texts, outputs, config)


def load_refer(
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
    percentiles: tuple[float, float],
    overwrite: bool,
    warn: bool = True,
    load: Callable[..., Any] | None = None,
):  # -> (ReferringModel, ReferConfig)
    """The model and run settings of ``refer``: built once, for one scene or a whole batch."""
    from drseg_cli.errors import UsageError
    from drseg_cli.model.factory import build_referring_model
    from drseg_cli.pipeline.refer import ReferConfig
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
        percentiles=percentiles,
        overwrite=overwrite,
        device=str(dev),
        amp_dtype=resolve_precision(precision, dev),
    )
    return built, config


@dataclasses.dataclass
class ReferRunner:
    """A picklable recipe for referring scenes of a batch: calling it builds the model once
    (``load_refer``) and returns a ``ReferScenes``. The one-process batch calls it here;
    ``--ray`` ships it to each Ray actor (``pipeline/distributed.py``, a ``RunnerFactory``),
    so both run the same code on the same settings and write the same files."""

    texts: tuple[str, ...]
    model_options: dict[str, Any]  # method, model, checkpoint, … precision (``load_refer``)
    bands: tuple[int, ...] | None
    percentiles: tuple[float, float]
    allow_no_crs: bool = False
    overwrite: bool = False
    warn: bool = True

    def __call__(self, gpu_share: float = 1.0) -> ReferScenes:
        """``gpu_share`` is unused: refer's batch size is ``--batch-size``, not from memory."""
        built, config = load_refer(
            percentiles=self.percentiles,
            overwrite=self.overwrite,
            warn=self.warn,
            **self.model_options,
        )
        return ReferScenes(self, built, config)


@dataclasses.dataclass
class ReferScenes:
    """A built referring model that runs one scene of a batch per call (a ``SceneRunner``)."""

    recipe: ReferRunner
    built: ReferringModel
    config: ReferConfig

    @property
    def info(self) -> dict:
        """What the batch fingerprints (Ray workers must agree on it): device, precision
        (as the manifest's settings spell it), windows per call, window size and overlap."""
        return {
            "device": self.config.device,
            "precision": str(self.config.amp_dtype),
            "batch_size": self.config.batch_size,
            "scene": {
                "tile_size": self.built.preprocess.tile_size,
                "overlap": self.config.overlap,
            },
            "random_weights": bool(self.built.random_weights),
        }

    def __call__(
        self,
        path: Path,
        plan: OutputPlan,
        replace: bool,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> SceneResult:
        """Refer ``path`` into ``plan``'s outputs (``replace``: existing ones may go);
        ``progress(windows, total)`` gets the windows done since its previous call."""
        from drseg_cli.pipeline.refer import refer_scene
        from drseg_cli.pipeline.segment import SceneResult
        from drseg_cli.raster.reader import inspect_raster

        recipe = self.recipe
        bands = list(recipe.bands) if recipe.bands is not None else None
        info = inspect_raster(path, bands, allow_no_crs=recipe.allow_no_crs)
        outputs = [p for p in (plan.mask, plan.vector) if p is not None]
        cfg = dataclasses.replace(self.config, overwrite=replace)
        done_before = 0

        def windows(done: int, total: int) -> None:  # refer_scene counts up; Ray adds steps
            nonlocal done_before
            if progress is not None:
                progress(done - done_before, total)
            done_before = done

        result = refer_scene(info, self.built, list(recipe.texts), outputs, cfg, progress=windows)
        return SceneResult(
            input=result.input,
            outputs={kind: str(path) for kind, path in plan.items()},  # the mask's .qml too
            width=info.width,
            height=info.height,
            crs=info.crs.to_string() if info.crs else None,
            tiles_total=result.windows_total,
            tiles_run=result.windows_run,
            tiles_skipped=0,
            seconds=result.seconds,
        )


def run_refer_batch(
    scenes: list[Path],
    texts: list[str],
    outdir: Path,
    *,
    fmt: str,
    resume: bool,
    fail_fast: bool,
    quiet: bool,
    warn: bool = True,
    bands: str | None,
    percentiles: str,
    allow_no_crs: bool,
    overwrite: bool,
    ray: RayOptions | None = None,
    **model_options: Any,
) -> dict[str, Any]:
    """Every scene through ``refer_scene`` with one model, under ``pipeline/batch.py``'s
    ``run_batch`` (manifest, resume, keep-going, one run per folder); returns the summary
    that ``--json`` prints, with the process's ``exit_code``. ``ray``: the scenes on Ray
    actors instead, one model per actor (``pipeline/distributed.py``)."""
    import contextlib
    import sys
    import time

    from drseg_cli import __version__
    from drseg_cli.atomic import folder_lock
    from drseg_cli.commands._model import make_folder
    from drseg_cli.commands._ray import ClusterProgress
    from drseg_cli.pipeline.batch import MANIFEST_NAME, Manifest, file_identity, run_batch
    from drseg_cli.pipeline.refer import plan_refer_outputs, verify_refer_outputs

    started = time.perf_counter()
    band_list = parse_int_list(bands, "--bands")
    low, high = parse_percentiles(percentiles)
    plans = plan_refer_outputs(scenes, outdir, fmt)
    make_folder(outdir)
    runner = ReferRunner(
        tuple(texts),
        model_options,
        tuple(band_list) if band_list is not None else None,
        (low, high),
        allow_no_crs=allow_no_crs,
        overwrite=overwrite,
        warn=warn and ray is None,  # Ray workers: the warning once, here
    )
    # one run per folder, until the end; Ray's workers stop before the lock is released
    with folder_lock(outdir), contextlib.ExitStack() as held:
        executor = None
        if ray is not None:  # the model is built in each Ray worker, not here
            from drseg_cli.pipeline.distributed import RayExecutor

            executor = held.enter_context(RayExecutor(runner, ray, max_workers=len(scenes)))
            info = executor.info
            if info.get("random_weights") and warn:
                err_console.print(
                    "drseg: warning: random weights (test model): results are meaningless"
                )
        else:
            loaded = runner()
            info = loaded.info

        checkpoint = model_options.get("checkpoint")
        settings = {  # everything that shapes the outputs: a change redoes scenes on --resume
            "drseg": __version__,
            "command": "refer",
            "method": model_options.get("method"),
            "model": model_options.get("model"),
            "checkpoint": (
                file_identity(Path(checkpoint))
                if checkpoint and Path(checkpoint).is_file()
                else checkpoint
            ),
            "dglrsis": sorted(model_options.get("dglrsis") or []),
            "expressions": [t.strip() for t in texts],
            "top_k": model_options.get("top_k"),
            "min_score": model_options.get("min_score"),
            "max_windows": model_options.get("max_windows"),
            "overlap": info["scene"]["overlap"],
            "bands": band_list,
            "percentiles": [low, high],
            "precision": info["precision"],
            "format": fmt.lower().lstrip("."),
        }
        run_info = {"command": "refer", "method": settings["method"], "model": settings["model"]}
        manifest = Manifest.load(outdir / MANIFEST_NAME, run_info)

        workers = len(executor.actors) if executor is not None else 0
        cluster = ClusterProgress(
            executor is not None and not quiet and sys.stderr.isatty(), len(scenes), workers
        )

        if executor is not None:
            executor.on_progress = cluster
        with cluster:
            batch = run_batch(
                scenes,
                plans,
                executor or loaded,
                manifest,
                class_names=["background", *texts],
                settings=settings,
                resume=resume,
                overwrite=overwrite,
                keep_going=not fail_fast,
                on_scene=lambda record: cluster.report(record, quiet),
                verify=lambda path, plan: verify_refer_outputs(path, plan, texts),
            )
    summary = run_info | {
        "expressions": settings["expressions"],
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
    return summary | {"exit_code": batch.exit_code}
