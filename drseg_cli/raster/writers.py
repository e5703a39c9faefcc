"""Georeferenced outputs written row band by row band: class mask, probabilities, uncertainty.

Each writer fills a tiled GeoTIFF under a temporary name beside its destination (same CRS,
transform and size as the input) and only ``commit()`` puts the final file in place — via
GDAL's COG driver when a Cloud-Optimized GeoTIFF is asked for. ``abort()`` removes
everything, so an interrupted run leaves no partial output under a final name.
"""

from __future__ import annotations

import contextlib
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window

from drseg_cli.atomic import _raise_output_error, atomic_output, temp_path_for
from drseg_cli.raster.mask_meta import (
    MASK_BAND_DESCRIPTION,
    MASK_NODATA,
    class_band_tags,
    class_names_tag,
)
from drseg_cli.raster.reader import SceneInfo

#: Conventional colours for common land-cover words; other classes take the palette below.
KNOWN_COLORS: dict[str, tuple[int, int, int]] = {
    "water": (31, 120, 180),
    "river": (31, 120, 180),
    "lake": (31, 120, 180),
    "sea": (20, 80, 160),
    "building": (227, 26, 28),
    "house": (227, 26, 28),
    "road": (150, 150, 150),
    "tree": (51, 160, 44),
    "forest": (27, 120, 55),
    "vegetation": (102, 189, 99),
    "grass": (178, 223, 138),
    "low vegetation": (178, 223, 138),
    "field": (253, 191, 111),
    "farmland": (253, 191, 111),
    "agriculture": (253, 191, 111),
    "bare soil": (191, 129, 45),
    "barren": (191, 129, 45),
    "car": (255, 127, 0),
    "background": (40, 40, 40),
    "other": (40, 40, 40),
    "clutter": (40, 40, 40),
}
PALETTE: list[tuple[int, int, int]] = [
    (166, 206, 227), (251, 154, 153), (202, 178, 214), (255, 255, 153), (106, 61, 154),
    (177, 89, 40), (141, 211, 199), (190, 186, 218), (251, 128, 114), (128, 177, 211),
    (252, 205, 229), (188, 128, 189), (204, 235, 197), (255, 237, 111), (217, 217, 217),
]  # fmt: skip

GTIFF_OPTIONS = {
    "driver": "GTiff",
    "tiled": True,
    "blockxsize": 256,
    "blockysize": 256,
    "compress": "deflate",
    "BIGTIFF": "IF_SAFER",
}
COG_OPTIONS = {
    "COMPRESS": "DEFLATE",
    "BLOCKSIZE": "512",
    "BIGTIFF": "IF_SAFER",
    "OVERVIEWS": "AUTO",
}


