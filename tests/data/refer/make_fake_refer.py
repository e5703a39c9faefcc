"""Write tiny fake copies of RRSIS-D, RefSegRS and RISBench in the layouts their authors release.

Layouts (docs/REFER.md, ``drseg_cli/evaluate/refer_layouts.py``): RRSIS-D as RMSIN ships it
(github.com/Lsan2401/RMSIN@dff69a68 README; ``refer/refer.py``@6598ff10): ``rrsisd/refs(unc).p``
(a pickled list of refs), ``rrsisd/instances.json`` (COCO), ``images/rrsisd/JPEGImages/``.
RefSegRS (github.com/zhu-xlab/rrsis, HF JessicaYuan/RefSegRS) and RISBench (HIT-SIRS/CroBIM)
as RSRefSeg 2's converters read them (KyanChen/RSRefSeg2@7cda8cda,
``tools_RSRefSeg2/data_tools/*-convert_data_to_jsonl.py``): ``output_phrase_{split}.txt`` with
``images/ID.tif`` + ``masks/ID.tif``, resp. ``img_rgb/NAME`` + ``mask/NAME``.

Images are 12 × 16 noise; the targets are rectangles whose pixels are listed in ``TARGETS``
so tests can compute IoUs by hand. About 10 KB per dataset. Used by tests/test_refer_layouts.py;
also runnable to get trees to try ``drseg evaluate --task refer`` on:

    python tests/data/refer/make_fake_refer.py /tmp/refer
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run by hand as a script: the repo root, for tests.data.…
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from tests.data.evaluate.make_fake_benchmarks import write_plain  # noqa: E402

H, W = 12, 16

#: name → (rows, cols) slices of each rectangle of a target (OR-ed)
TARGETS: dict[str, list[tuple[slice, slice]]] = {
    # RRSIS-D: two polygons (16 + 4 px), an RLE string (32 px), an uncompressed RLE (16 px)
    "rrsisd-tanks": [(slice(3, 7), slice(2, 6)), (slice(3, 5), slice(10, 12))],
    "rrsisd-road": [(slice(0, 2), slice(0, 16))],
    "rrsisd-field": [(slice(8, 12), slice(0, 4))],
    # the triangle (0, 7), (4.5, 7), (0, 11.5): pixel centres with x + y' < 4.5 (no ties)
    "rrsisd-triangle": [(slice(7 + k, 8 + k), slice(0, 4 - k)) for k in range(4)],
    # RefSegRS (16 px, 96 px)
    "refsegrs-10": [(slice(3, 7), slice(4, 8))],
    "refsegrs-11": [(slice(0, 12), slice(0, 8))],
    # RISBench (4 px, 35 px)
    "risbench-test_1_0": [(slice(3, 5), slice(6, 8))],
    "risbench-test_2_0": [(slice(2, 7), slice(2, 9))],
}


def target(name: str) -> np.ndarray:
    """The uint8 mask of a target of ``TARGETS``."""
    mask = np.zeros((H, W), np.uint8)
    for rows, cols in TARGETS[name]:
        mask[rows, cols] = 1
    return mask


def _noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (3, H, W)).astype(np.uint8)


def rle_runs(mask: np.ndarray) -> list[int]:
    """Column-major run lengths starting with zeros (COCO's uncompressed ``counts``)."""
    flat = np.asarray(mask, np.uint8).T.reshape(-1)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


def rle_string(runs: list[int]) -> str:
    """pycocotools' ``rleToString``: 5 bits a char from 48, continuation bit 0x20, counts
    after the second as differences to the one two before."""
    out = []
    for i, count in enumerate(runs):
        x = count - runs[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def _box(rows: slice, cols: slice) -> list[float]:
    """A rectangle as a COCO polygon (x, y corners in pixel units)."""
    x0, x1, y0, y1 = cols.start, cols.stop, rows.start, rows.stop
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def make_rrsisd(root: Path) -> Path:
    """RRSIS-D: refs 1 (two sentences) and 2 in test, 3 and 5 in train, 4 in val."""
    images = root / "images" / "rrsisd" / "JPEGImages"
    write_plain(images / "00001.jpg", _noise(1))
    write_plain(images / "00002.jpg", _noise(2))
    (root / "images" / "rrsisd" / "ann_split").mkdir(parents=True)
    road = target("rrsisd-road")
    anns = [
        {"id": 1, "image_id": 1, "categories_id": 15, "area": 20, "bbox": [2, 3, 10, 4],
         "segmentation": [_box(*r) for r in TARGETS["rrsisd-tanks"]]},
        {"id": 2, "image_id": 2, "categories_id": 6, "area": 32, "bbox": [0, 0, 16, 2],
         "segmentation": [{"size": [H, W], "counts": rle_string(rle_runs(road))}]},
        {"id": 3, "image_id": 1, "categories_id": 4, "area": 16, "bbox": [0, 8, 4, 4],
         "segmentation": {"size": [H, W], "counts": rle_runs(target("rrsisd-field"))}},
        {"id": 4, "image_id": 2, "categories_id": 6, "area": 10, "bbox": [0, 7, 4.5, 4.5],
         "segmentation": [[0, 7, 4.5, 7, 0, 11.5]]},
    ]  # fmt: skip
    instances = {
        "images": [
            {"id": i, "file_name": f"0000{i}.jpg", "height": H, "width": W} for i in (1, 2)
        ],
        "annotations": anns,
        "categories": [{"id": 4, "name": "baseballfield"}, {"id": 6, "name": "bridge"},
                       {"id": 15, "name": "storagetank"}],
    }  # fmt: skip

    def ref(ref_id: int, ann_id: int, image_id: int, split: str, *sents: str) -> dict:
        sentences = [
            {"tokens": s.split(), "raw": s.capitalize(), "sent_id": 10 * ref_id + k, "sent": s}
            for k, s in enumerate(sents)
        ]
        return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split,
                "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences],
                "category_id": anns[ann_id - 1]["categories_id"],
                "file_name": f"0000{image_id}.jpg"}  # fmt: skip

    refs = [
        ref(1, 1, 1, "test", "the storage tanks on the left", "two storage tanks"),
        ref(2, 2, 2, "test", "the road at the top"),
        ref(3, 3, 1, "train", "the field at the bottom left"),
        ref(5, 4, 2, "train", "the triangle"),
        ref(4, 2, 2, "val", "the road"),
    ]
    ann_dir = root / "rrsisd"
    ann_dir.mkdir(parents=True)
    (ann_dir / "instances.json").write_text(json.dumps(instances), "utf-8")
    with open(ann_dir / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    return root


def _phrases(root: Path, layout: str, image_dir: str, mask_dir: str, suffix: str,
             lines: dict[str, list[tuple[str, str]]]) -> Path:  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    for split, items in lines.items():
        text = "".join(f"{name} {sent}\n" for name, sent in items)
        (root / f"output_phrase_{split}.txt").write_text(text, "utf-8")
        for name, _ in items:
            seed = sum(map(ord, name))
            write_plain(root / image_dir / f"{name}{suffix}", _noise(seed))
            mask = target(f"{layout}-{Path(name).stem}") * np.uint8(255)  # 0/255 masks
            write_plain(root / mask_dir / f"{name}{suffix}", mask)
    return root


def make_refsegrs(root: Path) -> Path:
    """RefSegRS: ``images/ID.tif``, ``masks/ID.tif``; two test lines, one train, one val."""
    test = [("10", "the vehicle in the middle"), ("11", "the building along the road")]
    lines = {"test": test, "train": test[:1], "val": test[1:]}
    return _phrases(root, "refsegrs", "images", "masks", ".tif", lines)


def make_risbench(root: Path) -> Path:
    """RISBench: ``img_rgb/NAME``, ``mask/NAME`` (the name carries ``.png``)."""
    test = [("test_1_0.png", "the small vehicle at the top right"), ("test_2_0.png", "the ship")]
    lines = {"test": test, "train": test[:1], "val": test[1:]}
    return _phrases(root, "risbench", "img_rgb", "mask", "", lines)


MAKERS = {"rrsisd": make_rrsisd, "refsegrs": make_refsegrs, "risbench": make_risbench}


def make_all(root: Path) -> Path:
    """The three datasets under ``root/RRSIS-D``, ``root/RefSegRS``, ``root/RISBench``."""
    make_rrsisd(root / "RRSIS-D")
    make_refsegrs(root / "RefSegRS")
    make_risbench(root / "RISBench")
    return root


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_fake_refer.py OUTPUT_FOLDER")
    print(make_all(Path(sys.argv[1])))
