"""Referring datasets in their released layouts (RRSIS-D, RefSegRS, RISBench): readers, layout
detection, one-line errors, and ``evaluate``/``train --task refer`` on each."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from typer.testing import CliRunner

from drseg_cli.errors import InputError, UsageError
from drseg_cli.evaluate.refer import load_refer_dataset
from tests.data.refer.make_fake_refer import MAKERS, make_refsegrs, make_rrsisd, target
from tests.helpers import error_line

runner = CliRunner()

#: per layout, the test split: (sentence, target name) in order
TEST_SPLIT = {
    "rrsisd": [
        ("the storage tanks on the left", "rrsisd-tanks"),
        ("two storage tanks", "rrsisd-tanks"),
        ("the road at the top", "rrsisd-road"),
    ],
    "refsegrs": [
        ("the vehicle in the middle", "refsegrs-10"),
        ("the building along the road", "refsegrs-11"),
    ],
    "risbench": [
        ("the small vehicle at the top right", "risbench-test_1_0"),
        ("the ship", "risbench-test_2_0"),
    ],
}

# The fixed prediction P of the evaluation test: rows 3-6, cols 2-7 (24 px). By hand:
#   rrsisd   tanks 20 px (rows 3-6 × cols 2-5, rows 3-4 × cols 10-11): I 16, U 28 → 4/7 (twice)
#            road 32 px (rows 0-1): I 0, U 56 → 0
#            gIoU (4/7 + 4/7 + 0) / 3 = 8/21; cIoU 32/112
#   refsegrs 16 px (rows 3-6 × cols 4-7): I 16, U 24 → 2/3; 96 px (cols 0-7): I 24, U 96 → 1/4
#            gIoU (2/3 + 1/4) / 2 = 11/24; cIoU 40/120
#   risbench 4 px (rows 3-4 × cols 6-7): I 4, U 24 → 1/6; 35 px (rows 2-6 × cols 2-8): I 24,
#            U 35 → 24/35; gIoU (1/6 + 24/35) / 2 = 179/420; cIoU 28/59
HAND = {
    "rrsisd": {"gIoU": 8 / 21, "cIoU": 32 / 112, "Pr@0.5": 2 / 3, "Pr@0.6": 0.0},
    "refsegrs": {"gIoU": 11 / 24, "cIoU": 40 / 120, "Pr@0.5": 1 / 2, "Pr@0.6": 1 / 2,
                 "Pr@0.7": 0.0},
    "risbench": {"gIoU": 179 / 420, "cIoU": 28 / 59, "Pr@0.5": 1 / 2, "Pr@0.6": 1 / 2,
                 "Pr@0.7": 0.0},
}  # fmt: skip


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The three fake datasets, written once (tests that break files make their own)."""
    root = tmp_path_factory.mktemp("refer")
    return {name: make(root / name) for name, make in MAKERS.items()}


@pytest.mark.parametrize("layout", list(MAKERS))
def test_readers_give_the_planted_targets(datasets, layout):
    ds = load_refer_dataset(datasets[layout], "test")
    assert (ds.layout, ds.detected) == (layout, True)
    assert [s.sentence for s in ds.samples] == [s for s, _ in TEST_SPLIT[layout]]
    for sample, (_, name) in zip(ds.samples, TEST_SPLIT[layout], strict=True):
        np.testing.assert_array_equal(sample.mask(), target(name))
    # the other splits, and --limit
    assert [s.sentence for s in load_refer_dataset(datasets[layout], "train").samples] == {
        "rrsisd": ["the field at the bottom left", "the triangle"],
        "refsegrs": ["the vehicle in the middle"],
        "risbench": ["the small vehicle at the top right"],
    }[layout]
    assert len(load_refer_dataset(datasets[layout], "test", layout, limit=1)) == 1


def test_rrsisd_uncompressed_rle_polygon_at_pixel_centres_and_annotation_folder_as_root(datasets):
    # ref 3 (train) is an uncompressed-counts RLE, ref 5 a triangle with no pixel centre on its
    # edges (10 px: rows 7-10 with 4, 3, 2, 1 px); DATA may be the rrsisd/ folder itself
    ds = load_refer_dataset(datasets["rrsisd"] / "rrsisd", "train", "rrsisd")
    assert [s.image.name for s in ds.samples] == ["00001.jpg", "00002.jpg"]
    np.testing.assert_array_equal(ds.samples[0].mask(), target("rrsisd-field"))
    triangle = ds.samples[1].mask()
    assert triangle.sum() == 10 and triangle[7:11, :4].sum(1).tolist() == [4, 3, 2, 1]
    np.testing.assert_array_equal(triangle, target("rrsisd-triangle"))


