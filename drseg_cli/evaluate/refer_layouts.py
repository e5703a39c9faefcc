"""Referring datasets in the layouts their authors released: ``rrsisd``, ``refsegrs``, ``risbench``.

The RSRefSeg 2 jsonl files (layout ``rsrefseg2``, ``evaluate/refer.py``) are conversions of
these; reading the downloads as they are saves that step. Where each layout comes from:

- ``rrsisd``, RRSIS-D as released with RMSIN (github.com/Lsan2401/RMSIN, README.md at
  ``dff69a68``; loader ``refer/refer.py`` at ``6598ff10``, LAVT's ``REFER`` class)::

      DATA/rrsisd/refs(unc).p          pickled list of refs: ref_id, ann_id, image_id, split,
                                       sentences=[{raw, sent, tokens, sent_id}], category_id,
                                       file_name
      DATA/rrsisd/instances.json       COCO: images (id, file_name, height, width),
                                       annotations (id, image_id, segmentation, bbox)
      DATA/images/rrsisd/JPEGImages/   the images

  One sample per sentence (its ``sent``, the text RSRefSeg 2's converter
  ``tools_RSRefSeg2/data_tools/rrsisd-convert_data_to_jsonl.py`` at ``7cda8cda`` keeps); the
  target is the ref's annotation: COCO RLE (RRSIS-D's, a list of compressed RLEs) or polygons,
  rasterised at pixel centres. ``--split train|val|test`` selects refs as ``REFER.getRefIds``
  does (``test`` takes every split name containing "test"). ``DATA`` may also be the
  ``rrsisd`` annotation folder itself.
- ``refsegrs``, RefSegRS as its authors publish it (github.com/zhu-xlab/rrsis README at
  ``6f619912``: huggingface.co/datasets/JessicaYuan/RefSegRS; file names as RSRefSeg 2's
  ``refsegrs-convert_data_to_jsonl.py`` at ``7cda8cda`` reads them)::

      DATA/output_phrase_{train,val,test}.txt   lines "<image id> <expression words...>"
      DATA/images/<id>.tif, DATA/masks/<id>.tif

- ``risbench``, RISBench as released with CroBIM (github.com/HIT-SIRS/CroBIM README at
  ``e066542e`` links the download; file names as RSRefSeg 2's
  ``risbench-convert_data_to_jsonl.py`` at ``7cda8cda`` reads them)::

      DATA/output_phrase_{train,val,test}.txt   lines "<file name> <expression words...>"
                                                (the name carries its extension: test_11_7.png)
      DATA/img_rgb/<file name>, DATA/mask/<file name>

  Masks of both: band 1, non-zero = target (the converters' ``mask_utils.encode`` of the
  grey image). ``--split`` is a split name or the path of a phrase file.

Images and mask files are checked at load time, so a missing one is reported before any model
time, by name.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

from drseg_cli.errors import InputError, UsageError
from drseg_cli.evaluate.refer import ReferSample

REFS_NAME = "refs(unc).p"
RRSISD_IMAGES = Path("images/rrsisd/JPEGImages")
#: phrase-file layouts: image folder, mask folder, suffix added to the id of a line
PHRASE_LAYOUTS: dict[str, tuple[str, str, str]] = {
    "refsegrs": ("images", "masks", ".tif"),
    "risbench": ("img_rgb", "mask", ""),
}
EXPECTED = {
    "rsrefseg2": "*_{split}.jsonl",
    "rrsisd": "rrsisd/refs(unc).p + rrsisd/instances.json + images/rrsisd/JPEGImages/",
    "refsegrs": "images/ + masks/ + output_phrase_{split}.txt",
    "risbench": "img_rgb/ + mask/ + output_phrase_{split}.txt",
}


# ----------------------------------------------------------------------------- detection


def _rrsisd_dir(root: Path) -> Path | None:
    """The folder holding ``refs(*).p`` (``root/rrsisd`` or ``root`` itself), if any."""
    for folder in (root / "rrsisd", root):
        if folder.is_dir() and any(folder.glob("refs(*).p")):
            return folder
    return None


def _has_phrases(root: Path, layout: str) -> bool:
    images, masks, _ = PHRASE_LAYOUTS[layout]
    return (
        (root / images).is_dir()
        and (root / masks).is_dir()
        and any(root.glob("output_phrase_*.txt"))
    )


_FITS: dict[str, Callable[[Path], bool]] = {
    "rsrefseg2": lambda root: any(root.glob("*_*.jsonl")) or any(root.glob("*/*_*.jsonl")),
    "rrsisd": lambda root: _rrsisd_dir(root) is not None,
    "refsegrs": lambda root: _has_phrases(root, "refsegrs"),
    "risbench": lambda root: _has_phrases(root, "risbench"),
}


def detect_refer_layout(root: Path, split: str) -> str:
    """The one referring layout whose files are in ``root``; a jsonl ``--split`` path means
    ``rsrefseg2``. None, or several: a one-line error (pass ``--layout``)."""
    if split.endswith(".jsonl"):
        return "rsrefseg2"
    found = [name for name, fits in _FITS.items() if fits(root)]
    if len(found) == 1:
        return found[0]
    if not found:
        expected = "; ".join(f"{k}: {v.format(split=split)}" for k, v in EXPECTED.items())
        raise InputError(f"{root}: no referring dataset found (expected {expected})")
    raise UsageError(
        f"{root}: holds the files of referring layouts {', '.join(found)}; pass --layout NAME"
    )


# ----------------------------------------------------------------------------- readers


#: the globals a refs pickle may name: numpy scalars/arrays (ids saved as numpy integers) and
#: what protocol 2 uses for bytes; nothing that runs code
_ALLOWED = {
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
}


class _PlainUnpickler(pickle.Unpickler):
    """Builtin containers and scalars (and numpy ones) only: a refs file needs nothing else,
    and nothing else runs code while loading."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refuses to load {module}.{name}")
        if module == "numpy.core.multiarray":  # numpy 1 pickles under numpy 2: no warning
            import numpy as np

            if hasattr(np, "_core"):
                module = "numpy._core.multiarray"
        return super().find_class(module, name)


