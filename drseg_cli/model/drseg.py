"""DR-Seg (decouple and rectify), training-free, as reconstructed (docs/METHOD.md).

    F   = CLIP dense features [B, D, h, w] (ClearCLIP-style last block), F̂ = F/‖F‖ per patch
    S_o = s · F̂ Tᵀ                                   original branch (s = logit_scale = 100)
    m_s, m_t = SPSD(F̂, T, ρ)                         per-image channel split, exact
    F_u = up(F̂)                                      bilinear to the DINO grid (H/p₂, W/p₂)
    X₀  = F_u ⊙ m_t,  X_L = PDGR(X₀; graph(G))        G = DINO features of the same tile
    F_r = F_u ⊙ m_s + X_L, rescaled per pixel to ‖F_u‖ (``renorm``)
    S_r = s · F_r Tᵀ                                  refined branch
    S'  = UGAF(up(S_o), S_r)                          fused, on the DINO grid
    S   = up_px(S_o) + up_px(S' − up(S_o))            output, on the pixel grid (H, W)

The output is the CLIP baseline resampled once to the pixels, exactly as the pipeline
resamples ``--method clip``, plus DR-Seg's correction, which is computed on the DINO grid and
resampled once from there: both methods are compared on the same grid and through the same
resampling, and any difference is the method's. With nothing to rectify (ρ = 1, α = 0, L = 0
or PDGR off) the correction is zero: DINO is not run and S_o itself is returned on the CLIP
grid, so the pipeline writes the very mask of ``--method clip``.
Everything after the two backbones runs in fp32 with autocast off: it is cheap, and entropies
and softmaxes want the precision.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from drseg_cli.errors import UsageError
from drseg_cli.model.base import Preprocess, SegmentationModel
from drseg_cli.model.clipseg import get_baseline, normalise_images, unit_features
from drseg_cli.model.pdgr import rectify
from drseg_cli.model.spsd import SubspaceSplit, decouple
from drseg_cli.model.ugaf import fuse, normalized_entropy

if TYPE_CHECKING:
    from drseg_cli.model.backbones import ClipDenseEncoder, DinoEncoder


@dataclass(frozen=True)
class DRSegOptions:
    """Every DR-Seg constant, named and overridable (defaults are our reconstruction's).

    rho        semantic ratio ρ: share of CLIP channels kept as semantic (1 = CLIP baseline)
    k          graph sparsity: neighbours kept per DINO node (capped at (2·window+1)²)
    window     search-window radius r on the DINO grid: (2r+1)² candidates per node
    tau        softmax temperature τ_g of the edge weights softmax(cos/τ)
    alpha      APPNP propagation weight α (0 = no rectification: DINO not run, CLIP baseline)
    steps      APPNP steps L
    gamma      UGAF temperature γ of w_b ∝ exp(−U_b/γ)
    self_loops the node itself is a graph candidate (always kept: cos = 1)
    renorm     rescale rectified features per pixel to the norm of the unrectified ones
    logit_scale  s in S = s · cos (CLIP's 100)
    spsd       False: every channel is structural (the whole of F̂ is rectified)
    pdgr       False: X_L = X₀ (no graph, DINO not run): the CLIP baseline itself
    ugaf       False: the output is S_r alone
    clip_baseline  the CLIP branch (model/clipseg.py ``BASELINES``): ``clearclip`` (q-q block,
               remote-sensing templates) or ``segearth`` (SegEarth-OV's q-q + k-k + v-v block,
               ImageNet templates, F̂ ← F̂ − 0.3·ĝ); the factory builds the encoder to match
    """

    rho: float = 0.5
    k: int = 16
    window: int = 3
    tau: float = 0.1
    alpha: float = 0.8
    steps: int = 10
    gamma: float = 0.2
    self_loops: bool = True
    renorm: bool = True
    logit_scale: float = 100.0
    spsd: bool = True
    pdgr: bool = True
    ugaf: bool = True
    clip_baseline: str = "clearclip"

    def __post_init__(self) -> None:
        checks = {
            "rho": (0.0 <= self.rho <= 1.0, "in [0, 1]"),
            "k": (self.k >= 1, ">= 1"),
            "window": (self.window >= 0, ">= 0"),
            "tau": (self.tau > 0, "> 0"),
            "alpha": (0.0 <= self.alpha <= 1.0, "in [0, 1]"),
            "steps": (self.steps >= 0, ">= 0"),
            "gamma": (self.gamma > 0, "> 0"),
            "logit_scale": (self.logit_scale > 0, "> 0"),
            "clip_baseline": (
                self.clip_baseline in ("clearclip", "segearth"),
                "clearclip or segearth",
            ),
        }
        for name, (ok, rule) in checks.items():
            if not ok:  # NaN fails every comparison, so it is refused too
                raise UsageError(f"DR-Seg option {name} must be {rule} (got {getattr(self, name)})")

    def as_dict(self) -> dict[str, float | int | bool]:
        """Plain dict of every option (for logs, run manifests, ``--json``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class DRSegOutput:
    """Everything one forward computes.

    ``logits`` ``[B, K, H, W]`` (the model output, on the pixel grid) and ``uncertainty``
    ``[B, 1, H, W]`` (normalised entropy of ``logits``); on the DINO grid ``[h, w]``:
    ``original`` = up(S_o), ``refined`` = S_r, ``weights`` ``[B, 2, h, w]`` (UGAF weights of
    original/refined, None without UGAF). ``split`` is the SPSD channel split (None without
    SPSD). With nothing to rectify every tensor is S_o (or its entropy) on the CLIP grid.
    """

    logits: torch.Tensor
    uncertainty: torch.Tensor
    original: torch.Tensor
    refined: torch.Tensor
    weights: torch.Tensor | None
    split: SubspaceSplit | None


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The one resampling used throughout (and by the pipeline): bilinear, half-pixel centres."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class DRSegModel(SegmentationModel):
    """Training-free DR-Seg on a frozen CLIP dense encoder and a frozen DINO encoder.

    ``forward`` returns logits on the pixel grid (H, W), or on the CLIP grid when nothing is
    rectified (see the module docstring); ``forward_with_uncertainty`` also returns the
    per-pixel uncertainty ``[B, 1, ·, ·]``; ``forward_details`` returns every intermediate.
    Each encoder normalises its own input with its own mean/std (images arrive in [0, 1]);
    ``preprocess`` reports CLIP's for information only.
    """

    name = "drseg"

    def __init__(
        self,
        clip: ClipDenseEncoder,
        dino: DinoEncoder,
        options: DRSegOptions | None = None,
        *,
        tile_size: int = 448,
        guide_downsample: int = 1,
    ) -> None:
        super().__init__()
        self.clip, self.dino = clip, dino
        if guide_downsample < 1:
            raise UsageError(f"guide_downsample must be >= 1 (got {guide_downsample})")
        #: DINO sees the tile box-averaged this many times smaller (the CPU preset: 2, a
        #: quarter of the tokens); PDGR's graph lives on that coarser grid
        self.guide_downsample = int(guide_downsample)
        self.options = options or DRSegOptions()
        self.random_weights = bool(
            getattr(clip, "random_weights", False) or getattr(dino, "random_weights", False)
        )
        multiple = math.lcm(int(clip.patch_size), int(dino.patch_size) * self.guide_downsample)
        if tile_size % multiple:
            raise UsageError(f"tile size {tile_size} must be a multiple of {multiple}")
        self.preprocess = Preprocess(
            tile_size=tile_size,
            mean=tuple(float(v) for v in clip.mean),
            std=tuple(float(v) for v in clip.std),
            multiple=multiple,
        )

    def encode_text(self, class_prompts: Sequence[Sequence[str]]) -> torch.Tensor:
        """Class text embeddings ``[K, D]`` (L2-normalised) from the CLIP encoder."""
        return self.clip.encode_text(class_prompts)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K, H, W]`` (fp32) for images ``[B, 3, H, W]`` in [0, 1] (CLIP grid
        ``[B, K, H/p₁, W/p₁]`` when nothing is rectified)."""
        return self.forward_details(images, text).logits

    def forward_with_uncertainty(
        self, images: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, K, H, W], uncertainty [B, 1, H, W] in [0, 1])`` (as ``forward``)."""
        out = self.forward_details(images, text)
        return out.logits, out.uncertainty

    def forward_details(
        self,
        images: torch.Tensor,
        text: torch.Tensor,
        *,
        timings: dict[str, float] | None = None,
    ) -> DRSegOutput:
        """The whole DR-Seg forward (see the module docstring), keeping the intermediates.

        With ``timings``, the seconds spent in each stage (clip, dino, spsd, pdgr, ugaf, head)
        are added to it (device synchronised around each stage); used by benchmarks.
        """
        height, width = images.shape[-2:]
        multiple = self.preprocess.multiple
        if images.ndim != 4 or height % multiple or width % multiple:
            raise ValueError(
                f"images must be [B, 3, H, W] with H, W multiples of {multiple}; "
                f"got {tuple(images.shape)}"
            )
        device = images.device
        with _stage(timings, "clip", device):  # backbones run under the caller's autocast
            unit = self.clip_features(images)

        def guide() -> torch.Tensor:
            with _stage(timings, "dino", device):
                return self.guide_features(images)

        return self.forward_from_features(unit, guide, text, (height, width), timings=timings)

    def clip_features(
        self, images: torch.Tensor, options: DRSegOptions | None = None
    ) -> torch.Tensor:
        """U = F̂ + λ·ĝ ``[B, D, h, w]`` fp32 of images in [0, 1], λ from the CLIP baseline."""
        opt = options or self.options
        return unit_features(self.clip, images, get_baseline(opt.clip_baseline).cls_lambda)

    def guide_features(self, images: torch.Tensor) -> torch.Tensor:
        """DINO features ``[B, C, H/(d·p₂), W/(d·p₂)]`` of images in [0, 1] (d =
        ``guide_downsample``, images box-averaged d× smaller first): PDGR's graph guide."""
        if self.guide_downsample > 1:
            images = F.avg_pool2d(images, self.guide_downsample)
        return self.dino(normalise_images(images, self.dino))

    def forward_from_features(
        self,
        unit: torch.Tensor,
        guide: torch.Tensor | Callable[[], torch.Tensor],
        text: torch.Tensor,
        size: tuple[int, int],
        *,
        options: DRSegOptions | None = None,
        timings: dict[str, float] | None = None,
    ) -> DRSegOutput:
        """DR-Seg's head (SPSD → PDGR → UGAF) from backbone features: the one implementation,
        used by ``forward_details`` and by ``drseg tune`` (cached features, many options).

        ``unit`` from ``clip_features``; ``guide`` the DINO features or a callable computing
        them (called only when something is rectified); ``size`` the images' (H, W);
        ``options`` replace the model's own for this call.
        """
        opt = options or self.options
        height, width = size
        device = unit.device
        fp32 = functools.partial(torch.autocast, device_type=device.type, enabled=False)
        with _stage(timings, "head", device), fp32():
            unit = unit.float()
            classes = text.to(device=device, dtype=torch.float32)
            original = opt.logit_scale * torch.einsum("bdhw,kd->bkhw", unit, classes)
        split = None
        if opt.spsd:
            with _stage(timings, "spsd", device), fp32():
                split = decouple(unit, classes, opt.rho)
        rectifying = (
            opt.pdgr
            and opt.alpha > 0
            and opt.steps > 0
            and (split is None or split.structural_index.shape[1] > 0)
        )
        if not rectifying:  # nothing to rectify: the CLIP baseline itself, on its own grid
            with _stage(timings, "ugaf", device), fp32():
                return DRSegOutput(
                    original, normalized_entropy(original), original, original, None, split
                )
        guide = guide() if callable(guide) else guide
        grid = tuple(guide.shape[-2:])

        with _stage(timings, "head", device), fp32():
            upsampled = resize(unit, grid)
        with _stage(timings, "pdgr", device), fp32():
            refined_feats = self._rectify(upsampled, guide, split, opt)
        with _stage(timings, "head", device), fp32():
            refined = opt.logit_scale * torch.einsum("bdhw,kd->bkhw", refined_feats, classes)
            base = resize(original, grid)
        with _stage(timings, "ugaf", device), fp32():
            weights = None
            if opt.ugaf:
                fused = fuse([base, refined], gamma=opt.gamma)
                logits, weights = fused.logits, fused.weights
            else:
                logits = refined
        with _stage(timings, "head", device), fp32():
            # The CLIP baseline is resampled once, straight to the pixels (as --method clip
            # is); only DR-Seg's correction, computed on the DINO grid, comes from there.
            size = (height, width)
            logits = resize(original, size) + resize(logits - base, size)
            uncertainty = normalized_entropy(logits)
        return DRSegOutput(logits, uncertainty, base, refined, weights, split)

    def _rectify(
        self,
        upsampled: torch.Tensor,
        guide: torch.Tensor,
        split: SubspaceSplit | None,
        opt: DRSegOptions,
    ) -> torch.Tensor:
        """F_r = F_u ⊙ m_s + PDGR(F_u ⊙ m_t): only the structural channels are propagated
        (propagation is per channel, so the zero semantic channels need not be carried)."""
        if split is None:
            index, start = None, upsampled
        else:
            index = split.structural_index[:, :, None, None].expand(-1, -1, *upsampled.shape[-2:])
            start = upsampled.gather(1, index)
        rectified = rectify(
            start,
            guide.float(),
            k=opt.k,
            radius=opt.window,
            tau=opt.tau,
            alpha=opt.alpha,
            steps=opt.steps,
            self_loops=opt.self_loops,
        )
        out = rectified if index is None else upsampled.scatter(1, index, rectified)
        if opt.renorm:
            target = upsampled.norm(dim=1, keepdim=True)
            out = out * (target / out.norm(dim=1, keepdim=True).clamp_min(1e-12))
        return out


@contextlib.contextmanager
def _stage(timings: dict[str, float] | None, name: str, device: torch.device) -> Iterator[None]:
    """Adds the wall time of the block to ``timings[name]`` (no-op when ``timings`` is None)."""
    if timings is None:
        yield
        return
    _synchronise(device)
    start = time.perf_counter()
    yield
    _synchronise(device)
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
