"""DINO must visibly help: the planted-structure experiment (tests/planted_case.py) at the
default DR-Seg options, scored at pixel level through the pipeline's resampling.

The full table (more seeds, ``--json``) is ``benchmarks/planted.py``.
"""

from __future__ import annotations

import pytest
import torch

from drseg_cli.model.drseg import DRSegModel, DRSegOptions
from tests.planted_case import PlantedClip, PlantedConfig, PlantedDino, encode_images, label_tiles
from tests.planted_case import run as run_planted

SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (and contention on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def table() -> dict[str, dict[str, float]]:
    return run_planted(PlantedConfig(), SEEDS)


def test_dino_that_carries_the_boundaries_gains_over_alpha_zero(table) -> None:
    got = table["informative"]
    assert got["drseg"] - got["drseg_alpha0"] >= 3.0, got


@pytest.mark.parametrize("kind", ["noise", "smooth"])
def test_uninformative_dino_costs_at_most_a_point(table, kind) -> None:
    got = table[kind]
    assert got["drseg"] - got["drseg_alpha0"] >= -1.0, got


def test_alpha_zero_scores_exactly_as_the_clip_method(table) -> None:
    # Same grid and same resampling: without propagation nothing but CLIP is left.
    for kind in table.values():
        assert kind["drseg_alpha0"] == kind["clip"], kind


def test_planted_encoders_are_deterministic_and_dino_carries_no_class() -> None:
    cfg = PlantedConfig(tiles=2)
    cells, classes = label_tiles(cfg, 0)
    images = torch.from_numpy(encode_images(cells, classes))
    clip, dino = PlantedClip(cfg, 0), PlantedDino(cfg, 0)
    model = DRSegModel(clip, dino, DRSegOptions(), tile_size=cfg.tile)
    with torch.no_grad():
        first = model(images, clip.text)
        assert torch.equal(model(images, clip.text), first)  # α = 0 vs defaults: same features
        relabelled = images.clone()
        relabelled[:, 1] = (
            torch.from_numpy((classes + 1) % cfg.classes) / 255.0
        )  # same cells, other classes
        assert torch.equal(dino(model_input(relabelled, dino)), dino(model_input(images, dino)))
        assert not torch.equal(clip(model_input(relabelled, clip)), clip(model_input(images, clip)))


def model_input(images: torch.Tensor, encoder: torch.nn.Module) -> torch.Tensor:
    mean = torch.tensor(encoder.mean).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std).view(1, 3, 1, 1)
    return (images - mean) / std
