"""Test helpers: real test rasters, synthetic GeoTIFF factory, small deterministic models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin

from drseg_cli.model.base import Preprocess, SegmentationModel

DATA = Path(__file__).parent / "data"


def write_geotiff(
    path: Path,
    data: np.ndarray,
    *,
    crs: str | None = "EPSG:32633",
    transform=None,
    nodata: float | None = None,
    **extra,
) -> Path:
    """Write ``data`` ([bands, h, w]) as a GeoTIFF on a 10 m UTM grid unless told otherwise."""
    if data.ndim == 2:
        data = data[None]
    profile = dict(
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype,
        crs=crs,
        transform=transform or from_origin(500000, 4600000, 10, 10),
        nodata=nodata,
        tiled=True,
        blockxsize=256,
        blockysize=256,
    )
    profile.update(extra)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return path


class PixelModel(SegmentationModel):
    """Per-pixel logits (no spatial context): any tiling must reproduce them exactly."""

    name = "pixel"
    preprocess = Preprocess(64, (0.0,) * 3, (1.0,) * 3, 16)

    def encode_text(self, class_prompts):
        gen = torch.Generator().manual_seed(len(class_prompts))
        return torch.randn(len(class_prompts), 3, generator=gen)

    def forward(self, images, text):
        return torch.einsum("bchw,kc->bkhw", images, text) * 8.0


class ContextModel(SegmentationModel):
    """Coarse logits that depend on neighbouring pixels (like a ViT's patch grid)."""

    name = "context"
    preprocess = Preprocess(64, (0.0,) * 3, (1.0,) * 3, 16)

    def encode_text(self, class_prompts):
        gen = torch.Generator().manual_seed(len(class_prompts))
        return torch.randn(len(class_prompts), 3, generator=gen)

    def forward(self, images, text):
        pooled = torch.nn.functional.avg_pool2d(images, 8)
        return torch.einsum("bchw,kc->bkhw", pooled, text) * 8.0


def error_line(result) -> str:
    """The single ``drseg: error:`` line of a CLI result (warnings may precede it)."""
    assert "Traceback" not in result.output, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("drseg: error:")]
    assert len(lines) == 1, result.stderr
    others = [ln for ln in result.stderr.splitlines() if ln and not ln.startswith("drseg: ")]
    assert not others, result.stderr
    return lines[0]


def gdal_cache_max() -> int:
    """GDAL's block-cache limit in force now, in bytes (``GDALGetCacheMax64`` of the libgdal
    rasterio uses: loading the same file gives the same process-wide cache)."""
    import ctypes
    import ctypes.util

    libs = sorted((Path(rasterio.__file__).parent.parent / "rasterio.libs").glob("libgdal*"))
    lib = ctypes.CDLL(str(libs[0]) if libs else ctypes.util.find_library("gdal"))
    lib.GDALGetCacheMax64.restype = ctypes.c_int64
    return int(lib.GDALGetCacheMax64())
