"""Image/label datasets on disk: the OV remote-sensing benchmark releases plus generic layouts.

Two public releases of the same eight benchmarks differ in folders, label values and class
lists, so each (benchmark, release) pair is its own layout:

- SegEarth-OV (github.com/likyoo/SegEarth-OV, mmseg trees): ``img_dir/{split}`` +
  ``ann_dir/{split}`` (iSAID, LoveDA, Potsdam, Vaihingen, UAVid), ``{split}/src`` +
  ``{split}/gt`` (UDD5, VDD); layouts ``isaid``, ``loveda``, ``potsdam``, ``vaihingen``,
  ``uavid``, ``udd5``, ``vdd``.
- OVRSISBench (github.com/LiBingyu01/RSKT-Seg, detectron2 ``register_*.py``): ``imgs`` +
  ``D2masks`` (DLRSD, iSAID, Potsdam, Vaihingen), ``images_png`` + ``masks_png`` (LoveDA),
  ``Images`` + ``Labels`` (UAVid), ``all/src`` + ``all/gt`` (UDD5), ``src`` + ``gt`` (VDD);
  layouts ``dlrsd`` (also OVRS's) and ``ovrsis-*``.

Auto detection needs both the folder tree and the folder's own name, matched exactly
(case-insensitively): a tree alone never picks a class list, and two candidates are refused.
docs/EVALUATE.md has the table with the source file and commit of every entry.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import rasterio
from affine import Affine, TransformNotInvertibleError
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from drseg_cli.classes import ClassSpec, validate_classes
from drseg_cli.errors import InputError, UsageError, first_line

if TYPE_CHECKING:
    from drseg_cli.raster.reader import SceneInfo

log = logging.getLogger(__name__)

# Benchmark images and labels are plain PNG/JPEG: rasterio warns about every one of them, and
# ``warnings.catch_warnings`` is not thread-safe (labels are read from reader threads).
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module="rasterio")

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".jp2", ".img", ".vrt")
LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".gif", ".img", ".vrt")
#: Label-name decorations accepted by the generic layout (``tile_7_mask.png`` for ``tile_7.tif``).
GENERIC_LABEL_SUFFIXES = ("", "_label", "_labels", "_mask", "_gt", "_seg")
#: The split name recorded for trees without split folders (RSKT-Seg's ``*_all_sem_seg``).
ALL_SPLIT = "all"
#: Largest misregistration tolerated between a georeferenced label and its image, in pixels.
ALIGN_TOLERANCE_PX = 1e-3


@dataclass(frozen=True)
class Tree:
    """One arrangement of image and label folders, relative to the data folder.

    Paths are ``/``-separated folder names matched exactly (case-insensitively); ``{split}``
    stands for a split folder (restricted to ``splits`` when given) and ``{part}`` for each
    of ``parts`` (LoveDA's Urban/Rural). A tree without ``{split}`` is the split ``all``.
    """

    images: str
    labels: str
    splits: tuple[str, ...] | None = None
    default_split: str | None = None
    parts: tuple[str, ...] = ()

    @property
    def has_split(self) -> bool:
        return "{split}" in self.images

    def describe(self) -> str:
        """The tree as the user would see it, e.g. ``imgs/ + D2masks/``."""
        return f"{self.images}/ + {self.labels}/"

    def dirs(self, root: Path, split: str | None) -> tuple[list[Path], list[Path]] | None:
        """Image and label folders of ``split`` under ``root``, or None if absent."""
        if not self.has_split:
            if split is not None and split.casefold() != ALL_SPLIT:
                return None
            split = ALL_SPLIT
        elif split is None or (self.splits is not None and split.casefold() not in self.splits):
            return None
        images: list[Path] = []
        labels: list[Path] = []
        for part in self.parts or ("",):
            img = _resolve(root, self.images.format(split=split, part=part))
            lab = _resolve(root, self.labels.format(split=split, part=part))
            if img is not None and lab is not None:
                images.append(img)
                labels.append(lab)
        return (images, labels) if images else None

    def available_splits(self, root: Path) -> list[str]:
        """The splits of this tree present under ``root`` (lower case)."""
        if not self.has_split:
            return [ALL_SPLIT] if self.dirs(root, None) else []
        prefix = self.images.split("{split}")[0].strip("/")
        base = _resolve(root, prefix) if prefix else root
        if base is None:
            return []
        names = sorted({p.name.casefold() for p in base.iterdir() if p.is_dir()})
        return [n for n in names if self.dirs(root, n) is not None]

    def pick_split(self, root: Path) -> str | None:
        """The split used when ``--split`` is not given: the default, else val/test/train."""
        found = self.available_splits(root)
        for candidate in (self.default_split, "val", "test", "train", ALL_SPLIT):
            if candidate in found:
                return candidate
        return found[0] if len(found) == 1 else None


MMSEG = Tree("img_dir/{split}", "ann_dir/{split}", default_split="val")
D2 = Tree("imgs", "D2masks")  # OVRS / OVRSISBench detectron2 masks, split "all"
D2_SPLIT = Tree(
    "{split}/imgs", "{split}/D2masks", splits=("train", "val", "test"), default_split="val"
)  # *_split/{train,val}


@dataclass(frozen=True)
class Layout:
    """How one benchmark release lays out images and labels, and how label values are read."""

    name: str
    title: str
    trees: tuple[Tree, ...]  # empty: the generic layout (images/ + labels/ by stem)
    names: tuple[str, ...] = ()  # dataset folder names that select it in auto mode
    reduce_zero_label: bool = False
    label_suffixes: tuple[str, ...] = ("",)  # appended to the image stem to find its label
    classes: tuple[str, ...] = ()  # default class lines (``name: synonym, synonym``)
    source: str = ""

    @property
    def tree(self) -> str:
        """``generic`` for the generic layout, else ``fixed`` (callers test for generic)."""
        return "generic" if not self.trees else "fixed"

    def class_specs(self) -> list[ClassSpec]:
        """The benchmark's default classes (empty for the generic layouts)."""
        specs = []
        for line in self.classes:
            name, _, rest = line.partition(":")
            syn = tuple(s.strip() for s in rest.split(",") if s.strip())
            specs.append(ClassSpec(name.strip(), syn))
        return validate_classes(specs, f"layout {self.name}")

    def matches_name(self, folder: Path) -> bool:
        """Whether ``folder``'s own name is one of this benchmark's (exact, any case)."""
        return folder.name.casefold() in {n.casefold() for n in self.names}

    def fits(self, root: Path) -> bool:
        """Whether one of this layout's trees is present under ``root``."""
        return any(t.available_splits(root) for t in self.trees)

    def describe_trees(self) -> str:
        """The layout's trees for messages: ``a/ + b/ or c/ + d/``."""
        return " or ".join(t.describe() for t in self.trees)


_SEGEARTH = "likyoo/SegEarth-OV@3e22a969 configs/cfg_{0}.py, configs/cls_{0}.txt"
#: ISPRS Potsdam and Vaihingen, in their label order.
ISPRS_CLASSES = (
    "Impervious surfaces",
    "Building",
    "Low vegetation",
    "Tree",
    "Car",
    "Clutter/background",
)
_RSKT = "LiBingyu01/RSKT-Seg@29834f66 RSKT_Seg/data/datasets/register_{0}.py, datasets/{0}.json"

LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(
            "generic",
            "images/ + labels/ matched by file stem",
            (),
            label_suffixes=GENERIC_LABEL_SUFFIXES,
        ),
        Layout("mmseg", "img_dir/{split} + ann_dir/{split}", (MMSEG,)),
        # ------------------------------------------------------------ OVRS / OVRSISBench
        Layout(
            "dlrsd",
            "DLRSD (UC Merced dense labels), OVRS / OVRSISBench release",
            (D2, D2_SPLIT, MMSEG),
            names=("DLRSD", "DLRSD_split"),
            classes=(
                "airplane",
                "bare soil",
                "buildings",
                "cars",
                "chaparral",
                "court",
                "dock",
                "field",
                "grass",
                "mobile home",
                "pavement",
                "sand",
                "sea",
                "ship",
                "tanks",
                "trees",
                "water",
            ),
            source=_RSKT.format("DLRSD"),
        ),
        Layout(
            "ovrsis-isaid",
            "iSAID, OVRSISBench release (15 classes, background = 255 ignore)",
            (D2, D2_SPLIT),
            names=("iSAID", "iSAID_split"),
            classes=(
                "ship",
                "storage tank",
                "baseball diamond",
                "tennis court",
                "basketball court",
                "ground track field",
                "bridge",
                "large vehicle",
                "small vehicle",
                "helicopter",
                "swimming pool",
                "roundabout",
                "soccer ball field",
                "plane",
                "harbor",
            ),
            source=_RSKT.format("iSAID"),
        ),
        Layout(
            "ovrsis-potsdam",
            "ISPRS Potsdam, OVRSISBench release (0..5 as is)",
            (D2,),
            names=("Potsdam",),
            classes=ISPRS_CLASSES,
            source=_RSKT.format("Potsdam"),
        ),
        Layout(
            "ovrsis-vaihingen",
            "ISPRS Vaihingen, OVRSISBench release (0..5 as is)",
            (D2,),
            names=("Vaihingen",),
            classes=ISPRS_CLASSES,
            source=_RSKT.format("Vaihingen"),
        ),
        Layout(
            "ovrsis-loveda",
            "LoveDA, OVRSISBench release (0 = no-data is class 0; 0..7 as is)",
            (Tree("images_png", "masks_png"),),
            names=("LoveDA",),
            classes=(
                "no-data",
                "Background",
                "Building",
                "Road",
                "Water",
                "Barren",
                "Forest",
                "Agriculture",
            ),
            source=_RSKT.format("LoveDA"),
        ),
        Layout(
            "ovrsis-uavid",
            "UAVid, OVRSISBench release (8 classes: moving and static car apart)",
            (Tree("Images", "Labels"),),
            names=("uavid",),
            classes=(
                "Background clutter",
                "Building",
                "Road",
                "Tree",
                "Low vegetation",
                "Moving car",
                "Static car",
                "Human",
            ),
            source=_RSKT.format("uavid"),
        ),
        Layout(
            "ovrsis-udd5",
            "UDD5, OVRSISBench release (all/src + all/gt, no train/val split)",
            (Tree("{split}/src", "{split}/gt", splits=(ALL_SPLIT,)), Tree("src", "gt")),
            names=("UDD5",),
            classes=("Vegetation", "Building", "Road", "Vehicle", "Other"),
            source=_RSKT.format("UDD5"),
        ),
        Layout(
            "ovrsis-vdd",
            "VDD, OVRSISBench release (src + gt, no split)",
            (Tree("src", "gt"),),
            names=("VDD",),
            classes=("Other", "Wall", "Road", "Vegetation", "Vehicle", "Roof", "Water"),
            source=_RSKT.format("VDD"),
        ),
        # ------------------------------------------------------------ SegEarth-OV (mmseg)
        Layout(
            "isaid",
            "iSAID, SegEarth-OV / mmseg converter patches (background is class 0)",
            (MMSEG,),
            names=("iSAID",),
            label_suffixes=("_instance_color_RGB", ""),
            classes=(
                "background",
                "ship",
                "store tank",
                "baseball diamond",
                "tennis court",
                "basketball court",
                "ground track field",
                "bridge",
                "large vehicle",
                "small vehicle",
                "helicopter",
                "swimming pool",
                "roundabout",
                "soccer ball field",
                "plane",
                "harbor",
            ),
            source=_SEGEARTH.format("iSAID"),
        ),
        Layout(
            "loveda",
            "LoveDA, SegEarth-OV / mmseg (0 = no-data → ignore; 1..7 → 0..6)",
            (
                MMSEG,
                Tree(
                    "{split}/{part}/images_png",
                    "{split}/{part}/masks_png",
                    default_split="val",
                    parts=("Urban", "Rural"),
                ),
            ),
            names=("LoveDA",),
            reduce_zero_label=True,
            classes=(
                "background",
                "building: roof, house",
                "road",
                "water",
                "barren",
                "forest",
                "agricultural",
            ),
            source=_SEGEARTH.format("loveda"),
        ),
        Layout(
            "potsdam",
            "ISPRS Potsdam, SegEarth-OV / mmseg (0 = boundary → ignore; 1..6 → 0..5)",
            (MMSEG,),
            names=("potsdam",),
            reduce_zero_label=True,
            classes=(
                "road: parking lot",
                "building",
                "low vegetation",
                "tree",
                "car",
                "clutter: background",
            ),
            source=_SEGEARTH.format("potsdam"),
        ),
        Layout(
            "vaihingen",
            "ISPRS Vaihingen, SegEarth-OV / mmseg (0 = boundary → ignore; 1..6 → 0..5)",
            (MMSEG,),
            names=("vaihingen",),
            reduce_zero_label=True,
            classes=(
                "impervious surface",
                "building",
                "low vegetation",
                "tree",
                "car",
                "clutter",
            ),
            source=_SEGEARTH.format("vaihingen"),
        ),
        Layout(
            "uavid",
            "UAVid, SegEarth-OV / mmseg (moving car merged into car by the converter)",
            (Tree("img_dir/{split}", "ann_dir/{split}", default_split="test"),),
            names=("UAVid",),
            classes=("background", "building", "road", "car", "tree", "vegetation", "human"),
            source=_SEGEARTH.format("uavid"),
        ),
        Layout(
            "udd5",
            "UDD5, SegEarth-OV ({train,val}/src + {train,val}/gt)",
            (Tree("{split}/src", "{split}/gt", splits=("train", "val"), default_split="val"),),
            names=("UDD5",),
            classes=("vegetation", "building", "road", "vehicle", "background"),
            source=_SEGEARTH.format("udd5"),
        ),
        Layout(
            "vdd",
            "VDD, SegEarth-OV ({train,val,test}/src + {train,val,test}/gt)",
            (
                Tree(
                    "{split}/src",
                    "{split}/gt",
                    splits=("train", "val", "test"),
                    default_split="test",
                ),
            ),
            names=("VDD",),
            classes=("background", "facade", "road", "vegetation", "vehicle", "roof", "water"),
            source=_SEGEARTH.format("vdd"),
        ),
    )
}


