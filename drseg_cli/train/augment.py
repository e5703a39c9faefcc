"""Training crops and augmentations for aerial imagery (docs/TRAIN.md §Augmentation).

A sample is a random window of one image (scale jitter: the window is ``crop / scale``
source pixels, resampled to ``crop``), read with the same reader and scaling as inference
(``TileReader``: 8-bit /255, else the image-wide percentile stretch), then flipped and turned
by a multiple of 90° (nadir imagery has no "up"), then photometrically jittered.

All randomness comes from a numpy Generator seeded by ``(seed, epoch, sample)``, so a sample's
crop and augmentation are the same whichever process, worker or resumed run draws it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from drseg_cli.evaluate.datasets import Dataset, Sample
from drseg_cli.raster.reader import SceneInfo, Stretch, TileReader, compute_stretch, inspect_raster


@dataclass(frozen=True)
class AugmentConfig:
    """Crop size and augmentation strengths; zeros/False switch a part off."""

    crop_size: int = 448
    scale_min: float = 0.75  # zoom factor range: window = crop / scale source pixels
    scale_max: float = 1.5
    flip: bool = True  # horizontal and vertical flips
    rotate: bool = True  # k·90° rotations
    brightness: float = 0.2  # additive, ± in [0, 1] units
    contrast: float = 0.2  # multiplicative around the mean, 1 ± c
    saturation: float = 0.2  # blend with grey, 1 ± s
    gamma: float = 0.2  # exponent exp(± g)

    def __post_init__(self) -> None:
        if self.crop_size < 1:
            raise ValueError("crop size must be positive")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError("scale range must satisfy 0 < min <= max")

    @classmethod
    def off(cls, crop_size: int) -> AugmentConfig:
        """Plain random crops at scale 1, nothing else (tests, debugging)."""
        return cls(crop_size, 1.0, 1.0, False, False, 0.0, 0.0, 0.0, 0.0)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one draw of one sample: independent of rank, worker and resume."""
    return np.random.default_rng([seed, epoch, index])


def random_window(
    rng: np.random.Generator, width: int, height: int, cfg: AugmentConfig
) -> tuple[int, int, int]:
    """``(x0, y0, size)`` of a square source window (clamped into the image where it fits)."""
    scale = math.exp(rng.uniform(math.log(cfg.scale_min), math.log(cfg.scale_max)))
    size = max(1, int(round(cfg.crop_size / scale)))
    x0 = int(rng.integers(0, width - size + 1)) if width > size else 0
    y0 = int(rng.integers(0, height - size + 1)) if height > size else 0
    return x0, y0, size


def geometric(
    image: torch.Tensor, label: torch.Tensor, rng: np.random.Generator, cfg: AugmentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint flips and k·90° rotation of ``image [3,S,S]`` and ``label [S,S]``."""
    if cfg.flip:
        if rng.random() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        if rng.random() < 0.5:
            image, label = image.flip(-2), label.flip(-2)
    if cfg.rotate:
        k = int(rng.integers(0, 4))
        if k:
            image, label = image.rot90(k, (-2, -1)), label.rot90(k, (-2, -1))
    return image.contiguous(), label.contiguous()


def photometric(image: torch.Tensor, rng: np.random.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Brightness, contrast, saturation and gamma jitter of ``image [3,S,S]`` in [0, 1]."""
    out = image
    if cfg.gamma:
        out = out.clamp(0, 1).pow(math.exp(rng.uniform(-cfg.gamma, cfg.gamma)))
    if cfg.contrast:
        mean = out.mean()
        out = (out - mean) * (1 + rng.uniform(-cfg.contrast, cfg.contrast)) + mean
    if cfg.saturation:
        grey = out.mean(dim=0, keepdim=True)
        out = grey + (out - grey) * (1 + rng.uniform(-cfg.saturation, cfg.saturation))
    if cfg.brightness:
        out = out + rng.uniform(-cfg.brightness, cfg.brightness)
    return out.clamp(0, 1)


def resize_pair(
    image: torch.Tensor, label: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image bilinear (antialiased when shrinking), label nearest, to ``size×size``."""
    if image.shape[-1] == size and image.shape[-2] == size:
        return image, label
    shrink = image.shape[-1] > size
    img = F.interpolate(
        image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=shrink
    )[0]
    lab = F.interpolate(label[None, None].float(), size=(size, size), mode="nearest")[0, 0]
    return img, lab.to(label.dtype)


class CropDataset(torch.utils.data.Dataset):
    """Random augmented crops of a :class:`Dataset`; items are keyed ``(index, epoch)``.

    Returns ``(image float32 [3,S,S] in [0,1], label int64 [S,S])``; pixels outside the image
    or nodata carry the ignore index.
    """

    def __init__(
        self,
        dataset: Dataset,
        cfg: AugmentConfig,
        *,
        seed: int = 0,
        bands: Sequence[int] | None = None,
        percentiles: tuple[float, float] = (2.0, 98.0),
    ) -> None:
        self.dataset, self.cfg, self.seed = dataset, cfg, seed
        self.bands, self.percentiles = bands, percentiles
        self._scenes: dict[int, tuple[SceneInfo, Stretch | None]] = {}

    def __len__(self) -> int:
        return len(self.dataset.samples)

    def _scene(self, index: int) -> tuple[SceneInfo, Stretch | None]:
        """Image description and stretch, computed once per image per worker."""
        if index not in self._scenes:
            sample = self.dataset.samples[index]
            info = inspect_raster(sample.image, self.bands, allow_no_crs=True)
            self._scenes[index] = (info, compute_stretch(info, self.percentiles))
        return self._scenes[index]

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, epoch = key
        rng = sample_rng(self.seed, epoch, index)
        info, stretch = self._scene(index)
        x0, y0, size = random_window(rng, info.width, info.height, self.cfg)
        image, label = read_window(
            self.dataset, self.dataset.samples[index], info, stretch, x0, y0, size
        )
        image, label = resize_pair(image, label, self.cfg.crop_size)
        image, label = geometric(image, label, rng, self.cfg)
        return photometric(image, rng, self.cfg), label


def read_window(
    dataset: Dataset,
    sample: Sample,
    info: SceneInfo,
    stretch: Stretch | None,
    x0: int,
    y0: int,
    size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``size×size`` window as model input and remapped labels (ignore outside/nodata)."""
    with TileReader(info, stretch) as reader:
        rgb, valid = reader.read(x0, y0, size)
    w, h = min(size, info.width - x0), min(size, info.height - y0)
    ignore = dataset.ignore_index
    label = np.full((size, size), ignore, np.int64)
    with dataset.open_label(sample, info) as labels:
        label[:h, :w] = labels.read(y0, h, x0, w)
    label[~valid] = ignore
    return torch.from_numpy(rgb), torch.from_numpy(label)
