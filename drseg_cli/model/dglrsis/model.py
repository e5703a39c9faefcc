"""DGL-RSIS models behind drseg's interfaces: ``DGLRSISSegmenter`` (``drseg segment --method
dglrsis``, open-vocabulary segmentation by mask classification) and ``DGLRSISReferrer``
(``drseg refer --method dglrsis``, referring segmentation by global alignment).

Per window: class-agnostic proposals (:mod:`.proposals`) → local alignment (:mod:`.local`)
gives each proposal class logits → segmentation: per-pixel fusion of the proposals'
distributions; referring: Grad-CAM of the expression refined by its modifiers and mask
selection among the target noun's candidates (:mod:`.globalalign`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from drseg_cli.errors import UsageError
from drseg_cli.model.backbones import ClipDenseEncoder
from drseg_cli.model.base import (
    Preprocess,
    ReferOutput,
    ReferringModel,
    SegmentationModel,
    TileProposals,
)
from drseg_cli.model.dglrsis import globalalign, local
from drseg_cli.model.dglrsis.options import DGLRSISOptions
from drseg_cli.model.dglrsis.parser import ParsedText, load_spacy, parse_expression
from drseg_cli.model.dglrsis.proposals import layer_masks, sam_proposals, superpixel_proposals


class _Proposer:
    """Proposals of one window from the configured source."""

    def __init__(self, options: DGLRSISOptions, sam: Any = None) -> None:
        if options.proposals == "sam" and sam is None:
            raise UsageError(
                "DGL-RSIS proposals=sam needs SAM weights (the SAM model of drseg refer); "
                "without them use proposals=superpixel"
            )
        self.options, self.sam = options, sam

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Boolean masks ``[N, H, W]`` (on the image's device) of ``image [3, H, W]``."""
        if self.options.proposals == "sam":
            masks, _ = sam_proposals(self.sam, image, self.options)
            return masks.to(image.device)
        rgb = image.detach().float().permute(1, 2, 0).clamp(0, 1).cpu().numpy()
        return torch.from_numpy(superpixel_proposals(rgb, self.options)).to(image.device)


def _preprocess(clip: ClipDenseEncoder, tile_size: int) -> Preprocess:
    if tile_size <= 0 or tile_size % clip.patch_size:
        raise UsageError(f"tile size {tile_size} must be a multiple of {clip.patch_size}")
    return Preprocess(tile_size=tile_size, mean=clip.mean, std=clip.std, multiple=clip.patch_size)


