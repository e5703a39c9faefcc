"""Global alignment for referring expressions: cross-scale Grad-CAM, modifier priors, selection.

Cross-scale Grad-CAM (the paper's CS-GradCAM role): the window is resized to several input
sizes (``cam_scales`` × CLIP's native size, patch multiples); at each, the score is the
cosine between CLIP's image embedding and the expression's text embedding, and Grad-CAM is
taken on the tokens entering CLIP's last block A (``[L, C]``):

    w = mean over patches of ∂score/∂A,   cam = ReLU(Σ_c w_c A_c)   per patch

each map upsampled to the window, max-normalised, and the scales averaged (small sizes see
the whole layout, large ones resolve small objects). Gradients flow only into A: the blocks
before run without a graph, the weights stay frozen, the image gets none; it works under the
pipeline's ``torch.inference_mode`` (inference is switched off locally, inputs cloned).

Modifiers become priors (the paper refines the Grad-CAM maps with "contextual information
from global modifiers"; the forms are ours):

* absolute positions (on the left, at the top, in the middle...) → a pixel map multiplying
  the CAM: ``sigmoid((0.5 − x)/τ)`` for left, etc.; centre: a Gaussian of σ = 2τ;
* superlatives (largest, leftmost...) → per candidate, relative to the other candidates;
* relations to anchor nouns (left of, near, on, between...) → per candidate, the best over
  the anchor noun's candidates j (weighted by their noun probability) of a soft geometric
  test: ``sigmoid((x_j − x_i)/τ)`` for *left of*, ``exp(−gap/σ)`` for *near*, the fraction of
  the mask inside the anchor's box for *on*...

Mask selection integrates the pixel-level refined CAM into the proposals: each noun
candidate scores ``(λ_l·p/max p + λ_c·cam/max cam)/(λ_l + λ_c) × prior``; the best one is
selected — all within ``plural_keep`` of the best for a plural target, the best ``n`` for a
count ``n``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drseg_cli.model.backbones import ClipDenseEncoder
from drseg_cli.model.clipseg import normalise_images
from drseg_cli.model.dglrsis.local import global_from_tokens, native_size
from drseg_cli.model.dglrsis.options import DGLRSISOptions
from drseg_cli.model.dglrsis.parser import ParsedText


def cross_scale_gradcam(
    clip: ClipDenseEncoder, images: torch.Tensor, text: torch.Tensor, scales: Sequence[float]
) -> torch.Tensor:
    """Grad-CAM maps ``[B, E, H, W]`` in [0, 1] of ``text [E, D]`` (unit) on ``images
    [B, 3, H, W]`` in [0, 1], fused over ``scales`` (see the module docstring)."""
    b, _, h, w = images.shape
    e = text.shape[0]
    p, native = clip.patch_size, native_size(clip)
    maps = []
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        torch.autocast(images.device.type, enabled=False),
    ):
        img = images.detach().float().clone()  # a normal tensor even under inference mode
        txt = F.normalize(text.detach().float().clone(), dim=-1)
        for scale in scales:
            sh = max(p, round(native * scale * h / max(h, w) / p) * p)
            sw = max(p, round(native * scale * w / max(h, w) / p) * p)
            x = F.interpolate(img, size=(sh, sw), mode="bilinear", align_corners=False)
            with torch.no_grad():
                tokens = clip.tokens(normalise_images(x, clip)).float()
            length, width = tokens.shape[1:]
            a = tokens[:, None].expand(b, e, length, width).reshape(b * e, length, width)
            a = a.clone().requires_grad_(True)
            emb = F.normalize(global_from_tokens(clip, a).float(), dim=-1).view(b, e, -1)
            score = (emb * txt[None]).sum(-1)  # [B, E]
            (grad,) = torch.autograd.grad(score.sum(), a)
            weights = grad[:, 1:].mean(1, keepdim=True)  # [B·E, 1, C]
            cam = F.relu((a.detach()[:, 1:] * weights).sum(-1))  # [B·E, h·w]
            cam = cam.view(b * e, 1, sh // p, sw // p)
            cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)
            cam = cam / cam.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1, 1)
            maps.append(cam.view(b, e, h, w).detach())
    out = torch.stack(maps).mean(0)
    return out / out.flatten(2).amax(2).clamp(min=1e-12)[..., None, None]


# --------------------------------------------------------------------------- priors


def _coords(h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    return ys[:, None].expand(h, w), xs[None, :].expand(h, w)


def position_map(positions: Sequence[str], h: int, w: int, softness: float) -> torch.Tensor:
    """``[H, W]`` prior of absolute positions (left, right, top, bottom, center), multiplied."""
    ys, xs = _coords(h, w)
    prior = torch.ones(h, w)
    for pos in positions:
        if pos == "left":
            prior = prior * torch.sigmoid((0.5 - xs) / softness)
        elif pos == "right":
            prior = prior * torch.sigmoid((xs - 0.5) / softness)
        elif pos == "top":
            prior = prior * torch.sigmoid((0.5 - ys) / softness)
        elif pos == "bottom":
            prior = prior * torch.sigmoid((ys - 0.5) / softness)
        elif pos == "center":
            d2 = (xs - 0.5) ** 2 + (ys - 0.5) ** 2
            prior = prior * torch.exp(-d2 / (2 * (2 * softness) ** 2))
    return prior


@dataclass
class Geometry:
    """Centroids (x, y) and boxes in window fractions, and areas (pixels) of masks."""

    cx: torch.Tensor
    cy: torch.Tensor
    boxes: torch.Tensor  # [N, 4] x0, y0, x1, y1 in [0, 1]
    area: torch.Tensor

    @classmethod
    def of(cls, masks: torch.Tensor) -> Geometry:
        from drseg_cli.model.dglrsis.proposals import mask_boxes

        n, h, w = masks.shape
        ys, xs = _coords(h, w, masks.device)
        m = masks.float()
        area = m.flatten(1).sum(1)
        safe = area.clamp(min=1)
        cx = (m * xs).flatten(1).sum(1) / safe
        cy = (m * ys).flatten(1).sum(1) / safe
        boxes = mask_boxes(masks).to(m) / torch.tensor([w, h, w, h], dtype=m.dtype)
        return cls(cx, cy, boxes, area)


def _box_gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean gap ``[N, M]`` between boxes (0 where they overlap)."""
    dx = torch.maximum(a[:, None, 0], b[None, :, 0]) - torch.minimum(a[:, None, 2], b[None, :, 2])
    dy = torch.maximum(a[:, None, 1], b[None, :, 1]) - torch.minimum(a[:, None, 3], b[None, :, 3])
    return torch.sqrt(dx.clamp(min=0) ** 2 + dy.clamp(min=0) ** 2)


