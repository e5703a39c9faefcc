"""Device and precision choice, and the batched model call on tiles (torch side only)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from drseg_cli.errors import DrsegError, UsageError
from drseg_cli.model.base import SegmentationModel, TileProposals

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(spec: str) -> torch.device:
    """``auto`` → first CUDA GPU if any, else CPU; an absent CUDA device is a usage error."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device: unknown device {spec!r} (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
    elif device.type != "cpu":
        raise UsageError(f"--device: unsupported device {spec!r} (auto, cpu, cuda, cuda:N)")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for full fp32. ``auto`` = bf16 on GPUs that support it."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type == "cpu":
        raise UsageError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return torch.bfloat16 if precision == "bf16" else torch.float16


#: Rough device memory one 448 px tile needs through CLIP ViT-B/16 + DINO ViT-B/8 + DR-Seg
#: under bf16 (activations, logits); scaled by (tile / 448)² for other sizes.
BYTES_PER_TILE_448 = 600 * 1024**2
MAX_AUTO_BATCH = 64


def auto_batch_size(device: torch.device, tile_size: int, share: float = 1.0) -> int:
    """Tiles per batch: from the free GPU memory (half of it); 1 on the CPU, where batching
    does not pay (full-size ViT-B/16: 0.92 tiles/s at batch 1, 0.83 at batch 4).
    ``share`` < 1: this process has that fraction of the GPU (Ray workers packed on one
    GPU, ``--gpus-per-worker 0.5``), so its budget is at most that fraction of the memory.

    An estimate that is too high is corrected at run time: an out-of-memory error halves
    the batch (see ``TilePredictor.predict``).
    """
    if device.type != "cuda":
        return 1
    free, total = torch.cuda.mem_get_info(device)
    free = min(free, total * share)
    per_tile = BYTES_PER_TILE_448 * (tile_size / 448) ** 2
    return int(max(1, min(MAX_AUTO_BATCH, free * 0.5 // per_tile)))


def to_model_input(tiles: np.ndarray, device: torch.device) -> torch.Tensor:
    """Tiles ``[B,3,T,T]`` as float32 in [0, 1] on ``device``: uint8 tiles travel as bytes
    and are divided by 255 there (bit for bit the host's ``astype(float32) / 255``)."""
    batch = torch.from_numpy(np.ascontiguousarray(tiles))
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    if batch.dtype == torch.uint8:
        batch = batch.to(torch.float32).div_(255.0)
    return batch


def resample_logits(logits: torch.Tensor, size: int) -> torch.Tensor:
    """Logits ``[B, K, h, w]`` bilinearly resampled to ``size``² (``align_corners=False``);
    returned as they are when already that size."""
    if tuple(logits.shape[-2:]) == (size, size):
        return logits
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


class TilePredictor:
    """Runs the model on batches of tiles; class text embeddings are computed once here."""

    def __init__(
        self,
        model: SegmentationModel,
        class_prompts: Sequence[Sequence[str]],
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        *,
        compile_model: bool = False,
        channels_last: bool = False,
    ) -> None:
        self.model = model.to(device).eval()
        self.net = model  # the model itself (``self.model`` may be its compiled wrapper)
        self.proposals: list[TileProposals] | None = None  # per tile of the last batch
        self.channels_last = channels_last
        if compile_model:
            self.model = torch.compile(self.model, dynamic=False)
        self.device, self.amp_dtype = device, amp_dtype
        self.max_batch: int | None = None  # lowered after an out-of-memory error
        with torch.inference_mode():
            self.text = model.encode_text(class_prompts).to(device)

    @property
    def num_classes(self) -> int:
        return int(self.text.shape[0])

    def keep_proposals(self, on: bool) -> None:
        """From now on, keep each batch's proposals in ``self.proposals`` (one entry per
        tile, in order); a model that makes none is a one-line UsageError."""
        if on and not self.net.has_proposals:
            raise UsageError(
                f"--proposals: --method {self.net.name} makes no mask proposals "
                "(use --method dglrsis)"
            )
        if self.net.has_proposals:
            self.net.keep_proposals(on)
        self.proposals = [] if on else None

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def predict(self, tiles: np.ndarray, out_size: int | None = None) -> np.ndarray:
        """Logits ``[B, K, S, S]`` float32 for tiles ``[B,3,T,T]``, bilinearly resampled to
        ``S = out_size`` (default: the tile size). Tiles are float32 in [0, 1], or uint8
        (value / 255, converted on the device: a quarter of the bytes to move).

        Out of device memory, the batch is split in halves (and later batches stay that small)
        until it fits; a single tile that does not fit is a clear error. Non-finite logits
        under fp16/bf16 are redone once in fp32 (see ``_finite_logits``).
        """
        return self.predict_tensor(tiles, out_size).cpu().numpy()

    def predict_tensor(
        self, tiles: np.ndarray, out_size: int | None = None, *, resample: bool = True
    ) -> torch.Tensor:
        """As ``predict``, but the logits stay on the device (the device-side stitching
        takes them from there; only final rows come back to the host). ``resample=False``:
        at the model's own resolution, for a caller that resamples them elsewhere
        (``resample_logits``; the host stitcher does it in its own thread on a CPU)."""
        parts, start = [], 0
        if self.proposals is not None:
            self.proposals = []
        while start < len(tiles):
            chunk = tiles[start : start + (self.max_batch or len(tiles))]
            logits = self._predict_or_none(chunk, out_size, resample)
            if logits is None:  # out of memory: the failed batch is released by now
                self._shrink_batch(len(chunk))
                continue
            parts.append(logits)
            if self.proposals is not None:  # those of the call that succeeded
                self.proposals += self.net.last_proposals()
            start += len(chunk)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _predict_or_none(
        self, tiles: np.ndarray, out_size: int | None, resample: bool
    ) -> torch.Tensor | None:
        """``_predict``, or None when the device ran out of memory.

        The retry must happen outside the ``except`` block: while an exception is handled,
        its traceback keeps the failed forward's frames, and so its tensors, alive.
        """
        try:
            return self._predict(tiles, out_size, resample)
        except torch.OutOfMemoryError:
            return None

    def _shrink_batch(self, failed: int) -> None:
        """Halve the batch size after ``failed`` tiles ran out of memory (1 tile: error)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the failed batch's blocks are unreferenced by now
        if failed == 1:
            raise DrsegError(
                f"out of {self.device.type.upper()} memory with a single tile; "
                "use a smaller --tile-size or --device cpu"
            )
        self.max_batch = failed // 2
        log.warning(
            "out of %s memory with batch size %d: retrying with %d",
            self.device.type.upper(),
            failed,
            self.max_batch,
        )

    def _predict(self, tiles: np.ndarray, out_size: int | None, resample: bool) -> torch.Tensor:
        """Logits of ``tiles``, resampled to ``out_size`` (None: the tile size) if asked."""
        batch = to_model_input(tiles, self.device)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        logits = self._finite_logits(batch)
        return resample_logits(logits, out_size or tiles.shape[-1]) if resample else logits

    def _finite_logits(self, batch: torch.Tensor) -> torch.Tensor:
        """The model's fp32 logits for ``batch``, checked for NaN/Inf (one reduction on the device).

        Under fp16/bf16 autocast a non-finite result (overflow) is redone in fp32, which is
        kept for the rest of the run; non-finite fp32 logits fail the scene.
        """
        with torch.inference_mode(), self._autocast():
            logits = self.model(batch, self.text)
        logits = logits.float()
        low, high = torch.aminmax(logits)  # NaN and ±Inf reach these; far cheaper than isfinite
        if bool(low.isfinite() & high.isfinite()):
            return logits
        if self.amp_dtype is not None:
            log.warning(
                "model produced NaN/Inf logits under %s autocast: redoing the batch in fp32 "
                "and keeping fp32 for the rest of the run",
                str(self.amp_dtype).removeprefix("torch."),
            )
            del logits
            self.amp_dtype = None
            return self._finite_logits(batch)
        raise DrsegError("model produced NaN/Inf logits in fp32: broken weights or input")
