"""Local alignment: classify each mask proposal with CLIP (DGL-RSIS's mask classification).

Context-aware crop (the paper's "context-aware cropping"): the proposal's box, made square
on its longer side, enlarged by ``context_ratio`` (at least ``min_crop`` px) and resampled to
CLIP's input size (roi_align, so boxes past the window edge read zeros there, treated as
background); pixels outside the mask are *attenuated*, not erased:

    x' = m·x + (1 − m)·(a·x + (1 − a)·μ)          a = ``attenuation``, μ = CLIP's mean colour

so CLIP still sees the surroundings that tell a harbour from a river, while the proposal
dominates. The crop's image-level CLIP embedding (class token through the trained blocks)
is compared with the class text embeddings; the class text is enriched from the
remote-sensing knowledge table (:mod:`.knowledge`): names (the user's, then the table's
synonyms) through the prompt templates, blended with the table's descriptions:

    t = normalise((1 − w)·t_names + w·t_descriptions)          w = ``knowledge_weight``
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from drseg_cli.model.backbones import ClipDenseEncoder
from drseg_cli.model.clipseg import normalise_images
from drseg_cli.model.dglrsis.knowledge import DEFAULT_TABLE, KnowledgeTable
from drseg_cli.model.dglrsis.options import DGLRSISOptions
from drseg_cli.model.text import embed_classes


def native_size(clip: ClipDenseEncoder) -> int:
    """CLIP's own input edge (224 for ViT-B/16; the tiny test model's 64)."""
    size = clip.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def global_embedding(clip: ClipDenseEncoder, images: torch.Tensor) -> torch.Tensor:
    """Image-level CLIP embeddings ``[B, D]`` (not normalised) of normalised ``images`` of
    any patch-multiple size: every block as trained, positional embedding resampled."""
    return global_from_tokens(clip, clip.tokens(images))


def global_from_tokens(clip: ClipDenseEncoder, tokens: torch.Tensor) -> torch.Tensor:
    """The trained last block, ``ln_post`` and ``proj`` on the class token of ``tokens``
    ``[B, L, width]`` (what enters the last block)."""
    visual = clip.visual
    block = visual.transformer.resblocks[-1]
    x = block(tokens) if visual.transformer.batch_first else block(tokens.transpose(0, 1))
    if not visual.transformer.batch_first:
        x = x.transpose(0, 1)
    return visual.ln_post(x[:, 0]) @ visual.proj


def crop_boxes(masks: torch.Tensor, context_ratio: float, min_crop: int) -> torch.Tensor:
    """Square context boxes ``[N, 4]`` (x0, y0, x1, y1) around boolean masks ``[N, H, W]``."""
    from drseg_cli.model.dglrsis.proposals import mask_boxes

    boxes = mask_boxes(masks)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    side = (boxes[:, 2:] - boxes[:, :2]).amax(1).clamp(min=1) * context_ratio
    side = side.clamp(min=float(min_crop))
    half = (side / 2)[:, None]
    return torch.cat([centre - half, centre + half], 1)


def context_crops(
    image: torch.Tensor,
    masks: torch.Tensor,
    options: DGLRSISOptions,
    size: int,
    fill: Sequence[float],
) -> torch.Tensor:
    """Crops ``[N, 3, size, size]`` in [0, 1] of ``image [3, H, W]`` around each mask,
    background attenuated towards ``fill`` (see the module docstring)."""
    from torchvision.ops import roi_align

    if len(masks) == 0:
        return image.new_zeros(0, 3, size, size)
    image = image.float()
    boxes = crop_boxes(masks, options.context_ratio, options.min_crop).to(image)
    rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], 1)
    x = roi_align(image[None], rois, size, spatial_scale=1.0, aligned=True)
    own = rois.clone()
    own[:, 0] = torch.arange(len(rois), dtype=rois.dtype, device=rois.device)  # mask i, roi i
    m = roi_align(masks[:, None].to(x), own, size, 1.0, aligned=True).clamp(0, 1)
    inside = roi_align(image.new_ones(1, 1, *image.shape[-2:]), rois, size, 1.0, aligned=True)
    mu = torch.tensor(list(fill), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = x + (1 - inside) * mu  # outside the window: the fill colour, not black
    a = options.attenuation
    return m * x + (1 - m) * (a * x + (1 - a) * mu)


def crop_embeddings(clip: ClipDenseEncoder, crops: torch.Tensor, batch: int) -> torch.Tensor:
    """L2-normalised CLIP image embeddings ``[N, D]`` (fp32) of crops in [0, 1]."""
    out = []
    for start in range(0, len(crops), batch):
        x = normalise_images(crops[start : start + batch], clip)
        out.append(F.normalize(global_embedding(clip, x).float(), dim=-1))
    if not out:
        return crops.new_zeros(0, clip.embed_dim)
    return torch.cat(out)


def proposal_logits(
    clip: ClipDenseEncoder,
    image: torch.Tensor,
    masks: torch.Tensor,
    text: torch.Tensor,
    options: DGLRSISOptions,
) -> torch.Tensor:
    """Class logits ``[N, K]`` of each proposal of ``image [3, H, W]`` in [0, 1]:
    ``logit_scale`` · cos(crop embedding, class text ``[K, D]``)."""
    size = options.crop_size or native_size(clip)
    size -= size % clip.patch_size
    crops = context_crops(image, masks, options, size, clip.mean)
    emb = crop_embeddings(clip, crops, options.crop_batch)
    return options.logit_scale * emb @ text.to(emb).T


def enriched_text(
    clip: ClipDenseEncoder,
    class_prompts: Sequence[Sequence[str]],
    options: DGLRSISOptions,
    table: KnowledgeTable = DEFAULT_TABLE,
) -> torch.Tensor:
    """``[K, D]`` L2-normalised class embeddings enriched from the knowledge table."""
    rows = []
    for names in class_prompts:
        names = list(names)
        descriptions: list[str] = []
        if options.knowledge:
            names, descriptions = table.enrich(names, options.max_synonyms)
        t = embed_classes(clip.encode_prompts, [names], clip.templates)[0]
        if descriptions and options.knowledge_weight > 0:
            sentences = [f"an aerial image of {names[0]}: {d}." for d in descriptions]
            d = F.normalize(clip.encode_prompts(sentences), dim=-1).mean(0)
            w = options.knowledge_weight
            t = (1 - w) * t + w * F.normalize(d, dim=-1)
        rows.append(F.normalize(t.float(), dim=-1))
    return torch.stack(rows)


def fuse_pixels(
    masks: torch.Tensor, logits: torch.Tensor, fusion: str = "confidence"
) -> torch.Tensor:
    """Per-pixel class log-probabilities ``[K, H, W]`` from proposals ``[N, H, W]`` and their
    logits ``[N, K]``: the most confident covering proposal's distribution (``confidence``),
    or the mean of the covering proposals' distributions (``mean``). Uncovered pixels get
    the uniform distribution."""
    n, h, w = masks.shape
    k = logits.shape[1]
    probs = logits.float().softmax(1)
    flat = masks.reshape(n, -1)
    if fusion == "mean":
        cover = flat.float()
        num = probs.T @ cover  # [K, HW]
        den = cover.sum(0)
        out = torch.where(den > 0, num / den.clamp(min=1), torch.full_like(num, 1.0 / k))
    else:
        conf = probs.amax(1)  # [N]
        ranked = torch.where(flat, conf[:, None], torch.full_like(flat, -1.0, dtype=conf.dtype))
        best_val, best = ranked.max(0)  # [HW]
        out = probs[best].T  # [K, HW]
        out = torch.where(best_val >= 0, out, torch.full_like(out, 1.0 / k))
    return out.clamp(min=1e-6).log().reshape(k, h, w)
