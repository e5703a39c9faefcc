"""Referring segmentation: datasets, metrics (gIoU, cIoU, Pr@X) and an evaluation loop.

Dataset layout ``rsrefseg2``: the JSON-lines annotation files the RSRefSeg 2
release ships for RRSIS-D, RefSegRS and RISBench (``datainfo/{rrsisd,refsegrs,risbench}_
{train,val,test}.jsonl``; one object per line: ``file_name``, ``sent``, ``segmentation`` as
a COCO RLE, compressed string or counts list, or a list of them) with the images under the
``--data`` folder (``DATA/FILE_NAME``, or ``DATA/images/FILE_NAME``). The jsonl file is
``--split``: a path, or a split name looked up as ``DATA/*_{split}.jsonl``. The datasets in
their authors' own layouts (``rrsisd``, ``refsegrs``, ``risbench``) are read by
``evaluate/refer_layouts.py``; ``--layout auto`` tells the four apart by their files.

Metrics as the RRSIS literature (and the public ``RefSegIoUMetric``) define them, in %:
gIoU = mean over samples of the sample IoU; cIoU = Σ intersections / Σ unions; Pr@X = share
of samples whose IoU is *above* X (X = 0.5 … 0.9). Label value ``ignore_index`` is left out.
A sample whose prediction and target are both empty has IoU 1 (the public code would make it
NaN; RRSIS-D, RefSegRS and RISBench have none).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from drseg_cli.errors import InputError, UsageError

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
LAYOUTS = ("rsrefseg2", "rrsisd", "refsegrs", "risbench")


# ----------------------------------------------------------------------------- COCO RLE


def rle_counts(counts: str | bytes) -> list[int]:
    """COCO's compressed RLE string → run lengths (pycocotools' ``rleFrString``)."""
    s = counts.encode() if isinstance(counts, str) else counts
    out: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = s[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def rle_decode(seg: Any) -> np.ndarray:
    """A COCO RLE (``{"size": [h, w], "counts": str | list}``, or a list of them: OR-ed) →
    uint8 mask ``[h, w]`` (column-major runs, starting with zeros)."""
    if isinstance(seg, list):
        masks = [rle_decode(s) for s in seg]
        if not masks:
            raise ValueError("empty segmentation list")
        return np.logical_or.reduce(masks).astype(np.uint8)
    h, w = (int(v) for v in seg["size"])
    counts = seg["counts"]
    runs = rle_counts(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if sum(runs) != h * w:
        raise ValueError(f"RLE covers {sum(runs)} pixels, the mask has {h * w}")
    values = np.zeros(len(runs), np.uint8)
    values[1::2] = 1
    flat = np.repeat(values, runs)
    return flat.reshape(w, h).T.copy()


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """A mask → uncompressed COCO RLE (tests, synthetic datasets)."""
    flat = np.asarray(mask, np.uint8).T.reshape(-1)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        runs = [0, *runs]
    return {"size": list(mask.shape), "counts": runs}


def rasterize_polygons(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons (``[x1, y1, x2, y2, ...]`` each, pixel units, OR-ed) → uint8 mask.

    A pixel is in when its centre is inside (GDAL's rule, ``rasterio.features``); pycocotools
    rasterises on a 5× finer grid instead, so boundary pixels can differ by one.
    """
    from rasterio.features import rasterize

    shapes = []
    for poly in polygons:
        xy = np.asarray(poly, np.float64).reshape(-1, 2)  # odd length: ValueError
        if len(xy) < 3:
            raise ValueError(f"polygon with {len(xy)} points")
        ring = [*xy.tolist(), xy[0].tolist()]
        shapes.append(({"type": "Polygon", "coordinates": [ring]}, 1))
    if not shapes:
        raise ValueError("empty segmentation list")
    return rasterize(shapes, out_shape=(int(height), int(width)), fill=0, dtype="uint8")


def decode_segmentation(seg: Any, size: tuple[int, int] | None = None) -> np.ndarray:
    """A COCO segmentation → uint8 mask: RLE (or a list of them) or polygons (need ``size``,
    ``(height, width)`` from the image record)."""
    if isinstance(seg, list) and seg and all(isinstance(p, (list, tuple)) for p in seg):
        if size is None:
            raise ValueError("polygons without the image size")
        return rasterize_polygons(seg, *size)
    return rle_decode(seg)


