"""TilePredictor on the paths a GPU takes: out-of-memory retries, fp16 overflow, torch bound."""

from __future__ import annotations

import re
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from drseg_cli.classes import parse_classes
from drseg_cli.errors import DrsegError
from drseg_cli.pipeline.runtime import TilePredictor
from drseg_cli.pipeline.segment import OutputPlan, SegmentConfig, segment_scene
from tests.helpers import ContextModel

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def tiles(n: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(n).random((n, 3, size, size), dtype=np.float32)


class LeakCheckingOomModel(ContextModel):
    """Runs out of memory above ``limit`` tiles after allocating a big activation, and notes
    at each forward whether the activations of earlier failed forwards are still alive."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.failed: list[weakref.ref] = []
        self.alive_at_start: list[int] = []

    def forward(self, images, text):
        self.alive_at_start.append(sum(ref() is not None for ref in self.failed))
        activation = torch.empty(len(images), 1 << 18)  # stands in for the batch's activations
        if len(images) > self.limit:
            self.failed.append(weakref.ref(activation))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().forward(images, text)


def test_oom_retry_runs_after_the_failed_batch_is_released() -> None:
    model = LeakCheckingOomModel(limit=2)
    predictor = TilePredictor(model, [["a"], ["b"]], CPU)
    batch = tiles(8)
    out = predictor.predict(batch)
    np.testing.assert_array_equal(
        out, TilePredictor(ContextModel(), [["a"], ["b"]], CPU).predict(batch)
    )
    assert predictor.max_batch == 2
    assert len(model.failed) == 2  # 8 → 4 → 2
    # every retry (and every later batch) starts with no failed batch's tensors alive
    assert model.alive_at_start == [0] * len(model.alive_at_start)


def test_oom_with_one_tile_raises_outside_the_handler() -> None:
    model = LeakCheckingOomModel(limit=0)
    predictor = TilePredictor(model, [["a"]], CPU)
    with pytest.raises(DrsegError, match="single tile; use a smaller --tile-size") as info:
        predictor.predict(tiles(3))
    assert info.value.__context__ is None  # not raised while the OOM was being handled
    assert model.alive_at_start == [0, 0]


class OverflowModel(ContextModel):
    """A linear head whose outputs exceed fp16's range (65504): inf under fp16 autocast."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, 3)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(3) * 1e5)
            self.head.bias.zero_()
        self.calls = 0

    def forward(self, images, text):
        self.calls += 1
        feats = self.head(images.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # autocast op
        return torch.einsum("bchw,kc->bkhw", feats.float(), text) * 1e-5


def test_fp16_overflow_is_redone_in_fp32_and_fp32_kept(caplog) -> None:
    classes = [["a"], ["b"], ["c"]]
    reference = TilePredictor(OverflowModel(), classes, CPU).predict(tiles(2))
    assert np.isfinite(reference).all()
    model = OverflowModel()
    predictor = TilePredictor(model, classes, CPU, torch.float16)
    with caplog.at_level("WARNING"):
        out = predictor.predict(tiles(2))
    np.testing.assert_array_equal(out, reference)
    assert "NaN/Inf logits under float16 autocast: redoing the batch in fp32" in caplog.text
    assert predictor.amp_dtype is None and model.calls == 2
    predictor.predict(tiles(2))
    assert model.calls == 3  # later batches go straight to fp32


def test_finite_half_precision_logits_stay_in_half_precision() -> None:
    class Small(OverflowModel):
        def forward(self, images, text):
            assert torch.is_autocast_enabled("cpu")
            return super().forward(images * 1e-3, text)

    predictor = TilePredictor(Small(), [["a"], ["b"], ["c"]], CPU, torch.bfloat16)
    assert np.isfinite(predictor.predict(tiles(2))).all()
    assert predictor.amp_dtype == torch.bfloat16


class NanModel(ContextModel):
    """NaN logits in one column of every tile, whatever the precision."""

    def forward(self, images, text):
        out = super().forward(images, text)
        out[..., 1] = float("nan")
        return out


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_nan_logits_fail_the_scene_and_leave_nothing(rgb_scene, tmp_path, amp) -> None:
    classes = parse_classes("water,tree")
    predictor = TilePredictor(NanModel(), [c.prompt_names for c in classes], CPU, amp)
    out = tmp_path / "out"
    out.mkdir()
    plan = OutputPlan(out / "mask.tif", probs=out / "probs.tif", vector=out / "mask.gpkg")
    with pytest.raises(DrsegError, match="model produced NaN/Inf logits in fp32"):
        segment_scene(
            rgb_scene,
            plan,
            predictor,
            classes,
            SegmentConfig(tile_size=64, overlap=0.25),
            tile_multiple=16,
            default_tile_size=64,
        )
    assert list(out.iterdir()) == []


#: torch APIs the package uses that are newer than torch 2.1, with the release that has them.
NEWER_TORCH_APIS = {
    "torch.OutOfMemoryError": (2, 5),  # device-generic OOM error (torch.cuda's before)
    "torch.amp.GradScaler": (2, 3),  # device-generic GradScaler
    "torch.serialization.safe_globals": (2, 5),  # context manager (add_safe_globals: 2.4)
}


def test_declared_torch_bound_covers_the_apis_used() -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "drseg_cli").rglob("*.py"))
    used = {api: v for api, v in NEWER_TORCH_APIS.items() if api in source}
    assert used, "the scan must find the APIs it guards"
    spec = re.search(r'"(torch\s*>=\s*(\d+)\.(\d+)[^"]*)"', (ROOT / "pyproject.toml").read_text())
    assert spec, "pyproject.toml must give torch a lower bound"
    bound = (int(spec[2]), int(spec[3]))
    too_new = {api: v for api, v in used.items() if v > bound}
    assert not too_new, f"{spec[1]} but the code uses {too_new}"
