"""Class-agnostic mask proposals of one window (DGL-RSIS's GLD module, image side).

Two sources, both returning boolean masks ``[N, H, W]`` on the window's grid:

``superpixel_proposals`` (weight-free, the default): SLIC superpixels (scikit-image) merged
hierarchically — adjacent regions joined greedily by Ward's criterion on mean colour
(size-weighted squared distance) — with the regions of every level kept, finest first. Each
pixel is covered once per level, so every pixel gets a class and coarse levels give context.

``sam_proposals``: SAM's automatic mask generator on an already-built transformers
``SamModel`` (the loader is shared with ``drseg refer``): a regular point grid prompts the
mask decoder, each point's three masks are filtered by predicted IoU and stability score
(SAM's ``pred_iou_thresh``, ``stability_score_thresh``, offset 1), small masks dropped,
duplicates removed by box NMS — the recipe of segment-anything's
``SamAutomaticMaskGenerator``, without its crop layers. The pixels no mask covers form
one "leftover" proposal so that segmentation still labels every pixel.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from drseg_cli.errors import UsageError
from drseg_cli.model.dglrsis.options import DGLRSISOptions

if TYPE_CHECKING:
    from torch import nn

#: SAM's pixel statistics (segment-anything ``Sam.pixel_mean/std``, /255).
SAM_MEAN = (0.485, 0.456, 0.406)
SAM_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- superpixels


def merge_hierarchy(labels: np.ndarray, image: np.ndarray, targets: list[int]) -> list[np.ndarray]:
    """Label maps after greedy Ward merging of adjacent regions down to each count in
    ``targets`` (descending); ``labels`` ``[H, W]`` ints from 0, ``image`` ``[H, W, C]``."""
    n = int(labels.max()) + 1
    flat = labels.ravel()
    colours = image.reshape(-1, image.shape[-1]).astype(np.float64)
    size = np.bincount(flat, minlength=n).astype(np.float64)
    sums = np.stack(
        [np.bincount(flat, colours[:, c], minlength=n) for c in range(colours.shape[1])], 1
    )
    pairs = set()
    for a, b in (
        (labels[:, :-1], labels[:, 1:]),
        (labels[:-1, :], labels[1:, :]),
    ):
        diff = a != b
        for x, y in zip(a[diff].tolist(), b[diff].tolist(), strict=True):
            pairs.add((min(x, y), max(x, y)))
    neighbours: dict[int, set[int]] = {i: set() for i in range(n) if size[i] > 0}
    for x, y in pairs:
        neighbours[x].add(y)
        neighbours[y].add(x)
    version = [0] * n
    parent = list(range(n))

    def cost(x: int, y: int) -> float:
        mx, my = sums[x] / size[x], sums[y] / size[y]
        return float(((mx - my) ** 2).sum() * size[x] * size[y] / (size[x] + size[y]))

    heap = [(cost(x, y), x, y, 0, 0) for x, y in pairs]
    heapq.heapify(heap)
    count = len(neighbours)
    levels: list[np.ndarray] = []

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for target in sorted(targets, reverse=True):
        while count > target and heap:
            _, x, y, vx, vy = heapq.heappop(heap)
            if x not in neighbours or y not in neighbours or version[x] != vx or version[y] != vy:
                continue
            sums[x] += sums[y]
            size[x] += size[y]
            parent[y] = x
            for z in neighbours.pop(y):
                neighbours[z].discard(y)
                if z != x:
                    neighbours[z].add(x)
                    neighbours[x].add(z)
            neighbours[x].discard(x)
            version[x] += 1
            count -= 1
            for z in neighbours[x]:
                a, b = (x, z) if x < z else (z, x)
                heapq.heappush(heap, (cost(a, b), a, b, version[a], version[b]))
        lut = np.array([find(i) for i in range(n)])
        levels.append(lut[labels])
    return levels


def superpixel_proposals(image: np.ndarray, options: DGLRSISOptions) -> np.ndarray:
    """Boolean masks ``[N, H, W]`` of one RGB window ``[H, W, 3]`` in [0, 1]: the SLIC
    superpixels and their hierarchical merges (deduplicated, at most ``max_proposals``,
    finest level always complete)."""
    try:
        from skimage.segmentation import slic
    except ImportError:
        raise UsageError(
            "DGL-RSIS superpixel proposals need scikit-image: pip install 'drseg[dglrsis]'"
        ) from None

    labels = slic(
        image,
        n_segments=options.superpixels,
        compactness=options.compactness,
        sigma=options.slic_sigma,
        start_label=0,
        channel_axis=-1,
        enforce_connectivity=True,
    )
    _, labels = np.unique(labels, return_inverse=True)
    labels = labels.reshape(image.shape[:2])
    n = int(labels.max()) + 1
    targets = sorted({max(1, round(n * f)) for f in options.merge_levels}, reverse=True)
    levels = [labels, *merge_hierarchy(labels, image, [t for t in targets if t < n])]
    masks: list[np.ndarray] = []
    seen: set[bytes] = set()
    for level in levels:
        for value in np.unique(level):
            mask = level == value
            key = np.packbits(mask).tobytes()
            if key not in seen:
                seen.add(key)
                masks.append(mask)
    fine = n  # the finest level is kept whole; coarser regions fill the remaining budget
    extra = sorted(masks[fine:], key=lambda m: -int(m.sum()))
    masks = masks[:fine] + extra[: max(0, options.max_proposals - fine)]
    return np.stack(masks)


def layer_masks(masks: torch.Tensor) -> torch.Tensor:
    """Overlapping boolean masks ``[N, H, W]`` packed as label-map layers ``[L, H, W]`` int32
    (value ``i + 1`` = mask ``i``, 0 = none): each mask goes into the first layer where it
    overlaps no other (first fit, in order), so a hierarchy takes one layer per level and
    the layers hold N masks in far fewer bytes than N boolean maps."""
    n, h, w = masks.shape
    flat = masks.reshape(n, -1).cpu()
    layers: list[torch.Tensor] = []
    for i in range(n):
        where = flat[i].nonzero().squeeze(1)
        for layer in layers:
            if not bool(layer[where].any()):
                break
        else:
            layer = torch.zeros(h * w, dtype=torch.int32)
            layers.append(layer)
        layer[where] = i + 1
    if not layers:
        return torch.zeros(0, h, w, dtype=torch.int32)
    return torch.stack(layers).reshape(-1, h, w)


# --------------------------------------------------------------------------- SAM


def _stability(logits: torch.Tensor, offset: float, threshold: float = 0.0) -> torch.Tensor:
    """SAM's stability score: IoU of the masks thresholded at ±offset around the cut."""
    inter = (logits > threshold + offset).flatten(1).sum(1).float()
    union = (logits > threshold - offset).flatten(1).sum(1).float()
    return inter / union.clamp(min=1)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """``[N, 4]`` boxes (x0, y0, x1, y1; x1/y1 exclusive) of boolean masks ``[N, H, W]``;
    an empty mask gets (0, 0, 0, 0)."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, 4)
    rows, cols = masks.any(2), masks.any(1)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).amin(1)
    y1 = torch.where(rows, ar_h + 1, 0).amax(1)
    x0 = torch.where(cols, ar_w, w).amin(1)
    x1 = torch.where(cols, ar_w + 1, 0).amax(1)
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    boxes[~rows.any(1)] = 0
    return boxes


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices kept by greedy NMS (best score first) at box IoU ``iou``."""
    from torchvision.ops import nms

    return nms(boxes.float(), scores.float(), iou)


