"""Trained mode: overfitting a synthetic dataset, checkpoints, resume, DDP equivalence, pieces."""

from __future__ import annotations

import json
import os
import socket
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torch.multiprocessing as mp
from rasterio.errors import NotGeoreferencedWarning
from typer.testing import CliRunner

from drseg_cli import cli
from drseg_cli.errors import InputError, UsageError
from drseg_cli.evaluate.datasets import load_dataset
from drseg_cli.model.drseg import DRSegModel, DRSegOptions, resize
from drseg_cli.model.factory import build_model
from drseg_cli.train.augment import AugmentConfig, CropDataset, geometric, photometric
from drseg_cli.train.checkpoint import read_checkpoint, read_checkpoint_info
from drseg_cli.train.modules import HeadConfig, TrainedDRSeg
from drseg_cli.train.trainer import (
    SampleStream,
    TrainConfig,
    lr_factor,
    per_sample_loss,
    run_training,
)

cli._register()
CLASSES = "grass: lawn\nbuilding: roof\nwater\n"


def drseg(*args) -> object:
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _write(path: Path, data: np.ndarray) -> None:
    data = data[None] if data.ndim == 2 else data
    path.parent.mkdir(parents=True, exist_ok=True)
    driver = "PNG" if path.suffix == ".png" else "GTiff"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(
            path,
            "w",
            driver=driver,
            width=data.shape[2],
            height=data.shape[1],
            count=data.shape[0],
            dtype=data.dtype,
        ) as ds:
            ds.write(data)


