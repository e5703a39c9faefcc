"""Write tiny fake copies of the eight OVRSISBench datasets in the layout of that download.

The folders, file types and label encodings follow RSKT-Seg's detectron2 registrations
(github.com/LiBingyu01/RSKT-Seg@29834f66, RSKT_Seg/data/datasets/register_*.py): single-band
index PNG labels, value i = class i, 255 ignored. Pixels are random; only the structure is
real. Used by tests/test_datasets.py; also runnable to get a tree to try ``drseg evaluate`` on:

    python tests/data/evaluate/make_fake_benchmarks.py /tmp/ovrsisbench
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning

#: name -> (image folder, label folder, image suffix, number of classes), relative to the root
OVRSISBENCH: dict[str, tuple[str, str, str, int]] = {
    "DLRSD": ("DLRSD/imgs", "DLRSD/D2masks", ".jpg", 17),
    "iSAID": ("iSAID/imgs", "iSAID/D2masks", ".png", 15),
    "Potsdam": ("Potsdam/imgs", "Potsdam/D2masks", ".png", 6),
    "Vaihingen": ("Vaihingen/imgs", "Vaihingen/D2masks", ".png", 6),
    "LoveDA": ("LoveDA/images_png", "LoveDA/masks_png", ".png", 8),
    "uavid": ("uavid/Images", "uavid/Labels", ".png", 8),
    "UDD5": ("UDD5/all/src", "UDD5/all/gt", ".JPG", 5),
    "VDD": ("VDD/src", "VDD/gt", ".JPG", 7),
}
#: the train/val copies registered beside DLRSD and iSAID
SPLIT_COPIES = {"DLRSD_split": ("DLRSD", ".jpg", 17), "iSAID_split": ("iSAID", ".png", 15)}

_DRIVERS = {".png": "PNG", ".jpg": "JPEG", ".tif": "GTiff"}


def write_plain(path: Path, data: np.ndarray) -> Path:
    """A non-georeferenced PNG/JPEG/TIFF, as the benchmark downloads ship them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = data[None] if data.ndim == 2 else data
    profile = dict(driver=_DRIVERS[path.suffix.lower()], count=data.shape[0], dtype=data.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", width=data.shape[2], height=data.shape[1], **profile) as ds:
            ds.write(data)
    return path


def write_pair(
    image: Path, label: Path, num_classes: int, size: tuple[int, int] = (6, 8), seed: int = 0
) -> None:
    """A random RGB image and an index label using every class value once or more, plus 255."""
    h, w = size
    rng = np.random.default_rng(seed)
    write_plain(image, rng.integers(0, 255, (3, h, w)).astype(np.uint8))
    values = np.resize(np.append(np.arange(num_classes), 255), h * w).astype(np.uint8)
    write_plain(label, values.reshape(h, w))


def make_ovrsisbench(root: Path, names: tuple[str, ...] = ("a", "b")) -> Path:
    """The eight sets (and the DLRSD/iSAID train/val copies) under ``root``; returns it."""
    size = (6, 8)  # 48 pixels: every class value of the largest list (17) and 255
    for i, (images, labels, suffix, k) in enumerate(OVRSISBENCH.values()):
        for j, n in enumerate(names):
            write_pair(root / images / f"{n}{suffix}", root / labels / f"{n}.png", k, size, i + j)
    for folder, (_, suffix, k) in SPLIT_COPIES.items():
        for split in ("train", "val"):
            write_pair(
                root / folder / split / "imgs" / f"{split}_x{suffix}",
                root / folder / split / "D2masks" / f"{split}_x.png",
                k,
                size,
            )
    return root


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_fake_benchmarks.py OUTPUT_FOLDER")
    print(make_ovrsisbench(Path(sys.argv[1])))
