"""``drseg refer``: referring-expression segmentation of a scene of any size.

1. The expressions are encoded once (``ReferringModel.encode_expressions``).
2. Windows of the model's native size (``preprocess.tile_size``, ``TileGrid`` with overlap)
   are read as ``segment`` reads tiles (``TileReader``: same bands, nodata, scene-wide
   stretch); all-nodata windows are skipped. Each batch gives, per expression, a window score
   and mask logits (``ReferOutput``).
3. Per expression the windows at or above ``min_score`` are ranked by that score and the best
   ``max_windows`` kept with their masks (logits > 0, resampled to the window, valid pixels).
4. Kept windows that overlap or touch are grouped; each group's masks are OR-ed on the
   group's extent, so a target cut by a window seam becomes one object; connected regions
   (4-connected, as ``vectorize``) are the objects, each scored by the best window it
   came from. The ``top_k`` best objects per expression are kept.
5. Outputs: a class mask (COG; 0 background, i = expression i, 255 nodata) and/or polygons
   with ``expression``, ``score``, ``area_m2`` (geodesic, ``raster.vectorize``), written
   under temp names and committed together (``atomic.commit_together``).

Memory: one batch of windows, the masks of at most ``max_windows`` windows per expression,
and one group extent at a time; never a scene-sized array.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
from drseg_cli.errors import UsageError
from drseg_cli.raster.mask_meta import MASK_NODATA
from drseg_cli.raster.reader import SceneInfo, TileReader, compute_stretch
from drseg_cli.raster.tiling import Tile, TileGrid
from drseg_cli.raster.vsi import is_vsi

if TYPE_CHECKING:
    from drseg_cli.model.base import ReferringModel
    from drseg_cli.pipeline.segment import OutputPlan

log = logging.getLogger(__name__)

RASTER_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class ReferConfig:
    """Settings of one ``refer`` run (the CLI's options)."""

    top_k: int = 1
    min_score: float = 0.0
    max_windows: int = 16
    overlap: float = 0.25
    batch_size: int = 1
    percentiles: tuple[float, float] = (2.0, 98.0)
    overwrite: bool = False
    cog: bool = True
    device: str = "cpu"
    amp_dtype: Any = None

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise UsageError("--top-k must be at least 1")
        if not 0.0 <= self.min_score <= 1.0:
            raise UsageError("--min-score must be in [0, 1]")
        if self.max_windows < 1:
            raise UsageError("--max-windows must be at least 1")
        if not 0.0 <= self.overlap < 1.0:
            raise UsageError("--overlap must be in [0, 1)")


@dataclass
class ReferObject:
    """One segmented object: its expression, score, and pixels (a crop of the scene)."""

    expression: int
    score: float
    x0: int
    y0: int
    mask: np.ndarray  # bool [h, w], scene pixels (x0, y0) onwards
    windows: list[int] = field(default_factory=list)

    @property
    def pixels(self) -> int:
        return int(self.mask.sum())

    def to_dict(self, names: Sequence[str], info: SceneInfo) -> dict[str, Any]:
        ys, xs = np.nonzero(self.mask)
        col0, col1 = self.x0 + int(xs.min()), self.x0 + int(xs.max()) + 1
        row0, row1 = self.y0 + int(ys.min()), self.y0 + int(ys.max()) + 1
        t = info.transform
        xa, ya = t * (col0, row0)
        xb, yb = t * (col1, row1)
        return {
            "expression": names[self.expression],
            "score": round(self.score, 6),
            "pixels": self.pixels,
            "pixel_bbox": [col0, row0, col1, row1],
            "bbox": [min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)],
            "windows": self.windows,
        }


@dataclass
class ReferResult:
    """What a scene run did (``--json`` prints it)."""

    input: str
    outputs: dict[str, str]
    expressions: list[str]
    windows_total: int
    windows_run: int
    objects: list[dict[str, Any]]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ----------------------------------------------------------------------------- window scoring


@dataclass
class _Kept:
    score: float
    tile: Tile
    mask: np.ndarray  # bool [T, T] (valid pixels only)


