"""Metrics against hand-computed confusion matrices, and the streamed evaluation runner."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from drseg_cli import cli
from drseg_cli.evaluate.datasets import load_dataset
from drseg_cli.evaluate.metrics import ConfusionMatrix, LabelValueError, SegMetrics
from drseg_cli.evaluate.runner import EvalConfig, run_evaluation
from drseg_cli.model.base import Preprocess, SegmentationModel
from drseg_cli.pipeline.runtime import TilePredictor
from tests.data.evaluate.make_fake_benchmarks import make_ovrsisbench
from tests.helpers import PixelModel, write_geotiff

NAMES = ["road", "tree", "water"]


def test_hand_computed_confusion_and_metrics():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 0]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    conf = ConfusionMatrix(3)
    conf.update(gt, pred)
    # rows = gt, cols = pred; the 255 pixel is ignored whatever was predicted there
    np.testing.assert_array_equal(conf.matrix, [[2, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert conf.ignored == 1
    m = SegMetrics.from_confusion(conf, NAMES)
    # road: TP 2, FP 1 (water→road), FN 1 → IoU 2/4; tree: TP 2, FP 1 → 2/3; water: 1/2
    np.testing.assert_allclose(m.iou, [50.0, 200 / 3, 50.0])
    np.testing.assert_allclose(m.acc, [200 / 3, 100.0, 50.0])
    assert m.miou == pytest.approx((50 + 200 / 3 + 50) / 3)
    assert m.macc == pytest.approx((200 / 3 + 100 + 50) / 3)
    assert m.pixel_accuracy == pytest.approx(5 / 7 * 100)
    assert m.fwiou == pytest.approx((3 * 50 + 2 * 200 / 3 + 2 * 50) / 7)
    np.testing.assert_array_equal(m.gt_pixels, [3, 2, 2])
    np.testing.assert_array_equal(m.pred_pixels, [3, 3, 1])


def test_absent_classes_are_nan_and_left_out_of_the_means():
    conf = np.array([[4, 0, 0, 0], [0, 0, 0, 0], [2, 0, 0, 0], [0, 0, 0, 0]])
    # class 1: neither in gt nor pred → NaN IoU and Acc; class 3 likewise
    # class 2: in gt only (all predicted as 0) → IoU 0, Acc 0 (counts in the means)
    m = SegMetrics.from_confusion(conf, ["a", "b", "c", "d"])
    assert math.isnan(m.iou[1]) and math.isnan(m.acc[1]) and math.isnan(m.iou[3])
    assert m.iou[0] == pytest.approx(4 / 6 * 100) and m.iou[2] == 0.0
    assert m.miou == pytest.approx((4 / 6 * 100 + 0) / 2)
    assert m.macc == pytest.approx((100 + 0) / 2)
    d = m.to_dict()
    assert d["per_class"][1]["iou"] is None and json.dumps(d)  # valid JSON, no NaN


def test_predicted_but_absent_class_counts_as_zero_iou():
    conf = np.array([[3, 1], [0, 0]])  # class 1 never in gt, predicted once
    m = SegMetrics.from_confusion(conf, ["a", "b"])
    assert m.iou[1] == 0.0 and math.isnan(m.acc[1])
    assert m.miou == pytest.approx((75 + 0) / 2) and m.macc == pytest.approx(75)


def test_perfect_prediction_gives_100():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, (40, 30))
    conf = ConfusionMatrix(5)
    conf.update(gt, gt)
    m = SegMetrics.from_confusion(conf, list("abcde"))
    assert m.miou == m.macc == m.pixel_accuracy == m.fwiou == 100.0


def test_streaming_in_blocks_equals_one_shot_and_ignores_unpredicted():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 4, (64, 50))
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = rng.integers(0, 4, gt.shape)
    valid = rng.random(gt.shape) > 0.05
    one = ConfusionMatrix(4)
    one.update(gt, pred, valid)
    blocks = ConfusionMatrix(4)
    for y in range(0, 64, 7):
        blocks.update(gt[y : y + 7], pred[y : y + 7], valid[y : y + 7])
    np.testing.assert_array_equal(one.matrix, blocks.matrix)
    labelled = gt != 255
    assert one.matrix.sum() == np.count_nonzero(labelled & valid)
    assert one.unpredicted == np.count_nonzero(labelled & ~valid)
    # against a direct (slow-path) count
    ref = np.zeros((4, 4), np.int64)
    np.add.at(ref, (gt[labelled & valid], pred[labelled & valid]), 1)
    np.testing.assert_array_equal(one.matrix, ref)


def test_label_values_outside_the_classes_are_an_error():
    conf = ConfusionMatrix(3, ignore_index=255)
    with pytest.raises(LabelValueError, match="label values 7"):
        conf.update(np.array([[0, 7]]), np.array([[0, 1]]))
    conf = ConfusionMatrix(3, ignore_index=0)  # a custom ignore index is honoured
    conf.update(np.array([[0, 2, 1]]), np.array([[1, 2, 1]]))
    assert conf.matrix.sum() == 2 and conf.ignored == 1


# ------------------------------------------------------------------ runner (fake models)


class OracleModel(SegmentationModel):
    """Per-pixel logits that recover the class from the red channel (value = 60·class)."""

    name = "oracle"
    preprocess = Preprocess(32, (0.0,) * 3, (1.0,) * 3, 16)

    def encode_text(self, class_prompts):
        return torch.eye(len(class_prompts))

    def forward(self, images, text):
        k = torch.arange(text.shape[0], dtype=images.dtype).view(1, -1, 1, 1)
        return -((images[:, :1] * 255 / 60 - k) ** 2) * 10


def _make_generic(root, sizes, seed=0, k=3):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        label = np.kron(rng.integers(0, k, (h // 4 + 1, w // 4 + 1)), np.ones((4, 4)))[:h, :w]
        img = np.stack([label * 60, rng.integers(0, 255, (h, w)), np.full((h, w), 90)])
        write_geotiff(root / "images" / f"s{i}.tif", img.astype(np.uint8), crs=None)
        label = label.astype(np.uint8)
        label[:2, :3] = 255
        write_geotiff(root / "labels" / f"s{i}.png", label, driver="PNG", crs=None)
    return root


def _run(model, dataset, **cfg):
    names = NAMES[: int(model.encode_text([[n] for n in NAMES]).shape[0])]
    predictor = TilePredictor(model, [[n] for n in names], torch.device("cpu"))
    return run_evaluation(
        dataset,
        predictor,
        names,
        EvalConfig(**{"tile_size": 32, "overlap": 0.25, "batch_size": 3, **cfg}),
        tile_multiple=16,
        default_tile_size=32,
    )


def test_oracle_model_scores_100_through_both_paths(tmp_path):
    # 20x24 and 32x32 fit in one tile (batched across images); 70x50 is stitched from tiles
    ds = load_dataset(_make_generic(tmp_path / "d", [(20, 24), (70, 50), (32, 32), (45, 33)]))
    result = _run(OracleModel(), ds)
    m = result.metrics
    assert result.images == 4 and result.tiles > 4
    assert m.miou == m.macc == m.pixel_accuracy == 100.0
    assert m.ignored_pixels == 4 * 6
    assert m.gt_pixels.sum() == 20 * 24 + 70 * 50 + 32 * 32 + 45 * 33 - 24


def test_runner_confusion_equals_untiled_prediction(tmp_path):
    ds = load_dataset(_make_generic(tmp_path / "d", [(70, 50), (24, 20)], seed=3))
    model = PixelModel()
    result = _run(model, ds, batch_size=2)
    text = model.encode_text([[n] for n in NAMES])
    ref = ConfusionMatrix(3)
    import rasterio

    for s in ds.samples:
        with rasterio.open(s.image) as im, rasterio.open(s.label) as lb:
            x = torch.from_numpy(im.read().astype(np.float32) / 255.0)[None]
            ref.update(lb.read(1), model(x, text)[0].argmax(0).numpy())
    np.testing.assert_array_equal(result.metrics.confusion, ref.matrix)


def test_evaluate_cli_writes_json_and_csv(tmp_path, monkeypatch):
    root = _make_generic(tmp_path / "d", [(20, 24), (70, 50)])
    (tmp_path / "classes.txt").write_text("road: street\ntree\nwater\n")
    import drseg_cli.commands.evaluate as ev

    monkeypatch.setattr(ev, "build_model_for", lambda **kw: (OracleModel(), {}))
    cli._register()
    out, csv_path = tmp_path / "m.json", tmp_path / "m.csv"
    args = ["evaluate", "--data", root, "--classes", tmp_path / "classes.txt"]
    args += ["--tile-size", "32", "--device", "cpu", "-o", out, "--csv", csv_path, "--json"]
    r = CliRunner().invoke(cli.app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["mIoU"] == 100.0 and payload["images"] == 2
    assert payload["dataset"]["layout"] == "generic"
    assert json.loads(out.read_text())["confusion_matrix"] == payload["confusion_matrix"]
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "class,iou,acc,gt_pixels,pred_pixels" and rows[-1].startswith("all,100.0")
    # a second run refuses to overwrite; a class file with too few classes names the label
    r = CliRunner().invoke(cli.app, [str(a) for a in args])
    assert r.exit_code == 2 and "exists" in r.output
    (tmp_path / "two.txt").write_text("road\ntree\n")
    args[4], args[-4] = tmp_path / "two.txt", tmp_path / "n.json"
    r = CliRunner().invoke(cli.app, [str(a) for a in args[:-3]])
    assert r.exit_code == 1 and "label values 2" in r.output and ".png" in r.output


# ------------------------------------------------------------------ conventions, resolution


def test_absent_class_conventions_on_a_hand_computed_matrix():
    # rows = gt, cols = pred; class 1 never in the ground truth but predicted once
    conf = np.array([[3, 1, 0], [0, 0, 0], [1, 0, 2]])
    count = SegMetrics.from_confusion(conf, NAMES)  # mmseg: IoU 0, counts in mIoU
    drop = SegMetrics.from_confusion(conf, NAMES, "drop")  # detectron2: left out
    # road: TP 3, FN 1, FP 1 → 3/5; tree: TP 0, FP 1 → 0; water: TP 2, FN 1 → 2/3
    np.testing.assert_allclose(count.iou, [60.0, 0.0, 200 / 3])
    assert drop.iou[0] == pytest.approx(60.0) and math.isnan(drop.iou[1])
    assert count.miou == pytest.approx((60 + 0 + 200 / 3) / 3)
    assert drop.miou == pytest.approx((60 + 200 / 3) / 2)
    for m in (count, drop):  # everything else is the same under both conventions
        assert m.macc == pytest.approx((75 + 200 / 3) / 2) and math.isnan(m.acc[1])
        assert m.pixel_accuracy == pytest.approx(5 / 7 * 100)
        assert m.fwiou == pytest.approx((4 * 60 + 3 * 200 / 3) / 7)
    assert (count.to_dict()["absent_classes"], drop.to_dict()["absent_classes"]) == (
        "count",
        "drop",
    )
    # absent from both ground truth and prediction: undefined under both
    both = np.array([[2, 0], [0, 0]])
    assert math.isnan(SegMetrics.from_confusion(both, ["a", "b"]).iou[1])
    assert math.isnan(SegMetrics.from_confusion(both, ["a", "b"], "drop").iou[1])
    with pytest.raises(ValueError, match="absent_classes"):
        SegMetrics.from_confusion(conf, NAMES, "skip")


def test_labelled_pixels_are_the_scored_pixels_with_a_valid_label():
    gt = np.array([[0, 1, 255, 2], [2, 255, 1, 0]])
    pred = np.array([[0, 0, 1, 2], [1, 1, 1, 0]])
    valid = np.array([[1, 1, 1, 0], [1, 1, 0, 1]], bool)  # two labelled pixels: no prediction
    conf = ConfusionMatrix(3)
    conf.update(gt, pred, valid)
    d = SegMetrics.from_confusion(conf, NAMES).to_dict()
    assert d["labelled_pixels"] == 4  # valid label (not 255) and predicted
    assert d["unpredicted_pixels"] == 2 and d["ignored_pixels"] == 2
    assert d["labelled_pixels"] + d["unpredicted_pixels"] + d["ignored_pixels"] == gt.size
    assert d["labelled_pixels"] == sum(map(sum, d["confusion_matrix"]))


def _cli(tmp_path, monkeypatch, args):
    import drseg_cli.commands.evaluate as ev

    monkeypatch.setattr(ev, "build_model_for", lambda **kw: (OracleModel(), {}))
    cli._register()
    return CliRunner().invoke(cli.app, ["evaluate", *map(str, args), "--device", "cpu"])


def test_evaluate_cli_prints_and_records_layout_split_and_classes(tmp_path, monkeypatch):
    root = make_ovrsisbench(tmp_path / "datasets") / "UDD5"
    r = _cli(
        tmp_path, monkeypatch, ["--data", root, "--tile-size", "32", "-o", tmp_path / "m.json"]
    )
    assert r.exit_code == 0, r.output
    err = r.stderr
    assert "layout ovrsis-udd5 (detected" in err and "split all, 2 images" in err
    assert "5 classes from layout ovrsis-udd5: 0 Vegetation, 1 Building, 2 Road" in err
    assert "4 Other" in err and "label value v = class v" in err
    saved = json.loads((tmp_path / "m.json").read_text())
    r = _cli(tmp_path, monkeypatch, ["--data", root, "--tile-size", "32", "--json"])
    for payload in (saved, json.loads(r.stdout)):
        assert payload["dataset"]["layout"] == "ovrsis-udd5" and payload["dataset"]["detected"]
        assert payload["dataset"]["split"] == "all"
        assert payload["dataset"]["tree"] == "all/src/ + all/gt/"
        assert payload["classes"] == ["Vegetation", "Building", "Road", "Vehicle", "Other"]
        assert payload["classes_source"] == "layout ovrsis-udd5"
        assert payload["absent_classes"] == "count"
    assert "layout ovrsis-udd5" not in r.stderr  # --json: the JSON says it
    # a class list given by hand is said to be so, and a count unlike the layout's is warned
    args = ["--data", root, "--tile-size", "32", "--classes", "a,b,c,d,e,f"]
    r = _cli(tmp_path, monkeypatch, args)
    assert r.exit_code == 0, r.output
    assert "6 classes from --classes: 0 a, 1 b" in r.stderr
    assert "--classes gives 6 classes but layout ovrsis-udd5 has 5" in r.stderr


def test_evaluate_cli_absent_classes_option(tmp_path, monkeypatch):
    # 8x8: gt class 0 on the left half, 1 on the right; the oracle predicts 0 | 2 | 1 | 1
    root = tmp_path / "d"
    label = np.zeros((8, 8), np.uint8)
    label[:, 4:] = 1
    red = np.zeros((8, 8), np.uint8)
    red[:, 2:4], red[:, 4:] = 120, 60  # class 2 is predicted, never in the ground truth
    img = np.stack([red, np.full((8, 8), 50, np.uint8), np.full((8, 8), 90, np.uint8)])
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    write_geotiff(root / "images" / "a.tif", img, crs=None)
    write_geotiff(root / "labels" / "a.png", label, driver="PNG", crs=None)
    args = ["--data", root, "--classes", "road,tree,water", "--tile-size", "32", "--json"]
    count = json.loads(_cli(tmp_path, monkeypatch, args).stdout)
    drop = json.loads(_cli(tmp_path, monkeypatch, [*args, "--absent-classes", "drop"]).stdout)
    # road: TP 16, FN 16 → 50; tree: TP 32 → 100; water: 16 false positives, no gt
    assert [c["iou"] for c in count["per_class"]] == [50.0, 100.0, 0.0]
    assert [c["iou"] for c in drop["per_class"]] == [50.0, 100.0, None]
    assert (count["mIoU"], drop["mIoU"]) == (50.0, 75.0)
    assert count["mACC"] == drop["mACC"] == 75.0 and count["aAcc"] == drop["aAcc"] == 75.0
    assert count["labelled_pixels"] == drop["labelled_pixels"] == 64
    assert drop["absent_classes"] == "drop"
    r = _cli(tmp_path, monkeypatch, [*args, "--absent-classes", "ignore"])
    assert r.exit_code == 2 and "--absent-classes" in r.stderr


def test_evaluate_cli_refuses_a_shifted_georeferenced_label(tmp_path, monkeypatch):
    from rasterio.transform import from_origin

    root = tmp_path / "geo"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    write_geotiff(root / "images" / "a.tif", np.full((3, 8, 8), 60, np.uint8))
    shifted = from_origin(500000 + 1200, 4600000, 10, 10)  # write_geotiff's grid, 1200 m east
    write_geotiff(root / "labels" / "a.tif", np.ones((8, 8), np.uint8), transform=shifted)
    out = tmp_path / "m.json"
    args = ["--data", root, "--classes", "road,tree", "--tile-size", "32", "-o", out]
    r = _cli(tmp_path, monkeypatch, args)
    assert r.exit_code == 1 and not out.exists()
    assert "labels/a.tif: label is not aligned with its image" in r.stderr
    assert "images/a.tif" in r.stderr
    # on the same grid it is scored
    write_geotiff(root / "labels" / "a.tif", np.ones((8, 8), np.uint8))
    r = _cli(tmp_path, monkeypatch, args)
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["mIoU"] == 100.0


def test_runner_applies_the_threshold_rule_on_both_paths(tmp_path):
    """70x50 is stitched, 24x20 fits one tile: both give class 0 exactly below the threshold."""
    from drseg_cli.raster.stitch import ClassRule

    ds = load_dataset(_make_generic(tmp_path / "d", [(70, 50), (24, 20)], seed=3))
    model = PixelModel()
    result = _run(model, ds, batch_size=2, rule=ClassRule(0.9, 0))
    text = model.encode_text([[n] for n in NAMES])
    ref = ConfusionMatrix(3)
    import rasterio

    low = 0
    for s in ds.samples:
        with rasterio.open(s.image) as im, rasterio.open(s.label) as lb:
            x = torch.from_numpy(im.read().astype(np.float32) / 255.0)[None]
            logits = model(x, text)[0]
            pred = logits.argmax(0).numpy()
            below = logits.softmax(0).max(0).values.numpy() < 0.9
            pred[below] = 0
            low += below.sum()
            ref.update(lb.read(1), pred)
    assert low > 50
    np.testing.assert_array_equal(result.metrics.confusion, ref.matrix)