class DGLRSISSegmenter(SegmentationModel):
    """Open-vocabulary segmentation by proposal classification; logits ``[B, K, H, W]``
    are per-pixel class log-probabilities on the window's own grid."""

    name = "dglrsis"
    has_proposals = True

    def __init__(
        self,
        clip: ClipDenseEncoder,
        options: DGLRSISOptions | None = None,
        *,
        tile_size: int = 448,
        sam: Any = None,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.options = options or DGLRSISOptions()
        self.sam = sam
        self.propose = _Proposer(self.options, sam)
        self.random_weights = bool(getattr(clip, "random_weights", False))
        self.preprocess = _preprocess(clip, tile_size)
        self._keep = False
        self._proposals: list[TileProposals] = []

    def keep_proposals(self, on: bool) -> None:
        """Record each forward's classified proposals (off by default: it costs the packing)."""
        self._keep = bool(on)
        self._proposals = []

    def last_proposals(self) -> list[TileProposals]:
        """The latest forward's proposals, one entry per image, then forgotten."""
        out, self._proposals = self._proposals, []
        return out

    def encode_text(self, class_prompts: Sequence[Sequence[str]]) -> torch.Tensor:
        """``[K, D]`` class embeddings enriched from the RS knowledge table."""
        return local.enriched_text(self.clip, class_prompts, self.options)

    def proposal_logits(
        self, image: torch.Tensor, masks: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        """Class logits ``[N, K]`` of the proposals of one window (local alignment)."""
        return local.proposal_logits(self.clip, image, masks, text, self.options)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        out = []
        self._proposals = []  # a retried call (out of memory, fp32 redo) starts afresh
        for image in images:
            masks = self.propose(image)
            logits = self.proposal_logits(image, masks, text)
            out.append(local.fuse_pixels(masks, logits, self.options.fusion))
            if self._keep:
                score, cls = logits.float().softmax(1).max(1)
                self._proposals.append(
                    TileProposals(
                        layer_masks(masks).numpy(),
                        cls.cpu().numpy().astype(np.int64),
                        score.cpu().numpy().astype(np.float32),
                    )
                )
        return torch.stack(out)


@dataclass
class EncodedExpressions:
    """What ``DGLRSISReferrer`` keeps of the expressions (once per run)."""

    parsed: list[ParsedText]
    expression_text: torch.Tensor  # [E, D] unit CLIP embeddings of the whole expressions
    nouns: list[str]  # every target/anchor noun, once
    noun_text: torch.Tensor  # [U + G, D]: the nouns' enriched embeddings, then the negatives'
    targets: list[int]  # per expression: its target's index in ``nouns``


class DGLRSISReferrer(ReferringModel):
    """Training-free referring segmentation (see the module docstring)."""

    name = "dglrsis"

    def __init__(
        self,
        clip: ClipDenseEncoder,
        options: DGLRSISOptions | None = None,
        *,
        tile_size: int = 448,
        sam: Any = None,
        nlp: Any = None,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.options = options or DGLRSISOptions()
        self.sam = sam
        self.nlp = nlp
        self.propose = _Proposer(self.options, sam)
        self.random_weights = bool(getattr(clip, "random_weights", False))
        self.preprocess = _preprocess(clip, tile_size)

    def encode_expressions(self, expressions: Sequence[str]) -> EncodedExpressions:
        """Parse each expression; embed it whole (for Grad-CAM) and its nouns (enriched)."""
        if not expressions:
            raise UsageError("give at least one referring expression")
        parsed = [parse_expression(e, nlp=self.nlp) for e in expressions]
        nouns: list[str] = []
        targets = []
        for p in parsed:
            target = p.target or p.text.strip().lower()
            for noun in (target, *p.anchors):
                if noun not in nouns:
                    nouns.append(noun)
            targets.append(nouns.index(target))
        negatives = [n for n in self.options.negatives if n not in nouns]
        noun_text = local.enriched_text(self.clip, [[n] for n in nouns + negatives], self.options)
        with torch.autocast(noun_text.device.type, enabled=False):
            expr = torch.nn.functional.normalize(
                self.clip.encode_prompts(list(expressions)), dim=-1
            )
        return EncodedExpressions(parsed, expr, nouns, noun_text, targets)

    def proposal_logits(
        self, image: torch.Tensor, masks: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``[N, U + G]`` of the proposals against nouns and negatives."""
        return local.proposal_logits(self.clip, image, masks, text, self.options)

    def gradcam(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cross-scale Grad-CAM ``[B, E, H, W]`` of the expressions."""
        return globalalign.cross_scale_gradcam(self.clip, images, text, self.options.cam_scales)

    def _noun_probs(self, logits: torch.Tensor, u: int, n_nouns: int) -> torch.Tensor:
        """``[N]`` probability of noun ``u`` against the negatives (softmax over the two)."""
        cols = [u, *range(n_nouns, logits.shape[1])]
        return logits[:, cols].float().softmax(1)[:, 0]

    def _candidates(self, prob: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(prob, descending=True)[: self.options.max_candidates]
        keep = order[prob[order] >= self.options.candidate_min]
        return keep if len(keep) else order[:1]

    def forward(self, images: torch.Tensor, expressions: object) -> ReferOutput:
        enc = expressions
        if not isinstance(enc, EncodedExpressions):
            raise TypeError("DGLRSISReferrer.forward takes encode_expressions' result")
        b, _, h, w = images.shape
        e = len(enc.parsed)
        opts = self.options
        cams = self.gradcam(images, enc.expression_text.to(images.device))
        scores = torch.zeros(b, e)
        logits_out = torch.full((b, e, h, w), -opts.mask_logit)
        for i, image in enumerate(images):
            masks = self.propose(image)
            logits = self.proposal_logits(image, masks, enc.noun_text)
            n_nouns = len(enc.nouns)
            cands: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for u, noun in enumerate(enc.nouns):
                prob = self._noun_probs(logits, u, n_nouns)
                keep = self._candidates(prob)
                cands[noun] = (masks[keep].cpu(), prob[keep].cpu(), keep)
            for j, parsed in enumerate(enc.parsed):
                target = enc.nouns[enc.targets[j]]
                cand_masks, cand_prob, _ = cands[target]
                refined = cams[i, j].cpu() * globalalign.position_map(
                    parsed.positions, h, w, opts.prior_softness
                )
                area = cand_masks.flatten(1).sum(1).clamp(min=1)
                cam_score = (cand_masks.flatten(1).float() @ refined.flatten()) / area
                anchors = {n: (m, p) for n, (m, p, _) in cands.items() if n != target}
                prior = globalalign.object_priors(parsed, cand_masks, anchors, opts)
                chosen, score = globalalign.select_masks(parsed, cand_prob, cam_score, prior, opts)
                if opts.merge_parts:  # nested parts of the chosen object(s), as good
                    chosen = globalalign.with_parts(cand_masks, score, chosen, opts.plural_keep)
                selected = cand_masks[chosen].any(0)
                logits_out[i, j] = torch.where(selected, opts.mask_logit, -opts.mask_logit)
                best = chosen[0]
                scores[i, j] = cand_prob[best] * prior[best]
        return ReferOutput(
            scores=scores.to(images.device), mask_logits=logits_out.to(images.device)
        )


def _load_clip(
    preset: str,
    clip_model: str | None,
    clip_pretrained: str | Path | None,
    cache_dir: str | Path | None,
    random_weights: bool,
) -> tuple[ClipDenseEncoder, int]:
    """The preset's CLIP (trained blocks as released: DGL-RSIS uses CLIP's image-level
    embedding and Grad-CAM, not the dense path) and the preset's tile size."""
    from drseg_cli.model.backbones import load_clip
    from drseg_cli.model.factory import get_preset

    p = get_preset(preset)
    random = random_weights or p.random_weights
    if random and clip_pretrained is None:
        weights = None
    else:
        weights = clip_pretrained if clip_pretrained is not None else p.clip_pretrained
    clip = load_clip(
        clip_model or p.clip_model, weights, cache_dir=cache_dir, device="cpu", attention="standard"
    )
    return clip, p.tile_size


def _proposal_sam(options: DGLRSISOptions, sam_model: Any, cache_dir: str | Path | None) -> Any:
    """The SAM of ``proposals=sam``: the one given, else ``options.sam_model`` built by the
    loader ``drseg refer`` uses (``model/sam.py``: weights from the registry/cache)."""
    if options.proposals != "sam" or sam_model is not None:
        return sam_model
    from drseg_cli.model.sam import build_sam

    return build_sam(options.sam_model, cache_dir=cache_dir)


def build_dglrsis(
    preset: str = "vit-b16",
    *,
    clip_model: str | None = None,
    clip_pretrained: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    options: DGLRSISOptions | None = None,
    random_weights: bool = False,
    tile_size: int | None = None,
    sam_model: Any = None,
) -> DGLRSISSegmenter:
    """A frozen DGL-RSIS segmentation model (``--method dglrsis``) on ``device``."""
    clip, size = _load_clip(preset, clip_model, clip_pretrained, cache_dir, random_weights)
    sam_model = _proposal_sam(options or DGLRSISOptions(), sam_model, cache_dir)
    model = DGLRSISSegmenter(clip, options, tile_size=tile_size or size, sam=sam_model)
    model.eval().requires_grad_(False)
    return model.to(device)


def build_dglrsis_referrer(
    preset: str = "vit-b16",
    *,
    clip_model: str | None = None,
    clip_pretrained: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    options: DGLRSISOptions | None = None,
    random_weights: bool = False,
    tile_size: int | None = None,
    sam_model: Any = None,
) -> DGLRSISReferrer:
    """A frozen DGL-RSIS referring model (``drseg refer --method dglrsis``) on ``device``;
    ``sam_model``: a transformers ``SamModel`` for ``proposals=sam`` (drseg refer's loader)."""
    opts = options or DGLRSISOptions()
    clip, size = _load_clip(preset, clip_model, clip_pretrained, cache_dir, random_weights)
    sam_model = _proposal_sam(opts, sam_model, cache_dir)
    model = DGLRSISReferrer(
        clip, opts, tile_size=tile_size or size, sam=sam_model, nlp=load_spacy(opts.spacy_model)
    )
    model.eval().requires_grad_(False)
    return model.to(device)


def build_dglrsis_refer(
    preset: str = "vit-b16",
    *,
    checkpoint: str | Path | None = None,
    device: str = "cpu",
    options: DGLRSISOptions | None = None,
    **kwargs: Any,
) -> DGLRSISReferrer:
    """``drseg refer --method dglrsis``'s builder (``model.factory.REFER_METHODS``): the
    CLIP preset as variant; DGL-RSIS is training-free, so there is no checkpoint to load."""
    if checkpoint is not None:
        raise UsageError("DGL-RSIS is training-free: --checkpoint is for --method rsrefseg2")
    return build_dglrsis_referrer(preset, device=device, options=options, **kwargs)