def class_colors(names: Sequence[str]) -> list[tuple[int, int, int]]:
    """One distinct colour per class, conventional where the name is a known land-cover word."""
    colors, spare = [], iter(PALETTE * (len(names) // len(PALETTE) + 1))
    for name in names:
        colors.append(KNOWN_COLORS.get(name.strip().lower()) or next(spare))
    return colors


def qml_style(names: Sequence[str], colors: Sequence[tuple[int, int, int]]) -> str:
    """A QGIS paletted-renderer style (``.qml``) labelling each class value with its name."""
    qgis = ET.Element("qgis", version="3.28", styleCategories="AllStyleCategories")
    pipe = ET.SubElement(qgis, "pipe")
    renderer = ET.SubElement(
        pipe, "rasterrenderer", type="paletted", band="1", opacity="1", nodataColor=""
    )
    ET.SubElement(renderer, "rasterTransparency")
    palette = ET.SubElement(renderer, "colorPalette")
    for i, (name, (r, g, b)) in enumerate(zip(names, colors, strict=True)):
        ET.SubElement(
            palette,
            "paletteEntry",
            value=str(i),
            color=f"#{r:02x}{g:02x}{b:02x}",
            label=name,
            alpha="255",
        )
    body = ET.tostring(qgis, encoding="unicode")
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + body + "\n"


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


class RasterWriter:
    """A GeoTIFF on the input's grid, filled row band by row band, committed atomically."""

    def __init__(
        self,
        path: Path,
        info: SceneInfo,
        *,
        count: int,
        dtype: str,
        nodata: float | None,
        cog: bool,
        nbits: int | None = None,
        resampling: str = "NEAREST",
    ) -> None:
        self.path, self.cog, self.resampling = Path(path), cog, resampling
        self._tmp = temp_path_for(self.path)
        profile = dict(
            GTIFF_OPTIONS,
            width=info.width,
            height=info.height,
            count=count,
            dtype=dtype,
            crs=info.crs,
            transform=info.transform,
            nodata=nodata,
        )
        if count > 1:
            profile["interleave"] = "band"
        if nbits:
            profile["nbits"] = nbits
        self._nbits = nbits
        try:
            self.ds = rasterio.open(self._tmp, "w", **profile)
        except rasterio.errors.RasterioIOError as exc:
            raise_os_error(self.path, exc)

    def write_rows(self, y0: int, data: np.ndarray) -> None:
        """Write ``data`` (``[h, W]`` or ``[count, h, W]``) starting at scene row ``y0``."""
        if data.ndim == 2:
            data = data[None]
        window = Window(0, y0, data.shape[2], data.shape[1])
        try:
            self._write_window(data.astype(self.ds.dtypes[0], copy=False), window)
        except (rasterio.errors.RasterioIOError, OSError) as exc:
            raise_os_error(self.path, exc)

    def _write_window(self, data: np.ndarray, window: Window) -> None:
        self.ds.write(data, window=window)

    def commit(self) -> Path:
        """Close, convert to COG if asked, and move into place under the final name."""
        try:
            self.ds.close()
            if not self.cog:
                os.replace(self._tmp, self.path)
                return self.path
            options = dict(COG_OPTIONS, OVERVIEW_RESAMPLING=self.resampling)
            if self._nbits:
                options["NBITS"] = str(self._nbits)
            with atomic_output(self.path) as cog_tmp:
                rasterio.shutil.copy(self._tmp, cog_tmp, driver="COG", **options)
            return self.path
        except rasterio.errors.RasterioIOError as exc:
            raise_os_error(self.path, exc)
        except OSError as exc:
            _raise_output_error(self.path, exc)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close and delete the temporary file (a no-op after a successful commit)."""
        with contextlib.suppress(Exception):
            self.ds.close()
        for p in (self._tmp, Path(f"{self._tmp}.aux.xml"), Path(f"{self._tmp}.ovr")):
            with contextlib.suppress(OSError):
                p.unlink()


def raise_os_error(path: Path, exc: Exception) -> None:
    """Map a GDAL write failure to a one-line OutputError (disk full, permission...)."""
    text = str(exc)
    low = text.lower()
    if "no space" in low or "disk full" in low:
        _raise_output_error(path, OSError(28, "No space left on device"))
    if "permission" in low:
        _raise_output_error(path, OSError(13, "Permission denied"))
    _raise_output_error(path, OSError(5, text.splitlines()[0] if text else "write failed"))


class ClassMaskWriter(RasterWriter):
    """uint8 class mask: colour table, class names in tags, band description, QML sidecar."""

    def __init__(self, path: Path, info: SceneInfo, names: Sequence[str], *, cog: bool) -> None:
        super().__init__(
            path, info, count=1, dtype="uint8", nodata=MASK_NODATA, cog=cog, resampling="MODE"
        )
        self.names = list(names)
        colors = class_colors(self.names)
        cmap = {i: (*c, 255) for i, c in enumerate(colors)}
        cmap[MASK_NODATA] = (0, 0, 0, 0)
        self.ds.write_colormap(1, cmap)
        self.ds.set_band_description(1, MASK_BAND_DESCRIPTION)
        self.ds.update_tags(**class_names_tag(self.names))
        self.ds.update_tags(1, **class_band_tags(self.names))
        self._qml = qml_style(self.names, colors)

    def commit(self) -> Path:
        out = super().commit()
        write_text_atomic(self.qml_path, self._qml)
        return out

    @property
    def qml_path(self) -> Path:
        return self.path.with_suffix(".qml")


class ProbabilityWriter(RasterWriter):
    """Per-class probabilities, one band per class: uint8 0–255 (nodata 255 is never a
    probability code: 0–254 scale) or half-precision float (NaN nodata)."""

    def __init__(
        self, path: Path, info: SceneInfo, names: Sequence[str], *, dtype: str, cog: bool
    ) -> None:
        if dtype == "uint8":
            super().__init__(
                path, info, count=len(names), dtype="uint8", nodata=255, cog=cog,
                resampling="AVERAGE",
            )  # fmt: skip
        else:
            super().__init__(
                path, info, count=len(names), dtype="float32", nodata=float("nan"), cog=cog,
                nbits=16, resampling="AVERAGE",
            )  # fmt: skip
        self.quantise = dtype == "uint8"
        for i, name in enumerate(names):
            self.ds.set_band_description(i + 1, name)
        self.ds.update_tags(**class_names_tag(names))
        if self.quantise:
            self.ds.update_tags(SCALE="probability = value / 254")

    def write_probs(self, y0: int, probs: np.ndarray, valid: np.ndarray) -> None:
        if self.quantise:
            data = np.rint(probs * 254.0).astype(np.uint8)
            data[:, ~valid] = 255
        else:
            data = np.where(valid[None], probs, np.nan).astype(np.float32)
        self.write_rows(y0, data)


class ScalarWriter(RasterWriter):
    """One float band in [0, 1] stored as half precision (uncertainty, score), NaN nodata."""

    def __init__(self, path: Path, info: SceneInfo, description: str, *, cog: bool) -> None:
        super().__init__(
            path, info, count=1, dtype="float32", nodata=float("nan"), cog=cog, nbits=16,
            resampling="AVERAGE",
        )  # fmt: skip
        self.ds.set_band_description(1, description)
