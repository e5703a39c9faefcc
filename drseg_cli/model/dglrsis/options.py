"""Every constant of DGL-RSIS as an option (docs/METHOD.md, "DGL-RSIS", says why each value).

The paper gives the roles, not the numbers (and no code): each value here is our choice,
exposed so it can be tuned. On the command line: ``--dglrsis KEY=VALUE`` (repeatable; tuples
as ``1,1.5,2``). Pure Python (no torch) so that option checks and help stay light.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable
from dataclasses import dataclass, fields

from drseg_cli.errors import UsageError

PROPOSAL_SOURCES = ("superpixel", "sam")
FUSIONS = ("confidence", "mean")


@dataclass(frozen=True)
class DGLRSISOptions:
    """DGL-RSIS settings; ``__post_init__`` rejects bad values with a one-line UsageError."""

    # -- mask proposals (class-agnostic)
    proposals: str = "superpixel"  # superpixel | sam (needs a SAM model)
    sam_model: str = "facebook/sam-vit-base"  # SAM of proposals=sam (model/sam.py; test-tiny)
    superpixels: int = 64  # SLIC segments per window (finest level)
    compactness: float = 10.0  # SLIC colour/space trade-off
    slic_sigma: float = 0.0  # SLIC pre-smoothing (px; scikit-image's default: none)
    merge_levels: tuple[float, ...] = (0.5, 0.25)  # coarser levels: fraction of regions kept
    max_proposals: int = 256  # per window, largest first
    points_per_side: int = 16  # SAM AMG point grid
    points_per_batch: int = 64  # SAM prompts per decoder call
    pred_iou_thresh: float = 0.88  # SAM AMG: predicted IoU to keep a mask
    stability_thresh: float = 0.95  # SAM AMG: stability score to keep a mask
    stability_offset: float = 1.0  # SAM AMG: logit offset of the stability score
    nms_iou: float = 0.7  # SAM AMG: box NMS
    min_area: float = 0.0005  # SAM masks below this fraction of the window are dropped
    # -- local alignment (mask classification)
    context_ratio: float = 1.5  # crop side = ratio × the proposal box's longer side
    attenuation: float = 0.5  # background outside the mask kept at this strength (0: erased)
    crop_size: int = 0  # crop edge fed to CLIP; 0: CLIP's native input size
    min_crop: int = 16  # smallest crop side in window pixels (tiny proposals get context)
    crop_batch: int = 64  # crops per CLIP call
    knowledge: bool = True  # enrich class text from the RS knowledge table
    knowledge_weight: float = 0.5  # weight of the description embedding vs the names'
    max_synonyms: int = 4  # table synonyms added per class name
    logit_scale: float = 100.0  # CLIP's
    fusion: str = "confidence"  # overlapping proposals: most confident wins, or mean
    # -- global alignment (referring)
    cam_scales: tuple[float, ...] = (1.0, 1.5, 2.0)  # Grad-CAM input sizes × CLIP native
    negatives: tuple[str, ...] = (
        "background",
        "road",
        "building",
        "tree",
        "water",
        "low vegetation",
        "barren",
    )  # classes a noun candidate is told apart from
    candidate_min: float = 0.3  # noun probability a proposal needs to be a candidate
    max_candidates: int = 10  # candidates kept per noun (best first)
    local_weight: float = 0.5  # selection: local noun probability
    cam_weight: float = 0.5  # selection: mean refined Grad-CAM inside the mask
    prior_softness: float = 0.1  # relation/position sigmoids: width as a window fraction
    near_sigma: float = 0.15  # "near": distance scale as a fraction of the window diagonal
    plural_keep: float = 0.5  # plural target: keep candidates scoring ≥ this × the best
    merge_parts: bool = True  # add nested candidates (same object, other level) as good
    mask_logit: float = 4.0  # |logit| written inside/outside the selected mask(s)
    spacy_model: str = "en_core_web_sm"  # used for nouns the lexicon lacks, if installed

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> UsageError:
            return UsageError(f"DGL-RSIS option {name}={getattr(self, name)!r}: {why}")

        if self.proposals not in PROPOSAL_SOURCES:
            raise bad("proposals", f"choose one of {', '.join(PROPOSAL_SOURCES)}")
        if self.fusion not in FUSIONS:
            raise bad("fusion", f"choose one of {', '.join(FUSIONS)}")
        for name in (
            "superpixels",
            "max_proposals",
            "points_per_side",
            "points_per_batch",
            "min_crop",
            "crop_batch",
            "max_candidates",
        ):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        if self.crop_size < 0:
            raise bad("crop_size", "must be 0 (CLIP's native size) or more")
        if self.max_synonyms < 0:
            raise bad("max_synonyms", "must be 0 or more")
        for name in (
            "pred_iou_thresh",
            "stability_thresh",
            "nms_iou",
            "min_area",
            "attenuation",
            "knowledge_weight",
            "candidate_min",
            "local_weight",
            "cam_weight",
            "plural_keep",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "must be in [0, 1]")
        for name in ("compactness", "logit_scale", "prior_softness", "near_sigma", "mask_logit"):
            if not getattr(self, name) > 0:
                raise bad(name, "must be > 0")
        if self.slic_sigma < 0 or self.stability_offset < 0:
            raise bad("slic_sigma" if self.slic_sigma < 0 else "stability_offset", "must be ≥ 0")
        if self.context_ratio < 1.0:
            raise bad("context_ratio", "must be ≥ 1 (the crop holds the whole proposal)")
        if any(not 0.0 < f < 1.0 for f in self.merge_levels):
            raise bad("merge_levels", "fractions in (0, 1)")
        if not self.cam_scales or any(s <= 0 for s in self.cam_scales):
            raise bad("cam_scales", "give positive scales")
        if self.local_weight + self.cam_weight <= 0:
            raise bad("cam_weight", "local_weight + cam_weight must be > 0")


def _coerce(name: str, kind: object, text: str) -> object:
    origin = typing.get_origin(kind)
    if origin is tuple:
        (inner, *_) = typing.get_args(kind)
        parts = [p.strip() for p in text.split(",") if p.strip()] if text.strip() else []
        return tuple(_coerce(name, inner, p) for p in parts)
    if kind is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"--dglrsis {name}={text}: give true or false")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise UsageError(f"--dglrsis {name}={text}: not {what}") from None
    return text.strip()


def parse_options(
    pairs: Iterable[str] | None, base: DGLRSISOptions | None = None
) -> DGLRSISOptions:
    """``KEY=VALUE`` strings (``--dglrsis``) on top of ``base`` (the defaults)."""
    base = base or DGLRSISOptions()
    hints = typing.get_type_hints(DGLRSISOptions)
    known = {f.name for f in fields(DGLRSISOptions)}
    changes: dict[str, object] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"--dglrsis {pair!r}: give KEY=VALUE (e.g. context_ratio=1.5)")
        if key not in known:
            raise UsageError(
                f"--dglrsis {key}: unknown option; choose one of {', '.join(sorted(known))}"
            )
        changes[key] = _coerce(key, hints[key], value)
    return dataclasses.replace(base, **changes)
