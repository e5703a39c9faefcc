"""Stitch per-tile class logits into scene rows with bounded memory.

``LogitAccumulator`` keeps only a band of rows as tall as one tile (a ring buffer): tiles
arrive in row-major order, and once a tile starts below row y every row above y is final
and is handed out as ``StitchedRows``. Memory is therefore ``K × tile × width`` floats,
whatever the scene height; if even that exceeds the budget, the band lives in a temporary
disk-backed memmap instead of RAM.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drseg_cli.atomic import temp_path_for
from drseg_cli.raster.mask_meta import MASK_NODATA

#: Default RAM budget for the accumulator band before it moves to a memmap.
DEFAULT_ACCUMULATOR_BYTES = 2 * 1024**3


class StitchedRows:
    """Final results for scene rows ``[y0, y0 + height)``.

    ``classes`` (uint8, ``MASK_NODATA`` where invalid or uncovered) and ``valid`` are always
    there. Probabilities, score and uncertainty are either given (the device path computes
    them where the logits are) or computed on first use from the averaged ``logits`` (host
    path): a mask-only run never pays for a softmax.
    """

    def __init__(
        self,
        y0: int,
        classes: np.ndarray,
        valid: np.ndarray,
        *,
        logits: np.ndarray | None = None,
        probs: np.ndarray | None = None,
        score: np.ndarray | None = None,
        uncertainty: np.ndarray | None = None,
        prob_codes: np.ndarray | None = None,
    ) -> None:
        self.y0, self.classes, self.valid = y0, classes, valid
        self.logits = logits  # float32 [K, h, W] blended logits (host path), or None
        self._probs, self._score, self._uncertainty = probs, score, uncertainty
        #: uint8 [K, h, W] probabilities as ``ProbabilityWriter`` stores them (device path)
        self.prob_codes = prob_codes

    @property
    def height(self) -> int:
        return self.classes.shape[0]

    @property
    def probs(self) -> np.ndarray:
        """float32 ``[K, h, W]`` softmax of the blended logits."""
        if self._probs is None:
            if self.logits is None:
                raise ValueError("these rows carry no probabilities (not requested)")
            self._probs = softmax(self.logits)
        return self._probs

    def score(self) -> np.ndarray:
        """Probability of the chosen class, NaN where invalid."""
        if self._score is None:
            self._score = np.where(self.valid, self.probs.max(axis=0), np.nan).astype(np.float32)
        return self._score

    def uncertainty(self) -> np.ndarray:
        """Normalised entropy in [0, 1] (0 = certain), NaN where invalid."""
        if self._uncertainty is None:
            self._uncertainty = normalized_entropy(self.probs, self.valid)
        return self._uncertainty


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 as float32, computed in the input's precision on one temporary."""
    e = logits - logits.max(axis=0, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(axis=0, keepdims=True)
    return e.astype(np.float32, copy=False)


def normalized_entropy(probs: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """H(p) / log K in [0, 1] per pixel (0 when K = 1), NaN where invalid."""
    k = probs.shape[0]
    if k < 2:
        ent = np.zeros(probs.shape[1:], np.float32)
    else:
        p = np.clip(probs, 1e-12, 1.0)
        ent = -(p * np.log(p)).sum(axis=0) / math.log(k)
    return np.where(valid, ent, np.nan).astype(np.float32)


def argmax_classes(logits: np.ndarray) -> np.ndarray:
    """uint8 index of the largest of ``logits [K, h, w]`` (the first on ties, as
    ``np.argmax``) by K passes over contiguous planes instead of a strided reduction.

    Branch-free: where plane i beats the best so far, ``classes += better * (i - classes)``
    in uint8 arithmetic (wrapping), which is a select without numpy's masked stores (those
    cost ~10x as much on noisy logits, where the mask is unpredictable).
    """
    best = logits[0].copy()
    classes = np.zeros(best.shape, np.uint8)
    better = np.empty(best.shape, bool)
    step = np.empty(best.shape, np.uint8)
    for i in range(1, logits.shape[0]):
        np.greater(logits[i], best, out=better)
        np.subtract(np.uint8(i), classes, out=step)
        np.multiply(step, better.view(np.uint8), out=step)
        np.add(classes, step, out=classes)
        np.maximum(best, logits[i], out=best)
    return classes


def set_nodata(classes: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``classes`` with ``MASK_NODATA`` where not ``valid`` (nothing to do when all valid)."""
    if not valid.all():
        np.copyto(classes, np.uint8(MASK_NODATA), where=~valid)
    return classes


@dataclass(frozen=True)
class ClassRule:
    """How a pixel's class is chosen from its probabilities: the most probable class, or
    ``below`` where that probability is under ``threshold`` (SegEarth-OV's ``prob_thd``).

    ``below`` is a class index (a background class) or ``MASK_NODATA``; threshold 0 = argmax.
    """

    threshold: float = 0.0
    below: int = MASK_NODATA

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")


ARGMAX = ClassRule()


def classify(logits: np.ndarray, valid: np.ndarray, rule: ClassRule = ARGMAX) -> np.ndarray:
    """Class index (uint8, nodata where invalid) of averaged logits ``[K, h, w]``; the
    softmax is only computed when ``rule`` has a threshold (its best probability is
    ``1 / Σ exp(z − max z)``)."""
    classes = argmax_classes(logits)
    if rule.threshold > 0:
        top = logits.max(axis=0)
        total = np.exp(logits - top).sum(axis=0)
        best = (1.0 / total).astype(np.float32)
        classes[best < np.float32(rule.threshold)] = rule.below
    return set_nodata(classes, valid)


def finalize_logits(
    logits: np.ndarray, valid: np.ndarray, rule: ClassRule = ARGMAX
) -> tuple[np.ndarray, np.ndarray]:
    """Class index (uint8, nodata where invalid) and softmax probabilities of averaged logits."""
    probs = softmax(logits)
    classes = argmax_classes(logits)
    if rule.threshold > 0:
        classes[probs.max(axis=0) < np.float32(rule.threshold)] = rule.below
    return set_nodata(classes, valid), probs


def ring_spans(y0: int, h: int, band: int) -> list[tuple[slice, slice]]:
    """``(band rows, tile rows)`` slices of scene rows ``[y0, y0 + h)`` in a ring of ``band``
    rows: one span, or two where the tile wraps round (slices, never fancy indexing)."""
    start = y0 % band
    first = min(h, band - start)
    spans = [(slice(start, start + first), slice(0, first))]
    if first < h:
        spans.append((slice(0, h - first), slice(first, h)))
    return spans


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
        rule: ClassRule = ARGMAX,
    ) -> None:
        self.k, self.width, self.height, self.rule = num_classes, width, height, rule
        self.band = min(band_rows, height)
        self.top = 0  # first scene row not yet handed out
        self._memmap_path: Path | None = None
        self.on_disk = False
        nbytes = num_classes * self.band * width * 4
        if nbytes > max_bytes:
            # the temp marker and process id in the name let a later run remove the file
            # if this one is killed (atomic.remove_stale_temps)
            folder = Path(tmp_dir) if tmp_dir is not None else Path(tempfile.gettempdir())
            name = temp_path_for(folder / "drseg-acc-band.f32")
            self._memmap_path = name
            self.on_disk = True
            self.sum = np.memmap(name, np.float32, "w+", shape=(num_classes, self.band, width))
        else:
            self.sum = np.zeros((num_classes, self.band, width), np.float32)
        self.weight = np.zeros((self.band, width), np.float32)
        self.valid = np.zeros((self.band, width), bool)

    def add(
        self, x0: int, y0: int, logits: np.ndarray, weight: np.ndarray, valid: np.ndarray
    ) -> Iterator[StitchedRows]:
        """Accumulate one tile (``logits [K,h,w]``, already cropped to the scene).

        Yields the rows that became final because this tile starts further down.
        """
        if y0 < self.top:
            raise ValueError(f"tile at row {y0} arrived after rows up to {self.top} were final")
        yield from self.flush(y0)
        self.accumulate(x0, y0, logits, weight, valid)

    def accumulate(
        self, x0: int, y0: int, logits: np.ndarray, weight: np.ndarray, valid: np.ndarray
    ) -> None:
        """Add a tile without handing out rows (the caller flushes)."""
        k, h, w = logits.shape
        if y0 < self.top or y0 + h > self.top + self.band:
            raise ValueError("tile taller than the accumulator band")
        cols = slice(x0, x0 + w)
        for ring, part in ring_spans(y0, h, self.band):
            wt = weight[part]
            src = logits[:, part]
            product = self._scratch(src.shape)  # reused: no fresh pages for every tile
            np.multiply(src, wt, out=product)
            self.sum[:, ring, cols] += product
            self.weight[ring, cols] += wt
            self.valid[ring, cols] |= valid[part]

    def _scratch(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 work array of ``shape`` carved from one buffer kept between tiles."""
        size = math.prod(shape)
        if getattr(self, "_buffer", None) is None or self._buffer.size < size:
            self._buffer = np.empty(size, np.float32)
        return self._buffer[:size].reshape(shape)

    def flush(self, until: int) -> Iterator[StitchedRows]:
        """Hand out rows ``[top, until)`` (in chunks) and clear them from the band."""
        for y0, logits, valid in self.flush_logits(until):
            yield StitchedRows(y0, classify(logits, valid, self.rule), valid, logits=logits)

    def flush_logits(self, until: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Like ``flush`` but yields ``(y0, averaged logits [K,h,W], valid [h,W])``."""
        until = min(until, self.height)
        while self.top < until:
            start = self.top % self.band
            n = min(until - self.top, self.band - start)  # contiguous run in the ring
            sl = slice(start, start + n)
            wsum = self.weight[sl]
            covered = wsum > 0
            valid = self.valid[sl] & covered
            logits = np.asarray(self.sum[:, sl]) / np.where(covered, wsum, 1.0)
            yield self.top, logits, valid.copy()
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


def _bilinear_index(n_out: int, n_in: int, scale: int, start: int = 0):
    """Source indices and weights of ``align_corners=False`` bilinear upsampling by ``scale``."""
    pos = np.maximum((np.arange(start, start + n_out) + 0.5) / scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (pos - np.floor(pos)).astype(np.float32)


class CoarseLogitAccumulator:
    """Stitches logits on a grid ``scale`` times coarser, upsampled bilinearly at hand-out.

    Saves ``scale²`` in stitching memory and time; the validity mask stays at full
    resolution, so nodata edges are exact. Tiles must start on multiples of ``scale``.
    Results match ``F.interpolate(..., mode="bilinear", align_corners=False)`` of the
    coarse blend, also across hand-out chunks (one coarse row is kept as context).
    """

    def __init__(
        self,
        num_classes: int,
        width: int,
        height: int,
        band_rows: int,
        scale: int,
        *,
        max_bytes: int = DEFAULT_ACCUMULATOR_BYTES,
        tmp_dir: Path | None = None,
        rule: ClassRule = ARGMAX,
    ) -> None:
        self.scale, self.width, self.height, self.rule = scale, width, height, rule
        self.cw, self.ch = -(-width // scale), -(-height // scale)
        self.coarse = LogitAccumulator(
            num_classes,
            self.cw,
            self.ch,
            -(-band_rows // scale) + 1,
            max_bytes=max_bytes,
            tmp_dir=tmp_dir,
        )
        self.on_disk = self.coarse.on_disk
        self.vband = min(band_rows + 3 * scale, height)
        self.valid = np.zeros((self.vband, width), bool)
        self.top = 0  # first full-resolution row not yet handed out
        self._rows = np.zeros((num_classes, 0, self.cw), np.float32)  # final coarse rows
        self._rows_base = 0  # coarse index of self._rows[:, 0]
        self._cols = _bilinear_index(width, self.cw, scale)

    def add(
        self, x0: int, y0: int, logits: np.ndarray, weight: np.ndarray, valid: np.ndarray
    ) -> Iterator[StitchedRows]:
        """``logits``/``weight`` on the coarse grid, ``valid`` at full resolution."""
        f = self.scale
        if x0 % f or y0 % f:
            raise ValueError(f"tile origin ({x0}, {y0}) is not a multiple of the scale {f}")
        yield from self.flush(y0)
        h, w = valid.shape
        if y0 + h > self.top + self.vband:
            raise ValueError("tile taller than the accumulator band")
        self.valid[np.arange(y0, y0 + h) % self.vband, x0 : x0 + w] |= valid
        self.coarse.accumulate(x0 // f, y0 // f, logits, weight, weight > 0)

    def flush(self, until: int) -> Iterator[StitchedRows]:
        until = min(until, self.height)
        final_coarse = self.ch if until >= self.height else until // self.scale
        for _, logits, _ in self.coarse.flush_logits(final_coarse):
            self._rows = np.concatenate([self._rows, logits.astype(np.float32)], axis=1)
        have = self._rows_base + self._rows.shape[1]  # coarse rows final so far
        if have == 0:
            return
        # full rows whose lower source row is final
        y_end = until if have >= self.ch else min(until, (have - 1) * self.scale)
        y_end = max(y_end, self.top)
        while self.top < y_end:
            n = min(y_end - self.top, self.vband - self.top % self.vband, 256)
            yield self._emit(self.top, n)
            self.top += n
        next_source = int(max((self.top + 0.5) / self.scale - 0.5, 0.0))  # first row still needed
        drop = max(0, min(next_source, have) - self._rows_base)
        self._rows = self._rows[:, drop:]
        self._rows_base += drop

    def _emit(self, y0: int, n: int) -> StitchedRows:
        i0, i1, wy = _bilinear_index(n, self.ch, self.scale, y0)
        j0, j1, wx = self._cols
        rows = self._rows
        r0, r1 = rows[:, i0 - self._rows_base], rows[:, i1 - self._rows_base]
        top = r0[:, :, j0] * (1 - wx) + r0[:, :, j1] * wx
        bottom = r1[:, :, j0] * (1 - wx) + r1[:, :, j1] * wx
        logits = top * (1 - wy)[None, :, None] + bottom * wy[None, :, None]
        ring = np.arange(y0, y0 + n) % self.vband
        valid = self.valid[ring].copy()
        self.valid[ring] = False
        return StitchedRows(y0, classify(logits, valid, self.rule), valid, logits=logits)

    def finish(self) -> Iterator[StitchedRows]:
        yield from self.flush(self.height)
        self.close()

    def close(self) -> None:
        self.coarse.close()
