"""GDAL settings held while a scene is read and written.

GDAL's block cache defaults to 5 % of RAM and fills with written blocks, so memory would grow
with the scene; a cache that is too small (or off) makes GDAL flush partly written
compressed blocks and re-encode them later, which bloats plain GeoTIFF outputs.
"""

from __future__ import annotations

import rasterio

#: Block cache during a scene: holds a few rows of output blocks for every writer.
GDAL_CACHE_BYTES = 256 * 1024**2


def scene_gdal_env(cache_bytes: int = GDAL_CACHE_BYTES) -> rasterio.Env:
    """A ``rasterio.Env`` capping GDAL's block cache at ``cache_bytes``.

    rasterio hands an integer ``GDAL_CACHEMAX`` to ``GDALSetCacheMax64``, i.e. in *bytes*
    (unlike the environment variable, where small numbers mean megabytes).
    """
    if cache_bytes < 1024**2:
        raise ValueError(f"GDAL cache of {cache_bytes} bytes is too small to hold a block row")
    return rasterio.Env(GDAL_CACHEMAX=int(cache_bytes))
