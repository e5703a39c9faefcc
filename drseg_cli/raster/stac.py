"""A STAC Item as input: its visual (RGB) asset, or three single-band assets stacked as R,G,B.

The Item is read with ``pystac`` (the optional ``stac`` extra), from a file or a URL; asset
hrefs are resolved against the Item's location. Three band assets become a VRT in GDAL's
memory file system (``gdalbuildvrt -separate``), so each band is still read by range requests.
Outputs are named after the Item's id.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

import rasterio
from rasterio.errors import RasterioIOError
from rasterio.io import MemoryFile

from drseg_cli.errors import InputError, UsageError, first_line
from drseg_cli.raster.gdal_env import remote_gdal_options
from drseg_cli.raster.remote import RasterSource, is_remote, to_gdal_path

if TYPE_CHECKING:
    import pystac

#: VRTs of stacked band assets, alive for the whole process (readers open them by name).
_VRT_FILES: list[MemoryFile] = []
_VRT_LOCK = threading.Lock()


def is_stac_candidate(text: str | Path | RasterSource) -> bool:
    """Inputs read as STAC Items: names ending in ``.json`` (local or URL)."""
    if isinstance(text, RasterSource):
        return False
    return str(text).split("?", 1)[0].lower().endswith(".json")


def stac_input(text: str, assets: Sequence[str] | None = None) -> RasterSource:
    """The raster of the STAC Item at ``text``: ``assets`` names one RGB asset or three band
    assets (R,G,B); by default the asset keyed or with role ``visual``, else one whose
    ``eo:bands`` hold red, green and blue."""
    item = _read_item(text)
    names = [a.strip() for a in assets] if assets else [_visual_asset(item, text)]
    for name in names:
        if name not in item.assets:
            raise UsageError(
                f"--assets: {text}: item {item.id!r} has no asset {name!r} "
                f"(it has: {', '.join(item.assets) or 'none'})"
            )
    hrefs = [_gdal_href(item.assets[n].get_absolute_href() or item.assets[n].href) for n in names]
    if len(hrefs) == 1:
        return RasterSource(text, hrefs[0], stem=item.id)
    if len(hrefs) != 3:
        raise UsageError(f"--assets: give one RGB asset or three band assets, got {len(hrefs)}")
    return RasterSource(text, _stack_vrt(text, names, hrefs), stem=item.id)


def _read_item(text: str) -> pystac.Item:
    try:
        import pystac
    except ImportError:
        raise UsageError(
            f"{text}: reading a STAC Item needs pystac (pip install 'drseg[stac]')"
        ) from None
    href = text if "://" in text else os.path.abspath(text)
    if "://" not in text and not Path(text).is_file():
        raise InputError(f"{text}: file not found")
    try:
        obj = pystac.read_file(href)
    except Exception as exc:  # noqa: BLE001 - pystac raises many kinds (JSON, HTTP, schema)
        raise InputError(f"{text}: not a STAC Item pystac can read ({first_line(exc)})") from None
    if not isinstance(obj, pystac.Item):
        raise InputError(f"{text}: is a STAC {type(obj).__name__}, not an Item")
    return obj


def _visual_asset(item: pystac.Item, text: str) -> str:
    if "visual" in item.assets:
        return "visual"
    for key, asset in item.assets.items():
        if "visual" in (asset.roles or []):
            return key
    for key, asset in item.assets.items():
        bands = asset.extra_fields.get("eo:bands") or []
        names = {b.get("common_name") for b in bands if isinstance(b, dict)}
        if {"red", "green", "blue"} <= names:
            return key
    raise UsageError(
        f"{text}: item {item.id!r} has no visual asset; pass --assets with one RGB asset "
        f"or three band assets as R,G,B (it has: {', '.join(item.assets) or 'none'})"
    )


def _gdal_href(href: str) -> str:
    """The GDAL path of an absolute asset href (``file://`` URLs as local paths)."""
    if href.startswith("file://"):
        return href[len("file://") :]
    return to_gdal_path(href) if is_remote(href) else href


_DTYPES = {
    "uint8": "Byte",
    "int8": "Int8",
    "uint16": "UInt16",
    "int16": "Int16",
    "uint32": "UInt32",
    "int32": "Int32",
    "float32": "Float32",
    "float64": "Float64",
}


def _stack_vrt(text: str, names: Sequence[str], hrefs: Sequence[str]) -> str:
    """A VRT (in ``/vsimem/``) stacking band 1 of each href as R, G, B; they must share a grid."""
    headers = []
    for name, href in zip(names, hrefs, strict=True):
        try:
            with rasterio.Env(**remote_gdal_options(href)), rasterio.open(href) as ds:
                headers.append(
                    (ds.width, ds.height, ds.crs, ds.transform, ds.dtypes[0], ds.nodata)
                    + (ds.block_shapes[0],)
                )
        except (RasterioIOError, ValueError) as exc:
            raise InputError(
                f"{text}: asset {name!r} is not a raster GDAL can read ({first_line(exc)})"
            ) from None
    width, height, crs, transform = headers[0][:4]
    for name, header in zip(names[1:], headers[1:], strict=True):
        if header[:4] != (width, height, crs, transform):
            raise InputError(
                f"{text}: asset {name!r} is not on the grid of {names[0]!r}; "
                "pick assets of one resolution"
            )
    bands = []
    for i, (href, header) in enumerate(zip(hrefs, headers, strict=True)):
        dtype, nodata, (block_h, block_w) = _DTYPES.get(header[4], "Float64"), header[5], header[6]
        nodata_xml = f"<NoDataValue>{nodata!r}</NoDataValue>" if nodata is not None else ""
        bands.append(
            f'<VRTRasterBand dataType="{dtype}" band="{i + 1}">'
            f"<ColorInterp>{('Red', 'Green', 'Blue')[i]}</ColorInterp>{nodata_xml}"
            f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(href)}</SourceFilename>'
            f"<SourceBand>1</SourceBand>"
            f'<SourceProperties RasterXSize="{width}" RasterYSize="{height}" '
            f'DataType="{dtype}" BlockXSize="{block_w}" BlockYSize="{block_h}"/>'
            f'<SrcRect xOff="0" yOff="0" xSize="{width}" ySize="{height}"/>'
            f'<DstRect xOff="0" yOff="0" xSize="{width}" ySize="{height}"/>'
            f"</SimpleSource></VRTRasterBand>"
        )
    srs = f"<SRS>{escape(crs.to_wkt())}</SRS>" if crs else ""
    geo = ", ".join(repr(v) for v in transform.to_gdal())
    xml = (
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">{srs}'
        f"<GeoTransform>{geo}</GeoTransform>{''.join(bands)}</VRTDataset>"
    )
    memfile = MemoryFile(xml.encode("utf-8"), ext=".vrt")
    with _VRT_LOCK:
        _VRT_FILES.append(memfile)
    return memfile.name