def filter_masks(
    logits: torch.Tensor, iou_pred: torch.Tensor, options: DGLRSISOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM AMG filtering of mask logits ``[M, H, W]`` with predicted IoUs ``[M]``:
    (boolean masks ``[N, H, W]``, scores ``[N]``), best first."""
    keep = iou_pred >= options.pred_iou_thresh
    stability = _stability(logits, options.stability_offset)
    keep &= stability >= options.stability_thresh
    masks = logits > 0
    area = masks.flatten(1).sum(1)
    keep &= area >= max(1.0, options.min_area * logits.shape[-2] * logits.shape[-1])
    masks, scores = masks[keep], iou_pred[keep]
    if len(masks):
        order = box_nms(mask_boxes(masks), scores, options.nms_iou)
        masks, scores = masks[order], scores[order]
    return masks[: options.max_proposals], scores[: options.max_proposals]


def sam_inputs(image: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM's input: longest side resized to ``size``, normalised, padded bottom/right.
    Returns (pixel_values ``[1, 3, size, size]``, resized (h, w))."""
    h, w = image.shape[-2:]
    scale = size / max(h, w)
    rh, rw = max(1, round(h * scale)), max(1, round(w * scale))
    x = F.interpolate(image[None].float(), size=(rh, rw), mode="bilinear", align_corners=False)
    mean = torch.tensor(SAM_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(SAM_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return F.pad(x, (0, size - rw, 0, size - rh)), (rh, rw)


def point_grid(n: int) -> torch.Tensor:
    """``[n·n, 2]`` (x, y) cell centres of an n×n grid over [0, 1]² (SAM's ``build_point_grid``)."""
    offset = 1 / (2 * n)
    side = torch.linspace(offset, 1 - offset, n)
    ys, xs = torch.meshgrid(side, side, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)


@torch.no_grad()
def sam_proposals(
    sam: nn.Module, image: torch.Tensor, options: DGLRSISOptions, leftover: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM automatic masks of one window ``[3, H, W]`` in [0, 1] with a transformers
    ``SamModel``: (boolean masks ``[N, H, W]``, scores ``[N]``); with ``leftover`` the
    pixels no mask covers are one more mask (score 0)."""
    h, w = image.shape[-2:]
    size = int(sam.config.vision_config.image_size)
    device = next(sam.parameters()).device
    pixels, (rh, rw) = sam_inputs(image.to(device), size)
    embeddings = sam.get_image_embeddings(pixels)
    points = point_grid(options.points_per_side).to(device) * torch.tensor(
        [rw, rh], device=device, dtype=torch.float32
    )
    all_logits, all_iou = [], []
    for start in range(0, len(points), options.points_per_batch):
        chunk = points[start : start + options.points_per_batch]
        out = sam(
            image_embeddings=embeddings,
            input_points=chunk[None, :, None, :],
            input_labels=torch.ones(1, len(chunk), 1, dtype=torch.long, device=device),
            multimask_output=True,
        )
        low = out.pred_masks[0].flatten(0, 1)  # [P·3, h/4·…, w/4·…]
        up = F.interpolate(low[:, None].float(), size=(size, size), mode="bilinear")
        up = up[:, :, :rh, :rw]
        up = F.interpolate(up, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        all_logits.append(up.cpu())
        all_iou.append(out.iou_scores[0].flatten().float().cpu())
    masks, scores = filter_masks(torch.cat(all_logits), torch.cat(all_iou), options)
    if leftover:
        rest = ~masks.any(0) if len(masks) else torch.ones(h, w, dtype=torch.bool)
        if rest.any():
            masks = torch.cat([masks, rest[None]])
            scores = torch.cat([scores, torch.zeros(1)])
    return masks, scores
