"""Stitch per-tile class logits into scene rows with bounded memory.

``LogitAccumulator`` keeps only a band of rows as tall as one tile (a ring buffer): tiles
arrive in row-major order, and once a tile starts below row y every row above y is final
and is handed out as ``StitchedRows``. Memory is therefore ``K × tile × width`` floats,
whatever the scene height; if even that exceeds the budget, the band lives in a temporary
disk-backed memmap instead of RAM.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drseg_cli.raster.mask_meta import MASK_NODATA

#: Default RAM budget for the accumulator band before it moves to a memmap.
DEFAULT_ACCUMULATOR_BYTES = 2 * 1024**3


@dataclass
class StitchedRows:
    """Final, normalised results for scene rows ``[y0, y0 + height)``."""

    y0: int
    classes: np.ndarray  # uint8 [h, W], MASK_NODATA where invalid or uncovered
    probs: np.ndarray  # float32 [K, h, W] softmax of the blended logits
    valid: np.ndarray  # bool [h, W]

    @property
    def height(self) -> int:
        return self.classes.shape[0]

    def score(self) -> np.ndarray:
        """Probability of the chosen class, NaN where invalid."""
        return np.where(self.valid, self.probs.max(axis=0), np.nan).astype(np.float32)

    def uncertainty(self) -> np.ndarray:
        """Normalised entropy in [0, 1] (0 = certain), NaN where invalid."""
        k = self.probs.shape[0]
        if k < 2:
            ent = np.zeros(self.classes.shape, np.float32)
        else:
            p = np.clip(self.probs, 1e-12, 1.0)
            ent = -(p * np.log(p)).sum(axis=0) / math.log(k)
        return np.where(self.valid, ent, np.nan).astype(np.float32)


def finalize_logits(logits: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class index (uint8, nodata where invalid) and softmax probabilities of averaged logits."""
    shifted = logits - logits.max(axis=0, keepdims=True)
    e = np.exp(shifted)
    probs = e / e.sum(axis=0, keepdims=True)
    classes = np.argmax(logits, axis=0).astype(np.uint8)
    classes[~valid] = MASK_NODATA
    return classes, probs.astype(np.float32)


class LogitAccumulator:
    """Weighted sum of tile logits over a sliding band of rows; see the module docstring."""

    def __init__(
        self,
        num_classes: int,
        width: int,
        height: int,
        band_rows: int,
        *,
        max_bytes: int = DEFAULT_ACCUMULATOR_BYTES,
        tmp_dir: Path | None = None,
    ) -> None:
        self.k, self.width, self.height = num_classes, width, height
        self.band = min(band_rows, height)
        self.top = 0  # first scene row not yet handed out
        self._memmap_path: Path | None = None
        self.on_disk = False
        nbytes = num_classes * self.band * width * 4
        if nbytes > max_bytes:
            fd, name = tempfile.mkstemp(prefix="drseg-acc-", suffix=".f32", dir=tmp_dir)
            os.close(fd)
            self._memmap_path = Path(name)
            self.on_disk = True
            self.sum = np.memmap(name, np.float32, "w+", shape=(num_classes, self.band, width))
        else:
            self.sum = np.zeros((num_classes, self.band, width), np.float32)
        self.weight = np.zeros((self.band, width), np.float32)
        self.valid = np.zeros((self.band, width), bool)

    def _rows(self, y0: int, h: int) -> np.ndarray:
        return np.arange(y0, y0 + h) % self.band

    def add(
        self, x0: int, y0: int, logits: np.ndarray, weight: np.ndarray, valid: np.ndarray
    ) -> Iterator[StitchedRows]:
        """Accumulate one tile (``logits [K,h,w]``, already cropped to the scene).

        Yields the rows that became final because this tile starts further down.
        """
        if y0 < self.top:
            raise ValueError(f"tile at row {y0} arrived after rows up to {self.top} were final")
        yield from self.flush(y0)
        k, h, w = logits.shape
        if y0 + h > self.top + self.band:
            raise ValueError("tile taller than the accumulator band")
        rows = self._rows(y0, h)
        self.sum[:, rows, x0 : x0 + w] += logits * weight
        self.weight[rows, x0 : x0 + w] += weight
        self.valid[rows, x0 : x0 + w] |= valid

    def flush(self, until: int) -> Iterator[StitchedRows]:
        """Hand out rows ``[top, until)`` (in chunks) and clear them from the band."""
        until = min(until, self.height)
        while self.top < until:
            start = self.top % self.band
            n = min(until - self.top, self.band - start)  # contiguous run in the ring
            sl = slice(start, start + n)
            wsum = self.weight[sl]
            covered = wsum > 0
            valid = self.valid[sl] & covered
            logits = np.asarray(self.sum[:, sl]) / np.where(covered, wsum, 1.0)
            classes, probs = finalize_logits(logits, valid)
            yield StitchedRows(self.top, classes, probs, valid.copy())
            self.sum[:, sl] = 0
            self.weight[sl] = 0
            self.valid[sl] = False
            self.top += n

    def finish(self) -> Iterator[StitchedRows]:
        """Hand out every remaining row (call after the last tile)."""
        yield from self.flush(self.height)
        self.close()

    def close(self) -> None:
        if self._memmap_path is not None:
            del self.sum
            self._memmap_path.unlink(missing_ok=True)
            self._memmap_path = None
