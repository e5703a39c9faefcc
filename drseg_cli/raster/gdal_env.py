"""GDAL settings held while a scene is read and written.

GDAL's block cache defaults to 5 % of RAM and fills with read and written blocks, so memory
would grow with the scene; a cache too small to hold the block rows being written makes GDAL
flush partly written compressed blocks and re-encode them later, which bloats plain GeoTIFF
outputs. The cap is therefore sized from the scene's width, never its height.

Remote inputs (URLs, ``/vsi…`` paths) get the options that make cloud-optimised GeoTIFFs cheap
to read by range requests: no directory listing on open, a read-ahead cache, merged ranges.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import rasterio

from drseg_cli.raster.remote import RasterSource, is_remote

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


#: Extensions vsicurl may probe besides the input itself (none of the sidecar guesses).
REMOTE_EXTENSIONS = ".tif,.tiff,.vrt,.jp2,.img,.json"


def remote_gdal_options(source: str | Path | RasterSource | None) -> dict[str, str]:
    """GDAL options for reading ``source`` by range requests; empty for local files.

    Listing the directory on open (one request per sidecar guess, or a listing of a whole
    bucket) is disabled; consecutive ranges are merged into one request; HTTP/2 requests are
    multiplexed; ``VSI_CACHE`` keeps the header and recently read blocks.
    """
    if source is None or not is_remote(source):
        return {}
    options = {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
        "GDAL_HTTP_MULTIPLEX": "YES",
        "VSI_CACHE": "TRUE",
        "VSI_CACHE_SIZE": str(32 * 1024**2),
    }
    suffix = os.path.splitext(str(source).split("?", 1)[0])[1].lower()
    if suffix and suffix in REMOTE_EXTENSIONS.split(","):  # a URL without one stays readable
        options["CPL_VSIL_CURL_ALLOWED_EXTENSIONS"] = REMOTE_EXTENSIONS
    return options


def scene_gdal_env(
    cache_bytes: int, source: str | Path | RasterSource | None = None
) -> rasterio.Env:
    """A ``rasterio.Env`` capping GDAL's block cache at ``cache_bytes``, with the range-read
    options of ``remote_gdal_options`` when ``source`` is remote.

    rasterio hands an integer ``GDAL_CACHEMAX`` to ``GDALSetCacheMax64``, i.e. in *bytes*
    (unlike the environment variable, where small numbers mean megabytes).
    """
    if cache_bytes < 1024**2:
        raise ValueError(f"GDAL cache of {cache_bytes} bytes is too small to hold a block row")
    return rasterio.Env(GDAL_CACHEMAX=int(cache_bytes), **remote_gdal_options(source))
