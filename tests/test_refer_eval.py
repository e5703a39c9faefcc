"""Referring metrics against hand-computed values, COCO RLE decoding, ``evaluate --task refer``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from typer.testing import CliRunner

from drseg_cli.evaluate.refer import ReferScores, rle_decode, rle_encode

runner = CliRunner()


def test_metrics_equal_hand_computed_values():
    s = ReferScores()
    # 1: label 2×2 at the corner, prediction its left column → I 2, U 4, IoU 0.5
    label = np.zeros((4, 4), np.uint8)
    label[:2, :2] = 1
    pred = np.zeros((4, 4), bool)
    pred[:2, :1] = True
    assert s.add(pred, label) == 0.5
    # 2: label the left 3 columns, the last one ignored; prediction everything → I 12, U 12
    label = np.zeros((4, 4), np.uint8)
    label[:, :3] = 1
    label[:, 3] = 255
    assert s.add(np.ones((4, 4), bool), label) == 1.0
    # 3: one target pixel, empty prediction → I 0, U 1
    label = np.zeros((4, 4), np.uint8)
    label[0, 0] = 1
    assert s.add(np.zeros((4, 4), bool), label) == 0.0
    m = s.summary()
    assert m["samples"] == 3
    assert m["gIoU"] == pytest.approx(100 * 1.5 / 3)
    assert m["cIoU"] == pytest.approx(100 * 14 / 17)
    # Pr@X counts IoU strictly above X: only sample 2 (IoU 1) at every threshold
    for t in (0.5, 0.6, 0.7, 0.8, 0.9):
        assert m[f"Pr@{t}"] == pytest.approx(100 / 3)


def test_rle_decoding():
    # COCO compressed RLE of a 3×3 mask with its centre set: runs 4, 1, 4 → "414"
    mask = rle_decode({"size": [3, 3], "counts": "414"})
    assert mask.tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    # Column-major runs: a 2×3 mask with the first column set
    m = np.array([[1, 0, 0], [1, 0, 0]], np.uint8)
    assert rle_encode(m) == {"size": [2, 3], "counts": [0, 2, 4]}
    np.testing.assert_array_equal(rle_decode(rle_encode(m)), m)
    # A RISBench test sample (datainfo/risbench_test.jsonl, test_11_7.png): a small vehicle
    # "at the very top right edge of the image".
    real = rle_decode({"size": [512, 512], "counts": "\\PP66j?0O2O0000001O00O10001O1Me_i1"})
    ys, xs = np.nonzero(real)
    assert 0 < real.sum() < 2000 and xs.min() > 256 and ys.max() < 64
    with pytest.raises(ValueError, match="covers"):
        rle_decode({"size": [4, 4], "counts": [3, 2]})


def _dataset(root):
    root.mkdir()
    lines = []
    for i, (r0, c0) in enumerate(((10, 12), (40, 30))):
        img = np.full((3, 64, 80), 30, np.uint8)
        img[:, r0 : r0 + 9, c0 : c0 + 15] = 255
        with rasterio.open(
            root / f"im{i}.png", "w", driver="PNG", width=80, height=64, count=3, dtype="uint8"
        ) as ds:
            ds.write(img)
        label = (img[0] == 255).astype(np.uint8)
        lines.append(
            {"file_name": f"im{i}.png", "sent": "the white roof", "segmentation": rle_encode(label)}
        )  # noqa: E501
    (root / "toy_test.jsonl").write_text("\n".join(json.dumps(x) for x in lines), "utf-8")
    return root


def test_evaluate_task_refer_end_to_end(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from drseg_cli import cli
    from drseg_cli.model.base import ReferOutput
    from drseg_cli.model.rsrefseg2 import RSRefSeg2Model

    cli._register()
    data = _dataset(tmp_path / "toy")
    args = ["evaluate", "--task", "refer", "--data", str(data), "--split", "test"]
    args += ["-m", "test-tiny", "--json"]
    res = runner.invoke(cli.app, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["metrics"]["samples"] == 2 and len(out["per_sample"]) == 2

    def white(self, images, encoded):  # a perfect mask head: the white pixels
        hit = images.mean(1, keepdim=True) > 0.6
        return ReferOutput(hit.flatten(1).any(1, keepdim=True).float(), hit * 20.0 - 10.0)

    monkeypatch.setattr(RSRefSeg2Model, "forward", white)
    res = runner.invoke(cli.app, [*args, "-o", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)["metrics"]
    # 64×80 images resized to the 128 px window and back: edges may move by a pixel
    assert m["gIoU"] > 85 and m["cIoU"] > 85 and m["Pr@0.5"] == 100
    assert json.loads((tmp_path / "m.json").read_text())["metrics"] == m
    res = runner.invoke(cli.app, [*args[:-1], "--split", "val", "-m", "test-tiny"])
    assert res.exit_code == 1 and "no *_val.jsonl" in res.output
    del torch


def test_train_task_refer_reduces_loss_resumes_and_serves_refer(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from drseg_cli import cli

    torch.set_num_threads(1)
    cli._register()
    data = _dataset(tmp_path / "toy")
    (data / "toy_train.jsonl").write_text((data / "toy_test.jsonl").read_text(), "utf-8")
    (data / "toy_val.jsonl").write_text((data / "toy_test.jsonl").read_text(), "utf-8")
    run = tmp_path / "run"
    args = ["train", "--task", "refer", "--data", str(data), "-o", str(run), "-m", "test-tiny"]
    args += ["--batch-size", "2", "--lr", "3e-3", "--warmup-steps", "0", "--eval-every", "4"]
    res = runner.invoke(cli.app, [*args, "--max-steps", "4", "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    losses = summary["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert (run / "last.pt").is_file() and (run / "best.pt").is_file()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "eval" and "gIoU" in r for r in records)
    # --resume continues from step 4 to 6 with the saved config
    res = runner.invoke(cli.app, [*args, "--max-steps", "6", "--resume", "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["losses"]) == 2
    # the trained checkpoint serves `drseg refer` (LoRA factors merged on load)
    scene = data / "im0.png"
    out = tmp_path / "o.tif"
    res = runner.invoke(
        cli.app,
        ["refer", str(scene), "the white roof", "-m", "test-tiny", "--checkpoint",
         str(run / "last.pt"), "-o", str(out), "--allow-no-crs"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert out.is_file()


def test_evaluate_task_refer_with_dglrsis(tmp_path, monkeypatch):
    """DGL-RSIS, training-free, through the same referring evaluation as RSRefSeg 2."""
    pytest.importorskip("skimage")
    from drseg_cli import cli
    from drseg_cli.model.base import ReferOutput
    from drseg_cli.model.dglrsis.model import DGLRSISReferrer

    cli._register()
    data = _dataset(tmp_path / "toy")
    args = ["evaluate", "--task", "refer", "--method", "dglrsis", "--data", str(data)]
    args += ["--split", "test", "-m", "test-tiny", "--json"]

    def white(self, images, encoded):  # a perfect referrer: the white pixels
        hit = images.mean(1, keepdim=True) > 0.6
        return ReferOutput(hit.flatten(1).any(1, keepdim=True).float(), hit * 20.0 - 10.0)

    monkeypatch.setattr(DGLRSISReferrer, "forward", white)
    res = runner.invoke(cli.app, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["info"]["method"] == "dglrsis" and out["metrics"]["samples"] == 2
    assert out["metrics"]["gIoU"] > 85 and out["metrics"]["Pr@0.5"] == 100