def read_mask(path: Path) -> np.ndarray:
    """A mask image (band 1; non-zero = target, as RSRefSeg 2's converters read them) → uint8."""
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    if not path.is_file():
        raise InputError(f"{path}: mask not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                data = ds.read(1)
    except RasterioIOError as exc:
        raise InputError(f"{path}: cannot read mask ({str(exc).splitlines()[0]})") from None
    return (data > 0).astype(np.uint8)


# ----------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class ReferSample:
    """One (image, sentence, target) triple; the target is a COCO segmentation (RLE, or
    polygons with ``size``) or a mask file."""

    image: Path
    sentence: str
    segmentation: Any = None
    where: str = ""  # its place in the annotations, for messages ("line 3", "ref 12")
    mask_file: Path | None = None
    size: tuple[int, int] | None = None  # (height, width) for polygons
    source: Path | None = None  # the annotation file, for messages (default: the image)

    def mask(self, image_size: tuple[int, int] | None = None) -> np.ndarray:
        """The target, uint8 0/1; polygons without a recorded size take ``image_size``."""
        if self.mask_file is not None:
            return read_mask(self.mask_file)
        try:
            return decode_segmentation(self.segmentation, self.size or image_size)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            where = self.source or self.image
            raise InputError(f"{where}: bad segmentation ({self.where}: {exc})") from None


@dataclass
class ReferDataset:
    root: Path
    ann_file: Path
    samples: list[ReferSample] = field(default_factory=list)
    layout: str = "rsrefseg2"
    detected: bool = False  # chosen by --layout auto

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "layout": self.layout,
            "detected": self.detected,
            "annotations": str(self.ann_file),
            "samples": len(self),
        }


def load_refer_dataset(
    root: Path, split: str | None, layout: str = "auto", limit: int | None = None
) -> ReferDataset:
    """The referring dataset at ``root`` in ``layout`` (``auto``: from its files; see the module
    docstring and ``refer_layouts``); one-line errors."""
    from drseg_cli.evaluate import refer_layouts

    if layout not in LAYOUTS and layout != "auto":
        raise UsageError(f"--layout {layout}: referring layouts are auto, {', '.join(LAYOUTS)}")
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: dataset folder not found")
    split = split or "test"
    detected = layout == "auto"
    if detected:
        layout = refer_layouts.detect_refer_layout(root, split)
    if layout == "rsrefseg2":
        ann, samples = _load_rsrefseg2(root, split, limit)
    else:
        ann, samples = refer_layouts.LOADERS[layout](root, split, limit)
    return ReferDataset(root, ann, samples, layout, detected)


