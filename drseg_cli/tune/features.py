"""The feature cache of ``drseg tune``: CLIP and DINO features computed once per image.

Per image (one folder under the cache root, named by the image and a key of everything that
shapes its features: model, tile size, precision, stretch, label mapping, file identities):

    clip-<baseline>.npy  [T, D, h, w]   U = F̂ + λ·ĝ per tile, one file per CLIP baseline used
    dino.npy             [T, C, h₂, w₂] the DINO guide per tile
    gt.npy               [T, S, S]      labels per tile (ignore index outside the image)
    valid.npy            [T, S, S]      pixels with data (the reader's validity mask)
    windows.npy          [T, 4]         the pixels each tile scores: y0, x0, y1, x1 in the tile
    meta.json            written last: the folder is complete

Tiles are read exactly as ``drseg evaluate`` reads them (same reader, stretch, reflection
padding). An image that fits one tile is one tile scored over the whole image, as evaluate
scores it; a larger image is cut into a grid without overlap (the last row and column snapped
to the edge) and each pixel is scored once, by the first tile that covers it — without the
blend of ``segment``/``evaluate`` (final figures: ``drseg evaluate --config``).
Only one image's features are in memory at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from drseg_cli.atomic import atomic_output
from drseg_cli.errors import InputError
from drseg_cli.evaluate.datasets import Dataset, Sample
from drseg_cli.evaluate.metrics import ConfusionMatrix, LabelValueError
from drseg_cli.model.drseg import DRSegModel
from drseg_cli.raster.reader import TileReader, compute_stretch, inspect_raster
from drseg_cli.raster.tiling import TileGrid

CACHE_DTYPES = ("float16", "float32")
CACHE_VERSION = 1


@dataclass
class ImageFeatures:
    """One image's cached arrays (see the module docstring); ``clip`` by baseline name."""

    clip: dict[str, np.ndarray]
    dino: np.ndarray
    gt: np.ndarray
    valid: np.ndarray
    windows: np.ndarray

    @property
    def tiles(self) -> int:
        return int(self.windows.shape[0])


