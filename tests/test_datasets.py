"""Dataset layouts of the OV remote-sensing benchmarks, on fake miniature copies."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_origin

from drseg_cli.errors import InputError, UsageError
from drseg_cli.evaluate.datasets import LAYOUTS, LabelReader, load_dataset, remap_labels
from tests.data.evaluate.make_fake_benchmarks import OVRSISBENCH, make_ovrsisbench
from tests.helpers import write_geotiff

DRIVERS = {".png": "PNG", ".jpg": "JPEG", ".tif": "GTiff", ".bmp": "BMP"}


def _write(path: Path, data: np.ndarray) -> Path:
    """A plain (non-georeferenced) PNG/JPEG/TIFF/BMP, as the benchmark releases ship them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = data[None] if data.ndim == 2 else data
    profile = dict(driver=DRIVERS[path.suffix.lower()], count=data.shape[0], dtype=data.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", width=data.shape[2], height=data.shape[1], **profile) as ds:
            ds.write(data)
    return path


def _pair(img: Path, lab: Path, values=(0, 1, 2), size=(8, 12)) -> None:
    h, w = size
    rng = np.random.default_rng(len(str(img)))
    _write(img, rng.integers(0, 255, (3, h, w)).astype(np.uint8))
    label = np.resize(np.asarray(values, np.uint8), h * w).reshape(h, w)
    _write(lab, label)


# (layout, builder relative paths, expected split, remap sample (raw → class)) per benchmark
def _mmseg(root: Path, split: str, img_ext=".png", ann_suffix="", names=("a", "b")) -> None:
    for n in names:
        _pair(
            root / "img_dir" / split / f"{n}{img_ext}",
            root / "ann_dir" / split / f"{n}{ann_suffix}.png",
        )


BENCHMARKS = {
    # folder name, tree builder, default split, (raw label → class index) checks
    "loveda": ("loveDA", lambda r: _mmseg(r, "val"), "val", {0: 255, 1: 0, 7: 6}),
    "potsdam": ("potsdam", lambda r: _mmseg(r, "val"), "val", {0: 255, 1: 0, 6: 5}),
    "vaihingen": ("vaihingen", lambda r: _mmseg(r, "val"), "val", {0: 255, 3: 2}),
    "isaid": (
        "iSAID",
        lambda r: _mmseg(r, "val", ann_suffix="_instance_color_RGB"),
        "val",
        {0: 0, 15: 15},
    ),
    "uavid": ("UAVid", lambda r: _mmseg(r, "test"), "test", {0: 0, 6: 6}),
    "udd5": (
        "UDD5",
        lambda r: [_pair(r / "val/src" / f"{n}.JPG", r / "val/gt" / f"{n}.png") for n in "ab"],
        "val",
        {4: 4},
    ),
    "vdd": (
        "VDD",
        lambda r: [_pair(r / "test/src" / f"{n}.JPG", r / "test/gt" / f"{n}.png") for n in "ab"],
        "test",
        {6: 6},
    ),
    "dlrsd": (
        "DLRSD",
        lambda r: [_pair(r / "imgs" / f"{n}.jpg", r / "D2masks" / f"{n}.png") for n in "ab"],
        "all",
        {0: 0, 16: 16, 255: 255},
    ),
}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_layout_is_detected_and_paired(tmp_path, name):
    folder, build, split, remap = BENCHMARKS[name]
    root = tmp_path / "data" / folder
    build(root)
    for layout in ("auto", name):
        ds = load_dataset(root, layout)
        assert ds.layout.name == name and ds.split == split and len(ds) == 2
        assert [s.image.stem for s in ds.samples] == ["a", "b"]
        for s in ds.samples:
            assert s.label.stem.startswith(s.image.stem) and s.label.suffix == ".png"
    raw = np.array(list(remap), np.uint8)
    got = remap_labels(raw, ds.reduce_zero_label, ds.ignore_index)
    np.testing.assert_array_equal(got, list(remap.values()))
    assert ds.layout.class_specs()  # every benchmark carries its class list


def test_benchmark_class_lists_follow_the_public_releases():
    assert [c.name for c in LAYOUTS["loveda"].class_specs()][:2] == ["background", "building"]
    assert LAYOUTS["loveda"].class_specs()[1].synonyms == ("roof", "house")
    assert len(LAYOUTS["dlrsd"].class_specs()) == 17
    assert len(LAYOUTS["isaid"].class_specs()) == 16
    assert [len(LAYOUTS[n].class_specs()) for n in ("potsdam", "vaihingen", "uavid")] == [6, 6, 7]
    assert [len(LAYOUTS[n].class_specs()) for n in ("udd5", "vdd")] == [5, 7]


def test_label_reader_applies_reduce_zero_label(tmp_path):
    root = tmp_path / "LoveDA"
    _mmseg(root, "val", names=("x",))
    _write(root / "ann_dir/val/x.png", np.array([[0, 1, 2], [7, 255, 3]], np.uint8))
    _write(root / "img_dir/val/x.png", np.zeros((3, 2, 3), np.uint8))
    ds = load_dataset(root)
    with LabelReader(ds.samples[0].label, reduce_zero_label=True, ignore_index=255) as lr:
        np.testing.assert_array_equal(lr.read(), [[255, 0, 1], [6, 255, 2]])
        np.testing.assert_array_equal(lr.read(1, 1), [[6, 255, 2]])
    # the flag can be overridden for already-reduced copies
    assert not load_dataset(root, reduce_zero_label=False).reduce_zero_label


def test_loveda_native_release_tree(tmp_path):
    root = tmp_path / "LoveDA"
    for domain in ("Urban", "Rural"):
        for n in ("1", "2"):
            _pair(
                root / f"Val/{domain}/images_png/{domain}{n}.png",
                root / f"Val/{domain}/masks_png/{domain}{n}.png",
            )
    ds = load_dataset(root)
    assert ds.layout.name == "loveda" and ds.split == "val" and len(ds) == 4
    assert {s.image.parent.parent.name for s in ds.samples} == {"Urban", "Rural"}
    assert all(s.label.parent.name == "masks_png" for s in ds.samples)


def test_dlrsd_split_tree_and_mmseg_split_choice(tmp_path):
    root = tmp_path / "dlrsd_root"
    for split in ("train", "val"):
        _pair(
            root / f"DLRSD_split/{split}/imgs/x_{split}.jpg",
            root / f"DLRSD_split/{split}/D2masks/x_{split}.png",
        )
    ds = load_dataset(root, "dlrsd", "train")
    assert [s.image.stem for s in ds.samples] == ["x_train"]
    # generic mmseg tree: val preferred, another split on request, unknown split listed
    mm = tmp_path / "custom"
    _mmseg(mm, "val", names=("v",))
    _mmseg(mm, "train", names=("t",))
    assert load_dataset(mm).layout.name == "mmseg" and load_dataset(mm).split == "val"
    assert load_dataset(mm, split="train").samples[0].image.stem == "t"
    with pytest.raises(InputError, match=r"split 'test'.*found: train, val"):
        load_dataset(mm, split="test")


def test_generic_layout_matches_stems_with_label_suffixes(tmp_path):
    root = tmp_path / "mine"
    _pair(root / "images/tile_1.tif", root / "labels/tile_1_mask.png")
    _pair(root / "images/tile_2.tif", root / "labels/tile_2.tif")
    _write(root / "labels/orphan.png", np.zeros((4, 4), np.uint8))
    ds = load_dataset(root)
    assert ds.layout.name == "generic" and len(ds) == 2
    assert [p.name for p in ds.unpaired_labels] == ["orphan.png"]
    # images/ and labels/ under a split folder
    _pair(root / "test/images/q.tif", root / "test/labels/q.png")
    assert [s.image.stem for s in load_dataset(root, "generic", "test").samples] == ["q"]


def test_one_line_errors_for_bad_data_dirs(tmp_path):
    with pytest.raises(InputError, match="data folder not found"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(InputError, match="must be a folder"):
        load_dataset(tmp_path / "f.txt")
    with pytest.raises(InputError, match="expected an images/ and a labels/ folder"):
        load_dataset(tmp_path)
    with pytest.raises(UsageError, match="unknown layout 'nope'"):
        load_dataset(tmp_path, "nope")
    root = tmp_path / "g"
    _pair(root / "images/a.tif", root / "labels/a.png")
    _write(root / "images/b.tif", np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(InputError, match=r"b\.tif: no label with the same name in .*labels"):
        load_dataset(root)
    srcgt = tmp_path / "drone"
    _pair(srcgt / "val/src/a.JPG", srcgt / "val/gt/a.png")
    with pytest.raises(UsageError, match="matches layouts udd5 and vdd; pass --layout NAME"):
        load_dataset(srcgt)
    assert load_dataset(srcgt, "vdd").split == "val"  # the only split there, recorded
    with pytest.raises(InputError, match=r"no split 'test' for layout vdd \(found: val\)"):
        load_dataset(srcgt, "vdd", "test")
    empty = tmp_path / "e"
    (empty / "images").mkdir(parents=True)
    (empty / "labels").mkdir()
    with pytest.raises(InputError, match="no images found"):
        load_dataset(empty)


def test_label_errors_name_the_file(tmp_path):
    img = _write(tmp_path / "i.tif", np.zeros((3, 8, 12), np.uint8))
    small = _write(tmp_path / "small.png", np.zeros((6, 12), np.uint8))
    with pytest.raises(InputError, match=r"small\.png: label is 12x6 but image .*i\.tif is 12x8"):
        LabelReader(
            small, reduce_zero_label=False, ignore_index=255, expect_size=(12, 8), image_path=img
        )
    rgb = _write(tmp_path / "rgb.png", np.zeros((3, 8, 12), np.uint8))
    with pytest.raises(InputError, match=r"rgb\.png: label has 3 bands"):
        LabelReader(rgb, reduce_zero_label=False, ignore_index=255)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match=r"junk\.png: not a label image"):
        LabelReader(tmp_path / "junk.png", reduce_zero_label=False, ignore_index=255)


# ------------------------------------------------------------------ OVRSISBench download

# What RSKT-Seg registers for each set (RSKT_Seg/data/datasets/register_*.py @29834f66)
OVRSIS_EXPECTED = {
    "DLRSD": ("dlrsd", "imgs/ + D2masks/", 17, "airplane", "water"),
    "iSAID": ("ovrsis-isaid", "imgs/ + D2masks/", 15, "ship", "harbor"),
    "Potsdam": (
        "ovrsis-potsdam",
        "imgs/ + D2masks/",
        6,
        "Impervious surfaces",
        "Clutter/background",
    ),
    "Vaihingen": (
        "ovrsis-vaihingen",
        "imgs/ + D2masks/",
        6,
        "Impervious surfaces",
        "Clutter/background",
    ),
    "LoveDA": ("ovrsis-loveda", "images_png/ + masks_png/", 8, "no-data", "Agriculture"),
    "uavid": ("ovrsis-uavid", "Images/ + Labels/", 8, "Background clutter", "Human"),
    "UDD5": ("ovrsis-udd5", "all/src/ + all/gt/", 5, "Vegetation", "Other"),
    "VDD": ("ovrsis-vdd", "src/ + gt/", 7, "Other", "Water"),
}


@pytest.fixture(scope="module")
def ovrsisbench(tmp_path_factory) -> Path:
    return make_ovrsisbench(tmp_path_factory.mktemp("bench") / "datasets")


@pytest.mark.parametrize("name", list(OVRSISBENCH))
def test_ovrsisbench_sets_are_detected_with_their_release_class_lists(ovrsisbench, name):
    layout, tree, k, first, last = OVRSIS_EXPECTED[name]
    ds = load_dataset(ovrsisbench / name)
    assert (ds.layout.name, ds.split, ds.tree, len(ds)) == (layout, "all", tree, 2)
    names = [c.name for c in ds.layout.class_specs()]
    assert (len(names), names[0], names[-1]) == (k, first, last)
    assert not ds.reduce_zero_label and ds.detected
    # labels are read as is: every value 0..k-1 is a class, 255 is ignored
    with LabelReader(ds.samples[0].label, reduce_zero_label=False, ignore_index=255) as lr:
        values = set(np.unique(lr.read()).tolist())
    assert values == set(range(k)) | {255}
    described = ds.describe()
    assert (described["layout"], described["split"], described["tree"]) == (layout, "all", tree)
    # the explicit layout finds the set from RSKT-Seg's data root too
    given = load_dataset(ovrsisbench, layout)
    assert given.root.name == name and not given.detected and len(given) == 2


def test_ovrsisbench_train_val_copies_and_the_download_root(ovrsisbench, tmp_path):
    for folder, layout in (("DLRSD_split", "dlrsd"), ("iSAID_split", "ovrsis-isaid")):
        ds = load_dataset(ovrsisbench / folder)
        assert (ds.layout.name, ds.split, [s.name for s in ds.samples]) == (
            layout,
            "val",
            ["val_x"],
        )
        assert load_dataset(ovrsisbench, layout, "train").samples[0].name == "train_x"
    with pytest.raises(UsageError, match=r"holds the benchmark folders .*UDD5.*pass --data"):
        load_dataset(ovrsisbench)
    # a folder holding one benchmark's folders only (docs/TRAIN.md's data/DLRSD)
    parent = tmp_path / "DLRSD"
    for folder in ("DLRSD", "DLRSD_split"):
        shutil.copytree(ovrsisbench / folder, parent / folder)
    assert load_dataset(parent).layout.name == "dlrsd"
    assert load_dataset(parent, split="train").samples[0].name == "train_x"
    assert load_dataset(parent).split == "all"


def test_folder_names_match_exactly(tmp_path):
    # UDD6 is not UDD5, whichever of its trees it has
    udd6 = tmp_path / "UDD6"
    _pair(udd6 / "all/src/a.JPG", udd6 / "all/gt/a.png")
    with pytest.raises(UsageError, match=r"'UDD6'.* matches layout ovrsis-udd5; pass --layout"):
        load_dataset(udd6)
    _pair(udd6 / "val/src/a.JPG", udd6 / "val/gt/a.png")
    with pytest.raises(UsageError, match=r"matches layouts ovrsis-udd5, udd5 and vdd; pass"):
        load_dataset(udd6)
    assert load_dataset(udd6, "ovrsis-udd5").split == "all"
    # a name that merely contains a benchmark's is not it
    for folder in ("Potsdam_old", "myiSAID"):
        root = tmp_path / folder
        _pair(root / "imgs/a.png", root / "D2masks/a.png")
        with pytest.raises(UsageError, match="pass --layout NAME"):
            load_dataset(root)
    # case does not matter
    root = tmp_path / "POTSDAM"
    _pair(root / "imgs/a.png", root / "D2masks/a.png")
    assert load_dataset(root).layout.name == "ovrsis-potsdam"


def test_ambiguous_detection_is_refused_naming_layout(tmp_path):
    # an unnamed imgs/ + D2masks/ tree fits four releases: no class list is guessed
    root = tmp_path / "mydata"
    _pair(root / "imgs/a.jpg", root / "D2masks/a.png")
    msg = r"matches layouts dlrsd, ovrsis-isaid, ovrsis-potsdam and ovrsis-vaihingen; pass --layout"
    with pytest.raises(UsageError, match=msg):
        load_dataset(root)
    assert load_dataset(root, "ovrsis-vaihingen").layout.name == "ovrsis-vaihingen"
    # a LoveDA folder holding both the OVRSISBench and the mmseg tree
    loveda = tmp_path / "LoveDA"
    _pair(loveda / "images_png/a.png", loveda / "masks_png/a.png")
    _mmseg(loveda, "val")
    with pytest.raises(UsageError, match=r"matches layouts ovrsis-loveda and loveda; pass"):
        load_dataset(loveda)
    assert load_dataset(loveda, "loveda").reduce_zero_label
    # named like a benchmark but holding none of its trees
    empty = tmp_path / "VDD"
    (empty / "images").mkdir(parents=True)
    with pytest.raises(InputError, match=r"named like layout ovrsis-vdd and vdd but holds none"):
        load_dataset(empty)


def test_cli_refuses_ambiguous_data_with_exit_2(tmp_path):
    from typer.testing import CliRunner

    from drseg_cli import cli

    root = tmp_path / "data"
    _pair(root / "imgs/a.jpg", root / "D2masks/a.png")
    cli._register()
    r = CliRunner().invoke(cli.app, ["evaluate", "--data", str(root), "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert "drseg: error:" in r.output and "pass --layout NAME" in r.output


# ------------------------------------------------------------------ georeferenced labels


def _geo_pair(tmp_path, label_transform, label_crs="EPSG:32633"):
    img = write_geotiff(tmp_path / "img.tif", np.zeros((3, 8, 12), np.uint8))
    lab = write_geotiff(
        tmp_path / "lab.tif",
        np.zeros((8, 12), np.uint8),
        crs=label_crs,
        transform=label_transform,
    )
    return img, lab


def _open_label(lab, img):
    return LabelReader(
        lab, reduce_zero_label=False, ignore_index=255, expect_size=(12, 8), image_path=img
    )


def test_georeferenced_label_must_share_crs_and_transform(tmp_path):
    grid = from_origin(500000, 4600000, 10, 10)  # the image's (tests.helpers.write_geotiff)
    img, lab = _geo_pair(tmp_path, grid)
    _open_label(lab, img).close()  # same grid: fine
    shifted = from_origin(500000 + 1200, 4600000, 10, 10)  # 1200 m east = 120 pixels
    img, lab = _geo_pair(tmp_path, shifted)
    with pytest.raises(
        InputError, match=r"lab\.tif: label is not aligned with its image .*img\.tif"
    ):
        _open_label(lab, img)
    img, lab = _geo_pair(tmp_path, grid, label_crs="EPSG:32634")
    with pytest.raises(InputError, match=r"lab\.tif: label CRS EPSG:32634 differs .*img\.tif"):
        _open_label(lab, img)
    img, lab = _geo_pair(tmp_path, from_origin(500000, 4600000, 10, 10), label_crs=None)
    _open_label(lab, img).close()  # a transform without CRS on the image's grid: fine
    img, lab = _geo_pair(tmp_path, shifted, label_crs=None)
    with pytest.raises(InputError, match="not aligned"):
        _open_label(lab, img)
    # a plain (non-georeferenced) label is on the image's pixel grid by definition
    plain = _write(tmp_path / "plain.png", np.zeros((8, 12), np.uint8))
    _open_label(plain, img).close()