def _resolve(root: Path, relpath: str) -> Path | None:
    """``root/relpath`` with every folder name matched exactly but case-insensitively."""
    here: Path | None = root
    for part in relpath.strip("/").split("/"):
        if not part:
            continue
        here = _subdir(here, part) if here is not None else None
    return here


@dataclass(frozen=True)
class Sample:
    """One image and its label mask."""

    image: Path
    label: Path

    @property
    def name(self) -> str:
        return self.image.stem


@dataclass
class Dataset:
    """The samples of one split of one dataset, with the label mapping to apply."""

    root: Path
    layout: Layout
    split: str | None
    samples: list[Sample]
    reduce_zero_label: bool
    ignore_index: int = 255
    image_dir: Path | None = None
    label_dir: Path | None = None
    unpaired_labels: list[Path] = field(default_factory=list)
    tree: str = ""
    detected: bool = False  # chosen by --layout auto
    #: class index → new index or ``ignore_index`` (after ``reduce_zero_label``); None: as is
    class_map: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def restricted(self, keep: Sequence[int], num_classes: int) -> Dataset:
        """This split scored on the classes ``keep`` only (of ``num_classes``): their labels
        renumbered 0… in that order, every other class ignored (seen/unseen evaluation,
        training without held-out classes). Values past ``num_classes`` stay invalid."""
        lut = [self.ignore_index] * num_classes
        for new, old in enumerate(keep):
            lut[old] = new
        return dataclasses.replace(self, class_map=tuple(lut))

    def open_label(self, sample: Sample, info: SceneInfo) -> LabelReader:
        """The label of ``sample`` read with this split's mapping, checked against its image
        (``info``: size, and CRS/grid when both are georeferenced)."""
        return LabelReader(
            sample.label,
            reduce_zero_label=self.reduce_zero_label,
            ignore_index=self.ignore_index,
            expect_size=(info.width, info.height),
            image_path=sample.image,
            image_georef=(info.crs, info.transform),
            class_map=self.class_map,
        )

    def describe(self) -> dict:
        """What was resolved, for the JSON results and the stderr summary."""
        return {
            "root": str(self.root),
            "layout": self.layout.name,
            "layout_title": self.layout.title,
            "detected": self.detected,
            "tree": self.tree,
            "split": self.split,
            "images": len(self.samples),
            "image_dir": str(self.image_dir) if self.image_dir else None,
            "label_dir": str(self.label_dir) if self.label_dir else None,
            "reduce_zero_label": self.reduce_zero_label,
            "ignore_index": self.ignore_index,
            "source": self.layout.source or None,
        }