class _TopWindows:
    """Per expression, the ``n`` best windows at or above ``min_score`` and their masks."""

    def __init__(self, n_expr: int, n: int, min_score: float) -> None:
        self.n, self.min_score = n, min_score
        self.kept: list[list[_Kept]] = [[] for _ in range(n_expr)]

    def offer(self, e: int, score: float, tile: Tile, mask: Callable[[], np.ndarray]) -> None:
        if not score >= self.min_score:  # NaN is never kept
            return
        kept = self.kept[e]
        if len(kept) >= self.n and score <= kept[-1].score:
            return
        kept.append(_Kept(score, tile, mask()))
        kept.sort(key=lambda k: (-k.score, k.tile.index))
        del kept[self.n :]


def _mask_fn(logits, valid: np.ndarray, size: int) -> Callable[[], np.ndarray]:  # noqa: ANN001
    """The window's mask (logits > 0 at the window's size, valid pixels), made on demand."""

    def mask() -> np.ndarray:
        import torch.nn.functional as F

        m = logits[None, None]
        if tuple(m.shape[-2:]) != (size, size):
            m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)
        return (m[0, 0] > 0).cpu().numpy() & valid

    return mask


def score_windows(
    model: ReferringModel,
    encoded: object,
    reader: TileReader,
    grid: TileGrid,
    top: _TopWindows,
    config: ReferConfig,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Run the model over every window with data; offer each (window, expression) to ``top``.
    Returns how many windows were run."""
    import torch

    size = grid.size
    device = torch.device(config.device)
    run = 0
    tiles = list(grid)
    autocast = (
        torch.autocast(device.type, dtype=config.amp_dtype)
        if config.amp_dtype is not None
        else contextlib.nullcontext()
    )
    for start in range(0, len(tiles), config.batch_size):
        batch = tiles[start : start + config.batch_size]
        reads = [reader.read(t.x0, t.y0, size) for t in batch]
        use = [i for i, (_, valid) in enumerate(reads) if valid.any()]
        if use:
            images = torch.from_numpy(np.stack([reads[i][0] for i in use])).to(device)
            with torch.inference_mode(), autocast:
                out = model(images, encoded)
            scores = out.scores.float().cpu().numpy()
            logits = out.mask_logits.float()
            for j, i in enumerate(use):
                for e in range(scores.shape[1]):
                    top.offer(
                        e,
                        float(scores[j, e]),
                        batch[i],
                        _mask_fn(logits[j, e], reads[i][1], size),
                    )
            run += len(use)
        if progress:
            progress(min(start + len(batch), len(tiles)), len(tiles))
    return run


# ----------------------------------------------------------------------------- objects


def _groups(kept: Sequence[_Kept]) -> list[list[_Kept]]:
    """Windows that overlap or touch, grouped (union-find on their rectangles)."""
    parent = list(range(len(kept)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, a in enumerate(kept):
        for j in range(i + 1, len(kept)):
            b = kept[j].tile
            ta = a.tile
            if (
                ta.x0 <= b.x0 + b.width
                and b.x0 <= ta.x0 + ta.width
                and ta.y0 <= b.y0 + b.height
                and b.y0 <= ta.y0 + ta.height
            ):
                parent[find(i)] = find(j)
    out: dict[int, list[_Kept]] = {}
    for i, k in enumerate(kept):
        out.setdefault(find(i), []).append(k)
    return list(out.values())


def merge_objects(kept: Sequence[_Kept], expression: int, top_k: int) -> list[ReferObject]:
    """Masks of the kept windows of one expression → its ``top_k`` objects in scene pixels."""
    from scipy import ndimage

    objects: list[ReferObject] = []
    four = ndimage.generate_binary_structure(2, 1)
    for group in _groups(kept):
        x0 = min(k.tile.x0 for k in group)
        y0 = min(k.tile.y0 for k in group)
        x1 = max(k.tile.x0 + k.tile.width for k in group)
        y1 = max(k.tile.y0 + k.tile.height for k in group)
        union = np.zeros((y1 - y0, x1 - x0), bool)
        best = np.full(union.shape, -np.inf, np.float32)
        source = np.full(union.shape, -1, np.int64)
        for k in sorted(group, key=lambda k: k.score):  # the best window writes last
            t = k.tile
            m = k.mask[: t.height, : t.width]
            rows = slice(t.y0 - y0, t.y0 - y0 + t.height)
            cols = slice(t.x0 - x0, t.x0 - x0 + t.width)
            union[rows, cols] |= m
            hit = m & (best[rows, cols] < k.score)
            best[rows, cols][hit] = k.score
            source[rows, cols][hit] = t.index
        labels, n = ndimage.label(union, structure=four)
        for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None:
                continue
            region = labels[sl] == lab
            objects.append(
                ReferObject(
                    expression,
                    float(best[sl][region].max()),
                    x0 + sl[1].start,
                    y0 + sl[0].start,
                    region,
                    sorted({int(s) for s in np.unique(source[sl][region]) if s >= 0}),
                )
            )
    objects.sort(key=lambda o: (-o.score, -o.pixels, o.y0, o.x0))
    return objects[:top_k]


# ----------------------------------------------------------------------------- outputs


def split_outputs(outputs: Sequence[Path]) -> tuple[Path | None, Path | None]:
    """``-o`` paths → (mask .tif, polygons); one of each at most."""
    from drseg_cli.raster.vectorize import vector_format

    mask = vector = None
    for p in outputs:
        p = Path(p)
        if p.suffix.lower() in RASTER_SUFFIXES:
            if mask is not None:
                raise UsageError(f"{p}: only one mask output (.tif) per run")
            mask = p
        else:
            vector_format(p)  # an unknown extension is a one-line UsageError
            if vector is not None:
                raise UsageError(f"{p}: only one polygon output per run")
            vector = p
    if mask is None and vector is None:
        raise UsageError("give an output with -o: a mask (.tif) and/or polygons (.gpkg...)")
    return mask, vector


def _write_mask(
    path: Path, info: SceneInfo, reader: TileReader, names: Sequence[str], objects, cog: bool
) -> None:
    """Class mask: 0 background, i = expression i, 255 nodata; written by row bands."""
    from drseg_cli.raster.writers import ClassMaskWriter

    writer = ClassMaskWriter(path, info, ["background", *names], cog=cog)
    try:
        rows = 1024
        ordered = sorted(objects, key=lambda o: o.score)  # the best object is painted last
        for y0 in range(0, info.height, rows):
            h = min(rows, info.height - y0)
            band = np.zeros((h, info.width), np.uint8)
            for o in ordered:
                oh, ow = o.mask.shape
                a, b = max(y0, o.y0), min(y0 + h, o.y0 + oh)
                if a >= b:
                    continue
                part = o.mask[a - o.y0 : b - o.y0]
                view = band[a - y0 : b - y0, o.x0 : o.x0 + ow]
                view[part] = o.expression + 1
            valid = reader.read_valid(0, y0, info.width, h)
            band[~valid] = MASK_NODATA
            writer.write_rows(y0, band)
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def objects_frame(objects: Sequence[ReferObject], names: Sequence[str], info: SceneInfo):
    """Objects → GeoDataFrame (``expression``, ``score``, ``area_m2``, ``class_id``) in the
    scene's CRS; areas geodesic through ``raster.vectorize``."""
    import geopandas as gpd
    import pandas as pd
    import shapely
    from rasterio.transform import Affine

    from drseg_cli.raster.vectorize import vectorize_array

    rows: list[dict[str, Any]] = []
    geoms = []
    for o in objects:
        t = info.transform * Affine.translation(o.x0, o.y0)
        frame = vectorize_array(o.mask.astype(np.uint8), valid=o.mask, transform=t, crs=info.crs)
        frame = frame[frame["class_id"] == 1]
        geom = shapely.union_all(frame.geometry.values)
        area = float(np.nansum(frame["area_m2"].astype("float64").to_numpy()))
        geoms.append(geom)
        rows.append(
            {
                "class_id": o.expression + 1,
                "expression": names[o.expression],
                "score": o.score,
                "area_m2": area,
            }
        )
    table = pd.DataFrame(rows, columns=["class_id", "expression", "score", "area_m2"])
    table = table.astype({"class_id": "int32", "score": "float64", "area_m2": "float64"})
    return gpd.GeoDataFrame(table, geometry=gpd.GeoSeries(geoms, crs=info.crs), crs=info.crs)


# ----------------------------------------------------------------------------- one scene


def _output_files(outputs: Sequence[Path | None]) -> list[Path]:
    """Every file of ``outputs``: a mask and its style, polygons and their sidecars."""
    from drseg_cli.raster.vectorize import output_paths

    mask, vector = split_outputs([p for p in outputs if p is not None])
    files = [mask, mask.with_suffix(".qml")] if mask is not None else []
    return files + (output_paths(vector) if vector is not None else [])


def _refer_to_store(
    start: float,
    info: SceneInfo,
    model: ReferringModel,
    expressions: Sequence[str],
    outputs: Sequence[Path],
    config: ReferConfig,
    progress: Callable[[int, int], None] | None,
) -> ReferResult:
    check_writable(_output_files(outputs), config.overwrite)  # before any window is scored
    with staging_folder() as folder:
        local = [p for p in staged_paths(list(outputs), folder) if p is not None]
        fresh = dataclasses.replace(config, overwrite=True)  # the folder is new
        result = refer_scene(info, model, expressions, local, fresh, progress=progress)
        pairs = list(zip(_output_files(local), _output_files(outputs), strict=True))
        publish(pairs, replace=config.overwrite)
    final = {str(a): str(b) for a, b in pairs}
    result.outputs = {kind: final[path] for kind, path in result.outputs.items()}
    result.seconds = round(time.perf_counter() - start, 3)
    return result


def refer_scene(
    info: SceneInfo,
    model: ReferringModel,
    expressions: Sequence[str],
    outputs: Sequence[Path],
    config: ReferConfig,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> ReferResult:
    """Segment the objects ``expressions`` refer to in one scene and write ``outputs``.

    Outputs on an object store (``/vsis3/``…) are written to a local staging folder by the
    same code, then uploaded (``atomic.publish``), as ``segment`` does."""
    start = time.perf_counter()
    if any(is_vsi(p) for p in outputs):
        return _refer_to_store(start, info, model, expressions, outputs, config, progress)
    names = [e.strip() for e in expressions]
    if not names or any(not n for n in names):
        raise UsageError("give at least one non-empty expression")
    if len(names) > 254:
        raise UsageError(f"{len(names)} expressions: at most 254 per run (one mask class each)")
    mask_path, vector_path = split_outputs(outputs)
    finals = [p for p in (mask_path, vector_path) if p]
    if vector_path is not None:
        from drseg_cli.raster.vectorize import output_paths

        finals = [p for p in finals if p != vector_path] + output_paths(vector_path)
    check_writable(finals, config.overwrite)
    if vector_path is not None:
        from drseg_cli.raster.vectorize import check_crs_storable

        check_crs_storable(info.crs, vector_path)

    stretch = compute_stretch(info, config.percentiles)
    size = model.preprocess.tile_size
    grid = TileGrid.from_fraction(info.width, info.height, size, config.overlap)
    import torch

    with torch.inference_mode():
        encoded = model.encode_expressions(names)
    top = _TopWindows(len(names), config.max_windows, config.min_score)
    objects: list[ReferObject] = []
    staged: list[tuple[Path, Path]] = []
    from drseg_cli.pipeline.segment import default_decode_threads

    decode_threads = default_decode_threads(torch.device(config.device).type)
    with TileReader(info, stretch, decode_threads=decode_threads) as reader:
        run = score_windows(model, encoded, reader, grid, top, config, progress)
        for e, kept in enumerate(top.kept):
            objects += merge_objects(kept, e, config.top_k)
        try:
            if mask_path is not None:
                tmp = temp_path_for(mask_path)
                _write_mask(tmp, info, reader, names, objects, config.cog)
                staged += [
                    (tmp, mask_path),
                    (tmp.with_suffix(".qml"), mask_path.with_suffix(".qml")),
                ]
            if vector_path is not None:
                from drseg_cli.raster.vectorize import layer_style, output_paths, write_polygons

                tmp = temp_path_for(vector_path)
                write_polygons(
                    objects_frame(objects, names, info),
                    tmp,
                    layer=vector_path.stem,
                    metadata={"drseg_expressions": "\n".join(names)},
                    style=layer_style(["background", *names], [], None),  # the mask's colours
                )
                staged += [
                    (a, b)
                    for a, b in zip(output_paths(tmp), output_paths(vector_path), strict=True)
                    if a.exists()
                ]
            commit_together(staged)
        finally:
            for a, _ in staged:
                with contextlib.suppress(OSError):
                    a.unlink()
    outputs_done = {"mask": str(mask_path)} if mask_path else {}
    if vector_path:
        outputs_done["vector"] = str(vector_path)
    return ReferResult(
        input=str(info.path),
        outputs=outputs_done,
        expressions=names,
        windows_total=len(grid),
        windows_run=run,
        objects=[o.to_dict(names, info) for o in objects],
        seconds=round(time.perf_counter() - start, 3),
    )


def read_expressions(text: str | None, file: Path | None) -> list[str]:
    """The expression argument and/or ``--expressions FILE`` (one per line, ``#`` comments)."""
    from drseg_cli.errors import InputError

    out = [text.strip()] if text and text.strip() else []
    if file is not None:
        try:
            lines = Path(file).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise InputError(f"{file}: file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{file}: cannot read expressions ({exc})") from None
        out += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not out:
            raise InputError(f"{file}: no expressions (one per line)")
    if not out:
        raise UsageError('give an expression ("the large white building") or --expressions FILE')
    return out


# ----------------------------------------------------------------------------- batch

#: ``--format`` values of a referring batch (no Shapefile: see ``run_refer``).
REFER_FORMATS = ("tif", "gpkg", "geojson", "parquet")
#: The fields every referring polygon layer has (``objects_frame``).
REFER_FIELDS = ("expression", "score", "area_m2")


def plan_refer_outputs(inputs: Sequence[Path], outdir: Path, fmt: str) -> list[OutputPlan]:
    """One output per scene, ``OUTDIR/<stem>_refer.<fmt>``: ``_refer`` keeps it apart from
    ``segment``'s ``<stem>_mask.tif`` / ``<stem>.gpkg`` when both write to one folder."""
    from drseg_cli.pipeline.segment import OutputPlan

    ext = fmt.lower().lstrip(".")
    if ext not in REFER_FORMATS:
        raise UsageError(f"--format {fmt}: use one of {', '.join(REFER_FORMATS)}")
    stems: dict[str, Path] = {}
    plans = []
    for path in inputs:
        if path.stem in stems:
            raise UsageError(
                f"{path}: same file name as {stems[path.stem]}; outputs would collide in {outdir}"
            )
        stems[path.stem] = path
        plans.append(OutputPlan.from_output(outdir / f"{path.stem}_refer.{ext}"))
    return plans


def verify_refer_outputs(path: Path, plan: OutputPlan, expressions: Sequence[str]) -> None:
    """What ``--resume`` checks of a done scene: the mask with ``verify_outputs`` (input's
    grid, one class per expression, colour table and style); the polygons readable, with
    ``REFER_FIELDS`` and only these expressions. Raises ``InputError`` otherwise."""
    from drseg_cli.errors import InputError
    from drseg_cli.pipeline.segment import OutputPlan
    from drseg_cli.pipeline.verify import verify_outputs

    names = [e.strip() for e in expressions]
    if plan.mask is not None:
        verify_outputs(path, OutputPlan(plan.mask), ["background", *names])
    if plan.vector is not None:
        try:
            if plan.vector.suffix.lower() == ".parquet":
                import geopandas as gpd

                frame = gpd.read_parquet(plan.vector)
            else:
                import pyogrio

                layer = plan.vector.stem if plan.vector.suffix.lower() == ".gpkg" else None
                frame = pyogrio.read_dataframe(plan.vector, layer=layer, read_geometry=False)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is one error line
            raise InputError(f"{plan.vector}: cannot read polygons ({exc})") from None
        missing = set(REFER_FIELDS) - set(frame.columns)
        if missing:
            raise InputError(f"{plan.vector}: missing fields {sorted(missing)}")
        unknown = set(frame["expression"]) - set(names)
        if unknown:
            raise InputError(f"{plan.vector}: expressions not of this run {sorted(unknown)}")