def _inside_box(masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``[N, M]``: fraction of each mask's pixels inside each box (window fractions)."""
    n, h, w = masks.shape
    ys, xs = _coords(h, w, masks.device)
    inside = (
        (xs[None] >= boxes[:, 0, None, None])
        & (xs[None] <= boxes[:, 2, None, None])
        & (ys[None] >= boxes[:, 1, None, None])
        & (ys[None] <= boxes[:, 3, None, None])
    ).float()  # [M, H, W]
    hits = masks.float().flatten(1) @ inside.flatten(1).T
    return hits / masks.flatten(1).sum(1, keepdim=True).clamp(min=1)


def relation_scores(
    kind: str,
    target: torch.Tensor,
    anchors: Sequence[torch.Tensor],
    options: DGLRSISOptions,
) -> torch.Tensor:
    """``[N, M]`` soft truth of "target mask i <kind> anchor mask j" (for ``between``:
    ``[N, M1·M2]`` over anchor pairs)."""
    tau, sigma = options.prior_softness, options.near_sigma
    g = Geometry.of(target)
    a = Geometry.of(anchors[0])
    if kind == "left_of":
        return torch.sigmoid((a.cx[None] - g.cx[:, None]) / tau)
    if kind == "right_of":
        return torch.sigmoid((g.cx[:, None] - a.cx[None]) / tau)
    if kind == "above":
        return torch.sigmoid((a.cy[None] - g.cy[:, None]) / tau)
    if kind == "below":
        return torch.sigmoid((g.cy[:, None] - a.cy[None]) / tau)
    if kind in ("near", "far_from"):
        near = torch.exp(-_box_gap(g.boxes, a.boxes) / (sigma * 2**0.5))
        return near if kind == "near" else 1 - near
    if kind == "on":
        return _inside_box(target, a.boxes)
    if kind == "between":
        b = Geometry.of(anchors[1]) if len(anchors) > 1 else a
        p1 = torch.stack([a.cx, a.cy], 1)  # [M1, 2]
        p2 = torch.stack([b.cx, b.cy], 1)  # [M2, 2]
        c = torch.stack([g.cx, g.cy], 1)  # [N, 2]
        seg = p2[None] - p1[:, None]  # [M1, M2, 2]
        length2 = (seg**2).sum(-1).clamp(min=1e-6)
        rel = c[:, None, None] - p1[None, :, None]  # [N, M1, 1, 2]
        t = (rel * seg[None]).sum(-1) / length2[None]  # [N, M1, M2]
        foot = p1[None, :, None] + t[..., None] * seg[None]
        dist = torch.sqrt(((c[:, None, None] - foot) ** 2).sum(-1))
        inside = torch.sigmoid(t / tau) * torch.sigmoid((1 - t) / tau)
        return (inside * torch.exp(-dist / sigma)).flatten(1)
    raise ValueError(f"unknown relation {kind!r}")


def superlative_scores(kind: str, masks: torch.Tensor, softness: float) -> torch.Tensor:
    """``[N]`` prior of each candidate for a superlative, relative to the others."""
    g = Geometry.of(masks)
    if kind == "largest":
        return g.area / g.area.amax().clamp(min=1)
    if kind == "smallest":
        return g.area.amin() / g.area.clamp(min=1)
    if kind == "leftmost":
        return torch.exp(-(g.cx - g.cx.amin()) / softness)
    if kind == "rightmost":
        return torch.exp(-(g.cx.amax() - g.cx) / softness)
    if kind == "topmost":
        return torch.exp(-(g.cy - g.cy.amin()) / softness)
    if kind == "bottommost":
        return torch.exp(-(g.cy.amax() - g.cy) / softness)
    raise ValueError(f"unknown superlative {kind!r}")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU ``[N, M]`` of boolean masks."""
    fa, fb = a.flatten(1).float(), b.flatten(1).float()
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None] - inter
    return inter / union.clamp(min=1)


def object_priors(
    parsed: ParsedText,
    masks: torch.Tensor,
    anchors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    options: DGLRSISOptions,
) -> torch.Tensor:
    """``[N]`` prior of each target candidate from superlatives and relations; ``anchors``:
    noun → (candidate masks ``[M, H, W]``, noun probabilities ``[M]``)."""
    prior = torch.ones(len(masks))
    for kind in parsed.superlatives:
        prior = prior * superlative_scores(kind, masks, options.prior_softness)
    for rel in parsed.relations:
        found = [anchors.get(name) for name in rel.anchors]
        if not found or any(f is None or len(f[0]) == 0 for f in found):
            continue  # no candidate for the anchor noun here: the relation cannot be judged
        anchor_masks = [f[0] for f in found]
        weight = found[0][1] / found[0][1].amax().clamp(min=1e-12)
        truth = relation_scores(rel.kind, masks, anchor_masks, options)  # [N, M(·M2)]
        same = _overlap(masks, anchor_masks[0]) > 0.5  # an anchor is not its own target
        if rel.kind == "between":
            m2 = anchor_masks[1] if len(anchor_masks) > 1 else anchor_masks[0]
            w2 = found[-1][1] / found[-1][1].amax().clamp(min=1e-12)
            weight = (weight[:, None] * w2[None]).flatten()
            same = (same[:, :, None] | (_overlap(masks, m2) > 0.5)[:, None]).flatten(1)
        truth = torch.where(same, torch.zeros_like(truth), truth) * weight[None]
        prior = prior * truth.amax(1)
    return prior


def select_masks(
    parsed: ParsedText,
    noun_prob: torch.Tensor,
    cam_score: torch.Tensor,
    prior: torch.Tensor,
    options: DGLRSISOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of the selected candidates, their scores ``[N]``): see the module docstring."""
    lw, cw = options.local_weight, options.cam_weight
    p = noun_prob / noun_prob.amax().clamp(min=1e-12)
    c = cam_score / cam_score.amax().clamp(min=1e-12)
    score = (lw * p + cw * c) / (lw + cw) * prior
    order = torch.argsort(score, descending=True)
    if parsed.count and parsed.count > 1:
        chosen = order[: parsed.count]
    elif parsed.plural:
        chosen = order[score[order] >= options.plural_keep * score[order[0]]]
    else:
        chosen = order[:1]
    return chosen, score


def with_parts(
    masks: torch.Tensor, score: torch.Tensor, chosen: torch.Tensor, keep: float
) -> torch.Tensor:
    """``chosen`` plus the candidates nested in or around a chosen one (one contains ≥ 90 %
    of the other) that score ≥ ``keep`` × its score: the same object at other hierarchy
    levels, so a whole object is returned rather than its best-scoring part."""
    flat = masks.flatten(1).float()
    inter = flat @ flat.T
    area = flat.sum(1).clamp(min=1)
    nested = (inter / area[:, None] >= 0.9) | (inter / area[None, :] >= 0.9)
    out = set(chosen.tolist())
    for c in chosen.tolist():
        ok = nested[c] & (score >= keep * score[c])
        out.update(torch.nonzero(ok).flatten().tolist())
    return torch.tensor(sorted(out), dtype=torch.long)