def remap_labels(label: np.ndarray, reduce_zero_label: bool, ignore_index: int) -> np.ndarray:
    """Label values as class indices (int32); ``reduce_zero_label``: 0 → ignore, v → v-1."""
    out = label.astype(np.int32, copy=True)
    if reduce_zero_label:
        keep = out == ignore_index
        zero = out == 0
        out -= 1
        out[zero | keep] = ignore_index
    return out


def _open_quiet(path: Path) -> rasterio.DatasetReader:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path)


#: A raster's CRS (or None) and geotransform.
Georef = tuple[CRS | None, Affine]


def is_georeferenced(crs: CRS | None, transform: Affine) -> bool:
    """A CRS or a non-identity geotransform: the raster claims a place on the map."""
    return crs is not None or not transform.is_identity


def check_label_alignment(
    label_path: Path,
    label_georef: Georef,
    image_path: Path,
    image_georef: Georef,
    size: tuple[int, int],
) -> None:
    """Refuse a georeferenced label that does not cover the same ground as its image.

    Only checked when both files are georeferenced (a plain PNG label is on the image's
    pixel grid by definition); CRSs are compared when both have one, transforms always.
    """
    (lab_crs, lab_t), (img_crs, img_t) = label_georef, image_georef
    if not (is_georeferenced(lab_crs, lab_t) and is_georeferenced(img_crs, img_t)):
        return
    if lab_crs is not None and img_crs is not None and lab_crs != img_crs:
        raise InputError(
            f"{label_path}: label CRS {_crs_name(lab_crs)} differs from the CRS "
            f"{_crs_name(img_crs)} of its image {image_path}"
        )
    try:
        to_image_px = ~img_t * lab_t
    except TransformNotInvertibleError:
        raise InputError(f"{image_path}: geotransform cannot be inverted") from None
    w, h = size
    worst = 0.0
    for x, y in ((0, 0), (w, 0), (0, h), (w, h)):
        px, py = to_image_px * (x, y)
        worst = max(worst, abs(px - x), abs(py - y))
    if worst > ALIGN_TOLERANCE_PX:
        raise InputError(
            f"{label_path}: label is not aligned with its image {image_path} "
            f"(geotransforms differ by up to {worst:.4g} pixels: label origin "
            f"({lab_t.c:.6g}, {lab_t.f:.6g}), image origin ({img_t.c:.6g}, {img_t.f:.6g}))"
        )