def make_shapes(root: Path, n: int = 6, size: int = 64, seed: int = 0) -> Path:
    """Textured aerial-like scenes: grass (noisy green), a striped roof, water discs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        label = np.zeros((size, size), np.uint8)
        for _ in range(2):
            cy, cx = rng.integers(12, size - 12, 2)
            r = int(rng.integers(9, 16))
            label[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 2
        y0, x0 = rng.integers(0, size - 24, 2)
        h, w = rng.integers(14, 24, 2)
        label[y0 : y0 + h, x0 : x0 + w] = 1
        noise = rng.normal(0, 1, (3, size, size))
        textures = (
            np.array([70, 140, 60])[:, None, None] + 25 * noise,
            np.array([170, 90, 80])[:, None, None] + ((xx // 3) % 2)[None] * 60 + 10 * noise,
            np.array([40, 70, 160])[:, None, None] + 5 * noise,
        )
        img = np.zeros((3, size, size))
        for k, tex in enumerate(textures):
            img[:, label == k] = tex[:, label == k]
        _write(root / "images" / f"s{i}.tif", np.clip(img, 0, 255).astype(np.uint8))
        _write(root / "labels" / f"s{i}.png", label)
    (root / "classes.txt").write_text(CLASSES)
    return root


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes") / "data")


FAST = [
    "--model", "test-tiny", "--device", "cpu", "--crop-size", "48", "--batch-size", "4",
    "--decoder-stride", "1", "--decoder-channels", "16", "--lr", "2e-2", "--warmup-steps", "5",
    "--workers", "0",
    "--log-every", "10",
]  # fmt: skip


def _records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_overfits_saves_resumes_and_evaluate_reproduces_the_logged_miou(shapes, tmp_path):
    run = tmp_path / "run"
    data = ["--data", shapes, "-c", shapes / "classes.txt", "-o", run]
    r = drseg("train", *data, *FAST, "--max-steps", "30", "--eval-every", "30", "-q")
    assert r.exit_code == 0, r.output
    assert {p.name for p in run.iterdir()} >= {"last.pt", "best.pt", "config.json", "metrics.csv"}
    # a run folder is never silently reused
    r = drseg("train", *data, *FAST, "--max-steps", "30")
    assert r.exit_code == 2 and "--resume" in r.output
    r = drseg("train", *data, "--max-steps", "50", "--eval-every", "25", "--resume", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["resumed_from"] == 30 and summary["steps"] == 50
    evals = _records(run, "eval")
    assert [e["step"] for e in evals] == [30, 50]  # a step-25 eval belonged to the first leg
    assert evals[-1]["mIoU"] >= 90.0, evals
    assert [r["step"] for r in _records(run, "train")] == [10, 20, 30, 40, 50]
    assert summary["best_mIoU"] == max(e["mIoU"] for e in evals)

    info = read_checkpoint_info(run / "best.pt")  # self-describing
    assert [c["name"] for c in info["classes"]] == ["grass", "building", "water"]
    assert info["classes"][0]["synonyms"] == ["lawn"]
    assert info["tile_size"] == 48 and info["model"]["preset"] == "test-tiny"
    assert "optimizer" not in read_checkpoint(run / "best.pt")["train"]

    out = tmp_path / "metrics.json"
    r = drseg("evaluate", "--data", shapes, "--checkpoint", run / "best.pt", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["mIoU"] == pytest.approx(summary["best_mIoU"], abs=1e-3)


def _cfg(root: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(root),
        output=str(out),
        classes=str(root / "classes.txt"),
        model="test-tiny",
        device="cpu",
        crop_size=32,
        batch_size=4,
        steps=4,
        lr=1e-2,
        warmup_steps=1,
        workers=0,
        log_every=1,
        eval_every=1000,
        no_val=True,
        head={"decoder_stride": 2, "channels": 16},
    )
    return TrainConfig(**{**base, **kw})


class _Killed(Exception):
    pass


def _kill_at(step: int):
    def on_record(record: dict) -> None:
        if record["step"] == step:
            raise _Killed

    return on_record


def test_resume_after_a_crash_continues_exactly_and_checks_the_config(shapes, tmp_path):
    run_training(_cfg(shapes, tmp_path / "straight"))
    with pytest.raises(_Killed):  # dies while logging step 3: last.pt holds step 2
        run_training(_cfg(shapes, tmp_path / "split", save_every=2), on_record=_kill_at(3))
    assert read_checkpoint(tmp_path / "split" / "last.pt")["train"]["step"] == 2
    run_training(_cfg(shapes, tmp_path / "split"), resume=True)
    straight = [r["loss"] for r in _records(tmp_path / "straight", "train")]
    split = [r["loss"] for r in _records(tmp_path / "split", "train")]
    assert split == pytest.approx(straight, rel=1e-5) and len(split) == 4
    a = read_checkpoint(tmp_path / "straight" / "last.pt")["state_dict"]
    b = read_checkpoint(tmp_path / "split" / "last.pt")["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(UsageError, match="--lr 0.5 differs from the run being resumed"):
        run_training(_cfg(shapes, tmp_path / "split"), resume=True, given={"lr": 0.5})
    with pytest.raises(UsageError, match="nothing to resume"):
        run_training(_cfg(shapes, tmp_path / "fresh"), resume=True)


def test_accumulation_matches_one_big_batch(shapes, tmp_path):
    run_training(_cfg(shapes, tmp_path / "a", steps=2))
    run_training(_cfg(shapes, tmp_path / "b", steps=2, accum_steps=2))
    a = [r["loss"] for r in _records(tmp_path / "a", "train")]
    b = [r["loss"] for r in _records(tmp_path / "b", "train")]
    assert b == pytest.approx(a, rel=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg: TrainConfig) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    run_training(cfg)


def test_ddp_two_cpu_processes_match_one_process(shapes, tmp_path):
    cfg = _cfg(shapes, tmp_path / "ddp", steps=3)
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg), nprocs=2, join=True)
    run_training(replace(cfg, output=str(tmp_path / "single")))
    ddp = [r["loss"] for r in _records(tmp_path / "ddp", "train")]
    single = [r["loss"] for r in _records(tmp_path / "single", "train")]
    assert len(ddp) == 3 and ddp == pytest.approx(single, rel=1e-4)
    a = read_checkpoint(tmp_path / "ddp" / "last.pt")["state_dict"]
    b = read_checkpoint(tmp_path / "single" / "last.pt")["state_dict"]
    # same weights up to float summation order (Adam's first steps amplify it; lr = 1e-2)
    assert all(torch.allclose(a[k], b[k], atol=1e-3) for k in a)


def test_batch_must_split_evenly_and_bad_labels_name_the_file(shapes, tmp_path):
    with pytest.raises(UsageError, match="multiple of processes"):
        run_training(_cfg(shapes, tmp_path / "r", batch_size=3, accum_steps=2))
    with pytest.raises(InputError, match=r"s\d\.png: label values \[2\] are outside the 2"):
        run_training(_cfg(shapes, tmp_path / "r2", classes="grass,building", steps=1))


# ---------------------------------------------------------------------------- pieces


def test_sample_stream_splits_the_same_global_batch_any_way():
    stream = SampleStream(5, seed=3)
    whole = stream.micro_keys(2, 0, 0, 1, 4, 1)
    parts = [stream.micro_keys(2, m, r, 2, 4, 2) for m in range(2) for r in range(2)]
    assert [k for p in parts for k in p] == whole
    epoch0 = sorted(stream.key(p)[0] for p in range(5))
    assert epoch0 == [0, 1, 2, 3, 4] and stream.key(5)[1] == 1


def test_crops_are_deterministic_and_augmentation_keeps_labels_aligned(shapes):
    ds = load_dataset(shapes)
    crops = CropDataset(ds, AugmentConfig(crop_size=32), seed=1)
    a, b = crops[(2, 0)], crops[(2, 0)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(crops[(2, 1)][0], a[0])
    assert a[0].shape == (3, 32, 32) and a[1].dtype == torch.int64
    # flips/rotations move image and label together: encode the label in the image
    label = torch.arange(64).view(8, 8) % 3
    image = label.float().expand(3, 8, 8) / 2
    rng = np.random.default_rng(0)
    for _ in range(8):
        img, lab = geometric(image, label, rng, AugmentConfig(crop_size=8))
        assert torch.equal((img[0] * 2).round().long(), lab)
    jittered = photometric(torch.rand(3, 8, 8), rng, AugmentConfig(crop_size=8))
    assert jittered.min() >= 0 and jittered.max() <= 1


def test_loss_ignores_ignored_pixels_and_schedule_warms_then_decays():
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    masked = labels.clone()
    masked[0, :2] = 255
    for kind in ("ce", "bce"):
        full = per_sample_loss(logits, labels, kind, 255)
        part = per_sample_loss(logits, masked, kind, 255)
        assert part[1] == full[1] and part[0] != full[0]
        changed = logits.clone()
        changed[0, :, :2] += 5.0  # ignored pixels: no effect
        assert torch.allclose(per_sample_loss(changed, masked, kind, 255), part)
    cfg = TrainConfig(data="d", output="o", steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    lrs = [lr_factor(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(0.01, abs=1e-3)


def test_trained_model_starts_from_the_training_free_prediction():
    base = build_model("test-tiny", method="drseg", drseg_options=DRSegOptions(spsd=False))
    base_nopdgr = DRSegModel(
        base.clip, base.dino, DRSegOptions(spsd=False, pdgr=False), tile_size=64
    )
    head = HeadConfig(decoder_stride=4)
    model = TrainedDRSeg.from_drseg(base_nopdgr, head).eval()
    images = torch.rand(2, 3, 64, 64)
    text = model.encode_text([["road"], ["tree"], ["water"]])
    with torch.no_grad():
        out = model(images, text)
        ref = base_nopdgr(images, text)
    assert out.shape == (2, 3, 16, 16)
    scale = model.decoder.log_scale.exp() / base_nopdgr.options.logit_scale
    ref = resize(resize(ref, (8, 8)), (16, 16))  # CLIP grid → DINO grid (8×8) → stride 4
    torch.testing.assert_close(out, scale * ref, rtol=1e-4, atol=1e-4)

    full = TrainedDRSeg.from_drseg(base, head).train()
    full(images, text).logsumexp(1).mean().backward()
    learnable = {n for n, p in full.named_parameters() if p.requires_grad}
    assert learnable and all(not n.startswith(("clip.", "dino.")) for n in learnable)
    assert all(full.get_parameter(n).grad is not None for n in learnable if "spsd" not in n)
    assert not full.clip.training and not full.dino.training


def test_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(InputError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"junk\.pt: not a readable checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a drseg trained checkpoint"):
        read_checkpoint(tmp_path / "other.pt")
