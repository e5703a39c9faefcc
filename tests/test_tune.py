"""``drseg tune`` and ``--config``: features once per image, best ≥ defaults, exact round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from typer.testing import CliRunner

from drseg_cli import cli
from drseg_cli.model.backbones import ClipDenseEncoder, DinoEncoder
from drseg_cli.tune.features import tile_windows
from tests.helpers import error_line, write_geotiff

cli._register()
TINY = ["--model", "test-tiny", "--device", "cpu", "--tile-size", "32"]
CLASSES = "background,road,tree"
# a small space keeps the search to seconds; the defaults (steps 10, window 3) are tried too
SPACE = ["--param", "steps=3,5", "--param", "window=1,2", "--param", "k=4,8"]


def drseg(*args):
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def make_dataset(root, sizes, seed=0, k=3):
    """A generic labelled set: blocky labels that the image's red band partly shows."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        label = np.kron(rng.integers(0, k, (h // 8 + 1, w // 8 + 1)), np.ones((8, 8)))[:h, :w]
        red = label * 70 + rng.integers(0, 60, (h, w))
        img = np.stack([red, rng.integers(0, 255, (h, w)), np.full((h, w), 90)])
        write_geotiff(root / "images" / f"s{i}.tif", img.astype(np.uint8), crs=None)
        write_geotiff(root / "labels" / f"s{i}.png", label.astype(np.uint8), driver="PNG", crs=None)
    return root


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One tune run (exact float32 cache) on images that each fit one 32 px tile."""
    root = tmp_path_factory.mktemp("tune")
    data = make_dataset(root / "data", [(32, 32), (24, 28), (32, 20), (30, 32)])
    out = root / "out"
    r = drseg(
        "tune", "-d", data, "-c", CLASSES, "-o", out, *TINY, *SPACE,
        "--budget", "6", "--seed", "3", "--cache-dtype", "float32", "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    # (seed 3 draws a configuration better than the defaults: the round trips below then
    # show a file that changes the result, not the defaults again)
    assert summary["miou"] > summary["default_miou"]
    return data, out, summary


def evaluate_miou(data, *args) -> float:
    r = drseg("evaluate", "-d", data, "-c", CLASSES, *TINY, "--json", *args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["mIoU"]


def test_tune_best_is_at_least_the_defaults_and_matches_evaluate(tuned):
    data, out, summary = tuned
    assert {p.name for p in out.iterdir()} >= {"best.json", "trials.csv", "trials.json"}
    trials = json.loads((out / "trials.json").read_text())
    assert len(trials) == 6 and sum(t["default"] for t in trials) == 1
    # the defaults are carried to the last rung, so the best saw every image as they did
    assert summary["images"] == 4 and next(t for t in trials if t["default"])["images"] == 4
    best_miou = evaluate_miou(data, "--config", out / "best.json")
    default_miou = evaluate_miou(data)
    assert best_miou >= default_miou
    # tune scores single-tile images exactly as evaluate does (float32 cache)
    assert summary["miou"] == pytest.approx(best_miou, abs=1e-4)  # (JSON: 4 decimals)
    assert summary["default_miou"] == pytest.approx(default_miou, abs=1e-4)


def hand_options(config: dict) -> list[str]:
    """The options a configuration file stands for, spelled on the command line."""
    args = []
    for key, value in config.items():
        if key in ("drseg-config", "tune"):
            continue
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def test_config_round_trips_through_segment_and_evaluate(tuned, tmp_path):
    data, out, _ = tuned
    config = json.loads((out / "best.json").read_text())
    masks = {}
    for name, args in {
        "file": ["--config", out / "best.json"],
        "hand": hand_options(config),
        "defaults": ["--model", "test-tiny", "--tile-size", "32"],
    }.items():
        folder = tmp_path / name
        r = drseg(
            "segment", data / "images", "-c", CLASSES, "-o", f"{folder}/", *args,
            "--device", "cpu", "--allow-no-crs", "-q",
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        masks[name] = []
        for path in sorted(folder.glob("*.tif")):
            with rasterio.open(path) as ds:
                masks[name].append(ds.read(1))
        assert len(masks[name]) == 4
    assert all(np.array_equal(a, b) for a, b in zip(masks["file"], masks["hand"], strict=True))
    assert not all(  # the file changed the masks
        np.array_equal(a, b) for a, b in zip(masks["file"], masks["defaults"], strict=True)
    )
    by_hand = evaluate_miou(data, *hand_options(config))
    assert evaluate_miou(data, "--config", out / "best.json") == by_hand
    assert by_hand != evaluate_miou(data)


def test_command_line_options_win_over_the_config_file(tuned, tmp_path):
    data, out, _ = tuned
    config = json.loads((out / "best.json").read_text())
    other = 0.1 if config["rho"] != 0.1 else 0.9
    mixed = evaluate_miou(data, "--config", out / "best.json", "--rho", str(other))
    hand = hand_options(config | {"rho": other})
    assert mixed == evaluate_miou(data, *hand)


def test_features_are_computed_once_per_image(tmp_path, monkeypatch):
    # one image larger than a tile (tiled), both CLIP baselines searched
    sizes = [(32, 32), (48, 40), (20, 32)]
    data = make_dataset(tmp_path / "data", sizes, seed=1)
    tiles = sum(len(tile_windows(w, h, 32)) for h, w in sizes)
    assert tiles == 1 + 4 + 1
    calls = {"clip": 0, "dino": 0}

    def counting(kind, forward):
        def wrapper(self, images, *args, **kwargs):
            calls[kind] += images.shape[0]
            return forward(self, images, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        ClipDenseEncoder, "forward_tokens", counting("clip", ClipDenseEncoder.forward_tokens)
    )
    monkeypatch.setattr(DinoEncoder, "forward", counting("dino", DinoEncoder.forward))
    args = ["tune", "-d", data, "-c", CLASSES, *TINY, *SPACE, "--budget", "5", "--json"]
    r = drseg(*args, "-o", tmp_path / "a")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["features_computed"] == 3
    # every tile once through DINO, once through each CLIP baseline's encoder — not per trial
    assert calls == {"clip": 2 * tiles, "dino": tiles}
    calls.update(clip=0, dino=0)
    r = drseg(*args, "-o", tmp_path / "b", "--cache", tmp_path / "a" / "features")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["features_computed"] == 0
    assert calls == {"clip": 0, "dino": 0}  # a second search reuses the cache


def test_tune_writes_the_plot_of_the_two_most_influential_parameters(tuned):
    _, out, summary = tuned
    first, second = list(summary["influence"])[:2]
    png = out / f"mIoU_{first}_{second}.png"
    assert summary["outputs"]["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "content, problem",
    [
        ('{"drseg-config": 1, "rhoo": 0.5}', "unknown key(s) rhoo"),
        ('{"drseg-config": 1, "k": "many"}', "k must be a int"),
        ('{"drseg-config": 1, "rho": true}', "rho must be a float"),
        ('{"rho": 0.5}', "not a drseg configuration"),
        ('{"drseg-config": 2}', "version 2 is not supported"),
        ("rho = 0.5", "not a JSON configuration"),
    ],
)
@pytest.mark.parametrize("command", ["segment", "evaluate"])
def test_bad_config_file_is_one_line_error(tmp_path, rgb_scene, content, problem, command):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    target = tmp_path / "m.tif"
    if command == "segment":
        r = drseg("segment", rgb_scene, "-c", "a,b", "-o", target, "--config", bad, *TINY)
    else:
        r = drseg("evaluate", "-d", tmp_path, "-c", "a,b", "--config", bad, *TINY)
    assert r.exit_code == 2
    line = error_line(r)
    assert str(bad) in line and problem in line
    assert not target.exists()


def test_tune_refuses_existing_results_without_overwrite(tuned):
    data, out, _ = tuned
    before = (out / "best.json").read_bytes()
    r = drseg("tune", "-d", data, "-c", CLASSES, "-o", out, *TINY, "--budget", "1")
    assert r.exit_code == 2 and "best.json" in error_line(r)
    assert (out / "best.json").read_bytes() == before


def test_halving_carries_the_defaults_to_every_image(tmp_path):
    """A poor first configuration (the one run_search treats as the defaults) is dropped by
    nobody: it is scored on every image, so 'best >= defaults' compares like with like."""
    import torch

    from drseg_cli.evaluate.datasets import load_dataset
    from drseg_cli.model.drseg import DRSegOptions
    from drseg_cli.model.factory import build_model
    from drseg_cli.pipeline.runtime import TilePredictor
    from drseg_cli.tune.features import FeatureCache
    from drseg_cli.tune.search import Scorer, run_search

    data = make_dataset(tmp_path / "data", [(32, 32), (24, 28), (32, 20), (30, 32)], seed=2)
    dataset = load_dataset(data)
    cpu = torch.device("cpu")
    net = build_model("test-tiny", method="drseg", tile_size=32)
    predictor = TilePredictor(net, [["background"], ["road"], ["tree"]], cpu)
    models, texts = {"clearclip": net}, {"clearclip": predictor.text}
    cache = FeatureCache(tmp_path / "cache", dataset, models, 3, tile_size=32, device=cpu)
    cache.ensure()
    scorer = Scorer(cache, models, texts, DRSegOptions(), background=0, device=cpu)
    configs = [{"rho": r, "alpha": a} for r, a in ((0.5, 0.8), (0.3, 0.5), (0.7, 0.95), (0.9, 0.8))]
    configs.append({"rho": 0.5, "alpha": 0.0})
    names = ["background", "road", "tree"]
    trials = run_search(scorer, configs, names)
    worst = min(trials, key=lambda t: t.first_miou)
    assert not worst.is_default and worst.images < 4  # the worst start is dropped...
    configs.remove(worst.params)
    trials = run_search(scorer, [worst.params, *configs], names)
    first = next(t for t in trials if t.is_default)
    assert first.params == worst.params and first.images == 4  # ...unless it is the defaults
    # halving: 5 on 1 image → 3 (+ the defaults) on 2 → 2 (+ the defaults) on all 4
    assert sorted(t.images for t in trials) == [1, 2, 4, 4, 4]


@pytest.mark.parametrize("width, height", [(32, 32), (20, 31), (48, 40), (100, 33), (64, 96)])
def test_tile_windows_score_every_pixel_once(width, height):
    seen = np.zeros((height, width), int)
    for x0, y0, wy0, wx0, wy1, wx1 in tile_windows(width, height, 32):
        assert 0 <= wy0 < wy1 <= 32 and 0 <= wx0 < wx1 <= 32
        seen[y0 + wy0 : y0 + wy1, x0 + wx0 : x0 + wx1] += 1
    assert (seen == 1).all()


@pytest.mark.parametrize(
    "param, problem",
    [("rho=0.3,x", "values must be floats"), ("rhoo=1", "NAME one of"), ("rho=2", "rho must be")],
)
def test_tune_bad_param_is_one_line_error(tmp_path, param, problem):
    data = make_dataset(tmp_path / "data", [(32, 32)])
    out = tmp_path / "out"
    r = drseg("tune", "-d", data, "-c", CLASSES, "-o", out, *TINY, "--param", param)
    assert r.exit_code == 2 and problem in error_line(r)
    assert not out.exists()  # nothing written, not even the folder
