"""Georeferenced outputs written row band by row band: class mask, probabilities, uncertainty.

Each writer fills a tiled GeoTIFF under a temporary name beside its destination (same CRS,
transform and size as the input) and only ``commit()`` puts the final file in place — via
GDAL's COG driver when a Cloud-Optimized GeoTIFF is asked for. ``abort()`` removes
everything, so an interrupted run leaves no partial output under a final name.
"""

from __future__ import annotations

import colorsys
import contextlib
import itertools
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window

from drseg_cli.atomic import atomic_output, raise_output_error, temp_path_for
from drseg_cli.raster.mask_meta import (
    MASK_BAND_DESCRIPTION,
    MASK_NODATA,
    class_band_tags,
    class_names_tag,
)
from drseg_cli.raster.overviews import ModePyramid, with_mode_overviews
from drseg_cli.raster.reader import SceneInfo

#: Conventional colours for common remote-sensing class words and their synonyms. A class
#: name is matched on its words (``low vegetation``, ``Impervious_surfaces``, ``tall trees``):
#: the longest known phrase in it wins; other names take the distinct colours below.
KNOWN_COLORS: dict[str, tuple[int, int, int]] = {
    # water
    "water": (31, 120, 180), "river": (31, 120, 180), "lake": (31, 120, 180),
    "pond": (31, 120, 180), "reservoir": (31, 120, 180), "canal": (31, 120, 180),
    "stream": (31, 120, 180), "sea": (20, 80, 160), "ocean": (20, 80, 160),
    "wetland": (72, 175, 190), "swamp": (72, 175, 190), "marsh": (72, 175, 190),
    # buildings and built-up land
    "building": (227, 26, 28), "house": (227, 26, 28), "roof": (227, 26, 28),
    "rooftop": (227, 26, 28), "built up": (200, 40, 60), "urban": (200, 40, 60),
    "settlement": (200, 40, 60), "residential": (200, 40, 60), "industrial": (160, 30, 90),
    # roads and sealed surfaces
    "road": (150, 150, 150), "street": (150, 150, 150), "highway": (150, 150, 150),
    "pavement": (150, 150, 150), "parking": (175, 175, 175), "parking lot": (175, 175, 175),
    "impervious": (190, 190, 190), "impervious surface": (190, 190, 190),
    "railway": (90, 90, 90), "rail": (90, 90, 90), "bridge": (120, 120, 130),
    "runway": (130, 130, 130),
    # vegetation
    "vegetation": (102, 189, 99), "tree": (51, 160, 44), "forest": (27, 120, 55),
    "woodland": (27, 120, 55), "wood": (27, 120, 55), "shrub": (120, 160, 60),
    "shrubland": (120, 160, 60), "bush": (120, 160, 60), "grass": (178, 223, 138),
    "grassland": (178, 223, 138), "meadow": (178, 223, 138), "lawn": (178, 223, 138),
    "low vegetation": (178, 223, 138), "pasture": (200, 230, 130),
    "rangeland": (200, 230, 130), "park": (140, 200, 110),
    # agriculture
    "field": (253, 191, 111), "farmland": (253, 191, 111), "agriculture": (253, 191, 111),
    "agricultural": (253, 191, 111), "crop": (253, 191, 111), "cropland": (253, 191, 111),
    "paddy": (230, 200, 90), "greenhouse": (210, 240, 250),
    # bare ground
    "bare soil": (191, 129, 45), "soil": (191, 129, 45), "bare": (191, 129, 45),
    "bare land": (191, 129, 45), "barren": (191, 129, 45), "dirt": (191, 129, 45),
    "sand": (238, 214, 160), "beach": (238, 214, 160), "desert": (238, 214, 160),
    "rock": (140, 120, 100), "mud": (140, 100, 60),
    # snow, cloud, shadow
    "snow": (245, 250, 255), "ice": (220, 240, 250), "glacier": (220, 240, 250),
    "cloud": (235, 235, 235), "shadow": (25, 25, 40),
    # objects
    "car": (255, 127, 0), "vehicle": (255, 127, 0), "truck": (255, 127, 0),
    "ship": (255, 90, 160), "boat": (255, 90, 160), "airplane": (255, 220, 0),
    "plane": (255, 220, 0), "aircraft": (255, 220, 0), "solar panel": (70, 40, 120),
    # nothing in particular
    "background": (40, 40, 40), "other": (40, 40, 40), "clutter": (40, 40, 40),
    "unknown": (40, 40, 40), "void": (40, 40, 40), "unclassified": (40, 40, 40),
}  # fmt: skip
#: Colours for names without a known word: pale and mid tones unlike the conventional
#: colours above; past these, hues spread by the golden angle.
PALETTE: list[tuple[int, int, int]] = [
    (166, 206, 227), (251, 154, 153), (202, 178, 214), (255, 255, 153), (106, 61, 154),
    (177, 89, 40), (141, 211, 199), (190, 186, 218), (251, 128, 114), (128, 177, 211),
    (252, 205, 229), (188, 128, 189), (204, 235, 197), (255, 237, 111), (217, 217, 217),
    (0, 150, 136), (233, 30, 99), (121, 85, 72), (63, 81, 181), (205, 220, 57),
]  # fmt: skip
_STEMS = {w for key in KNOWN_COLORS for w in key.split()}
_IRREGULAR = {"leaves": "leaf", "grasses": "grass", "bushes": "bush", "marshes": "marsh"}


