"""GDAL settings held while a scene is read and written.

GDAL's block cache defaults to 5 % of RAM and fills with read and written blocks, so memory
would grow with the scene; a cache too small to hold the block rows being written makes GDAL
flush partly written compressed blocks and re-encode them later, which bloats plain GeoTIFF
outputs. The cap is therefore sized from the scene's width, never its height.
"""

from __future__ import annotations

import math

import rasterio

#: Cache for reading (source blocks, overviews) on top of the output block rows.
GDAL_CACHE_BASE_BYTES = 64 * 1024**2
#: Output block height (``writers.GTIFF_OPTIONS``).
OUTPUT_BLOCK_ROWS = 256


def scene_cache_bytes(width: int, output_bytes_per_pixel: int, band_rows: int) -> int:
    """Block cache for a scene ``width`` wide whose outputs take ``output_bytes_per_pixel``
    (all bands of all outputs), written in bands of up to ``band_rows`` rows.

    A band touches ``ceil(band_rows / 256) + 1`` block rows and the block row it left
    incomplete must survive until the next band: those, plus ``GDAL_CACHE_BASE_BYTES``.
    """
    block_rows = math.ceil(band_rows / OUTPUT_BLOCK_ROWS) + 2
    return GDAL_CACHE_BASE_BYTES + block_rows * OUTPUT_BLOCK_ROWS * width * output_bytes_per_pixel


def scene_gdal_env(cache_bytes: int) -> rasterio.Env:
    """A ``rasterio.Env`` capping GDAL's block cache at ``cache_bytes``.

    rasterio hands an integer ``GDAL_CACHEMAX`` to ``GDALSetCacheMax64``, i.e. in *bytes*
    (unlike the environment variable, where small numbers mean megabytes).
    """
    if cache_bytes < 1024**2:
        raise ValueError(f"GDAL cache of {cache_bytes} bytes is too small to hold a block row")
    return rasterio.Env(GDAL_CACHEMAX=int(cache_bytes))