def _read_refs(path: Path) -> list[dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            refs = _PlainUnpickler(f, encoding="latin1").load()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    except Exception as exc:  # noqa: BLE001 - a broken pickle raises many types
        raise InputError(f"{path}: not a refs pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise InputError(f"{path}: not a refs pickle (expected a list of ref dicts)")
    return refs


def _read_instances(path: Path) -> tuple[dict[Any, dict], dict[Any, dict]]:
    """``instances.json`` → (images by id, annotations by id)."""
    if not path.is_file():
        raise InputError(f"{path}: not found (the RRSIS-D COCO annotations)")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        images = {im["id"]: im for im in doc["images"]}
        anns = {a["id"]: a for a in doc["annotations"]}
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    except (KeyError, TypeError) as exc:
        raise InputError(f"{path}: not COCO instances (missing {exc})") from None
    return images, anns


def _refs_file(folder: Path) -> Path:
    if (folder / REFS_NAME).is_file():
        return folder / REFS_NAME
    found = sorted(folder.glob("refs(*).p"))
    if len(found) == 1:
        return found[0]
    names = ", ".join(p.name for p in found)
    raise InputError(f"{folder}: several refs files ({names}) and no {REFS_NAME}")


def _in_split(name: Any, split: str) -> bool:
    name = str(name)
    return split in name if split == "test" else name == split


def _check_file(path: Path, what: str, where: str, seen: set[Path]) -> None:
    if path not in seen:
        if not path.is_file():
            raise InputError(f"{path}: {what} not found ({where})")
        seen.add(path)


def load_rrsisd(root: Path, split: str, limit: int | None) -> tuple[Path, list[ReferSample]]:
    """RRSIS-D as released (module docstring): one sample per sentence of each ref in split."""
    folder = _rrsisd_dir(root)
    if folder is None:
        raise InputError(f"{root}: no {EXPECTED['rrsisd']}")
    refs_path = _refs_file(folder)
    inst_path = folder / "instances.json"
    image_dirs = [root / RRSISD_IMAGES, folder.parent / RRSISD_IMAGES]
    image_dir = next((d for d in image_dirs if d.is_dir()), None)
    if image_dir is None:
        raise InputError(f"{root}: no {RRSISD_IMAGES}/ image folder")
    refs = _read_refs(refs_path)
    images, anns = _read_instances(inst_path)
    samples: list[ReferSample] = []
    seen: set[Path] = set()
    splits: set[str] = set()
    for i, ref in enumerate(refs):
        splits.add(str(ref.get("split")))
        if not _in_split(ref.get("split"), split):
            continue
        try:
            ref_id, ann_id, image_id = ref["ref_id"], ref["ann_id"], ref["image_id"]
            sentences = [s.get("sent") or s.get("raw") for s in ref["sentences"]]
        except (KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{refs_path}: ref {i} is not a referring ref ({exc})") from None
        where = f"ref {ref_id} of {refs_path.name}"
        ann = anns.get(ann_id)
        if ann is None or "segmentation" not in ann:
            raise InputError(f"{inst_path}: no annotation {ann_id} with a segmentation ({where})")
        record = images.get(image_id, {})
        name = record.get("file_name") or ref.get("file_name")
        if not name:
            raise InputError(f"{inst_path}: no image {image_id} ({where})")
        image = image_dir / name
        _check_file(image, "image", where, seen)
        h, w = record.get("height"), record.get("width")
        size = (int(h), int(w)) if h and w else None  # polygons need it; RLEs carry theirs
        for sent in sentences:
            if not sent:
                raise InputError(f"{refs_path}: ref {ref_id} has a sentence without text")
            samples.append(
                ReferSample(image, str(sent), ann["segmentation"], f"annotation {ann_id}, {where}",
                            size=size, source=inst_path)
            )  # fmt: skip
            if limit and len(samples) >= limit:
                return refs_path, samples
    if not samples:
        raise InputError(
            f"{refs_path}: no refs in split {split!r} (splits: {', '.join(sorted(splits))})"
        )
    return refs_path, samples


def _phrase_file(root: Path, split: str) -> Path:
    p = Path(split)
    for cand in (p, root / p):
        if cand.suffix == ".txt" and cand.is_file():
            return cand
    path = root / f"output_phrase_{split}.txt"
    if not path.is_file():
        have = sorted(x.name for x in root.glob("output_phrase_*.txt"))
        raise InputError(f"{path}: not found (phrase files here: {', '.join(have) or 'none'})")
    return path


def load_phrases(
    root: Path, split: str, limit: int | None, layout: str
) -> tuple[Path, list[ReferSample]]:
    """RefSegRS / RISBench as released (module docstring): one sample per phrase-file line."""
    image_dir, mask_dir, suffix = PHRASE_LAYOUTS[layout]
    for folder in (image_dir, mask_dir):
        if not (root / folder).is_dir():
            expected = EXPECTED[layout].format(split=split)
            raise InputError(f"{root}: no {folder}/ folder (layout {layout}: {expected})")
    phrases = _phrase_file(root, split)
    samples: list[ReferSample] = []
    seen: set[Path] = set()
    try:
        lines = phrases.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{phrases}: not UTF-8 text ({exc.reason})") from None
    for n, line in enumerate(lines, start=1):
        name, _, sent = line.strip().partition(" ")
        if not name:
            continue
        if not sent.strip():
            raise InputError(f"{phrases}: line {n} is not '<image> <expression>'")
        where = f"line {n} of {phrases.name}"
        image = root / image_dir / f"{name}{suffix}"
        mask = root / mask_dir / f"{name}{suffix}"
        _check_file(image, "image", where, seen)
        _check_file(mask, "mask", where, seen)
        samples.append(ReferSample(image, sent.strip(), None, where, mask_file=mask))
        if limit and len(samples) >= limit:
            break
    if not samples:
        raise InputError(f"{phrases}: no samples")
    return phrases, samples


LOADERS: dict[str, Callable[[Path, str, int | None], tuple[Path, list[ReferSample]]]] = {
    "rrsisd": load_rrsisd,
    "refsegrs": lambda root, split, limit: load_phrases(root, split, limit, "refsegrs"),
    "risbench": lambda root, split, limit: load_phrases(root, split, limit, "risbench"),
}