def _words(name: str) -> list[str]:
    """Lower-case words of a class name, plurals made singular (``Tall_Trees`` → tall tree)."""
    words = re.findall(r"[a-z]+", name.lower())
    out = []
    for w in words:
        if w in _IRREGULAR:
            w = _IRREGULAR[w]
        elif w.endswith("ies") and len(w) > 4:
            w = w[:-3] + "y"
        elif w.endswith("s") and not w.endswith("ss") and len(w) > 3 and w[:-1] in _STEMS:
            w = w[:-1]
        out.append(w)
    return out


def known_color(name: str) -> tuple[int, int, int] | None:
    """The conventional colour of the longest known phrase among ``name``'s words, or None."""
    words = _words(name)
    for n in range(len(words), 0, -1):
        for i in range(len(words) - n + 1):
            color = KNOWN_COLORS.get(" ".join(words[i : i + n]))
            if color is not None:
                return color
    return None


def _spread(i: int) -> tuple[int, int, int]:
    """The i-th colour of an endless sequence: hues by the golden angle, two tones."""
    h = (i * 0.618033988749895) % 1.0
    s, v = (0.55, 0.9) if i % 2 == 0 else (0.8, 0.65)
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


def _unused(color: tuple[int, int, int], used: set) -> tuple[int, int, int] | None:
    """``color``, or the nearest lighter/darker shade of it that no other class has."""
    for k in (0, 28, -28, 56, -56, 84, -84):
        shade = tuple(min(255, max(0, c + k)) for c in color)
        if shade not in used:
            return shade  # type: ignore[return-value]
    return None


def class_colors(names: Sequence[str]) -> list[tuple[int, int, int]]:
    """One colour per class, never two alike: conventional where the name has a known word
    (``KNOWN_COLORS``), else the next distinct colour of ``PALETTE`` and beyond."""
    colors: list[tuple[int, int, int]] = []
    used: set[tuple[int, int, int]] = set()
    spare = itertools.chain(PALETTE, (_spread(i) for i in itertools.count()))
    for name in names:
        known = known_color(name)
        color = _unused(known, used) if known else None
        if color is None:
            color = next(c for c in spare if c not in used)
        used.add(color)
        colors.append(color)
    return colors


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
    # blocks compressed in parallel, written in the same order: the same bytes (4096² mask:
    # 0.13 → 0.075 s on 2 cores)
    "NUM_THREADS": "ALL_CPUS",
}


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


#: The field a polygon layer's style colours by (stable across formats; shapefiles may cut
#: long class names).
STYLE_FIELD = "class_id"


def vector_qml_style(
    values: Sequence[int], labels: Sequence[str], colors: Sequence[tuple[int, int, int]]
) -> str:
    """A QGIS categorized-renderer style for polygons: one fill per class value of
    ``STYLE_FIELD``, labelled with its name and filled with the mask's colour."""
    qgis = ET.Element("qgis", version="3.22", styleCategories="Symbology")
    renderer = ET.SubElement(
        qgis, "renderer-v2", type="categorizedSymbol", attr=STYLE_FIELD,
        symbollevels="0", enableorderby="0", forceraster="0",
    )  # fmt: skip
    categories = ET.SubElement(renderer, "categories")
    symbols = ET.SubElement(renderer, "symbols")
    rows = zip(values, labels, colors, strict=True)
    for i, (value, label, (r, g, b)) in enumerate(rows):
        ET.SubElement(
            categories, "category", render="true", symbol=str(i), value=str(value), label=label
        )
        symbol = ET.SubElement(
            symbols, "symbol", type="fill", name=str(i), alpha="1", clip_to_extent="1",
            force_rhr="0",
        )  # fmt: skip
        layer = ET.SubElement(
            symbol, "layer", {"class": "SimpleFill", "pass": "0", "locked": "0", "enabled": "1"}
        )
        props = {
            "color": f"{r},{g},{b},255",
            "style": "solid",
            "outline_color": f"{r // 2},{g // 2},{b // 2},255",
            "outline_style": "solid",
            "outline_width": "0.2",
            "outline_width_unit": "MM",
            "joinstyle": "miter",
        }
        option = ET.SubElement(layer, "Option", type="Map")
        for k, v in props.items():
            ET.SubElement(option, "Option", name=k, value=v, type="QString")
        for k, v in props.items():  # QGIS before 3.26 reads these
            ET.SubElement(layer, "prop", k=k, v=v)
    ET.SubElement(qgis, "layerGeometryType").text = "2"  # polygons
    body = ET.tostring(qgis, encoding="unicode")
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + body + "\n"


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


