"""The stored-output regression case: test-tiny DR-Seg on the bundled NAIP sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import torch

from drseg_cli.classes import parse_classes
from drseg_cli.model.factory import build_model
from drseg_cli.pipeline.runtime import TilePredictor
from drseg_cli.pipeline.segment import OutputPlan, SegmentConfig, segment_scene

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "sample_tiles" / "naip_prairie_512.tif"
GOLDEN = Path(__file__).parent / "data" / "golden" / "naip_prairie_test_tiny_drseg"
CLASSES = parse_classes("water,grassland,farmland,road,building")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Changes when the libraries' random initialisation of test-tiny changes."""
    total = sum(float(p.double().abs().sum()) for p in model.state_dict().values())
    return f"{total:.6e}"


def run_golden_case(workdir: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Mask and uint8 probabilities of the whole pipeline on a 512² scene of 36 tiles."""
    model = build_model("test-tiny", method="drseg")
    predictor = TilePredictor(model, [c.prompt_names for c in CLASSES], torch.device("cpu"))
    plan = OutputPlan(workdir / "mask.tif", probs=workdir / "probs.tif")
    config = SegmentConfig(tile_size=112, overlap=0.25, batch_size=2)
    segment_scene(SCENE, plan, predictor, CLASSES, config, tile_multiple=16, default_tile_size=112)
    with rasterio.open(plan.mask) as m, rasterio.open(plan.probs) as p:
        return m.read(1), p.read(), weights_fingerprint(model)