def _crs_name(crs: CRS) -> str:
    try:
        return crs.to_string()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - any CRS GDAL cannot name
        return str(crs)


def read_georef(path: Path) -> Georef:
    """CRS and transform of a raster (header only)."""
    try:
        with _open_quiet(path) as ds:
            return ds.crs, ds.transform
    except RasterioIOError as exc:
        raise InputError(f"{path}: not a raster GDAL can read ({first_line(exc)})") from None


class LabelReader:
    """Reads (remapped) label rows from a single-band mask; checks it against its image.

    With ``image_path`` the label must match the image's size and, when both are
    georeferenced, its CRS and geotransform (``image_georef`` saves re-opening the image).
    """

    def __init__(
        self,
        path: Path,
        *,
        reduce_zero_label: bool,
        ignore_index: int,
        expect_size: tuple[int, int] | None = None,
        image_path: Path | None = None,
        image_georef: Georef | None = None,
        class_map: Sequence[int] | None = None,
    ) -> None:
        self.path = path
        self.reduce_zero_label, self.ignore_index = reduce_zero_label, ignore_index
        self.class_map = None if class_map is None else np.asarray(class_map, np.int32)
        try:
            self.ds = _open_quiet(path)
        except RasterioIOError as exc:
            msg = f"{path}: not a label image GDAL can read ({first_line(exc)})"
            raise InputError(msg) from None
        try:
            if self.ds.count != 1:
                raise InputError(
                    f"{path}: label has {self.ds.count} bands; labels must be single-band class "
                    "indices (convert colour-coded masks first)"
                )
            if np.dtype(self.ds.dtypes[0]).kind not in "ui":
                raise InputError(f"{path}: label data type {self.ds.dtypes[0]} is not integer")
            if expect_size is not None and (self.ds.width, self.ds.height) != expect_size:
                w, h = expect_size
                raise InputError(
                    f"{path}: label is {self.ds.width}x{self.ds.height} but image "
                    f"{image_path} is {w}x{h}"
                )
            if image_path is not None:
                if image_georef is None:
                    image_georef = read_georef(image_path)
                check_label_alignment(
                    path,
                    (self.ds.crs, self.ds.transform),
                    image_path,
                    image_georef,
                    (self.ds.width, self.ds.height),
                )
        except BaseException:
            self.ds.close()
            raise

    @property
    def width(self) -> int:
        return self.ds.width

    @property
    def height(self) -> int:
        return self.ds.height

    def read(self, y0: int = 0, height: int | None = None, x0: int = 0, width: int | None = None):
        """Remapped class indices (int32) of a window (default: the whole label)."""
        height = self.ds.height - y0 if height is None else height
        width = self.ds.width - x0 if width is None else width
        try:
            raw = self.ds.read(1, window=Window(x0, y0, width, height))
        except RasterioIOError as exc:
            msg = f"{self.path}: read failed near row {y0} ({first_line(exc)})"
            raise InputError(msg) from None
        out = remap_labels(raw, self.reduce_zero_label, self.ignore_index)
        if self.class_map is not None:
            known = (out >= 0) & (out < len(self.class_map)) & (out != self.ignore_index)
            out[known] = self.class_map[out[known]]
        return out

    def close(self) -> None:
        self.ds.close()

    def __enter__(self) -> LabelReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- discovery