class RasterWriter:
    """A GeoTIFF on the input's grid, filled row band by row band, committed atomically."""

    #: Class masks: MODE overviews computed by ``raster/overviews.py`` (False: by GDAL; the
    #: COG is byte-identical either way)
    own_overviews: bool = True

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
        self._single_byte = count == 1 and dtype == "uint8" and nodata is not None
        self._nodata = int(nodata) if self._single_byte else None
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
        if cog and self._single_byte:
            # a class mask staged for the COG driver, which re-encodes it anyway: run-length
            # coding costs a sixth of deflate's CPU (the COG's bytes are the same)
            profile["compress"] = "packbits"
        if count > 1:
            profile["interleave"] = "band"
        if nbits:
            profile["nbits"] = nbits
        self._nbits = nbits
        self._pyramid: ModePyramid | None = None  # a class mask's overviews, built row by row
        try:
            self.ds = rasterio.open(self._tmp, "w", **profile)
        except rasterio.errors.RasterioIOError as exc:
            raise_os_error(self.path, exc)

    def write_rows(self, y0: int, data: np.ndarray) -> None:
        """Write ``data`` (``[h, W]`` or ``[count, h, W]``) starting at scene row ``y0``."""
        if data.ndim == 2:
            data = data[None]
        window = Window(0, y0, data.shape[2], data.shape[1])
        data = data.astype(self.ds.dtypes[0], copy=False)
        try:
            self._write_window(data, window)
            if self._own_mode_overviews():
                if self._pyramid is None and y0 == 0:
                    block = int(COG_OPTIONS["BLOCKSIZE"])
                    h, w = self.ds.height, self.ds.width
                    self._pyramid = ModePyramid(self._tmp, h, w, block, self._nodata)
                if self._pyramid is not None:
                    self._pyramid.add_rows(y0, data[0])
        except (rasterio.errors.RasterioIOError, OSError) as exc:
            raise_os_error(self.path, exc)

    def _own_mode_overviews(self) -> bool:
        """A class mask bound for a COG: its MODE overviews are computed here."""
        return self.cog and self.own_overviews and self.resampling == "MODE" and self._single_byte

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
            with atomic_output(self.path) as cog_tmp, self._cog_source() as source:
                rasterio.shutil.copy(source, cog_tmp, driver="COG", **options)
            return self.path
        except rasterio.errors.RasterioIOError as exc:
            raise_os_error(self.path, exc)
        except OSError as exc:
            raise_output_error(self.path, exc)
        finally:
            self.abort()

    def _cog_source(self) -> contextlib.AbstractContextManager[Path]:
        """What the COG driver copies: the temporary GeoTIFF, or (a class mask) a VRT of it
        listing MODE overviews computed by ``raster/overviews.py``, the bytes GDAL would
        write in a third of the time; built while the rows were written (``ModePyramid``),
        or from the file when they did not come top to bottom."""
        if not self._own_mode_overviews():
            return contextlib.nullcontext(self._tmp)
        if self._pyramid is not None:
            return self._pyramid.vrt()
        return with_mode_overviews(self._tmp, int(COG_OPTIONS["BLOCKSIZE"]), self._nodata)

    def abort(self) -> None:
        """Close and delete the temporary file (a no-op after a successful commit)."""
        with contextlib.suppress(Exception):
            self.ds.close()
        if self._pyramid is not None:
            self._pyramid.discard()
        for p in (self._tmp, Path(f"{self._tmp}.aux.xml"), Path(f"{self._tmp}.ovr")):
            with contextlib.suppress(OSError):
                p.unlink()


def raise_os_error(path: Path, exc: Exception) -> None:
    """Map a GDAL write failure to a one-line OutputError (disk full, permission...)."""
    text = str(exc)
    low = text.lower()
    if "no space" in low or "disk full" in low:
        raise_output_error(path, OSError(28, "No space left on device"))
    if "permission" in low:
        raise_output_error(path, OSError(13, "Permission denied"))
    raise_output_error(path, OSError(5, text.splitlines()[0] if text else "write failed"))


class ClassMaskWriter(RasterWriter):
    """uint8 class mask: colour table, class names in tags, band description, QML sidecar."""

    def __init__(
        self,
        path: Path,
        info: SceneInfo,
        names: Sequence[str],
        *,
        cog: bool,
        tags: dict[str, str] | None = None,
    ) -> None:
        """``tags``: more dataset tags (e.g. ``mask_meta.CLIPPED_TAG``)."""
        super().__init__(
            path, info, count=1, dtype="uint8", nodata=MASK_NODATA, cog=cog, resampling="MODE"
        )
        self.names = list(names)
        colors = class_colors(self.names)
        cmap = {i: (*c, 255) for i, c in enumerate(colors)}
        cmap[MASK_NODATA] = (0, 0, 0, 0)
        self.ds.write_colormap(1, cmap)
        self.ds.set_band_description(1, MASK_BAND_DESCRIPTION)
        self.ds.update_tags(**class_names_tag(self.names), **(tags or {}))
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