def _load_rsrefseg2(root: Path, split: str, limit: int | None) -> tuple[Path, list[ReferSample]]:
    ann = _find_annotations(root, split)
    samples = []
    with open(ann, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                name, sent, seg = item["file_name"], item["sent"], item["segmentation"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise InputError(f"{ann}: line {n} is not a referring sample ({exc})") from None
            image = root / name
            if not image.is_file() and (root / "images" / name).is_file():
                image = root / "images" / name
            samples.append(ReferSample(image, str(sent), seg, f"line {n}"))
            if limit and len(samples) >= limit:
                break
    if not samples:
        raise InputError(f"{ann}: no samples")
    return ann, samples


def _find_annotations(root: Path, split: str) -> Path:
    p = Path(split)
    for cand in (p, root / p):
        if cand.suffix == ".jsonl" and cand.is_file():
            return cand
    found = sorted(root.glob(f"*_{split}.jsonl")) + sorted(root.glob(f"*/*_{split}.jsonl"))
    if not found:
        raise InputError(f"{root}: no *_{split}.jsonl annotation file (see docs/REFER.md)")
    return found[0]


def read_rgb(path: Path) -> np.ndarray:
    """An image file → float32 ``[3, H, W]`` in [0, 1] (8-bit JPEG/PNG/TIFF; grey repeated)."""
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    if not path.is_file():
        raise InputError(f"{path}: image not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                data = ds.read()
    except RasterioIOError as exc:
        raise InputError(f"{path}: cannot read image ({str(exc).splitlines()[0]})") from None
    data = data[:3] if data.shape[0] >= 3 else np.repeat(data[:1], 3, 0)
    scale = 255.0 if data.dtype == np.uint8 else float(max(data.max(), 1))
    return (data.astype(np.float32) / scale).clip(0, 1)


# ----------------------------------------------------------------------------- metrics


@dataclass
class ReferScores:
    """Streamed referring metrics: per-sample IoU, and the cumulative I and U."""

    ious: list[float] = field(default_factory=list)
    inter: int = 0
    union: int = 0

    def add(self, pred: np.ndarray, label: np.ndarray, ignore_index: int = 255) -> float:
        """Score one prediction (bool ``[H, W]``) against a label (0/1, ``ignore_index``)."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction {pred.shape} and label {label.shape} differ")
        keep = label != ignore_index
        p = pred.astype(bool) & keep
        t = (label == 1) & keep
        i, u = int((p & t).sum()), int((p | t).sum())
        iou = i / u if u else 1.0
        self.ious.append(iou)
        self.inter += i
        self.union += u
        return iou

    def summary(self) -> dict[str, float]:
        """gIoU, cIoU and Pr@X in %, and the sample count."""
        ious = np.asarray(self.ious, np.float64)
        out = {
            "samples": len(ious),
            "gIoU": 100 * float(ious.mean()) if len(ious) else float("nan"),
            "cIoU": 100 * self.inter / self.union if self.union else float("nan"),
        }
        for t in THRESHOLDS:
            out[f"Pr@{t}"] = 100 * float((ious > t).mean()) if len(ious) else float("nan")
        return out


# ----------------------------------------------------------------------------- evaluation


def predict_mask(model: Any, image: np.ndarray, sentence: str, device: Any) -> np.ndarray:
    """The model's mask for one image and sentence, at the image's size: the image resized to
    the model's window (the public test pipeline: resize, no crop), logits resized back."""
    import torch
    import torch.nn.functional as F

    size = model.preprocess.tile_size
    x = torch.from_numpy(image)[None].to(device)
    h, w = x.shape[-2:]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    with torch.inference_mode():
        out = model(x, model.encode_expressions([sentence]))
        logits = F.interpolate(out.mask_logits[:, :1].float(), size=(h, w), mode="bilinear")
    return (logits[0, 0] > 0).cpu().numpy()


def iter_samples(dataset: ReferDataset) -> Iterator[tuple[ReferSample, np.ndarray, np.ndarray]]:
    for s in dataset.samples:
        image = read_rgb(s.image)
        label = s.mask(image.shape[1:])
        if label.shape != image.shape[1:]:
            raise InputError(
                f"{s.mask_file or s.image}: mask {label.shape} does not match the image "
                f"{image.shape[1:]} ({s.where})"
            )
        yield s, image, label


def evaluate_refer(
    model: Any,
    dataset: ReferDataset,
    device: Any = "cpu",
    ignore_index: int = 255,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Score ``model`` on every sample of ``dataset``: the metrics and per-sample IoUs."""
    scores = ReferScores()
    per_sample = []
    for n, (s, image, label) in enumerate(iter_samples(dataset), start=1):
        iou = scores.add(predict_mask(model, image, s.sentence, device), label, ignore_index)
        per_sample.append({"image": s.image.name, "sentence": s.sentence, "iou": round(iou, 6)})
        if progress:
            progress(n, len(dataset))
    return {"metrics": scores.summary(), "per_sample": per_sample}


def sentence_batches(
    samples: Sequence[ReferSample], size: int, rng: np.random.Generator
) -> Iterator[list[ReferSample]]:
    """Shuffled batches of samples, forever (training)."""
    while True:
        order = rng.permutation(len(samples))
        for i in range(0, len(order) - size + 1 if len(order) >= size else 1, size):
            yield [samples[j] for j in order[i : i + size]]