@pytest.mark.parametrize("layout", list(MAKERS))
def test_evaluate_task_refer_on_each_layout_equals_hand_computed_metrics(
    datasets, layout, monkeypatch
):
    pytest.importorskip("torch")
    from drseg_cli import cli
    from drseg_cli.evaluate import refer

    def fixed(model, image, sentence, device):  # the prediction P, whatever the model
        pred = np.zeros(image.shape[1:], bool)
        pred[3:7, 2:8] = True
        return pred

    monkeypatch.setattr(refer, "predict_mask", fixed)
    cli._register()
    args = ["evaluate", "--task", "refer", "--data", str(datasets[layout]), "-m", "test-tiny"]
    res = runner.invoke(cli.app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["info"]["dataset"]["layout"] == layout and out["info"]["dataset"]["detected"]
    assert f"layout {layout} (detected), {len(TEST_SPLIT[layout])} samples from" in res.stderr
    assert [p["sentence"] for p in out["per_sample"]] == [s for s, _ in TEST_SPLIT[layout]]
    m = out["metrics"]
    assert m["samples"] == len(TEST_SPLIT[layout])
    for key, value in HAND[layout].items():
        assert m[key] == pytest.approx(100 * value), key
    # the layout named explicitly reads the same
    res = runner.invoke(cli.app, [*args, "--layout", layout, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["metrics"] == m


@pytest.mark.parametrize("layout", list(MAKERS))
def test_train_task_refer_runs_on_each_layout(datasets, layout, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from drseg_cli import cli

    torch.set_num_threads(1)
    cli._register()
    run = tmp_path / "run"
    args = ["train", "--task", "refer", "--data", str(datasets[layout]), "-o", str(run)]
    args += ["-m", "test-tiny", "--batch-size", "2", "--max-steps", "2", "--eval-every", "2"]
    res = runner.invoke(cli.app, [*args, "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["layout"] == layout
    assert len(summary["losses"]) == 2 and all(np.isfinite(summary["losses"]))
    assert (run / "last.pt").is_file()
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["samples"] == 1  # the val split: one sample each


def test_rrsisd_native_equals_its_rsrefseg2_jsonl_conversion(datasets, tmp_path):
    """RSRefSeg 2's converter (rrsisd-convert_data_to_jsonl.py) copies each ref's ``sent``,
    ``file_name`` and annotation ``segmentation`` (RLE or, here, polygons) into a jsonl line:
    both readers give the same samples; jsonl polygons take the image's size."""
    from drseg_cli.evaluate.refer import iter_samples

    root = datasets["rrsisd"]
    refs = pickle.loads((root / "rrsisd" / "refs(unc).p").read_bytes())
    anns = {a["id"]: a for a in json.loads((root / "rrsisd" / "instances.json").read_text())[
        "annotations"]}  # fmt: skip
    lines = [
        {"split": r["split"], "sent": s["sent"], "file_name": r["file_name"],
         "segmentation": anns[r["ann_id"]]["segmentation"]}
        for r in refs if r["split"] == "test" for s in r["sentences"]
    ]  # fmt: skip
    jsonl = tmp_path / "rrsisd_test.jsonl"
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in lines), "utf-8")
    native = list(iter_samples(load_refer_dataset(root, "test")))
    images = root / "images" / "rrsisd" / "JPEGImages"
    converted = load_refer_dataset(images, str(jsonl))
    assert converted.layout == "rsrefseg2"
    pairs = zip(native, iter_samples(converted), strict=True)
    for (a, image_a, label_a), (b, image_b, label_b) in pairs:
        assert (a.image, a.sentence) == (b.image, b.sentence)
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(label_a, label_b)


def test_rrsisd_refs_with_numpy_ids_load(tmp_path):
    # a refs pickle written with numpy integers (protocol 2, as Python 2 era tools write)
    root = make_rrsisd(tmp_path / "rrsisd")
    refs_file = root / "rrsisd" / "refs(unc).p"
    refs = pickle.loads(refs_file.read_bytes())
    for ref in refs:
        for key in ("ref_id", "ann_id", "image_id"):
            ref[key] = np.int64(ref[key])
    data = pickle.dumps(refs, protocol=2)
    for module in (b"numpy._core.multiarray", b"numpy.core.multiarray"):  # numpy 2, numpy 1
        refs_file.write_bytes(data.replace(b"numpy._core.multiarray", module))
        ds = load_refer_dataset(root, "test")
        assert isinstance(ds.samples[0].image, type(root)) and len(ds) == 3
        np.testing.assert_array_equal(ds.samples[2].mask(), target("rrsisd-road"))


def test_auto_detection_refuses_guesses(tmp_path, datasets):
    with pytest.raises(InputError, match="no referring dataset found"):
        load_refer_dataset(tmp_path, "test")
    both = make_refsegrs(tmp_path / "both")
    (both / "x_test.jsonl").write_text("{}\n", "utf-8")
    with pytest.raises(UsageError, match="rsrefseg2, refsegrs; pass --layout"):
        load_refer_dataset(both, "test")
    assert load_refer_dataset(both, "test", "refsegrs").layout == "refsegrs"
    with pytest.raises(InputError, match=r"no masks/ folder \(layout refsegrs"):
        load_refer_dataset(datasets["rrsisd"], "test", "refsegrs")
    with pytest.raises(InputError, match=r"no rrsisd/refs\(unc\)\.p"):
        load_refer_dataset(datasets["risbench"], "test", "rrsisd")
    with pytest.raises(InputError, match="output_phrase_dev.txt: not found"):
        load_refer_dataset(datasets["risbench"], "dev")
    with pytest.raises(InputError, match=r"no refs in split 'dev' \(splits: test, train, val\)"):
        load_refer_dataset(datasets["rrsisd"], "dev")
    with pytest.raises(UsageError, match="referring layouts are auto, rsrefseg2, rrsisd"):
        load_refer_dataset(datasets["rrsisd"], "test", "isaid")


class _Evil:
    def __reduce__(self):
        return (print, ("ran",))


def test_broken_files_are_one_line_errors_naming_the_file(tmp_path, capsys):
    from drseg_cli import cli

    cli._register()

    def error(root, *extra):
        args = ["evaluate", "--task", "refer", "--data", str(root), "-m", "test-tiny", *extra]
        res = runner.invoke(cli.app, args)
        assert res.exit_code == 1, res.output
        return error_line(res)

    rrsisd = make_rrsisd(tmp_path / "rrsisd")
    refs = rrsisd / "rrsisd" / "refs(unc).p"
    good = refs.read_bytes()
    refs.write_bytes(good[: len(good) // 2])  # truncated
    assert error(rrsisd).startswith(f"drseg: error: {refs}: not a refs pickle")
    refs.write_bytes(pickle.dumps([_Evil()]))  # a pickle that would run code: refused
    line = error(rrsisd)
    assert line.startswith(f"drseg: error: {refs}: not a refs pickle") and "refuses" in line
    assert "ran" not in capsys.readouterr().out
    refs.write_bytes(good)
    inst = rrsisd / "rrsisd" / "instances.json"
    text = inst.read_text()
    inst.write_text(text[:-10], "utf-8")
    assert error(rrsisd).startswith(f"drseg: error: {inst}: not valid JSON")
    inst.write_text(text, "utf-8")
    image = rrsisd / "images" / "rrsisd" / "JPEGImages" / "00002.jpg"
    image.unlink()
    assert error(rrsisd) == f"drseg: error: {image}: image not found (ref 2 of refs(unc).p)"

    refsegrs = make_refsegrs(tmp_path / "refsegrs")
    mask = refsegrs / "masks" / "11.tif"
    mask.unlink()
    expected = f"drseg: error: {mask}: mask not found (line 2 of output_phrase_test.txt)"
    assert error(refsegrs) == expected
    phrases = refsegrs / "output_phrase_val.txt"
    phrases.write_text("11\n", "utf-8")
    assert error(refsegrs, "--split", "val") == (
        f"drseg: error: {phrases}: line 1 is not '<image> <expression>'"
    )