def _files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".")
    )


def _subdir(folder: Path, *names: str) -> Path | None:
    """The child of ``folder`` whose name matches one of ``names`` (case-insensitive)."""
    if not folder.is_dir():
        return None
    wanted = [n.lower() for n in names]
    children = {p.name.lower(): p for p in folder.iterdir() if p.is_dir()}
    for n in wanted:
        if n in children:
            return children[n]
    return None


def pair_files(
    image_dirs: Sequence[Path],
    label_dirs: Sequence[Path],
    label_suffixes: Sequence[str] = ("",),
) -> tuple[list[Sample], list[Path]]:
    """Match images to labels by stem (+ a layout's label suffix); folder i pairs with folder i.

    One-line errors for an image without a label and for two files with the same stem.
    """
    if len(image_dirs) != len(label_dirs):
        raise ValueError("image and label folders must pair up")
    samples: list[Sample] = []
    unpaired: list[Path] = []
    for img_dir, lab_dir in zip(image_dirs, label_dirs, strict=True):
        labels: dict[str, Path] = {}
        for p in _files(lab_dir, LABEL_SUFFIXES):
            key = p.stem.lower()
            if key in labels:
                raise InputError(f"{p}: two label files with the same name ({labels[key].name})")
            labels[key] = p
        label_set = set(labels.values())
        seen: dict[str, Path] = {}
        missing: list[Path] = []
        for img in _files(img_dir, IMAGE_SUFFIXES):
            if img in label_set:  # images and labels in one folder: never pair a label with itself
                continue
            key = img.stem.lower()
            if key in seen:
                raise InputError(f"{img}: two images with the same name ({seen[key].name})")
            seen[key] = img
            label = next(
                (labels[k] for s in label_suffixes if (k := (img.stem + s).lower()) in labels),
                None,
            )
            if label is None:
                missing.append(img)
            else:
                samples.append(Sample(img, label))
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise InputError(f"{missing[0]}: no label with the same name in {lab_dir}{more}")
        unpaired += sorted(label_set - {s.label for s in samples})
    return samples, unpaired


