"""Planted-structure experiment: does DINO visibly help DR-Seg? (tests/test_planted.py,
benchmarks/planted.py; docs/METHOD.md §"Defaults and the planted experiment").

Synthetic tiles with a known label map (Voronoi cells at pixel resolution, each cell one of K
classes) and two stand-in encoders with the backbones interface that read the map back from
the image itself, so every model sees exactly the same features for the same tile:

- CLIP (patch 16): per patch, the class text directions weighted by the class fractions of
  the patch, blurred over the 3×3 neighbouring patches, plus a shared bias and Gaussian noise.
  It separates the classes but its boundaries are a patch or two off.
- DINO (patch 8): per patch, the cell-id embeddings weighted by the cell fractions of the
  patch, plus small noise. It carries the boundaries but not the class (two cells of the same
  class have unrelated embeddings). "noise" DINO is pure Gaussian noise.

Each model is run through the pipeline's own ``TilePredictor`` (logits resampled once to the
tile by the pipeline, exactly as ``drseg segment`` does) and scored by pixel mIoU.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from drseg_cli.evaluate.metrics import ConfusionMatrix, SegMetrics
from drseg_cli.model.base import SegmentationModel
from drseg_cli.model.clipseg import ClipSegModel
from drseg_cli.model.drseg import DRSegModel, DRSegOptions
from drseg_cli.pipeline.runtime import TilePredictor

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DINO_KINDS = ("informative", "noise", "smooth")
METHODS = ("clip", "drseg_alpha0", "drseg")


@dataclass(frozen=True)
class PlantedConfig:
    """Sizes and signal levels of the planted tiles (defaults: the documented experiment)."""

    tile: int = 128  # px; CLIP grid 8×8, DINO grid 16×16
    tiles: int = 8  # per seed
    classes: int = 5
    cells: int = 9  # Voronoi cells per tile
    clip_dim: int = 64
    dino_dim: int = 32
    clip_signal: float = 0.2  # weight of the class directions
    clip_bias: float = 2.0  # norm of the bias every patch shares (orthogonal to every class)
    clip_noise: float = 0.03  # per-channel Gaussian noise of CLIP features
    dino_noise: float = 0.05  # per-channel Gaussian noise of informative DINO features


def label_tiles(cfg: PlantedConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(cells, classes)`` ``[N, T, T]`` int: Voronoi cell ids and their classes per pixel."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : cfg.tile, 0 : cfg.tile].astype(np.float64) + 0.5
    cells = np.empty((cfg.tiles, cfg.tile, cfg.tile), np.int64)
    classes = np.empty_like(cells)
    for i in range(cfg.tiles):
        seeds = rng.uniform(0, cfg.tile, size=(cfg.cells, 2))
        # anisotropic metric per tile: cells of varied shape and boundary angles
        scale = rng.uniform(0.6, 1.6, size=2)
        dist = (yy[..., None] - seeds[:, 0]) ** 2 * scale[0] + (xx[..., None] - seeds[:, 1]) ** 2
        cells[i] = dist.argmin(-1)
        cell_class = rng.permutation(np.arange(cfg.cells) % cfg.classes)
        classes[i] = cell_class[cells[i]]
    return cells, classes


def encode_images(cells: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Tiles ``[N, 3, T, T]`` float32 in [0, 1] that carry the label map (read back by the
    planted encoders): channel 0 = cell id / 255, channel 1 = class / 255."""
    img = np.zeros((cells.shape[0], 3, *cells.shape[1:]), np.float32)
    img[:, 0] = cells / 255.0
    img[:, 1] = classes / 255.0
    return img


def _decode(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], channel: int):
    """Integer map ``[B, H, W]`` stored in ``channel`` of normalised images."""
    m, s = mean[channel], std[channel]
    return torch.round((x[:, channel].double() * s + m) * 255.0).long()


def _fractions(labels: torch.Tensor, count: int, patch: int) -> torch.Tensor:
    """Share of each label in each patch: ``[B, count, H/p, W/p]``."""
    onehot = F.one_hot(labels, count).permute(0, 3, 1, 2).float()
    return F.avg_pool2d(onehot, patch)


def _generator(labels: torch.Tensor, salt: int) -> torch.Generator:
    """Noise that depends only on the tile content and the encoder: same tile, same noise."""
    digest = zlib.crc32(labels.cpu().numpy().astype(np.int16).tobytes())
    return torch.Generator().manual_seed(digest ^ salt)