def _file_identity(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_output(path) as tmp, tmp.open("wb") as fh:
        np.save(fh, array)


def tile_windows(width: int, height: int, size: int) -> list[tuple[int, int, int, int, int, int]]:
    """``(x0, y0, wy0, wx0, wy1, wx1)`` per tile: its origin and the window (tile coordinates)
    of the pixels it scores — each image pixel exactly once (module docstring)."""
    if width <= size and height <= size:
        return [(0, 0, 0, 0, height, width)]
    grid = TileGrid.from_fraction(width, height, size, 0.0)
    xs, ys = grid.x_offsets, grid.y_offsets
    out = []
    for r, y0 in enumerate(ys):
        for c, x0 in enumerate(xs):
            sy = 0 if r == 0 else max(0, ys[r - 1] + size - y0)
            sx = 0 if c == 0 else max(0, xs[c - 1] + size - x0)
            out.append((x0, y0, sy, sx, min(size, height - y0), min(size, width - x0)))
    return out


class FeatureCache:
    """Computes (once) and loads the per-image features of a dataset for ``models``.

    ``models`` maps each CLIP baseline to a DR-Seg model built with it; the DINO guide is
    the first model's (every model has the same DINO). ``autocast`` is the backbones'
    precision (None: fp32), as ``TilePredictor`` runs them.
    """

    def __init__(
        self,
        root: Path,
        dataset: Dataset,
        models: dict[str, DRSegModel],
        num_classes: int,
        *,
        tile_size: int,
        device: torch.device,
        autocast: torch.dtype | None = None,
        dtype: str = "float16",
        batch_size: int = 4,
        bands: Sequence[int] | None = None,
        percentiles: tuple[float, float] = (2.0, 98.0),
        settings: dict | None = None,
    ) -> None:
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"cache dtype must be one of {CACHE_DTYPES}")
        self.root, self.dataset, self.models = root, dataset, models
        self.num_classes, self.tile_size, self.device = num_classes, tile_size, device
        self.autocast, self.dtype, self.batch_size = autocast, dtype, max(1, batch_size)
        self.bands, self.percentiles = bands, percentiles
        self.settings = {
            "version": CACHE_VERSION,
            "tile_size": tile_size,
            "dtype": dtype,
            "precision": str(autocast),
            "bands": list(bands) if bands else None,
            "percentiles": list(percentiles),
            "reduce_zero_label": dataset.reduce_zero_label,
            "ignore_index": dataset.ignore_index,
            **(settings or {}),
        }
        self.computed = 0  # images whose features this process computed (the rest were cached)

    def folder(self, sample: Sample) -> Path:
        """The cache folder of ``sample`` (its key covers the settings and both files)."""
        key = self.settings | {
            "image": _file_identity(sample.image),
            "label": _file_identity(sample.label),
        }
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.root / f"{sample.image.stem}-{digest}"

    def ensure(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Compute the features of every image not cached yet (per missing baseline)."""
        total = len(self.dataset.samples)
        for sample in self.dataset.samples:
            folder = self.folder(sample)
            missing = [b for b in self.models if not (folder / f"clip-{b}.npy").is_file()]
            if missing or not (folder / "meta.json").is_file():
                self._compute(sample, folder, missing)
                self.computed += 1
            if progress:
                progress(1, total)

    def load(self, sample: Sample, baselines: Sequence[str]) -> ImageFeatures:
        """The cached arrays of ``sample`` (``ensure`` first)."""
        folder = self.folder(sample)
        return ImageFeatures(
            clip={b: np.load(folder / f"clip-{b}.npy") for b in baselines},
            dino=np.load(folder / "dino.npy"),
            gt=np.load(folder / "gt.npy"),
            valid=np.load(folder / "valid.npy"),
            windows=np.load(folder / "windows.npy"),
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _compute(self, sample: Sample, folder: Path, baselines: Sequence[str]) -> None:
        size, ds = self.tile_size, self.dataset
        info = inspect_raster(sample.image, self.bands, allow_no_crs=True)
        stretch = compute_stretch(info, self.percentiles)
        with ds.open_label(sample, info) as labels:
            label = labels.read()
        try:  # bad label values fail now, naming the file, not in the middle of a search
            ConfusionMatrix(self.num_classes, ds.ignore_index).update(label, label)
        except LabelValueError as exc:
            raise InputError(f"{sample.label}: {exc}") from None
        windows = tile_windows(info.width, info.height, size)
        rgb, valid, gt = [], [], []
        with TileReader(info, stretch) as reader:
            for x0, y0, *_ in windows:
                tile, ok = reader.read(x0, y0, size)
                rgb.append(tile)
                valid.append(ok)
                g = np.full((size, size), ds.ignore_index, np.int32)
                part = label[y0 : y0 + size, x0 : x0 + size]
                g[: part.shape[0], : part.shape[1]] = part
                gt.append(g)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "meta.json").unlink(missing_ok=True)
        images = np.stack(rgb)
        first = next(iter(self.models.values()))
        for name in baselines:
            model = self.models[name]
            feats = self._run(images, lambda x, m=model: m.clip_features(x))
            _save(folder / f"clip-{name}.npy", feats)
        if not (folder / "dino.npy").is_file():
            _save(folder / "dino.npy", self._run(images, first.guide_features))
        _save(folder / "gt.npy", np.stack(gt))
        _save(folder / "valid.npy", np.stack(valid))
        _save(folder / "windows.npy", np.array([w[2:] for w in windows], np.int32))
        meta = {"image": str(sample.image), "label": str(sample.label), "tiles": len(windows)}
        with atomic_output(folder / "meta.json") as tmp:
            tmp.write_text(json.dumps(meta | {"settings": self.settings}, indent=1))

    def _run(self, images: np.ndarray, fn: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
        """``fn`` over the tiles in batches, under the backbones' precision, as ``dtype``."""
        out = []
        for batch in _chunks(images, self.batch_size):
            x = torch.from_numpy(batch).to(self.device)
            with torch.inference_mode(), self._autocast():
                y = fn(x)
            out.append(y.float().cpu().numpy().astype(self.dtype))
        return np.concatenate(out)


def _chunks(array: np.ndarray, n: int) -> Iterator[np.ndarray]:
    for start in range(0, len(array), n):
        yield array[start : start + n]
