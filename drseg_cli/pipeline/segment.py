"""One scene → georeferenced outputs: read tiles, predict in batches, stitch, write.

Reading runs in a small thread pool ahead of the model and stitching/writing runs in one
background thread behind it, so the model (the expensive part) rarely waits for disk.
Memory is bounded by the batch, the prefetch depth and one band of stitched rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from drseg_cli.atomic import (
    check_writable,
    commit_together,
    publish,
    staged_paths,
    staging_folder,
    temp_path_for,
)
from drseg_cli.classes import ClassSpec
from drseg_cli.errors import UsageError
from drseg_cli.raster.gdal_env import scene_cache_bytes, scene_gdal_env
from drseg_cli.raster.mask_meta import CLIPPED_TAG, MASK_NODATA
from drseg_cli.raster.reader import (
    SceneInfo,
    Stretch,
    TileReader,
    compute_stretch,
    inspect_raster,
)
from drseg_cli.raster.remote import is_remote
from drseg_cli.raster.stitch import (
    ARGMAX,
    DEFAULT_ACCUMULATOR_BYTES,
    ClassRule,
    CoarseLogitAccumulator,
    LogitAccumulator,
    StitchedRows,
)
from drseg_cli.raster.tiling import Tile, TileGrid, blend_window
from drseg_cli.raster.vsi import is_vsi, output_path
from drseg_cli.raster.writers import (
    ClassMaskWriter,
    ProbabilityWriter,
    RasterWriter,
    ScalarWriter,
)

if TYPE_CHECKING:  # torch is imported by whoever builds the predictor, not by `drseg check`
    from drseg_cli.model.base import TileProposals
    from drseg_cli.pipeline.runtime import TilePredictor
    from drseg_cli.raster.aoi import AreaOfInterest

log = logging.getLogger(__name__)

MASK_SUFFIXES = (".tif", ".tiff")
VECTOR_SUFFIXES = (".gpkg", ".shp", ".geojson", ".json", ".parquet")

ProgressFn = Callable[[int], None]
DEFAULT_BACKGROUND = "background"


def class_table(
    names: Sequence[str], threshold: float = 0.0, background: str | None = DEFAULT_BACKGROUND
) -> tuple[list[str], ClassRule]:
    """The mask's class names and the rule that picks a pixel's class among them.

    With a threshold, pixels whose best probability is below it get the class named
    ``background`` (one of ``names``, or a class appended after them), or nodata if None.
    """
    names = list(names)
    if not threshold:
        return names, ARGMAX
    if background is None:
        return names, ClassRule(threshold)
    if background not in names:
        if len(names) >= MASK_NODATA:
            raise UsageError(f"--background {background}: no class value left for it")
        names.append(background)
    return names, ClassRule(threshold, names.index(background))


@dataclass(frozen=True)
class OutputPlan:
    """Where each product of a scene goes; ``None`` = not written."""

    mask: Path | None
    vector: Path | None = None
    probs: Path | None = None
    uncertainty: Path | None = None
    proposals: Path | None = None  # per-proposal polygons (mask-classification methods)

    def __post_init__(self) -> None:
        if self.proposals is not None:
            seen: dict[str, Path] = {}
            for path in self.final_paths():
                key = os.path.normcase(os.path.abspath(path))
                if key in seen:
                    raise UsageError(f"{path}: two outputs of the scene would share this file")
                seen[key] = path

    def items(self) -> list[tuple[str, Path]]:
        """The outputs by kind, as ``SceneResult.outputs`` and the batch manifest name them
        (the mask's ``.qml`` style is one)."""
        items = [
            ("mask", self.mask),
            ("style", self.mask.with_suffix(".qml") if self.mask else None),
            ("vector", self.vector),
            ("probs", self.probs),
            ("uncertainty", self.uncertainty),
            ("proposals", self.proposals),
        ]
        return [(kind, path) for kind, path in items if path is not None]

    @classmethod
    def from_output(
        cls,
        output: Path,
        *,
        vector: bool = False,
        probs: Path | None = None,
        uncertainty: Path | None = None,
        proposals: Path | None = None,
    ) -> OutputPlan:
        """Mask for ``*.tif``; polygons for ``*.gpkg/.shp/.geojson/.parquet`` (or ``--vector``).
        Every path may be an object-store URL (``s3://b/k`` → ``/vsis3/b/k``)."""
        output = output_path(output)
        probs, uncertainty, proposals = (
            output_path(p) if p is not None else None for p in (probs, uncertainty, proposals)
        )
        suffix = output.suffix.lower()
        if suffix in MASK_SUFFIXES:
            vec = output.with_suffix(".gpkg") if vector else None
            return cls(output, vec, probs, uncertainty, proposals)
        if suffix in VECTOR_SUFFIXES:
            return cls(None, output, probs, uncertainty, proposals)
        raise UsageError(
            f"{output}: unknown output type {suffix or '(none)'}; use .tif for a mask or "
            ".gpkg/.shp/.geojson/.parquet for polygons"
        )

    def final_paths(self) -> list[Path]:
        """Every file the outputs consist of (styles and shapefile sidecars included)."""
        return plan_files(self)


@dataclass
class SegmentConfig:
    """How a scene is read, tiled and written (model-independent)."""

    tile_size: int | None = None  # None: the model's preferred tile size
    overlap: float = 0.25
    blend: str = "linear"  # blend window of overlapping tiles (raster.tiling.BLEND_MODES)
    bands: Sequence[int] | None = None
    allow_no_crs: bool = False
    percentiles: tuple[float, float] = (2.0, 98.0)
    batch_size: int = 4
    read_threads: int | None = None  # None: default_read_threads (1 on a CPU, local file)
    cog: bool = True
    probs_dtype: str = "uint8"
    min_area: float = 0.0
    simplify: float = 0.0
    overwrite: bool = False
    accumulator_bytes: int = DEFAULT_ACCUMULATOR_BYTES
    logit_scale: int = 1  # stitch logits this many times coarser, upsample when writing
    gdal_cache_bytes: int | None = None  # GDAL block cache; None: from the width (gdal_env)
    threshold: float = 0.0  # best class probability below this → ``background``
    background: str | None = DEFAULT_BACKGROUND  # class name, or None: nodata
    dst_crs: str | None = None  # CRS of polygon outputs; None: the scene's (GeoJSON: WGS 84)
    device_stitch: bool | None = None  # blend on the model's device; None: on CUDA when it fits
    aoi: str | None = None  # area of interest: vector file, WKT or minx,miny,maxx,maxy
    aoi_crs: str | None = None  # CRS of a WKT/box AOI (or a file without one); None: scene's

    #: Fields that change only speed, memory or replacement rules, never what is written.
    RUNTIME_FIELDS = (
        "batch_size",
        "read_threads",
        "overwrite",
        "accumulator_bytes",
        "gdal_cache_bytes",
        "device_stitch",
    )

    def output_settings(self) -> dict:
        """Every field that shapes the outputs (a batch's ``--resume`` fingerprint uses it)."""
        values = asdict(self)
        return {k: v for k, v in values.items() if k not in self.RUNTIME_FIELDS}


@dataclass
class SceneResult:
    """Summary of one segmented scene (goes into ``--json`` and the batch manifest)."""

    input: str
    outputs: dict[str, str]
    width: int
    height: int
    crs: str | None
    tiles_total: int
    tiles_run: int
    tiles_skipped: int
    seconds: float
    tiles_outside_aoi: int = 0
    class_pixels: dict[str, int] = field(default_factory=dict)
    #: sha256 of each output when the process that wrote them computed it (a Ray worker:
    #: the driver then need not read every output back over the network); else None
    checksums: dict[str, str] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def tile_size_for(config: SegmentConfig, multiple: int, default: int) -> int:
    size = config.tile_size or default
    if size < multiple or size % multiple:
        raise UsageError(f"--tile-size {size}: must be a positive multiple of {multiple}")
    return size


#: Most tiles one read covers (neighbours in a grid row): bounds a read's memory whatever
#: the scene width.
ROW_READ_TILES = 16


def row_runs(tiles: Iterable[Tile], most: int = ROW_READ_TILES) -> Iterator[list[Tile]]:
    """Tiles in grid order, grouped into runs of neighbours in one grid row (consecutive
    columns, at most ``most``): each run is read as one window (``TileReader.read_row``)."""
    run: list[Tile] = []
    for tile in tiles:
        if run and (tile.row != run[-1].row or tile.col != run[-1].col + 1 or len(run) == most):
            yield run
            run = []
        run.append(tile)
    if run:
        yield run


def default_read_threads(info: SceneInfo, device_type: str) -> int:
    """Read threads for a scene: one for a local file on a CPU, two otherwise.

    Each read thread has its own GDAL handle, and GDAL caches decoded blocks per handle: two
    threads decode many input blocks twice (0.30 → 0.55 CPU ms per 224 px tile of a deflate
    scene). One thread reads faster than a CPU model runs, and on a CPU every core it
    spends decoding is taken from the model; a GPU's host has cores to spare, and range
    requests to a remote file need the second thread to hide their latency.
    """
    return 1 if device_type == "cpu" and not is_remote(info.path) else 2


def default_decode_threads(device_type: str) -> str | None:
    """GDAL decoding threads per read thread: every core on a GPU's host, whose cores are
    free while the model runs on the device (one read thread decodes a 4096² deflate scene
    1.5× faster with two cores); on a CPU none, as the model needs the cores."""
    return "ALL_CPUS" if device_type == "cuda" else None


def _prefetch(
    tiles: Iterable[Tile],
    read: Callable[[Sequence[Tile]], list[tuple[np.ndarray, np.ndarray]]],
    pool: ThreadPoolExecutor,
    depth: int,
) -> Iterator[tuple[Tile, np.ndarray, np.ndarray]]:
    """Tiles in grid order, read by runs of row neighbours (``row_runs``) by the pool, at
    least ``depth`` tiles ahead."""
    pending: deque[tuple[list[Tile], Future]] = deque()
    ahead = 0
    for run in row_runs(tiles):
        pending.append((run, pool.submit(read, run)))
        ahead += len(run)
        while pending and ahead - len(pending[0][0]) >= depth:
            done, fut = pending.popleft()
            ahead -= len(done)
            for t, (rgb, valid) in zip(done, fut.result(), strict=True):
                yield t, rgb, valid
    while pending:
        done, fut = pending.popleft()
        for t, (rgb, valid) in zip(done, fut.result(), strict=True):
            yield t, rgb, valid


class _SceneSink:
    """Writes the finished rows of every raster output of a scene."""

    def __init__(
        self,
        info: SceneInfo,
        class_names: Sequence[str],
        plan: OutputPlan,
        config: SegmentConfig,
        mask_path: Path,
        score_path: Path | None,
        mask_names: Sequence[str] | None = None,
        clipped: bool = False,
    ) -> None:
        """``class_names``: the model's classes (probability bands); ``mask_names``: the
        mask's class table (``class_names`` plus a background class, see ``class_table``);
        ``clipped``: cut to an area of interest (recorded in the mask's tags)."""
        self.counts = np.zeros(256, np.int64)
        self.writers: list[RasterWriter] = []
        table = mask_names or class_names
        tags = {CLIPPED_TAG: "aoi"} if clipped else None
        self.mask = self._add(ClassMaskWriter(mask_path, info, table, cog=config.cog, tags=tags))
        self.probs = self.uncertainty = self.score = None
        if plan.probs:
            self.probs = self._add(
                ProbabilityWriter(
                    plan.probs, info, class_names, dtype=config.probs_dtype, cog=config.cog
                )
            )
        if plan.uncertainty:
            self.uncertainty = self._add(
                ScalarWriter(plan.uncertainty, info, "uncertainty", cog=config.cog)
            )
        if score_path:
            self.score = self._add(ScalarWriter(score_path, info, "score", cog=False))

    def _add(self, writer: RasterWriter):
        self.writers.append(writer)
        return writer

    @property
    def row_outputs(self) -> frozenset[str]:
        """What the rows must carry besides classes (``device_stitch.ROW_OUTPUTS``)."""
        wanted = set()
        if self.probs:
            wanted.add("prob_codes" if self.probs.quantise else "probs")
        if self.uncertainty:
            wanted.add("uncertainty")
        if self.score:
            wanted.add("score")
        return frozenset(wanted)

    def write(self, rows: StitchedRows) -> None:
        self.mask.write_rows(rows.y0, rows.classes)
        self.counts += np.bincount(rows.classes.ravel(), minlength=256)
        if self.probs:
            if self.probs.quantise and rows.prob_codes is not None:
                self.probs.write_rows(rows.y0, rows.prob_codes)
            else:
                self.probs.write_probs(rows.y0, rows.probs, rows.valid)
        if self.uncertainty:
            self.uncertainty.write_rows(rows.y0, rows.uncertainty())
        if self.score:
            self.score.write_rows(rows.y0, rows.score())

    def abort(self) -> None:
        for w in self.writers:
            w.abort()


@dataclass
class TileCounts:
    total: int
    run: int = 0
    skipped: int = 0  # entirely nodata: never sent to the model
    outside_aoi: int = 0  # no pixel in the area of interest: never read


#: Every extra a row can carry (``stitch_scene``'s default: nothing is left out).
ALL_ROW_OUTPUTS = ("probs", "score", "uncertainty")
RowJob = Callable[[Callable[[StitchedRows], None]], None]
#: Receives one tile's proposals (``TilePredictor.keep_proposals``) and its valid pixels.
ProposalsFn = Callable[[Tile, "TileProposals", np.ndarray], None]


def stitch_scene(
    info: SceneInfo,
    stretch: Stretch | None,
    grid: TileGrid,
    predictor: TilePredictor,
    on_rows: Callable[[StitchedRows], None],
    *,
    batch_size: int = 4,
    read_threads: int | None = None,
    accumulator_bytes: int = DEFAULT_ACCUMULATOR_BYTES,
    tmp_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    blend: str = "linear",
    rule: ClassRule = ARGMAX,
    outputs: Collection[str] = ALL_ROW_OUTPUTS,
    device_stitch: bool | None = None,
    aoi: AreaOfInterest | None = None,
    on_proposals: ProposalsFn | None = None,
) -> TileCounts:
    """Predict every tile of a scene and hand the stitched rows, top to bottom, to ``on_rows``.

    Tiles are read ahead by ``read_threads`` (None: ``default_read_threads``); stitching and
    ``on_rows`` run in one background thread (at most two batches behind), so the model is
    the only thing on the main thread.
    ``blend`` picks the blend window (``flat``: overlapping tiles averaged uniformly);
    ``rule`` how each pixel's class is chosen (``class_table``). With ``aoi`` only the tiles
    that reach it are read and predicted, and pixels outside it are nodata (the AOI is
    rasterised tile by tile, in the read threads).

    ``device_stitch`` (None: on a CUDA device, when the band fits ``accumulator_bytes`` and
    logits are stitched at full resolution) blends on the model's device and brings back only
    final rows, carrying the ``outputs`` asked for (``device_stitch.ROW_OUTPUTS``; the host
    path computes them on first use, whatever ``outputs`` says).

    ``on_proposals`` (the predictor keeping proposals): called in the stitch thread with each
    predicted tile, its ``TileProposals`` and its valid pixels.
    """
    f = grid.align  # > 1: stitch on a grid f times coarser (CoarseLogitAccumulator)
    out_size = grid.size // f
    window = blend_window(out_size, grid.overlap // f, blend)
    k = predictor.num_classes
    if device_stitch is None:
        device_stitch = _device_stitch_fits(predictor, info, grid, accumulator_bytes)
    counts = TileCounts(len(grid))
    tiles: Iterable[Tile] = grid
    if aoi is not None:
        from drseg_cli.raster.aoi import count_tiles

        counts.outside_aoi = counts.total - count_tiles(aoi, grid)
        tiles = aoi.tiles(grid)
    to_run = counts.total - counts.outside_aoi

    if device_stitch:
        if f > 1:
            raise ValueError("device stitching works at full resolution (logit_scale 1)")
        stitcher: _Stitcher = _DeviceStitcher(info, grid, predictor, window, rule, outputs)
        stitcher.on_proposals = on_proposals
    else:
        budget = {"max_bytes": accumulator_bytes, "tmp_dir": tmp_dir, "rule": rule}
        if f > 1:
            acc = CoarseLogitAccumulator(k, info.width, info.height, grid.size, f, **budget)
        else:
            acc = LogitAccumulator(k, info.width, info.height, grid.size, **budget)
        stitcher = _HostStitcher(acc, predictor, window, f)
        stitcher.on_proposals = on_proposals

    try:
        with (
            TileReader(
                info,
                stretch,
                raw=True,
                decode_threads=default_decode_threads(predictor.device.type),
            ) as reader,
            ThreadPoolExecutor(
                max(1, read_threads or default_read_threads(info, predictor.device.type)),
                "drseg-read",
            ) as read_pool,
            ThreadPoolExecutor(1, "drseg-stitch") as stitch_pool,
        ):
            pending: deque[Future] = deque()
            batch: list[tuple[Tile, np.ndarray, np.ndarray]] = []

            def read(run: Sequence[Tile]) -> list[tuple[np.ndarray, np.ndarray]]:
                got = reader.read_row([t.x0 for t in run], run[0].y0, grid.size)
                if aoi is not None:
                    for tile, (_, valid) in zip(run, got, strict=True):
                        h, w = tile.height, tile.width
                        valid[:h, :w] &= aoi.window_mask(tile.x0, tile.y0, w, h)
                return got

            def flush_batch() -> None:
                job = stitcher.predict(batch, out_size)  # the model, on this thread
                pending.append(stitch_pool.submit(job, on_rows))
                while len(pending) > 2:
                    pending.popleft().result()
                counts.run += len(batch)
                if progress:
                    progress(len(batch), to_run)
                batch.clear()

            for tile, rgb, valid in _prefetch(tiles, read, read_pool, max(2, batch_size * 2)):
                if not valid[: tile.height, : tile.width].any():
                    counts.skipped += 1
                    if progress:
                        progress(1, to_run)
                    continue
                batch.append((tile, rgb, valid))
                if len(batch) == batch_size:
                    flush_batch()
            if batch:
                flush_batch()
            while pending:
                pending.popleft().result()
        stitcher.finish(info.height, on_rows)
    finally:
        stitcher.close()
    return counts


class _Stitcher:
    """One batch's model call (main thread) and the stitching job it hands the stitch thread."""

    on_proposals: ProposalsFn | None = None

    def proposals_job(
        self, predictor: TilePredictor, batch: Sequence[tuple[Tile, np.ndarray, np.ndarray]]
    ) -> Callable[[], None]:
        """Hand the batch's proposals over (in the stitch thread; nothing without a sink)."""
        sink, props = self.on_proposals, predictor.proposals
        if sink is None or props is None:
            return lambda: None
        if len(props) != len(batch):
            raise RuntimeError(f"{len(props)} proposal sets for a batch of {len(batch)} tiles")
        pairs = [(b[0], p, b[2]) for b, p in zip(batch, props, strict=True)]

        def job() -> None:
            for tile, p, valid in pairs:
                sink(tile, p, valid)

        return job

    def predict(self, batch: Sequence[tuple[Tile, np.ndarray, np.ndarray]], size: int) -> RowJob:
        raise NotImplementedError

    def finish(self, height: int, on_rows: Callable[[StitchedRows], None]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the stitcher holds (a memmap)."""


class _HostStitcher(_Stitcher):
    """Logits to the host, blended by the numpy ``LogitAccumulator`` in the stitch thread."""

    def __init__(self, acc, predictor: TilePredictor, window: np.ndarray, scale: int) -> None:
        self.acc, self.predictor, self.window, self.scale = acc, predictor, window, scale

    def predict(self, batch, size):
        from drseg_cli.pipeline.runtime import resample_logits

        # on a CPU the logits are resampled to the tile size in the stitch thread: the main
        # thread, the pipeline's critical path, only runs the model (same op, same values)
        on_cpu = self.predictor.device.type == "cpu"
        tiles_in = np.stack([b[1] for b in batch])
        model_logits = self.predictor.predict_tensor(tiles_in, size, resample=not on_cpu)
        tiles, valids = [b[0] for b in batch], [b[2] for b in batch]
        f, acc, window = self.scale, self.acc, self.window
        proposals = self.proposals_job(self.predictor, batch)

        def job(on_rows: Callable[[StitchedRows], None]) -> None:
            proposals()
            logits = resample_logits(model_logits, size).cpu().numpy()
            for tile, lg, valid in zip(tiles, logits, valids, strict=True):
                h, w = tile.height, tile.width
                hc, wc = -(-h // f), -(-w // f)
                for rows in acc.add(
                    tile.x0, tile.y0, lg[:, :hc, :wc], window[:hc, :wc], valid[:h, :w]
                ):
                    on_rows(rows)

        return job

    def finish(self, height, on_rows):
        for rows in self.acc.flush(height):
            on_rows(rows)

    def close(self) -> None:
        self.acc.close()


class _DeviceStitcher(_Stitcher):
    """Logits stay on the model's device and are blended there (``device_stitch``); the
    stitch thread only copies final rows back and writes them."""

    def __init__(self, info, grid, predictor: TilePredictor, window, rule, outputs) -> None:
        import torch

        from drseg_cli.pipeline.device_stitch import DeviceLogitAccumulator

        self.torch, self.predictor = torch, predictor
        device = predictor.device
        host_float = torch.float16 if device.type == "cuda" else torch.float32
        self.acc = DeviceLogitAccumulator(
            predictor.num_classes, info.width, info.height, grid.size, device,
            rule=rule, outputs=outputs, host_float=host_float,
        )  # fmt: skip
        self.window = torch.from_numpy(window).to(device)

    def predict(self, batch, size):
        torch = self.torch
        logits = self.predictor.predict_tensor(np.stack([b[1] for b in batch]), size)
        valid = torch.from_numpy(np.stack([b[2] for b in batch])).to(logits.device)
        ready = []
        for i, (tile, _, _) in enumerate(batch):
            h, w = tile.height, tile.width
            lg, vd = logits[i, :, :h, :w], valid[i, :h, :w]
            ready += self.acc.add(tile.x0, tile.y0, lg, self.window[:h, :w], vd)
        proposals = self.proposals_job(self.predictor, batch)

        def job(on_rows: Callable[[StitchedRows], None]) -> None:
            proposals()
            for rows in ready:
                on_rows(rows.to_host())

        return job

    def finish(self, height, on_rows):
        for rows in self.acc.flush(height):
            on_rows(rows.to_host())


def _device_stitch_fits(
    predictor: TilePredictor, info: SceneInfo, grid: TileGrid, budget: int
) -> bool:
    """Stitch on the device: a CUDA model, full-resolution logits, a band within budget."""
    if predictor.device.type != "cuda" or grid.align > 1:
        return False
    from drseg_cli.pipeline.device_stitch import DeviceLogitAccumulator

    need = DeviceLogitAccumulator.band_bytes(predictor.num_classes, info.width, grid.size)
    return need <= budget


def plan_files(plan: OutputPlan) -> list[Path]:
    """Every file the plan's outputs consist of, in a fixed order (QML, shapefile sidecars)."""
    files = []
    if plan.mask is not None:
        files += [plan.mask, plan.mask.with_suffix(".qml")]
    if plan.vector is not None:
        from drseg_cli.raster.vectorize import output_paths

        files += output_paths(plan.vector)
    files += [p for p in (plan.probs, plan.uncertainty) if p is not None]
    if plan.proposals is not None:
        from drseg_cli.raster.vectorize import output_paths

        files += output_paths(plan.proposals)
    return files


def check_plan_crs(plan: OutputPlan, info: SceneInfo, dst_crs: str | None = None) -> None:
    """Refuse, before the model runs, polygons that cannot be written in their CRS (see
    ``raster.vectorize.output_crs``) or a ``dst_crs`` without polygons."""
    layers = [p for p in (plan.vector, plan.proposals) if p is not None]
    if not layers:
        if dst_crs is not None:
            raise UsageError("--dst-crs reprojects polygons: add --vector or -o *.gpkg")
        return
    import pyproj

    from drseg_cli.raster.vectorize import check_crs_storable, output_crs

    crs = None if info.crs is None else pyproj.CRS.from_wkt(info.crs.to_wkt())
    for path in layers:
        check_crs_storable(output_crs(crs, path, dst_crs), path)


def scene_aoi_of(config: SegmentConfig, info: SceneInfo) -> AreaOfInterest | None:
    """``config.aoi`` on the scene (None without one); a one-line error if it misses."""
    if config.aoi is None:
        return None
    from drseg_cli.raster.aoi import scene_aoi

    return scene_aoi(config.aoi, info, config.aoi_crs)


def segment_scene(
    input_path: Path,
    plan: OutputPlan,
    predictor: TilePredictor,
    classes: Sequence[ClassSpec],
    config: SegmentConfig,
    *,
    tile_multiple: int,
    default_tile_size: int,
    progress: Callable[[int, int], None] | None = None,
    stage: Callable[[str], None] | None = None,
) -> SceneResult:
    """Segment one scene into the outputs of ``plan``; nothing is left behind on failure.

    ``progress(tiles, total)`` follows the tiles; ``stage(name)`` names the steps after them.

    GDAL's block cache is capped while it runs: ``config.gdal_cache_bytes``, else sized from
    the scene width and the outputs (``raster/gdal_env.py``).
    """
    start = time.perf_counter()
    check_writable(plan.final_paths(), config.overwrite)
    if any(is_vsi(p) for p in plan.final_paths()):
        return _segment_to_store(
            start,
            input_path,
            plan,
            predictor,
            classes,
            config,
            tile_multiple=tile_multiple,
            default_tile_size=default_tile_size,
            progress=progress,
            stage=stage,
        )
    info = inspect_raster(input_path, config.bands, config.allow_no_crs)
    size = tile_size_for(config, tile_multiple, default_tile_size)
    cache = config.gdal_cache_bytes or scene_cache_bytes(
        info.width, output_bytes_per_pixel(plan, config, predictor.num_classes), size
    )
    with scene_gdal_env(cache, input_path):
        return _segment_scene(
            info, plan, predictor, classes, config, size, progress, stage or _no_stage, start
        )


def _segment_to_store(
    start: float,
    input_path: Path,
    plan: OutputPlan,
    predictor: TilePredictor,
    classes: Sequence[ClassSpec],
    config: SegmentConfig,
    **kwargs: Any,
) -> SceneResult:
    """``segment_scene`` for outputs on an object store: the scene is written to a local
    staging folder by the same code (so the bytes are those of a local run), then each file
    is uploaded (``atomic.publish``); the result names the objects and carries their sha256."""
    finals = [getattr(plan, f.name) for f in dataclasses.fields(plan)]  # every output kind
    with staging_folder() as folder:
        local = OutputPlan(*staged_paths(finals, folder))
        staged_config = dataclasses.replace(config, overwrite=True)  # the folder is new
        result = segment_scene(input_path, local, predictor, classes, staged_config, **kwargs)
        pairs = list(zip(plan_files(local), plan_files(plan), strict=True))
        if kwargs.get("stage"):
            kwargs["stage"]("uploading")
        sums = publish(pairs, replace=config.overwrite)
    final = {str(a): str(b) for a, b in pairs}
    result.outputs = {kind: final[path] for kind, path in result.outputs.items()}
    result.checksums = {k: sums[v] for k, v in result.outputs.items() if v in sums}
    result.seconds = round(time.perf_counter() - start, 3)
    return result


def _no_stage(name: str) -> None:
    """No stage labels (no progress display)."""


def output_bytes_per_pixel(plan: OutputPlan, config: SegmentConfig, num_classes: int) -> int:
    """Bytes per pixel of every raster a scene writes (mask, score, probabilities, uncertainty),
    as the writers hold them in GDAL's cache."""
    total = 1 + (4 if plan.vector else 0) + (4 if plan.uncertainty else 0)
    if plan.probs:
        total += num_classes * (1 if config.probs_dtype == "uint8" else 4)
    return total


def _segment_scene(
    info: SceneInfo,
    plan: OutputPlan,
    predictor: TilePredictor,
    classes: Sequence[ClassSpec],
    config: SegmentConfig,
    size: int,
    progress: Callable[[int, int], None] | None,
    stage: Callable[[str], None],
    start: float,
) -> SceneResult:
    stretch = compute_stretch(info, config.percentiles)
    if size % config.logit_scale:
        raise UsageError(f"--logit-scale {config.logit_scale}: must divide the tile size {size}")
    grid = TileGrid.from_fraction(
        info.width, info.height, size, config.overlap, align=config.logit_scale
    )
    names = [c.name for c in classes]
    mask_names, rule = class_table(names, config.threshold, config.background)
    if predictor.num_classes != len(names):
        raise UsageError("model text embeddings do not match the class list")

    check_plan_crs(plan, info, config.dst_crs)  # before any tile is predicted
    aoi = scene_aoi_of(config, info)
    # Every output is written under a temp name and renamed into place together at the end
    # (commit_together), so a failure never leaves new files beside old ones.
    staged = OutputPlan(
        *(
            temp_path_for(p) if p else None
            for p in (plan.mask, plan.vector, plan.probs, plan.uncertainty, plan.proposals)
        )
    )
    anchor = plan.mask or plan.vector
    assert anchor is not None
    mask_path = staged.mask or temp_path_for(anchor.with_suffix(".tif"))
    score_path = temp_path_for(anchor.with_suffix(".score.tif")) if plan.vector else None
    temps = [mask_path, score_path, *plan_files(staged)]
    if plan.proposals:  # a model without proposals: a UsageError before any file
        predictor.keep_proposals(True)
    sink = _SceneSink(
        info, names, staged, config, mask_path, score_path, mask_names, clipped=aoi is not None
    )
    props_writer, on_proposals = None, None
    try:
        if plan.proposals and staged.proposals:
            props_writer, on_proposals = _proposal_sink(
                info, grid, plan.proposals, staged.proposals, names, config, aoi
            )
        tiles = stitch_scene(
            info,
            stretch,
            grid,
            predictor,
            sink.write,
            batch_size=config.batch_size,
            read_threads=config.read_threads,
            accumulator_bytes=config.accumulator_bytes,
            tmp_dir=mask_path.parent,
            progress=progress,
            blend=config.blend,
            rule=rule,
            outputs=sink.row_outputs,
            device_stitch=config.device_stitch,
            aoi=aoi,
            on_proposals=on_proposals,
        )
        stage("writing COG" if config.cog else "writing GeoTIFF")
        for writer in sink.writers:
            writer.commit()
        if plan.vector and staged.vector:
            from drseg_cli.raster.vectorize import vectorize_mask

            stage("polygons")
            vectorize_mask(
                mask_path,
                staged.vector,
                class_names=mask_names,
                score_path=score_path,
                min_area=config.min_area,
                simplify=config.simplify,
                overwrite=config.overwrite,
                layer=plan.vector.stem,
                dst_crs=config.dst_crs,
                clip=None if aoi is None else aoi.geometry,
            )
        if props_writer is not None:
            stage("proposals")
            props_writer.commit()
        pairs = list(zip(plan_files(staged), plan_files(plan), strict=True))
        commit_together(
            [(a, b) for a, b in pairs if a.exists()],
            remove=[b for a, b in pairs if not a.exists()],  # e.g. an old shapefile's .cpg
        )
    except BaseException:
        sink.abort()
        if props_writer is not None:
            props_writer.abort()
        raise
    finally:
        if plan.proposals:
            predictor.keep_proposals(False)
        for p in temps:
            if p is None:
                continue
            for q in (p, p.with_suffix(".qml"), Path(f"{p}.aux.xml")):
                with contextlib.suppress(OSError):
                    q.unlink()

    outputs = {kind: str(path) for kind, path in plan.items()}
    counts = sink.counts
    return SceneResult(
        input=str(info.path),
        outputs=outputs,
        width=info.width,
        height=info.height,
        crs=info.crs.to_string() if info.crs else None,
        tiles_total=tiles.total,
        tiles_run=tiles.run,
        tiles_skipped=tiles.skipped,
        tiles_outside_aoi=tiles.outside_aoi,
        seconds=round(time.perf_counter() - start, 3),
        class_pixels={n: int(counts[i]) for i, n in enumerate(mask_names)}
        | {"nodata": int(counts[255])},
    )


def _proposal_sink(
    info: SceneInfo,
    grid: TileGrid,
    path: Path,
    staged: Path,
    names: Sequence[str],
    config: SegmentConfig,
    aoi: AreaOfInterest | None,
):
    """The proposals layer of a scene and the per-tile callback that feeds it: each tile's
    proposals cut to its part of the scene and its valid pixels (nodata, outside the AOI),
    kept where their centroid is in the tile's core (``TileGrid.core``: no duplicates)."""
    import pyproj

    from drseg_cli.raster.mask_meta import CLIPPED_TAG
    from drseg_cli.raster.proposals import ProposalLayerWriter

    crs = None if info.crs is None else pyproj.CRS.from_wkt(info.crs.to_wkt())
    writer = ProposalLayerWriter(
        path,
        staged,
        crs=crs,
        transform=info.transform,
        size=(info.width, info.height),
        class_names=names,
        dst_crs=config.dst_crs,
        metadata={CLIPPED_TAG: "aoi"} if aoi is not None else None,
    )

    def add(tile: Tile, proposals: TileProposals, valid: np.ndarray) -> None:
        h, w = tile.height, tile.width
        writer.add(
            tile.x0,
            tile.y0,
            proposals.layers[:, :h, :w],
            proposals.classes,
            proposals.scores,
            core=grid.core(tile),
            valid=valid[:h, :w],
        )

    return writer, add