def _generic_dirs(root: Path, split: str | None) -> tuple[list[Path], list[Path], str | None]:
    """``images/`` + ``labels/`` (also ``masks/``, ``gt/``), at the root or under the split."""
    label_names = ("labels", "label", "masks", "mask", "gt", "annotations")
    image_names = ("images", "image", "imgs", "img")
    candidates = []
    if split:
        candidates += [(root / split, None), (root, split)]
    candidates.append((root, None))
    for base, sub in candidates:
        img, lab = _subdir(base, *image_names), _subdir(base, *label_names)
        if img is not None and lab is not None:
            if sub is not None:
                img, lab = _subdir(img, sub), _subdir(lab, sub)
                if img is None or lab is None:
                    continue
            return [img], [lab], split
    where = f"{root}/{split}" if split else str(root)
    raise InputError(f"{where}: expected an images/ and a labels/ folder (generic layout)")


def _and_list(names: Sequence[str]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _ambiguous(root: Path, layouts: Sequence[Layout], why: str) -> UsageError:
    names = [layout.name for layout in layouts]
    noun = "layout" if len(names) == 1 else "layouts"
    return UsageError(f"{root}: {why} matches {noun} {_and_list(names)}; pass --layout NAME")


def benchmark_layouts() -> list[Layout]:
    """The layouts that carry a benchmark class list (selected by folder name in auto mode)."""
    return [layout for layout in LAYOUTS.values() if layout.names]


def detect_layout(root: Path) -> Layout:
    """Pick the layout from the folder tree *and* the folder's own name; refuse guesses.

    A benchmark layout is chosen only when ``root``'s name is one of its folder names
    (exactly, any case) and its tree is present, or when ``root`` holds that benchmark's
    folders only; a tree alone selects only the layouts without a class list (``mmseg``,
    ``generic``). Two candidates are a one-line refusal.
    """
    fitting = [layout for layout in benchmark_layouts() if layout.fits(root)]
    named = [layout for layout in fitting if layout.matches_name(root.resolve())]
    if len(named) == 1:
        return named[0]
    if named:
        raise _ambiguous(root, named, f"the folder name {root.resolve().name!r} and its tree")
    if LAYOUTS["mmseg"].fits(root):
        return LAYOUTS["mmseg"]
    if _generic_fits(root):
        return LAYOUTS["generic"]
    if fitting:
        trees = sorted(
            {
                t.describe().replace("{split}", split)
                for layout in fitting
                for t in layout.trees
                for split in t.available_splits(root)
            }
        )
        raise _ambiguous(
            root,
            fitting,
            f"the folder name {root.resolve().name!r} is no benchmark's; its tree "
            f"({', '.join(trees)})",
        )
    held = {
        (child.name, layout.name)
        for child in root.iterdir()
        for layout in benchmark_layouts()
        if child.is_dir() and layout.matches_name(child) and layout.fits(child)
    }
    if len({name for _, name in held}) == 1:  # e.g. DLRSD/ + DLRSD_split/ only: entered later
        return LAYOUTS[held.pop()[1]]
    if held:
        folders = sorted({child for child, _ in held})
        raise UsageError(
            f"{root}: holds the benchmark folders {_and_list(folders)}; pass --data {root}/NAME"
        )
    same_name = [layout for layout in benchmark_layouts() if layout.matches_name(root.resolve())]
    if same_name:
        raise InputError(
            f"{root}: named like layout {_and_list([x.name for x in same_name])} but holds "
            f"none of its trees ({' or '.join(x.describe_trees() for x in same_name)})"
        )
    return LAYOUTS["generic"]


def _generic_fits(root: Path) -> bool:
    try:
        _generic_dirs(root, None)
    except InputError:
        return False
    return True


def _layout_dirs(
    root: Path, layout: Layout, split: str | None
) -> tuple[Path, list[Path], list[Path], str | None, str]:
    """``(root, image dirs, label dirs, split, tree)`` of ``layout``; one-line error if absent.

    A data folder that holds the benchmark's folder (RSKT-Seg's ``datasets/``) is entered.
    """
    if not layout.trees:
        images, labels, used = _generic_dirs(root, split)
        return root, images, labels, used, "images/ + labels/"
    for base in (root, *_named_children(root, layout)):
        for tree in layout.trees:
            chosen = split.casefold() if split is not None else tree.pick_split(base)
            found = tree.dirs(base, chosen) if chosen is not None else None
            if found is not None:
                images, labels = found
                return base, images, labels, chosen, tree.describe().replace("{split}", chosen)
    splits = sorted({s for t in layout.trees for s in t.available_splits(root)})
    if split is not None and splits:
        raise InputError(
            f"{root}: no split {split!r} for layout {layout.name} "
            f"(found: {', '.join(splits)}); pass --split"
        )
    if splits:  # several splits and none preferred
        raise InputError(
            f"{root}: several splits for layout {layout.name} ({', '.join(splits)}); pass --split"
        )
    where = f" (split {split!r})" if split is not None else ""
    raise InputError(f"{root}: no {layout.name} tree{where}: expected {layout.describe_trees()}")


def _named_children(root: Path, layout: Layout) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and layout.matches_name(p))


