"""Image/label datasets on disk: the eight OV remote-sensing benchmark layouts plus a generic one.

The benchmark trees are the ones the public open-vocabulary RS benchmark releases use:

- mmseg-style ``img_dir/{split}`` + ``ann_dir/{split}`` (LoveDA, Potsdam, Vaihingen, iSAID,
  UAVid), as written by the SegEarth-OV converters and read by its configs
  (github.com/likyoo/SegEarth-OV: dataset_prepare.md, configs/cfg_*.py, custom_datasets.py);
- ``{split}/src`` + ``{split}/gt`` for UDD5 and VDD (same source);
- DLRSD as registered by OVRS (github.com/caoql98/OVRS, cat_seg/data/datasets/register_DLRSD.py):
  ``imgs/`` + ``D2masks/`` (contiguous ids 0..16), or ``DLRSD_split/{split}/{imgs,D2masks}``;
- LoveDA also in its native release tree ``{Train,Val}/{Urban,Rural}/{images_png,masks_png}``.

Label remapping (``reduce_zero_label``: 0 → ignore, v → v-1) follows the mmseg dataset classes
those configs use (LoveDA: 0 = no-data; Potsdam/Vaihingen: 0 = boundary/no-label after the mmseg
converters). Default class lists are SegEarth-OV's ``configs/cls_*.txt`` (synonyms after the
name) and OVRS's DLRSD category list. docs/EVALUATE.md has the table.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from drseg_cli.classes import ClassSpec, validate_classes
from drseg_cli.errors import InputError, UsageError

log = logging.getLogger(__name__)

# Benchmark images and labels are plain PNG/JPEG: rasterio warns about every one of them, and
# ``warnings.catch_warnings`` is not thread-safe (labels are read from reader threads).
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module="rasterio")

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".jp2", ".img", ".vrt")
LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".gif", ".img", ".vrt")
#: Label-name decorations accepted by the generic layout (``tile_7_mask.png`` for ``tile_7.tif``).
GENERIC_LABEL_SUFFIXES = ("", "_label", "_labels", "_mask", "_gt", "_seg")


@dataclass(frozen=True)
class Layout:
    """How one benchmark lays out images and labels, and how its label values are read."""

    name: str
    title: str
    tree: str  # mmseg | srcgt | generic | dlrsd | loveda
    default_split: str | None
    reduce_zero_label: bool = False
    label_suffixes: tuple[str, ...] = ("",)  # appended to the image stem to find its label
    classes: tuple[str, ...] = ()  # default class lines (``name: synonym, synonym``)
    aliases: tuple[str, ...] = ()  # folder-name fragments that select this layout in auto mode
    source: str = ""

    def class_specs(self) -> list[ClassSpec]:
        """The benchmark's default classes (empty for the generic layouts)."""
        specs = []
        for line in self.classes:
            name, _, rest = line.partition(":")
            syn = tuple(s.strip() for s in rest.split(",") if s.strip())
            specs.append(ClassSpec(name.strip(), syn))
        return validate_classes(specs, f"layout {self.name}")


_SEGEARTH = "github.com/likyoo/SegEarth-OV (configs/cfg_{}.py, configs/cls_{}.txt)"

LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(
            "generic",
            "images/ + labels/ matched by file stem",
            "generic",
            None,
            label_suffixes=GENERIC_LABEL_SUFFIXES,
        ),
        Layout("mmseg", "img_dir/{split} + ann_dir/{split}", "mmseg", "val"),
        Layout(
            "dlrsd",
            "DLRSD (UC Merced dense labels), OVRS layout",
            "dlrsd",
            None,
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
            aliases=("dlrsd",),
            source="github.com/caoql98/OVRS (cat_seg/data/datasets/register_DLRSD.py)",
        ),
        Layout(
            "isaid",
            "iSAID (mmseg converter patches)",
            "mmseg",
            "val",
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
            aliases=("isaid",),
            source=_SEGEARTH.format("iSAID", "iSAID"),
        ),
        Layout(
            "loveda",
            "LoveDA (0 = no-data → ignore; 1..7 → 0..6)",
            "loveda",
            "val",
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
            aliases=("loveda",),
            source=_SEGEARTH.format("loveda", "loveda"),
        ),
        Layout(
            "potsdam",
            "ISPRS Potsdam (0 = boundary → ignore; 1..6 → 0..5)",
            "mmseg",
            "val",
            reduce_zero_label=True,
            classes=(
                "road: parking lot",
                "building",
                "low vegetation",
                "tree",
                "car",
                "clutter: background",
            ),
            aliases=("potsdam",),
            source=_SEGEARTH.format("potsdam", "potsdam"),
        ),
        Layout(
            "vaihingen",
            "ISPRS Vaihingen (0 = boundary → ignore; 1..6 → 0..5)",
            "mmseg",
            "val",
            reduce_zero_label=True,
            classes=(
                "impervious surface",
                "building",
                "low vegetation",
                "tree",
                "car",
                "clutter",
            ),
            aliases=("vaihingen",),
            source=_SEGEARTH.format("vaihingen", "vaihingen"),
        ),
        Layout(
            "uavid",
            "UAVid (moving car merged into static car by the converter)",
            "mmseg",
            "test",
            classes=("background", "building", "road", "car", "tree", "vegetation", "human"),
            aliases=("uavid",),
            source=_SEGEARTH.format("uavid", "uavid"),
        ),
        Layout(
            "udd5",
            "UDD5 ({split}/src + {split}/gt)",
            "srcgt",
            "val",
            classes=("vegetation", "building", "road", "vehicle", "background"),
            aliases=("udd",),
            source=_SEGEARTH.format("udd5", "udd5"),
        ),
        Layout(
            "vdd",
            "VDD ({split}/src + {split}/gt)",
            "srcgt",
            "test",
            classes=("background", "facade", "road", "vegetation", "vehicle", "roof", "water"),
            aliases=("vdd",),
            source=_SEGEARTH.format("vdd", "vdd"),
        ),
    )
}


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

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self) -> dict:
        return {
            "root": str(self.root),
            "layout": self.layout.name,
            "split": self.split,
            "images": len(self.samples),
            "image_dir": str(self.image_dir) if self.image_dir else None,
            "label_dir": str(self.label_dir) if self.label_dir else None,
            "reduce_zero_label": self.reduce_zero_label,
            "ignore_index": self.ignore_index,
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


class LabelReader:
    """Reads (remapped) label rows from a single-band mask; checks it against the image size."""

    def __init__(
        self,
        path: Path,
        *,
        reduce_zero_label: bool,
        ignore_index: int,
        expect_size: tuple[int, int] | None = None,
        image_path: Path | None = None,
    ) -> None:
        self.path = path
        self.reduce_zero_label, self.ignore_index = reduce_zero_label, ignore_index
        try:
            self.ds = _open_quiet(path)
        except RasterioIOError as exc:
            msg = f"{path}: not a label image GDAL can read ({_first_line(exc)})"
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
            msg = f"{self.path}: read failed near row {y0} ({_first_line(exc)})"
            raise InputError(msg) from None
        return remap_labels(raw, self.reduce_zero_label, self.ignore_index)

    def close(self) -> None:
        self.ds.close()

    def __enter__(self) -> LabelReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


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


def _split_dirs(
    root: Path, layout: Layout, split: str | None
) -> tuple[list[Path], list[Path], str | None]:
    """Image and label folders of ``split`` for a layout's tree; one-line error if absent."""
    tree = layout.tree
    if tree == "generic":
        return _generic_dirs(root, split)
    if tree == "dlrsd":
        return _dlrsd_dirs(root, split)
    if tree == "loveda" and _subdir(root, "img_dir") is None:
        return _loveda_native_dirs(root, split or layout.default_split or "val")
    if tree in ("mmseg", "loveda"):
        img_root, ann_root = _subdir(root, "img_dir"), _subdir(root, "ann_dir")
        if img_root is None or ann_root is None:
            raise InputError(f"{root}: {layout.name} layout needs img_dir/ and ann_dir/ folders")
        split = _pick_split(img_root, ann_root, split, layout, root)
        return [img_root / split], [ann_root / split], split
    if tree == "srcgt":
        split = split or layout.default_split or "val"
        base = _subdir(root, split)
        if base is None:
            splits = sorted(p.name for p in root.iterdir() if (p / "src").is_dir())
            raise InputError(
                f"{root}: no split {split!r} with src/ and gt/ folders "
                f"(found: {', '.join(splits) or 'none'}); pass --split"
            )
        src, gt = _subdir(base, "src"), _subdir(base, "gt")
        if src is None or gt is None:
            raise InputError(f"{base}: {layout.name} layout needs src/ and gt/ folders")
        return [src], [gt], split
    raise AssertionError(tree)


def _pick_split(img_root: Path, ann_root: Path, split: str | None, layout: Layout, root: Path):
    available = sorted(
        p.name for p in img_root.iterdir() if p.is_dir() and (ann_root / p.name).is_dir()
    )
    if split is not None:
        if split not in available:
            raise InputError(
                f"{root}: split {split!r} needs img_dir/{split} and ann_dir/{split} "
                f"(found: {', '.join(available) or 'none'})"
            )
        return split
    for candidate in (layout.default_split, "val", "test", "train"):
        if candidate in available:
            return candidate
    if len(available) == 1:
        return available[0]
    raise InputError(
        f"{root}: no labelled split in img_dir/ + ann_dir/ "
        f"(found: {', '.join(available) or 'none'})"
    )


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


def _dlrsd_dirs(root: Path, split: str | None) -> tuple[list[Path], list[Path], str | None]:
    if _subdir(root, "img_dir") is not None:
        mm = Layout("dlrsd", "", "mmseg", "val")
        return _split_dirs(root, mm, split)
    if split:
        base = _subdir(root, "DLRSD_split")
        base = _subdir(base, split) if base is not None else _subdir(root, split)
        if base is None:
            raise InputError(f"{root}: no DLRSD split {split!r} (DLRSD_split/{split}/imgs)")
    else:
        base = _subdir(root, "DLRSD") if _subdir(root, "imgs") is None else root
        base = base or root
    img, lab = _subdir(base, "imgs", "images"), _subdir(base, "D2masks", "masks", "labels")
    if img is None or lab is None:
        raise InputError(f"{base}: DLRSD layout needs imgs/ and D2masks/ folders")
    return [img], [lab], split


def _loveda_native_dirs(root: Path, split: str) -> tuple[list[Path], list[Path], str]:
    base = _subdir(root, split, split.capitalize())
    if base is None:
        raise InputError(f"{root}: no LoveDA split {split!r} (expected {split.capitalize()}/)")
    imgs, labs = [], []
    for domain in ("Urban", "Rural"):
        d = _subdir(base, domain)
        if d is None:
            continue
        i, m = _subdir(d, "images_png"), _subdir(d, "masks_png")
        if i is not None and m is not None:
            imgs.append(i)
            labs.append(m)
    if not imgs:
        raise InputError(f"{base}: LoveDA split needs Urban|Rural/images_png + masks_png folders")
    return imgs, labs, split


def detect_layout(root: Path) -> Layout:
    """Pick a layout from the folder tree, and a benchmark from the folder's own name.

    Auto mode: ``img_dir/`` + ``ann_dir/`` in a folder named like ``loveDA`` or ``Potsdam``
    selects that benchmark (and its label remapping); otherwise the plain layout of the tree.
    """
    names = root.resolve().name.lower()
    if _subdir(root, "img_dir") and _subdir(root, "ann_dir"):
        tree = {"mmseg", "loveda", "dlrsd"}
    elif _subdir(root, "imgs") or _subdir(root, "DLRSD_split") or _subdir(root, "DLRSD"):
        tree = {"dlrsd"}
    elif any(
        (d := _subdir(root, s)) is not None and _subdir(d, "Urban", "Rural") is not None
        for s in ("Train", "Val", "Test")
    ):
        tree = {"loveda"}
    elif any((p / "src").is_dir() and (p / "gt").is_dir() for p in root.iterdir() if p.is_dir()):
        tree = {"srcgt"}
    else:
        return LAYOUTS["generic"]
    for layout in LAYOUTS.values():
        if layout.tree in tree and any(a in names for a in layout.aliases):
            return layout
    if "mmseg" in tree:
        return LAYOUTS["mmseg"]
    if tree == {"dlrsd"}:
        return LAYOUTS["dlrsd"]
    if tree == {"loveda"}:
        return LAYOUTS["loveda"]
    raise UsageError(
        f"{root}: a {{split}}/src + {{split}}/gt tree (UDD5 or VDD); pass --layout udd5 or vdd"
    )


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
    image_dirs, label_dirs, used_split = _split_dirs(root, chosen, split)
    samples, unpaired = pair_files(image_dirs, label_dirs, chosen.label_suffixes)
    if not samples:
        raise InputError(f"{image_dirs[0]}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    if unpaired:
        log.warning("%s: %d label file(s) without an image", label_dirs[0], len(unpaired))
    if limit is not None:
        samples = samples[:limit]
    return Dataset(
        root=root,
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
    )


def iter_layouts() -> Iterator[Layout]:
    yield from LAYOUTS.values()
