"""Evaluate a model on a dataset: the same reading, tiling and stitching as ``drseg segment``.

Images larger than one tile go through ``stitch_scene`` (the segment loop); its ``on_rows``
callback reads the matching label rows and adds them to the confusion matrix, so a scene of
any size costs one band of rows. Images that fit in one tile are batched across images
(same reader, same padding, same logits → argmax), which keeps the model busy on datasets
of many small patches. Nothing but the ``K×K`` confusion matrix is kept.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from drseg_cli.errors import InputError, UsageError
from drseg_cli.evaluate.datasets import Dataset, Sample
from drseg_cli.evaluate.metrics import ConfusionMatrix, LabelValueError, SegMetrics
from drseg_cli.pipeline.runtime import TilePredictor
from drseg_cli.pipeline.segment import stitch_scene
from drseg_cli.raster.reader import SceneInfo, Stretch, TileReader, compute_stretch, inspect_raster
from drseg_cli.raster.stitch import (
    ARGMAX,
    DEFAULT_ACCUMULATOR_BYTES,
    ClassRule,
    StitchedRows,
    finalize_logits,
)
from drseg_cli.raster.tiling import TileGrid

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


@dataclass
class EvalConfig:
    """How images are read and tiled for evaluation (defaults = ``drseg segment``'s)."""

    tile_size: int | None = None  # None: the model's preferred tile size
    overlap: float = 0.25
    blend: str = "linear"  # blend window of overlapping tiles (raster.tiling.BLEND_MODES)
    batch_size: int = 4
    bands: Sequence[int] | None = None
    percentiles: tuple[float, float] = (2.0, 98.0)
    read_threads: int = 2
    accumulator_bytes: int = DEFAULT_ACCUMULATOR_BYTES
    rule: ClassRule = ARGMAX  # --threshold/--background (pipeline.segment.class_table)


@dataclass
class EvalResult:
    """Metrics of one evaluation run plus what it cost."""

    metrics: SegMetrics
    images: int
    tiles: int
    seconds: float
    tile_size: int
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            **self.metrics.to_dict(),
            "images": self.images,
            "tiles": self.tiles,
            "tile_size": self.tile_size,
            "seconds": round(self.seconds, 3),
            **self.info,
        }


@dataclass
class _Prepared:
    sample: Sample
    info: SceneInfo
    stretch: Stretch | None


def _prepare(sample: Sample, dataset: Dataset, config: EvalConfig) -> _Prepared:
    info = inspect_raster(sample.image, config.bands, allow_no_crs=True)
    with dataset.open_label(sample, info):
        pass  # validates bands, dtype, size and georeference before any model time is spent
    return _Prepared(sample, info, compute_stretch(info, config.percentiles))


def _update(conf: ConfusionMatrix, label_path, gt, pred, valid) -> None:
    try:
        conf.update(gt, pred, valid)
    except LabelValueError as exc:
        raise InputError(f"{label_path}: {exc}") from None


def evaluate_dataset(
    dataset: Dataset,
    predictor: TilePredictor,
    class_names: Sequence[str],
    config: EvalConfig,
    *,
    tile_multiple: int,
    default_tile_size: int,
    progress: ProgressFn | None = None,
    shard: tuple[int, int] = (0, 1),
) -> tuple[ConfusionMatrix, int, int]:
    """Accumulate the confusion matrix of ``predictor`` over (a shard of) ``dataset``.

    Returns ``(confusion, images, tiles)``. ``shard = (rank, world)`` evaluates every
    ``world``-th image starting at ``rank`` (for multi-process evaluation; sum the matrices).
    """
    if predictor.num_classes != len(class_names):
        raise UsageError("model text embeddings do not match the class list")
    size = config.tile_size or default_tile_size
    if size < tile_multiple or size % tile_multiple:
        raise UsageError(f"--tile-size {size}: must be a positive multiple of {tile_multiple}")
    rank, world = shard
    samples = dataset.samples[rank::world]
    conf = ConfusionMatrix(len(class_names), dataset.ignore_index)
    tiles = done = 0
    small: list[_Prepared] = []

    def flush_small() -> None:
        nonlocal tiles, done
        if small:
            tiles += _evaluate_single_tiles(small, dataset, predictor, conf, size, config)
            done += len(small)
            if progress:
                progress(len(small), len(samples))
            small.clear()

    with ThreadPoolExecutor(max(1, config.read_threads), "drseg-eval-prep") as pool:
        for prepared in _ahead(pool, samples, dataset, config):
            if prepared.info.width <= size and prepared.info.height <= size:
                small.append(prepared)
                if len(small) == config.batch_size:
                    flush_small()
                continue
            flush_small()
            tiles += _evaluate_scene(prepared, dataset, predictor, conf, size, config)
            done += 1
            if progress:
                progress(1, len(samples))
        flush_small()
    return conf, done, tiles


