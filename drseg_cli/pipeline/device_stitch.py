"""Stitching where the logits are: the ring band of ``raster.stitch.LogitAccumulator`` held
as torch tensors on the model's device.

On a GPU the host cannot keep up with moving every tile's float32 logits back
(``K × T² × 4`` bytes a tile) and blending them in numpy. Here the weighted sum, the
softmax, argmax, score and entropy run on the device, and only the final rows come back:
uint8 classes and validity, plus the float rows an output asked for (float16 on a GPU: the
writers store 16-bit floats anyway; uint8 probability codes for ``--probs-dtype uint8``).

Same arithmetic, in the same order, as the host path: float32 masks are array-equal to it
and probabilities agree to float rounding (tests/test_device_stitch.py runs this code on
``device='cpu'`` tensors against the numpy accumulator).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from drseg_cli.raster.mask_meta import MASK_NODATA
from drseg_cli.raster.stitch import ARGMAX, ClassRule, StitchedRows, ring_spans

#: What the rows may carry besides classes: ``probs`` (float), ``prob_codes`` (uint8
#: 0–254 as ``ProbabilityWriter`` stores them, 255 nodata), ``score``, ``uncertainty``.
ROW_OUTPUTS = ("probs", "prob_codes", "score", "uncertainty")


@dataclass
class DeviceRows:
    """Final rows still on the device; ``to_host`` copies them (the only transfer)."""

    y0: int
    classes: torch.Tensor
    valid: torch.Tensor
    extras: dict[str, torch.Tensor]

    def to_host(self) -> StitchedRows:
        def host(t: torch.Tensor | None) -> np.ndarray | None:
            return None if t is None else t.cpu().numpy()

        extra = {k: host(v) for k, v in self.extras.items()}
        floats = {k: extra[k] for k in ("probs", "score", "uncertainty") if k in extra}
        for k, v in floats.items():
            floats[k] = v.astype(np.float32, copy=False)
        return StitchedRows(
            self.y0,
            host(self.classes),
            host(self.valid),
            prob_codes=extra.get("prob_codes"),
            **floats,
        )


class DeviceLogitAccumulator:
    """``LogitAccumulator`` on a torch device; ``flush`` yields ``DeviceRows``.

    ``outputs``: the rows' extras to compute (``ROW_OUTPUTS``); ``host_float``: the dtype the
    float extras travel in (float32 for exactness, float16 to halve the transfer).
    """

    def __init__(
        self,
        num_classes: int,
        width: int,
        height: int,
        band_rows: int,
        device: torch.device,
        *,
        rule: ClassRule = ARGMAX,
        outputs: Collection[str] = (),
        host_float: torch.dtype = torch.float32,
    ) -> None:
        unknown = set(outputs) - set(ROW_OUTPUTS)
        if unknown:
            raise ValueError(f"unknown row outputs {sorted(unknown)}")
        self.k, self.width, self.height, self.rule = num_classes, width, height, rule
        self.outputs, self.host_float, self.device = frozenset(outputs), host_float, device
        self.band = min(band_rows, height)
        self.top = 0
        self.sum = torch.zeros((num_classes, self.band, width), dtype=torch.float32, device=device)
        self.weight = torch.zeros((self.band, width), dtype=torch.float32, device=device)
        self.valid = torch.zeros((self.band, width), dtype=torch.bool, device=device)

    @staticmethod
    def band_bytes(num_classes: int, width: int, band_rows: int) -> int:
        """Device memory of the band (sum, weight and validity)."""
        return (num_classes * 4 + 4 + 1) * band_rows * width

    def add(
        self, x0: int, y0: int, logits: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor
    ) -> list[DeviceRows]:
        """Accumulate one tile (``logits [K,h,w]``, cropped to the scene, on the device);
        returns the rows that became final because this tile starts further down."""
        if y0 < self.top:
            raise ValueError(f"tile at row {y0} arrived after rows up to {self.top} were final")
        done = list(self.flush(y0))
        k, h, w = logits.shape
        if y0 + h > self.top + self.band:
            raise ValueError("tile taller than the accumulator band")
        cols = slice(x0, x0 + w)
        for ring, part in ring_spans(y0, h, self.band):
            wt = weight[part]
            self.sum[:, ring, cols] += logits[:, part] * wt
            self.weight[ring, cols] += wt
            self.valid[ring, cols] |= valid[part]
        return done

    def flush(self, until: int) -> Iterator[DeviceRows]:
        """Finalise rows ``[top, until)`` on the device and clear them from the band."""
        until = min(until, self.height)
        while self.top < until:
            start = self.top % self.band
            n = min(until - self.top, self.band - start)
            sl = slice(start, start + n)
            wsum = self.weight[sl]
            covered = wsum > 0
            valid = self.valid[sl] & covered
            logits = self.sum[:, sl] / torch.where(covered, wsum, torch.ones_like(wsum))
            yield self._finalize(self.top, logits, valid)
            self.sum[:, sl] = 0
            self.weight[sl] = 0
            self.valid[sl] = False
            self.top += n

    def finish(self) -> Iterator[DeviceRows]:
        yield from self.flush(self.height)

    def _finalize(self, y0: int, logits: torch.Tensor, valid: torch.Tensor) -> DeviceRows:
        """What ``raster.stitch.classify`` and ``StitchedRows`` compute, on the device."""
        invalid = ~valid
        classes = logits.argmax(0).to(torch.uint8)  # first maximum on ties, as numpy
        want = self.outputs
        probs = torch.softmax(logits, 0) if want else None
        if self.rule.threshold > 0:
            top = logits.amax(0)
            best = 1.0 / torch.exp(logits - top).sum(0)
            classes = torch.where(best < self.rule.threshold, self.rule.below, classes)
            classes = classes.to(torch.uint8)
        classes = classes.masked_fill(invalid, MASK_NODATA)
        extras: dict[str, torch.Tensor] = {}
        if probs is not None:  # every extra derives from the probabilities
            if "probs" in want:
                extras["probs"] = probs.to(self.host_float)
            if "prob_codes" in want:
                codes = torch.round(probs * 254.0).to(torch.uint8)
                extras["prob_codes"] = codes.masked_fill(invalid, 255)
            if "score" in want:
                score = probs.amax(0).masked_fill(invalid, math.nan)
                extras["score"] = score.to(self.host_float)
            if "uncertainty" in want:
                extras["uncertainty"] = self._entropy(probs, invalid).to(self.host_float)
        return DeviceRows(y0, classes, valid, extras)

    def _entropy(self, probs: torch.Tensor, invalid: torch.Tensor) -> torch.Tensor:
        if self.k < 2:
            ent = torch.zeros(probs.shape[1:], dtype=torch.float32, device=probs.device)
        else:
            p = probs.clamp(1e-12, 1.0)
            ent = -(p * torch.log(p)).sum(0) / math.log(self.k)
        return ent.masked_fill(invalid, math.nan)
