"""The tile grid over a scene and the blend window used to stitch overlapping tiles.

Tiles are ``size``×``size`` with a stride of ``size - overlap``; the last row and column are
snapped to the scene edge so tiles stay inside the scene (no padding) unless the scene is
smaller than one tile, in which case the single tile is padded by reflection when read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tile:
    """One tile: its top-left pixel in the scene and the part of it that lies in the scene."""

    index: int
    row: int
    col: int
    x0: int
    y0: int
    width: int  # pixels of the tile inside the scene (== size except for tiny scenes)
    height: int


def _offsets(extent: int, size: int, stride: int, align: int = 1) -> list[int]:
    if extent <= size:
        return [0]
    last = math.ceil((extent - size) / align) * align  # may overhang by < align px
    n = math.ceil(last / stride) + 1
    return sorted({min(i * stride, last) for i in range(n)})


@dataclass(frozen=True)
class TileGrid:
    """Row-major tile grid over a ``width``×``height`` scene."""

    width: int
    height: int
    size: int
    overlap: int
    align: int = 1  # tile origins on multiples of this (coarse stitching needs it)

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError("tile size must be positive")
        if not 0 <= self.overlap < self.size:
            raise ValueError("overlap must be in [0, tile size)")
        if self.size % self.align or self.stride % self.align:
            raise ValueError(f"tile size and stride must be multiples of {self.align}")

    @classmethod
    def from_fraction(
        cls, width: int, height: int, size: int, overlap: float, align: int = 1
    ) -> TileGrid:
        """Grid with ``overlap`` given as a fraction of the tile size (0.25 = 25 %)."""
        if not 0.0 <= overlap < 1.0:
            raise ValueError("overlap fraction must be in [0, 1)")
        stride = (size - int(round(size * overlap))) // align * align
        return cls(width, height, size, size - stride, align)

    @property
    def stride(self) -> int:
        return self.size - self.overlap

    @property
    def x_offsets(self) -> list[int]:
        return _offsets(self.width, self.size, self.stride, self.align)

    @property
    def y_offsets(self) -> list[int]:
        return _offsets(self.height, self.size, self.stride, self.align)

    def __len__(self) -> int:
        return len(self.x_offsets) * len(self.y_offsets)

    def __iter__(self) -> Iterator[Tile]:
        xs, index = self.x_offsets, 0
        for r, y0 in enumerate(self.y_offsets):
            for c, x0 in enumerate(xs):
                yield Tile(
                    index,
                    r,
                    c,
                    x0,
                    y0,
                    min(self.size, self.width - x0),
                    min(self.size, self.height - y0),
                )
                index += 1

    def core(self, tile: Tile) -> tuple[float, float, float, float]:
        """The part of the scene ``tile`` answers for alone, ``(x0, y0, x1, y1)`` half-open
        in pixel coordinates: cut in the middle of each overlap with a neighbour, out to the
        scene edge elsewhere. The cores of all tiles partition the scene, so an object kept
        by the tile whose core holds its centroid is kept once."""

        def span(offsets: list[int], i: int, extent: int) -> tuple[float, float]:
            lo = 0.0 if i == 0 else (offsets[i - 1] + self.size + offsets[i]) / 2
            hi = (
                float(extent)
                if i == len(offsets) - 1
                else (offsets[i] + self.size + offsets[i + 1]) / 2
            )
            return lo, hi

        x0, x1 = span(self.x_offsets, tile.col, self.width)
        y0, y1 = span(self.y_offsets, tile.row, self.height)
        return x0, y0, x1, y1

    def blend_window(self, mode: str = "linear") -> np.ndarray:
        """The blend window of this grid's tiles (see ``blend_window``)."""
        return blend_window(self.size, self.overlap, mode)


#: ``linear``: weights ramp over the overlap (drseg's default); ``flat``: every tile pixel
#: weighs 1, so overlapping tiles are averaged uniformly (SegEarth-OV's slide inference).
BLEND_MODES = ("linear", "flat")


def blend_window(size: int, overlap: int, mode: str = "linear") -> np.ndarray:
    """Weights ``[size, size]`` of one tile's logits when overlapping tiles are blended.

    ``linear`` falls off linearly over the overlap, separably; ``flat`` is all ones. Both are
    strictly positive everywhere, so a pixel covered by one tile gets that tile's value
    exactly; ``linear`` hands over smoothly (no visible seam).
    """
    if mode not in BLEND_MODES:
        raise ValueError(f"blend {mode!r}: choose one of {', '.join(BLEND_MODES)}")
    if mode == "flat":
        return np.ones((size, size), np.float32)
    ramp = max(overlap, 1)
    i = np.arange(size, dtype=np.float64) + 0.5
    w1 = np.minimum(1.0, np.minimum(i, size - i) / ramp)
    return np.outer(w1, w1).astype(np.float32)
