"""``drseg evaluate``: mIoU/mACC of a model on an image + label dataset (docs/EVALUATE.md)."""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from pathlib import Path

import typer

from drseg_cli.commands import options as opt
from drseg_cli.commands._common import err_console, print_json, report_errors
from drseg_cli.commands._model import (
    background_option,
    build_model_for,
    drseg_options_from,
    tiling_defaults,
)
from drseg_cli.errors import UsageError


@report_errors
def command(
    data: Path = opt.data(),
    task: str = opt.task(),
    layout: str = opt.layout(
        help="auto | generic | mmseg | dlrsd | ovrsis-isaid | ovrsis-potsdam | ovrsis-vaihingen "
        "| ovrsis-loveda | ovrsis-uavid | ovrsis-udd5 | ovrsis-vdd (OVRSISBench) | isaid | "
        "loveda | potsdam | vaihingen | uavid | udd5 | vdd (SegEarth-OV). See docs/EVALUATE.md. "
        "--task refer: auto | rsrefseg2 | rrsisd | refsegrs | risbench (docs/REFER.md).",
    ),
    split: str | None = opt.split(),
    ignore_index: int = opt.ignore_index(),
    reduce_zero_label: bool = opt.reduce_zero_label(),
    keep_zero_label: bool = opt.keep_zero_label(),
    limit: int | None = opt.limit(),
    absent_classes: str = opt.absent_classes(),
    config: Path | None = opt.config(),
    bands: str | None = opt.bands(),
    percentiles: str = opt.percentiles("Per-image stretch for non-8-bit data."),
    classes: str | None = opt.classes(required=False),
    holdout_classes: str | None = opt.holdout_classes(
        "Classes held out of training (default: the checkpoint's), for --class-split."
    ),
    class_split: str | None = opt.class_split(),
    threshold: float = opt.threshold(),
    background: str = opt.background("The dataset class given to pixels below --threshold."),
    model: str = opt.model(),
    method: str = opt.method(),
    checkpoint: Path | None = opt.checkpoint(),
    as_clip_branch: bool = opt.as_clip_branch(),
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
    dglrsis: list[str] | None = opt.dglrsis(),
    tile_size: int | None = opt.tile_size(),
    overlap: float | None = opt.overlap(),
    blend: str | None = opt.blend(),
    batch_size: int = opt.batch_size(4, "Tiles per model call."),
    device: str = opt.device(),
    precision: str = opt.precision(),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Write metrics JSON here.", rich_help_panel=opt.OUTPUTS
    ),
    csv_path: Path | None = typer.Option(
        None, "--csv", help="Write per-class CSV here.", rich_help_panel=opt.OUTPUTS
    ),
    overwrite: bool = opt.overwrite("Replace existing metric files."),
    quiet: bool = opt.quiet("No progress or table."),
    json_: bool = opt.json_("Print the metrics JSON on stdout."),
) -> None:
    """Score predictions against label masks: mIoU, mACC, per-class IoU/Acc, fwIoU, aAcc."""
    from drseg_cli.atomic import check_writable
    from drseg_cli.commands.segment import _Progress, parse_int_list, parse_percentiles
    from drseg_cli.evaluate.datasets import load_dataset
    from drseg_cli.evaluate.metrics import seen_unseen
    from drseg_cli.evaluate.runner import EvalConfig, run_evaluation
    from drseg_cli.pipeline.runtime import TilePredictor, resolve_device, resolve_precision

    started = time.perf_counter()
    if task not in ("segment", "refer"):
        raise UsageError(f"--task {task}: choose segment or refer")
    if task == "refer":
        return _evaluate_refer(
            data, layout, split, limit, model, method, checkpoint, device, precision, ignore_index,
            output, overwrite, quiet, json_, started,
        )  # fmt: skip
    tiling_defaults(overlap, blend)  # a bad --overlap/--blend fails before any model loads
    background_option(threshold, background)
    if not 0 <= ignore_index <= 65535:
        raise UsageError("--ignore-index: must be in [0, 65535]")
    if absent_classes not in ("count", "drop"):
        raise UsageError(f"--absent-classes: {absent_classes!r} is not 'count' or 'drop'")
    outputs = [p for p in (output, csv_path) if p is not None]
    check_writable(outputs, overwrite)
    dataset = load_dataset(
        data,
        layout,
        split,
        reduce_zero_label=opt.zero_label(reduce_zero_label, keep_zero_label),
        ignore_index=ignore_index,
        limit=limit,
    )
    torch_device = resolve_device(device)
    amp = resolve_precision(precision, torch_device)
    drseg_options = drseg_options_from(
        dict(
            rho=rho,
            k=k,
            alpha=alpha,
            steps=steps,
            gamma=gamma,
            window=window,
            tau=tau,
            clip_baseline=clip_baseline,
        ),
        no_spsd=no_spsd,
        no_pdgr=no_pdgr,
        no_ugaf=no_ugaf,
    )
    ckpt_info: dict = {}
    if checkpoint is not None:  # cheap: classes and tile size before the model is built
        from drseg_cli.train.checkpoint import read_checkpoint_info

        ckpt_info = read_checkpoint_info(checkpoint)
    class_specs, classes_source = resolve_classes(
        classes, dataset.layout, ckpt_info.get("classes"), checkpoint
    )
    class_specs, dataset, split_info = apply_class_split(
        class_specs, dataset, class_split, holdout_classes, ckpt_info.get("holdout")
    )
    names = [c.name for c in class_specs]
    rule = evaluation_rule(names, threshold, background)  # before any model loads
    if not (quiet or json_):
        print_resolved(dataset, names, classes_source, absent_classes)
    net, _ = build_model_for(
        model=model,
        method=method,
        checkpoint=checkpoint,
        clip_model=clip_model,
        clip_pretrained=clip_pretrained,
        dino_model=dino_model,
        dino_checkpoint=dino_checkpoint,
        drseg_options=drseg_options,
        device=str(torch_device),
        clip_branch=as_clip_branch,
        dglrsis=dglrsis,
    )
    if net.random_weights and not quiet:
        logging.getLogger("drseg").warning(
            "model %r has random weights: metrics are meaningless (for tests only)",
            str(checkpoint) if checkpoint is not None else model,
        )
    predictor = TilePredictor(net, [c.prompt_names for c in class_specs], torch_device, amp)
    overlap, blend = tiling_defaults(overlap, blend, net)
    config = EvalConfig(
        rule=rule,
        tile_size=tile_size or ckpt_info.get("tile_size"),
        overlap=overlap,
        blend=blend,
        batch_size=batch_size,
        bands=parse_int_list(bands, "--bands"),
        percentiles=parse_percentiles(percentiles),
    )
    show = not (quiet or json_) and sys.stderr.isatty()
    with _Progress(show, "evaluate") as progress:
        result = run_evaluation(
            dataset,
            predictor,
            names,
            config,
            tile_multiple=net.preprocess.multiple,
            default_tile_size=net.preprocess.tile_size,
            progress=lambda n, total: progress(n, total),
            absent_classes=absent_classes,
        )
    result.info = {
        "dataset": dataset.describe(),
        "classes": names,
        "classes_source": classes_source,
        "model": model if checkpoint is None else str(checkpoint),
        "method": method if checkpoint is None else "drseg-trained",
        "as_clip_branch": as_clip_branch,
        "device": str(torch_device),
        "precision": "fp32" if amp is None else str(amp).removeprefix("torch."),
        "overlap": overlap,
        "blend": blend,
        "threshold": threshold,
        "background": background if threshold else None,
        "config": str(config) if config is not None else None,
        "batch_size": batch_size,
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
    if split_info is not None:
        if split_info["split"] == "all":
            split_info |= seen_unseen(result.metrics, split_info["unseen"])
        result.info["class_split"] = split_info
    payload = result.to_dict()
    if output is not None:
        write_json(output, payload)
    if csv_path is not None:
        write_csv(csv_path, result.metrics.csv_rows())
    if json_:
        print_json(payload)
    elif not quiet:
        print_table(result)


def resolve_classes(spec: str | None, layout, checkpoint_classes, checkpoint=None):
    """``--classes``, else the benchmark layout's default list, else the checkpoint's.

    Returns ``(specs, source)``; the source is recorded with the results.
    """
    from drseg_cli.classes import ClassSpec, parse_classes

    if spec:
        specs = parse_classes(spec)
        if layout.classes and len(specs) != len(layout.classes):
            logging.getLogger("drseg").warning(
                "--classes gives %d classes but layout %s has %d: label value i is class i "
                "of --classes",
                len(specs),
                layout.name,
                len(layout.classes),
            )
        return specs, "--classes"
    if layout.classes:
        return layout.class_specs(), f"layout {layout.name}"
    if checkpoint_classes:
        specs = [ClassSpec(c["name"], tuple(c.get("synonyms", ()))) for c in checkpoint_classes]
        return specs, f"checkpoint {checkpoint}"
    raise UsageError(f"--classes is required for the {layout.name} layout")


CLASS_SPLITS = ("all", "seen", "unseen")


def apply_class_split(class_specs, dataset, class_split, holdout, checkpoint_holdout):
    """``--class-split`` with ``--holdout-classes`` (else the checkpoint's held-out classes).

    ``seen``/``unseen``: only those classes are predicted and scored (labels of the others
    ignored); ``all``: every class predicted, mIoU reported per subset (added after the run).
    Returns ``(class_specs, dataset, info)``; ``info`` None without held-out classes.
    """
    from drseg_cli.classes import holdout_indices, parse_name_list

    if class_split is not None and class_split not in CLASS_SPLITS:
        raise UsageError(f"--class-split {class_split!r}: choose one of {', '.join(CLASS_SPLITS)}")
    held_names = parse_name_list(holdout) or list(checkpoint_holdout or [])
    if not held_names:
        if class_split is not None:
            raise UsageError(
                "--class-split needs --holdout-classes (or a checkpoint trained with them)"
            )
        return class_specs, dataset, None
    names = [c.name for c in class_specs]
    held = holdout_indices(held_names, names)
    mode = class_split or "all"
    info = {
        "split": mode,
        "seen": [n for i, n in enumerate(names) if i not in held],
        "unseen": [names[i] for i in held],
    }
    if mode == "all":
        return class_specs, dataset, info
    keep = [i for i in range(len(names)) if (i in held) == (mode == "unseen")]
    return [class_specs[i] for i in keep], dataset.restricted(keep, len(names)), info


def print_resolved(dataset, names: list[str], classes_source: str, absent_classes: str) -> None:
    """Say on stderr which layout, split and class list are used, before any model time."""
    d = dataset.describe()
    how = "detected" if d["detected"] else "given"
    remap = "0 → ignore, v → class v−1" if d["reduce_zero_label"] else "label value v = class v"
    lines = [
        f"dataset {d['root']}: layout {d['layout']} ({how}; {d['layout_title']})",
        f"  tree {d['tree']}, split {d['split']}, {d['images']} images; {remap}, "
        f"{d['ignore_index']} ignored; absent classes: {absent_classes}",
        f"  {len(names)} classes from {classes_source}: "
        + ", ".join(f"{i} {n}" for i, n in enumerate(names)),
    ]
    for line in lines:
        err_console.print(line, markup=False)


def write_json(path: Path, payload: dict) -> None:
    """Atomically write ``payload`` as indented JSON (NaN already mapped to null)."""
    from drseg_cli.atomic import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")


def write_csv(path: Path, rows: list[list[str]]) -> None:
    """Atomically write rows as CSV."""
    from drseg_cli.atomic import atomic_output

    with atomic_output(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)


def print_table(result) -> None:
    """Per-class IoU/Acc and the summary as a rich table on stdout."""
    import math

    from rich.console import Console
    from rich.table import Table

    m = result.metrics
    table = Table(title=f"{result.images} images, {result.tiles} tiles")
    for col in ("class", "IoU", "Acc", "gt pixels", "pred pixels"):
        table.add_column(col, justify="left" if col == "class" else "right")

    def fmt(v: float) -> str:
        return "—" if math.isnan(v) else f"{v:.2f}"

    for i, name in enumerate(m.class_names):
        table.add_row(
            name, fmt(m.iou[i]), fmt(m.acc[i]), f"{m.gt_pixels[i]:,}", f"{m.pred_pixels[i]:,}"
        )
    table.add_section()
    table.add_row("mean", fmt(m.miou), fmt(m.macc), f"{m.gt_pixels.sum():,}", "", style="bold")
    console = Console(highlight=False)
    console.print(table)
    console.print(
        f"mIoU {fmt(m.miou)}  mACC {fmt(m.macc)}  aAcc {fmt(m.pixel_accuracy)}  "
        f"fwIoU {fmt(m.fwiou)}  ({result.seconds:.1f} s)"
    )
    split = result.info.get("class_split")
    if split and split["split"] == "all":
        console.print(
            f"seen mIoU {split['mIoU_seen']}  unseen mIoU {split['mIoU_unseen']}  "
            f"harmonic {split['hIoU']}  (unseen: {', '.join(split['unseen'])})"
        )
    elif split:
        console.print(f"{split['split']} classes only: {', '.join(m.class_names)}")
    if m.unpredicted_pixels:
        err_console.print(
            f"note: {m.unpredicted_pixels:,} labelled pixels had no prediction (image nodata) "
            "and were not scored",
            markup=False,
        )


def evaluation_rule(names: list[str], threshold: float, background: str):
    """The class rule for ``--threshold``: the background must be a class the labels score."""
    from drseg_cli.pipeline.segment import class_table

    name = background_option(threshold, background)
    if threshold and name not in names:
        raise UsageError(
            f"--background {background}: not one of the evaluated classes "
            f"({', '.join(names)}); name the class that low-confidence pixels belong to"
        )
    return class_table(names, threshold, name)[1]


def _evaluate_refer(
    data, layout, split, limit, model, method, checkpoint, device, precision, ignore_index,
    output, overwrite, quiet, json_, started,
) -> None:  # fmt: skip
    """``--task refer``: gIoU, cIoU, Pr@0.5…0.9 of a referring model (docs/REFER.md)."""
    from drseg_cli.atomic import check_writable
    from drseg_cli.evaluate.refer import evaluate_refer, load_refer_dataset
    from drseg_cli.model.factory import DEFAULT_REFER_METHOD, build_referring_model
    from drseg_cli.pipeline.runtime import resolve_device

    check_writable([output] if output else [], overwrite)
    dataset = load_refer_dataset(data, split, layout, limit)
    if not quiet:  # which layout and file, before any model time
        d = dataset.describe()
        how = "detected" if d["detected"] else "given"
        err_console.print(
            f"dataset {d['root']}: layout {d['layout']} ({how}), {d['samples']} samples from "
            f"{d['annotations']}",
            markup=False,
        )
    torch_device = resolve_device(device)
    name = DEFAULT_REFER_METHOD if method == "drseg" else method  # segment's default
    variant = None if model == "vit-b16" else model
    net = build_referring_model(name, variant, checkpoint=checkpoint, device=str(torch_device))
    if net.random_weights and not quiet:
        logging.getLogger("drseg").warning("random weights: metrics are meaningless (tests)")
    result = evaluate_refer(net, dataset, torch_device, ignore_index)
    result["info"] = {
        "dataset": dataset.describe(),
        "method": name,
        "model": variant,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "device": str(torch_device),
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
    if output is not None:
        write_json(output, result)
    if json_:
        print_json(result)
    elif not quiet:
        m = result["metrics"]
        err_console.print(
            f"{m['samples']} samples: gIoU {m['gIoU']:.2f}  cIoU {m['cIoU']:.2f}  "
            + "  ".join(f"Pr@{t} {m[f'Pr@{t}']:.1f}" for t in (0.5, 0.6, 0.7, 0.8, 0.9)),
            markup=False,
        )