def _ahead(
    pool: ThreadPoolExecutor, samples: Sequence[Sample], dataset: Dataset, config: EvalConfig
) -> Iterator[_Prepared]:
    """Validate/describe upcoming images in the pool, a couple of batches ahead."""
    pending: deque[Future] = deque()
    depth = max(2, 2 * config.batch_size)
    for sample in samples:
        pending.append(pool.submit(_prepare, sample, dataset, config))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _evaluate_scene(
    p: _Prepared,
    dataset: Dataset,
    predictor: TilePredictor,
    conf: ConfusionMatrix,
    size: int,
    config: EvalConfig,
) -> int:
    """One image larger than a tile: ``stitch_scene`` hands rows, we read the label rows."""
    grid = TileGrid.from_fraction(p.info.width, p.info.height, size, config.overlap)
    with dataset.open_label(p.sample, p.info) as labels:

        def on_rows(rows: StitchedRows) -> None:
            gt = labels.read(rows.y0, rows.height)
            _update(conf, p.sample.label, gt, rows.classes, rows.valid)

        counts = stitch_scene(
            p.info,
            p.stretch,
            grid,
            predictor,
            on_rows,
            batch_size=config.batch_size,
            read_threads=config.read_threads,
            accumulator_bytes=config.accumulator_bytes,
            blend=config.blend,
            rule=config.rule,
            outputs=(),  # classes only
        )
    return counts.run


def _read_single(p: _Prepared, dataset: Dataset, size: int):
    with TileReader(p.info, p.stretch) as reader:
        rgb, valid = reader.read(0, 0, size)
    with dataset.open_label(p.sample, p.info) as labels:
        gt = labels.read()
    return rgb, valid, gt


def _evaluate_single_tiles(
    batch: Sequence[_Prepared],
    dataset: Dataset,
    predictor: TilePredictor,
    conf: ConfusionMatrix,
    size: int,
    config: EvalConfig,
) -> int:
    """Images that fit in one tile, batched: pad like the reader does, predict, argmax."""
    with ThreadPoolExecutor(max(1, config.read_threads), "drseg-eval-read") as pool:
        reads = list(pool.map(lambda p: _read_single(p, dataset, size), batch))
    run = [i for i, (_, valid, _) in enumerate(reads) if valid.any()]
    for i, (_, valid, gt) in enumerate(reads):
        if i not in run:  # all nodata: never sent to the model (as in segment)
            _update(conf, batch[i].sample.label, gt, np.zeros_like(gt), np.zeros_like(valid))
    if not run:
        return 0
    logits = predictor.predict(np.stack([reads[i][0] for i in run]))
    for j, i in enumerate(run):
        p, (_, valid, gt) = batch[i], reads[i]
        h, w = p.info.height, p.info.width
        pred, _ = finalize_logits(logits[j][:, :h, :w], valid[:h, :w], config.rule)
        _update(conf, p.sample.label, gt, pred, valid[:h, :w])
    return len(run)


def run_evaluation(
    dataset: Dataset,
    predictor: TilePredictor,
    class_names: Sequence[str],
    config: EvalConfig,
    *,
    tile_multiple: int,
    default_tile_size: int,
    progress: ProgressFn | None = None,
    absent_classes: str = "count",
) -> EvalResult:
    """Evaluate the whole dataset in this process and compute the metrics.

    ``absent_classes``: how classes absent from the ground truth enter mIoU (``metrics``).
    """
    start = time.perf_counter()
    conf, images, tiles = evaluate_dataset(
        dataset,
        predictor,
        class_names,
        config,
        tile_multiple=tile_multiple,
        default_tile_size=default_tile_size,
        progress=progress,
    )
    return EvalResult(
        metrics=SegMetrics.from_confusion(conf, class_names, absent_classes),
        images=images,
        tiles=tiles,
        seconds=time.perf_counter() - start,
        tile_size=config.tile_size or default_tile_size,
    )
