"""Segmentation metrics from a streamed confusion matrix (mmseg conventions by default).

The confusion matrix ``C[g, p]`` counts pixels of ground-truth class ``g`` predicted as ``p``;
it is updated block by block (``np.bincount`` on ``K*g + p``), so no prediction is ever kept.

Per class: IoU = TP / (TP + FP + FN), Acc = TP / (TP + FN) (recall, mmseg's "Acc").
A class absent from both ground truth and prediction has IoU NaN; a class absent from the
ground truth has Acc NaN. NaNs are left out of the means (mIoU, mACC). A class predicted but
absent from the ground truth is the one place the two public conventions differ:

- ``count`` (default; mmseg ``IoUMetric``): its IoU is 0 and it counts in mIoU;
- ``drop`` (detectron2 ``SemSegEvaluator``, used by CAT-Seg/OVRS/RSKT-Seg): its IoU is
  undefined (NaN) and it is left out of mIoU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_IGNORE_INDEX = 255
#: How a class absent from the ground truth but predicted enters mIoU (module docstring).
ABSENT_CLASSES = ("count", "drop")


class LabelValueError(ValueError):
    """Ground-truth values that are neither a class index nor the ignore index."""

    def __init__(self, values: Sequence[int], num_classes: int, ignore_index: int) -> None:
        self.values = list(values)
        shown = ", ".join(str(v) for v in self.values[:8]) + (" ..." if len(values) > 8 else "")
        super().__init__(
            f"label values {shown} are outside the {num_classes} classes (0..{num_classes - 1}) "
            f"and not the ignore index {ignore_index}"
        )


class ConfusionMatrix:
    """A ``K×K`` int64 confusion matrix updated in place from label/prediction blocks."""

    def __init__(self, num_classes: int, ignore_index: int = DEFAULT_IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError("num_classes must be positive")
        self.k = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), np.int64)
        self.ignored = 0  # ground-truth pixels equal to the ignore index
        self.unpredicted = 0  # labelled pixels without a prediction (image nodata)

    def update(self, gt: np.ndarray, pred: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Add a block; ``valid`` (optional) marks pixels that have a prediction.

        Raises ``LabelValueError`` for ground-truth values that are neither a class nor the
        ignore index (a wrong class file or a label needing remapping).
        """
        if gt.shape != pred.shape or (valid is not None and valid.shape != gt.shape):
            raise ValueError(f"shape mismatch: gt {gt.shape}, pred {pred.shape}")
        gt = gt.ravel().astype(np.int64, copy=False)
        pred = pred.ravel().astype(np.int64, copy=False)
        labelled = gt != self.ignore_index
        self.ignored += int(gt.size - np.count_nonzero(labelled))
        bad = labelled & ((gt < 0) | (gt >= self.k))
        if bad.any():
            raise LabelValueError(np.unique(gt[bad]).tolist(), self.k, self.ignore_index)
        keep = labelled & (pred >= 0) & (pred < self.k)
        if valid is not None:
            keep &= valid.ravel()
        self.unpredicted += int(np.count_nonzero(labelled) - np.count_nonzero(keep))
        idx = self.k * gt[keep] + pred[keep]
        self.matrix += np.bincount(idx, minlength=self.k * self.k).reshape(self.k, self.k)

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another matrix (e.g. from another process) into this one."""
        if other.k != self.k:
            raise ValueError("cannot merge confusion matrices of different sizes")
        self.matrix += other.matrix
        self.ignored += other.ignored
        self.unpredicted += other.unpredicted


@dataclass(frozen=True)
class SegMetrics:
    """Metrics of one confusion matrix; percentages in [0, 100], NaN where undefined."""

    class_names: tuple[str, ...]
    iou: np.ndarray  # [K] percent, NaN where the class is absent from gt and pred
    acc: np.ndarray  # [K] percent, NaN where the class is absent from gt
    gt_pixels: np.ndarray  # [K]
    pred_pixels: np.ndarray  # [K]
    miou: float
    macc: float
    pixel_accuracy: float  # aAcc: correct / labelled pixels
    fwiou: float  # IoU weighted by ground-truth frequency
    confusion: np.ndarray  # [K, K] rows = ground truth, columns = prediction
    ignored_pixels: int = 0
    unpredicted_pixels: int = 0
    absent_classes: str = "count"

    @property
    def labelled_pixels(self) -> int:
        """Pixels with a valid (non-ignore) label that were scored: the confusion matrix total.

        Labelled pixels without a prediction (image nodata) are ``unpredicted_pixels``.
        """
        return int(self.confusion.sum())

    @classmethod
    def from_confusion(
        cls,
        conf: np.ndarray | ConfusionMatrix,
        class_names: Sequence[str],
        absent_classes: str = "count",
    ) -> SegMetrics:
        """Compute every metric from a confusion matrix (vectorised).

        ``absent_classes``: ``count`` (mmseg) or ``drop`` (detectron2), see the module docstring.
        """
        if absent_classes not in ABSENT_CLASSES:
            raise ValueError(f"absent_classes must be one of {ABSENT_CLASSES}")
        ignored = unpredicted = 0
        if isinstance(conf, ConfusionMatrix):
            ignored, unpredicted, conf = conf.ignored, conf.unpredicted, conf.matrix
        conf = np.asarray(conf, np.int64)
        k = conf.shape[0]
        if conf.shape != (k, k) or len(class_names) != k:
            raise ValueError("confusion matrix and class names do not match")
        tp = np.diag(conf).astype(np.float64)
        gt = conf.sum(axis=1).astype(np.float64)
        pred = conf.sum(axis=0).astype(np.float64)
        union = gt + pred - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            scored = union > 0 if absent_classes == "count" else gt > 0
            iou = np.where(scored, tp / union, np.nan) * 100.0
            acc = np.where(gt > 0, tp / gt, np.nan) * 100.0
        total = gt.sum()
        present = ~np.isnan(iou)
        return cls(
            class_names=tuple(class_names),
            iou=iou,
            acc=acc,
            gt_pixels=gt.astype(np.int64),
            pred_pixels=pred.astype(np.int64),
            miou=_nanmean(iou),
            macc=_nanmean(acc),
            pixel_accuracy=float(tp.sum() / total * 100.0) if total else math.nan,
            fwiou=float(np.sum((gt / total)[present] * iou[present])) if total else math.nan,
            confusion=conf,
            ignored_pixels=int(ignored),
            unpredicted_pixels=int(unpredicted),
            absent_classes=absent_classes,
        )

    def to_dict(self) -> dict:
        """JSON-ready: NaN becomes ``None`` (JSON has no NaN)."""
        return {
            "mIoU": _num(self.miou),
            "mACC": _num(self.macc),
            "aAcc": _num(self.pixel_accuracy),
            "fwIoU": _num(self.fwiou),
            "per_class": [
                {
                    "class": name,
                    "iou": _num(self.iou[i]),
                    "acc": _num(self.acc[i]),
                    "gt_pixels": int(self.gt_pixels[i]),
                    "pred_pixels": int(self.pred_pixels[i]),
                }
                for i, name in enumerate(self.class_names)
            ],
            "absent_classes": self.absent_classes,
            "labelled_pixels": self.labelled_pixels,
            "ignored_pixels": self.ignored_pixels,
            "unpredicted_pixels": self.unpredicted_pixels,
            "confusion_matrix": self.confusion.tolist(),
        }

    def csv_rows(self) -> list[list[str]]:
        """Header + one row per class + an ``all`` row with mIoU/mACC and the totals."""
        rows = [["class", "iou", "acc", "gt_pixels", "pred_pixels"]]
        for i, name in enumerate(self.class_names):
            rows.append(
                [
                    name,
                    _fmt(self.iou[i]),
                    _fmt(self.acc[i]),
                    str(int(self.gt_pixels[i])),
                    str(int(self.pred_pixels[i])),
                ]
            )
        rows.append(
            [
                "all",
                _fmt(self.miou),
                _fmt(self.macc),
                str(int(self.gt_pixels.sum())),
                str(int(self.pred_pixels.sum())),
            ]
        )
        return rows


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def _num(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 4)


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.4f}"


def seen_unseen(metrics: SegMetrics, unseen: Sequence[str]) -> dict:
    """mIoU over the seen and the unseen (held-out) classes and their harmonic mean, from one
    evaluation over all classes (the generalised zero-shot protocol): the measure of a
    fine-tuned model collapsing onto the classes it was trained on."""
    held = set(unseen)
    names = list(metrics.class_names)
    seen_mask = np.array([n not in held for n in names])
    s = _nanmean(metrics.iou[seen_mask]) if seen_mask.any() else math.nan
    u = _nanmean(metrics.iou[~seen_mask]) if (~seen_mask).any() else math.nan
    h = 2 * s * u / (s + u) if s + u > 0 else math.nan
    return {
        "seen": [n for n in names if n not in held],
        "unseen": [n for n in names if n in held],
        "mIoU_seen": _num(s),
        "mIoU_unseen": _num(u),
        "hIoU": _num(h),
    }
