"""``drseg tune``: search DR-Seg's cheap parameters on a labelled set (docs/TUNE.md)."""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import typer

from drseg_cli.commands import options as opt
from drseg_cli.commands._common import err_console, print_json, report_errors
from drseg_cli.errors import UsageError

SEARCH = "Search"


class _Bar:
    """A rich progress bar on a terminal, silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        self.tasks: dict[str, int] = {}
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                console=err_console,
                transient=True,
            )
            self.bar.start()

    def callback(self, label: str):
        def advance(n: int, total: int) -> None:
            if self.bar is None:
                return
            if label not in self.tasks:
                self.tasks[label] = self.bar.add_task(label, total=total)
            self.bar.update(self.tasks[label], advance=n)

        return advance

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@report_errors
def command(
    data: Path = opt.data(),
    output: Path = typer.Option(
        ...,
        "--output",
        "-o",
        help="Folder for best.json, trials.csv/.json and the plot.",
        rich_help_panel=opt.OUTPUTS,
    ),
    layout: str = opt.layout(help="Dataset layout, as drseg evaluate reads it."),
    split: str | None = opt.split(),
    ignore_index: int = opt.ignore_index(),
    reduce_zero_label: bool = opt.reduce_zero_label(),
    keep_zero_label: bool = opt.keep_zero_label(),
    limit: int | None = opt.limit(),
    absent_classes: str = opt.absent_classes(),
    bands: str | None = opt.bands(),
    percentiles: str = opt.percentiles("Per-image stretch for non-8-bit data."),
    classes: str | None = opt.classes(required=False),
    background: str = opt.background(
        "Class of pixels below the threshold; threshold searched if listed."
    ),
    model: str = opt.model(),
    clip_model: str | None = opt.clip_model(),
    clip_pretrained: str | None = opt.clip_pretrained(),
    dino_model: str | None = opt.dino_model(),
    dino_checkpoint: Path | None = opt.dino_checkpoint(),
    search: str = typer.Option(
        "halving", "--search", help="halving (successive halving) | grid.", rich_help_panel=SEARCH
    ),
    budget: int = typer.Option(
        32,
        "--budget",
        min=1,
        help="Configurations tried (the defaults included).",
        rich_help_panel=SEARCH,
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the random draw of configurations.", rich_help_panel=SEARCH
    ),
    param: list[str] = typer.Option(
        [],
        "--param",
        help="Values searched for a parameter, e.g. 'rho=0.3,0.5' (repeatable).",
        rich_help_panel=SEARCH,
        show_default=False,
    ),
    cache: Path | None = typer.Option(
        None,
        "--cache",
        help=opt.shown_default("Feature cache folder; reused.", "OUTPUT/features"),
        rich_help_panel=SEARCH,
    ),
    cache_dtype: str = typer.Option(
        "float16",
        "--cache-dtype",
        help="float16 | float32 (exact, twice the disk).",
        rich_help_panel=SEARCH,
    ),
    tile_size: int | None = opt.tile_size(),
    batch_size: int = opt.batch_size(4, "Tiles per backbone call."),
    device: str = opt.device(),
    precision: str = opt.precision(),
    top: int = typer.Option(
        10, "--top", min=1, help="Configurations shown in the table.", rich_help_panel=opt.OUTPUTS
    ),
    overwrite: bool = opt.overwrite("Replace existing result files."),
    quiet: bool = opt.quiet("No progress or table."),
    json_: bool = opt.json_("Print the result JSON on stdout."),
) -> None:
    """Find DR-Seg settings that maximise mIoU on a labelled set; write them as best.json."""
    from drseg_cli.atomic import check_writable
    from drseg_cli.commands._config import write_config
    from drseg_cli.commands._model import build_model_for
    from drseg_cli.commands.evaluate import evaluation_rule, resolve_classes
    from drseg_cli.commands.segment import parse_int_list, parse_percentiles
    from drseg_cli.evaluate.datasets import load_dataset
    from drseg_cli.model.drseg import DRSegOptions
    from drseg_cli.pipeline.runtime import TilePredictor, resolve_device, resolve_precision
    from drseg_cli.tune.features import CACHE_DTYPES, FeatureCache
    from drseg_cli.tune.report import plot_path, write_plot, write_trials
    from drseg_cli.tune.search import (
        SEARCHES,
        SPACE,
        Scorer,
        default_params,
        influence,
        parse_param,
        run_search,
        sample_configurations,
    )

    started = time.perf_counter()
    if search not in SEARCHES:
        raise UsageError(f"--search {search!r}: choose one of {', '.join(SEARCHES)}")
    if cache_dtype not in CACHE_DTYPES:
        raise UsageError(f"--cache-dtype {cache_dtype!r}: choose one of {', '.join(CACHE_DTYPES)}")
    if absent_classes not in ("count", "drop"):
        raise UsageError(f"--absent-classes: {absent_classes!r} is not 'count' or 'drop'")
    if not 0 <= ignore_index <= 65535:
        raise UsageError("--ignore-index: must be in [0, 65535]")
    space = dict(SPACE) | dict(parse_param(p) for p in param)
    given = {parse_param(p)[0] for p in param}
    if output.exists() and not output.is_dir():
        raise UsageError(f"-o {output}: not a folder")
    best_path, csv_path, json_path = (
        output / "best.json",
        output / "trials.csv",
        output / "trials.json",
    )
    dataset = load_dataset(
        data,
        layout,
        split,
        reduce_zero_label=opt.zero_label(reduce_zero_label, keep_zero_label),
        ignore_index=ignore_index,
        limit=limit,
    )
    class_specs, _ = resolve_classes(classes, dataset.layout, None)
    names = [c.name for c in class_specs]
    if background not in names:
        if "threshold" in given and any(space["threshold"]):
            evaluation_rule(names, max(space["threshold"]), background)  # the one-line error
        space.pop("threshold")
    for name, values in space.items():  # a bad value fails before any model loads
        for v in values:
            if name != "threshold":
                DRSegOptions(**{name: v})
            else:
                evaluation_rule(names, v, background)
    if output.is_dir():
        check_writable([best_path, csv_path, json_path], overwrite)
    torch_device = resolve_device(device)
    amp = resolve_precision(precision, torch_device)
    baselines = list(dict.fromkeys(space.get("clip_baseline", ("clearclip",))))
    models, texts = {}, {}
    for name in baselines:
        net, _ = build_model_for(
            model=model,
            method="drseg",
            checkpoint=None,
            clip_model=clip_model,
            clip_pretrained=clip_pretrained,
            dino_model=dino_model,
            dino_checkpoint=dino_checkpoint,
            drseg_options=DRSegOptions(clip_baseline=name),
            device=str(torch_device),
        )
        predictor = TilePredictor(net, [c.prompt_names for c in class_specs], torch_device, amp)
        models[name], texts[name] = predictor.model, predictor.text
    first = models[baselines[0]]
    if first.random_weights and not quiet:
        logging.getLogger("drseg").warning(
            "model %r has random weights: results are meaningless (for tests only)", model
        )
    size = tile_size or first.preprocess.tile_size
    if size < first.preprocess.multiple or size % first.preprocess.multiple:
        raise UsageError(
            f"--tile-size {size}: must be a positive multiple of {first.preprocess.multiple}"
        )
    feature_cache = FeatureCache(
        cache or output / "features",
        dataset,
        models,
        len(names),
        tile_size=size,
        device=torch_device,
        autocast=amp,
        dtype=cache_dtype,
        batch_size=batch_size,
        bands=parse_int_list(bands, "--bands"),
        percentiles=parse_percentiles(percentiles),
        settings={
            "model": model,
            "clip_model": clip_model,
            "clip_pretrained": clip_pretrained,
            "dino_model": dino_model,
            "dino_checkpoint": str(dino_checkpoint) if dino_checkpoint else None,
            "num_classes": len(names),  # (the labels are checked against it)
        },
    )
    output.mkdir(parents=True, exist_ok=True)
    check_writable([best_path, csv_path, json_path], overwrite)
    bar = _Bar(not (quiet or json_) and sys.stderr.isatty())
    try:
        t0 = time.perf_counter()
        feature_cache.ensure(bar.callback("features"))
        feature_seconds = time.perf_counter() - t0
        base = DRSegOptions()
        defaults = default_params(space, base, 0.0)
        configurations = sample_configurations(space, budget, defaults, seed)
        scorer = Scorer(
            feature_cache,
            models,
            texts,
            base,
            background=names.index(background) if background in names else None,
            device=torch_device,
        )
        t0 = time.perf_counter()
        trials = run_search(
            scorer,
            configurations,
            names,
            method=search,
            absent_classes=absent_classes,
            progress=bar.callback("search"),
        )
        search_seconds = time.perf_counter() - t0
    finally:
        bar.close()
    best = trials[0]
    default = next(t for t in trials if t.is_default)
    ranked = influence(trials, list(space))
    settings = {"method": "drseg", "model": model, **best.params}
    if best.params.get("threshold"):
        settings["background"] = background
    if tile_size is not None:
        settings["tile_size"] = tile_size
    summary = {
        "best": settings,
        "miou": best.miou,
        "default_miou": default.miou,
        "images": best.images,
        "search": search,
        "budget": budget,
        "seed": seed,
        "trials": len(trials),
        "influence": {n: round(v, 4) for n, v in ranked},
        "features_computed": feature_cache.computed,
        "feature_seconds": round(feature_seconds, 3),
        "search_seconds": round(search_seconds, 3),
        "configurations_per_second": round(
            sum(t.images for t in trials) / max(len(dataset), 1) / max(search_seconds, 1e-9), 3
        ),
    }
    write_config(best_path, settings, tune={k: v for k, v in summary.items() if k != "best"})
    write_trials(csv_path, json_path, trials)
    outputs = {"config": str(best_path), "trials_csv": str(csv_path), "trials_json": str(json_path)}
    if len(ranked) >= 2:
        p1, p2 = ranked[0][0], ranked[1][0]
        png = plot_path(output, p1, p2)
        if write_plot(png, trials, p1, p2):
            outputs["plot"] = str(png)
    summary |= {"outputs": outputs, "seconds": round(time.perf_counter() - started, 3)}
    if json_:
        print_json(_finite(summary))
    elif not quiet:
        _print_table(trials, list(space), top, summary)


def _finite(value):
    """NaN → None through a JSON-bound structure."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


_SHORT = {"window": "win", "steps": "L", "clip_baseline": "baseline", "threshold": "thr"}


def _print_table(trials, names: list[str], top: int, summary: dict) -> None:
    """The best ``top`` configurations (and the defaults) as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"drseg tune: {summary['trials']} configurations ({summary['search']})")
    for col in ("#", *(_SHORT.get(n, n) for n in names), "mIoU", "images"):
        table.add_column(col, justify="right", no_wrap=True)
    shown = trials[:top] + [t for t in trials[top:] if t.is_default]
    for t in shown:
        rank = str(trials.index(t) + 1) + ("*" if t.is_default else "")
        table.add_row(rank, *(str(t.params[n]) for n in names), f"{t.miou:.2f}", str(t.images))
    table.caption = "* DR-Seg's defaults"
    console = Console(highlight=False)
    console.print(table)
    console.print(
        f"best mIoU {summary['miou']:.2f} (defaults {summary['default_miou']:.2f}) → "
        f"{summary['outputs']['config']}  ({summary['seconds']:.1f} s; "
        f"{summary['configurations_per_second']:.2f} configurations/s from cached features)",
        markup=False,
    )