class PlantedClip(nn.Module):
    """CLIP stand-in: coarse, class-separating features on a patch-16 grid."""

    patch_size, mean, std = 16, OPENAI_MEAN, OPENAI_STD

    def __init__(self, cfg: PlantedConfig, seed: int) -> None:
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)
        self.text = F.normalize(torch.randn(cfg.classes, cfg.clip_dim, generator=gen), dim=1)
        bias = torch.randn(cfg.clip_dim, generator=gen)
        basis = torch.linalg.qr(self.text.T).Q  # the bias favours no class (⟂ every text)
        self.bias = cfg.clip_bias * F.normalize(bias - basis @ (basis.T @ bias), dim=0)
        self.salt = seed * 7919 + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        classes = _decode(x, self.mean, self.std, 1)
        frac = _fractions(classes, self.cfg.classes, self.patch_size)
        blur = torch.tensor([1.0, 2.0, 1.0])
        kernel = (blur[:, None] * blur[None, :] / 16.0).expand(self.cfg.classes, 1, 3, 3)
        frac = F.conv2d(F.pad(frac, (1, 1, 1, 1), mode="replicate"), kernel, groups=frac.shape[1])
        feats = self.cfg.clip_signal * torch.einsum("bkhw,kd->bdhw", frac, self.text)
        noise = torch.randn(feats.shape, generator=_generator(classes, self.salt))
        return feats + self.bias.view(1, -1, 1, 1) + self.cfg.clip_noise * noise

    def encode_text(self, class_prompts: Sequence[Sequence[str]]) -> torch.Tensor:
        """Class k is named ``c{k}``."""
        return self.text[[int(names[0][1:]) for names in class_prompts]]


class PlantedDino(nn.Module):
    """DINO stand-in on a patch-8 grid: cell embeddings (``informative``), pure Gaussian noise
    (``noise``) or spatially smooth noise (``smooth``); only the first carries boundaries."""

    patch_size, mean, std = 8, IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, cfg: PlantedConfig, seed: int, kind: str = "informative") -> None:
        super().__init__()
        if kind not in DINO_KINDS:
            raise ValueError(f"kind must be one of {DINO_KINDS}")
        self.cfg, self.kind = cfg, kind
        gen = torch.Generator().manual_seed(seed + 1)
        embedding = torch.randn(cfg.cells, cfg.dino_dim, generator=gen)
        self.cell_embedding = F.normalize(embedding, dim=1)
        self.salt = seed * 7919 + 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cells = _decode(x, self.mean, self.std, 0)
        gen = _generator(cells, self.salt)
        size = (x.shape[0], self.cfg.dino_dim, x.shape[-2] // 8, x.shape[-1] // 8)
        if self.kind == "noise":
            return torch.randn(size, generator=gen)
        if self.kind == "smooth":
            box = torch.full((self.cfg.dino_dim, 1, 5, 5), 1 / 25)
            noise = F.pad(torch.randn(size, generator=gen), (2, 2, 2, 2), mode="replicate")
            return F.conv2d(noise, box, groups=self.cfg.dino_dim)
        frac = _fractions(cells, self.cfg.cells, self.patch_size)
        feats = torch.einsum("bkhw,ke->behw", frac, self.cell_embedding)
        return feats + self.cfg.dino_noise * torch.randn(size, generator=gen)


def score(model: SegmentationModel, images: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Pixel mIoU (%) of ``model`` through the pipeline's ``TilePredictor`` (logits resampled
    once to the tile, as ``drseg segment`` does)."""
    prompts = [[f"c{i}"] for i in range(k)]
    predictor = TilePredictor(model, prompts, torch.device("cpu"))
    conf = ConfusionMatrix(k)
    conf.update(labels, predictor.predict(images).argmax(1))
    return SegMetrics.from_confusion(conf, [p[0] for p in prompts]).miou


def run_seed(
    cfg: PlantedConfig,
    seed: int,
    options: DRSegOptions | None = None,
    guide_downsample: int = 1,
) -> dict[str, dict[str, float]]:
    """mIoU of clip, DR-Seg α = 0 and DR-Seg (``options``, default the defaults) for both DINO
    kinds on the tiles of one seed: ``{dino_kind: {method: miou}}``. ``guide_downsample``: DINO
    sees the tile box-averaged that many times smaller (the CPU preset: 2); the stand-in then
    reads averaged cell ids at boundaries, a wrong cell there, like a blurred real image."""
    options = options or DRSegOptions()
    cells, classes = label_tiles(cfg, seed)
    images = encode_images(cells, classes)
    clip = PlantedClip(cfg, seed)
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for kind in DINO_KINDS:
            dino = PlantedDino(cfg, seed, kind)
            models = {
                "clip": ClipSegModel(clip, tile_size=cfg.tile),
                "drseg_alpha0": DRSegModel(
                    clip,
                    dino,
                    dataclasses.replace(options, alpha=0.0),
                    tile_size=cfg.tile,
                    guide_downsample=guide_downsample,
                ),
                "drseg": DRSegModel(
                    clip, dino, options, tile_size=cfg.tile, guide_downsample=guide_downsample
                ),
            }
            out[kind] = {m: score(models[m], images, classes, cfg.classes) for m in METHODS}
    return out


def run(
    cfg: PlantedConfig,
    seeds: Sequence[int],
    options: DRSegOptions | None = None,
    guide_downsample: int = 1,
) -> dict[str, dict[str, float]]:
    """Mean over ``seeds`` of :func:`run_seed`."""
    runs = [run_seed(cfg, s, options, guide_downsample) for s in seeds]
    return {
        kind: {m: float(np.mean([r[kind][m] for r in runs])) for m in METHODS}
        for kind in DINO_KINDS
    }