def load_dataset(
    root: Path,
    layout: str = "auto",
    split: str | None = None,
    *,
    reduce_zero_label: bool | None = None,
    ignore_index: int = 255,
    limit: int | None = None,
) -> Dataset:
    """Find the image/label pairs of ``split`` under ``root``; one-line errors name the problem."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: data folder not found")
    if not root.is_dir():
        raise InputError(f"{root}: --data must be a folder")
    if layout == "auto":
        chosen = detect_layout(root)
    elif layout in LAYOUTS:
        chosen = LAYOUTS[layout]
    else:
        raise UsageError(f"--layout: unknown layout {layout!r} (auto, {', '.join(LAYOUTS)})")
    base, image_dirs, label_dirs, used_split, tree = _layout_dirs(root, chosen, split)
    samples, unpaired = pair_files(image_dirs, label_dirs, chosen.label_suffixes)
    if not samples:
        raise InputError(f"{image_dirs[0]}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    if unpaired:
        log.warning("%s: %d label file(s) without an image", label_dirs[0], len(unpaired))
    if limit is not None:
        samples = samples[:limit]
    return Dataset(
        root=base,
        layout=chosen,
        split=used_split,
        samples=samples,
        reduce_zero_label=(
            chosen.reduce_zero_label if reduce_zero_label is None else reduce_zero_label
        ),
        ignore_index=ignore_index,
        image_dir=image_dirs[0] if len(image_dirs) == 1 else image_dirs[0].parent.parent,
        label_dir=label_dirs[0] if len(label_dirs) == 1 else label_dirs[0].parent.parent,
        unpaired_labels=unpaired,
        tree=tree,
        detected=layout == "auto",
    )


def iter_layouts() -> Iterator[Layout]:
    yield from LAYOUTS.values()
