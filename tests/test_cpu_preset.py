"""The CPU preset: DINO on the tile at half resolution (``vit-b16-cpu``; ``test-tiny-cpu`` has
the same mechanics with tiny random backbones), and the one-line suggestion on a CPU."""

from __future__ import annotations

import numpy as np
import rasterio
import torch
from typer.testing import CliRunner

from drseg_cli import cli
from drseg_cli.model.factory import CPU_PRESET, build_model, get_preset
from drseg_cli.raster.mask_meta import MASK_NODATA
from tests.helpers import write_geotiff

cli._register()


def drseg(*args):
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_cpu_preset_is_vit_s8_dino_at_half_resolution():
    p = get_preset(CPU_PRESET)
    assert (p.clip_model, p.dino_model, p.tile_size, p.dino_downsample) == (
        "ViT-B-16",
        "vit_small_patch8_224.dino",
        448,
        2,
    )


def test_half_resolution_dino_sees_the_box_averaged_tile_on_a_coarser_grid():
    model = build_model("test-tiny-cpu", method="drseg")
    assert model.guide_downsample == 2 and model.preprocess.multiple == 16
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        guide = model.guide_features(images)
        assert guide.shape[-2:] == (4, 4)  # 64 px / 2 / patch 8
        same = model.dino(
            (
                torch.nn.functional.avg_pool2d(images, 2)
                - torch.tensor(model.dino.mean)[:, None, None]
            )
            / torch.tensor(model.dino.std)[:, None, None]
        )
        torch.testing.assert_close(guide, same)  # DINO on the box-averaged tile
        assert model(images, model.encode_text([["a"], ["b"]])).shape == (1, 2, 64, 64)


def test_cpu_preset_runs_end_to_end_and_drseg_on_a_cpu_suggests_it_once(tmp_path):
    rng = np.random.default_rng(0)
    img = np.kron(rng.integers(1, 255, (3, 12, 15)), np.ones((1, 8, 8))).astype(np.uint8)
    img[:, :20, :30] = 0  # a nodata corner
    scene = write_geotiff(tmp_path / "scene.tif", img, nodata=0)
    out = tmp_path / "cpu.tif"
    args = ["-c", "water,land,cloud", "--device", "cpu", "--tile-size", "64", "--batch-size", "8"]
    r = drseg("segment", scene, "-o", out, "--model", "test-tiny-cpu", *args)
    assert r.exit_code == 0, r.output
    assert CPU_PRESET not in r.output  # already the CPU preset: nothing to suggest
    with rasterio.open(scene) as src, rasterio.open(out) as m:
        mask, valid = m.read(1), src.dataset_mask() > 0
    np.testing.assert_array_equal(mask == MASK_NODATA, ~valid)
    assert set(np.unique(mask[valid])) <= {0, 1, 2}

    r = drseg("segment", scene, "-o", tmp_path / "full.tif", "--model", "test-tiny", *args)
    assert r.exit_code == 0, r.output
    assert r.output.count("--model test-tiny-cpu") == 1, r.output  # a test model's twin
    r = drseg(
        "segment", scene, "-o", tmp_path / "clip.tif", "--model", "test-tiny", "--method",
        "clip", *args,
    )  # fmt: skip
    assert CPU_PRESET not in r.output  # CLIP-only runs no DINO


def test_the_real_preset_is_suggested_for_the_real_model(caplog):
    from drseg_cli.commands._model import ModelChoice, suggest_cpu_preset
    from drseg_cli.raster.reader import forget_warnings

    forget_warnings()
    suggest_cpu_preset(ModelChoice(model="vit-b16", method="drseg"), "cpu")
    suggest_cpu_preset(ModelChoice(model="vit-b16", method="drseg"), "cuda")  # a GPU: nothing
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and f"--model {CPU_PRESET} " in messages[0]
    forget_warnings()
