"""DGL-RSIS models: proposals (superpixel, SAM AMG on a tiny random SamModel), context crops,
planted scenes for mask classification and referring selection, Grad-CAM, the referrer
through the ReferringModel interface, and ``drseg segment --method dglrsis`` on a GeoTIFF."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import torch
from typer.testing import CliRunner

from drseg_cli import cli
from drseg_cli.errors import DrsegError, UsageError
from drseg_cli.model.base import ReferOutput, ReferringModel
from drseg_cli.model.dglrsis import globalalign, local
from drseg_cli.model.dglrsis.model import build_dglrsis_referrer
from drseg_cli.model.dglrsis.options import DGLRSISOptions
from drseg_cli.model.dglrsis.proposals import (
    filter_masks,
    merge_hierarchy,
    sam_proposals,
    superpixel_proposals,
)
from drseg_cli.model.factory import build_model
from tests.helpers import DATA

cli._register()

FAST = DGLRSISOptions(superpixels=24, cam_scales=(1.0, 1.5), negatives=("background", "road"))


def planted(size: int = 160) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Grey scene with two red squares (left, right) and a blue one between them."""
    img = np.full((size, size, 3), 0.5, np.float32)
    regions = {}
    for name, (y, x), colour in (
        ("left", (60, 16), (0.9, 0.1, 0.1)),
        ("right", (60, 112), (0.9, 0.1, 0.1)),
        ("middle", (60, 64), (0.1, 0.2, 0.9)),
    ):
        mask = np.zeros((size, size), bool)
        mask[y : y + 32, x : x + 32] = True
        img[mask] = colour
        regions[name] = mask
    return img, regions


def fraction_inside(masks: torch.Tensor, region: np.ndarray) -> torch.Tensor:
    r = torch.from_numpy(region)
    return (masks & r).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp(min=1)


@pytest.fixture(scope="module")
def referrer():
    return build_dglrsis_referrer("test-tiny", options=FAST)


# --------------------------------------------------------------------------- proposals


def test_superpixel_proposals_follow_planted_edges():
    img, regions = planted()
    masks = torch.from_numpy(superpixel_proposals(img, FAST))
    assert masks.dtype == torch.bool and masks.shape[1:] == img.shape[:2]
    assert masks.any(0).all()  # every pixel has a proposal
    for region in regions.values():
        frac = fraction_inside(masks, region)
        pure = masks[frac == 1].any(0).numpy()
        assert (pure == region).all()  # the region is tiled exactly by proposals inside it
    # coarser levels exist: some proposal holds a whole square
    assert any((m.numpy() == regions["left"]).all() for m in masks)


def test_merge_hierarchy_is_nested_and_hits_the_counts():
    rng = np.random.default_rng(0)
    labels = np.kron(np.arange(16).reshape(4, 4), np.ones((8, 8), int))
    image = rng.random((32, 32, 3))
    levels = merge_hierarchy(labels, image, [8, 3])
    assert [len(np.unique(level)) for level in levels] == [8, 3]
    for fine, coarse in zip([labels, levels[0]], levels, strict=True):
        for value in np.unique(fine):  # each finer region lies in one coarser region
            assert len(np.unique(coarse[fine == value])) == 1


def tiny_sam():
    from transformers import SamConfig, SamModel

    cfg = SamConfig(
        vision_config=dict(
            hidden_size=32,
            output_channels=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=128,
            patch_size=16,
            window_size=4,
            global_attn_indexes=[1],
            mlp_dim=64,
            num_pos_feats=16,
        ),
        prompt_encoder_config=dict(
            hidden_size=32, image_size=128, patch_size=16, mask_input_channels=4
        ),
        mask_decoder_config=dict(
            hidden_size=32,
            mlp_dim=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            iou_head_hidden_dim=32,
        ),
    )
    torch.manual_seed(0)
    return SamModel(cfg).eval()


def test_sam_amg_from_a_given_sam_model():
    sam = tiny_sam()
    img, _ = planted(96)
    image = torch.from_numpy(img).permute(2, 0, 1)
    keep_all = DGLRSISOptions(
        proposals="sam",
        points_per_side=3,
        points_per_batch=4,
        pred_iou_thresh=0,
        stability_thresh=0,
        min_area=0,
        nms_iou=1.0,
    )
    masks, scores = sam_proposals(sam, image, keep_all, leftover=False)
    assert masks.dtype == torch.bool and masks.shape[1:] == (96, 96)
    assert 0 < len(masks) <= 27 and scores.shape == (len(masks),)  # ≤ 9 points × 3 masks
    assert torch.all(scores[:-1] >= scores[1:])  # best first
    strict = DGLRSISOptions(proposals="sam", points_per_side=3, pred_iou_thresh=1.0)
    masks, scores = sam_proposals(sam, image, strict)  # nothing passes: the leftover only
    assert masks.shape == (1, 96, 96) and masks.all() and scores.tolist() == [0.0]


def test_amg_filter_drops_low_iou_unstable_and_duplicate_masks():
    logits = torch.full((4, 20, 20), -10.0)
    logits[0, 2:10, 2:10] = 10  # good
    logits[1, 2:10, 2:11] = 9  # near-duplicate of 0, lower IoU score → NMS drops it
    logits[2, 12:18, 12:18] = 10  # low predicted IoU
    logits[3, 12:18, 2:8] = 0.5  # unstable: flips between ±1 offsets
    iou = torch.tensor([0.95, 0.9, 0.5, 0.99])
    masks, scores = filter_masks(logits, iou, DGLRSISOptions())
    assert scores.tolist() == pytest.approx([0.95])
    assert torch.equal(masks[0], logits[0] > 0)


# --------------------------------------------------------------------------- local alignment


def test_context_crop_enlarges_and_attenuates_background():
    image = torch.rand(3, 64, 64)
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, 16:32, 24:40] = True  # 16×16 box
    fill = (0.2, 0.4, 0.6)
    erased = local.context_crops(image, mask, DGLRSISOptions(attenuation=0.0), 32, fill)
    kept = local.context_crops(image, mask, DGLRSISOptions(attenuation=1.0), 32, fill)
    half = local.context_crops(image, mask, DGLRSISOptions(attenuation=0.5), 32, fill)
    # box 16 px × ratio 1.5 = 24 px → 32 px crop: the mask spans the middle 2/3
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[6:26, 6:26] = True
    mu = torch.tensor(fill).view(3, 1, 1)
    assert torch.allclose(erased[0][:, ~inside][:, :10], mu.view(3, 1).expand(3, 10), atol=1e-5)
    assert torch.allclose(half[0], 0.5 * (erased[0] + kept[0]), atol=1e-5)
    core = torch.zeros(32, 32, dtype=torch.bool)
    core[8:24, 8:24] = True  # well inside the mask: untouched by attenuation
    assert torch.allclose(erased[0][:, core], kept[0][:, core], atol=1e-5)
    assert not torch.allclose(kept[0][:, ~inside], mu.view(3, 1).expand_as(kept[0][:, ~inside]))


def test_segmentation_labels_exactly_the_planted_region(monkeypatch):
    """CLIP scores replaced: a proposal's 'ship' logit is its share inside the left square.
    Mask classification + pixel fusion must label exactly that square."""
    model = build_model("test-tiny", method="dglrsis", dglrsis_options=FAST)
    img, regions = planted()
    target = regions["left"]

    def fake_logits(image, masks, text):
        frac = fraction_inside(masks.cpu(), target)
        return torch.stack([10 * (1 - frac), 10 * frac], 1)

    monkeypatch.setattr(model, "proposal_logits", fake_logits)
    text = model.encode_text([["background"], ["ship"]])
    with torch.inference_mode():
        logits = model(torch.from_numpy(img).permute(2, 0, 1)[None], text)
    assert logits.shape == (1, 2, 160, 160)
    assert np.array_equal(logits[0].argmax(0).numpy() == 1, target)
    probs = logits[0].softmax(0)
    assert torch.allclose(probs.sum(0), torch.ones(160, 160), atol=1e-4)


def test_class_text_is_enriched_by_the_knowledge_table():
    model = build_model("test-tiny", method="dglrsis")
    clip = model.clip
    plain = local.enriched_text(clip, [["house"]], DGLRSISOptions(knowledge=False))
    rich = local.enriched_text(clip, [["house"]], DGLRSISOptions())
    assert rich.shape == plain.shape == (1, clip.embed_dim)
    assert torch.allclose(rich.norm(dim=-1), torch.ones(1))
    assert not torch.allclose(rich, plain)  # table synonyms and descriptions moved it
    unknown = local.enriched_text(clip, [["zzq"]], DGLRSISOptions())
    assert torch.allclose(
        unknown, local.enriched_text(clip, [["zzq"]], DGLRSISOptions(knowledge=False))
    )


# --------------------------------------------------------------------------- global alignment


def test_gradcam_shape_and_gradients_only_into_last_block_input(referrer):
    clip = referrer.clip
    seen = {}
    tokens = clip.tokens

    def spy_tokens(x):
        out = tokens(x)
        seen.setdefault("tokens_graph", []).append(out.requires_grad)
        return out

    hook = clip.visual.transformer.resblocks[-1].register_forward_hook(
        lambda mod, inp, out: seen.setdefault("last_graph", []).append(out.requires_grad)
    )
    images = torch.rand(2, 3, 96, 128)
    text = torch.nn.functional.normalize(torch.randn(3, clip.embed_dim), dim=-1)
    try:
        clip.tokens = spy_tokens
        clip.requires_grad_(True)  # even with trainable weights, no graph before the last block
        with torch.inference_mode():  # as the pipeline runs models
            cams = globalalign.cross_scale_gradcam(clip, images, text, (1.0, 1.5))
    finally:
        del clip.tokens
        clip.requires_grad_(False)
        hook.remove()
    assert cams.shape == (2, 3, 96, 128)
    assert torch.isfinite(cams).all() and cams.min() >= 0
    assert torch.allclose(cams.flatten(2).amax(2), torch.ones(2, 3))
    assert seen["tokens_graph"] == [False, False]  # blocks before the last: no graph
    assert seen["last_graph"] == [True, True]  # the last block: the only graph
    assert all(p.grad is None for p in clip.parameters())  # nothing accumulated in weights
    assert not images.requires_grad and images.grad is None
    # different expressions give different maps (the text drives the gradient)
    assert not torch.allclose(cams[:, 0], cams[:, 1])


def test_left_of_selects_the_left_candidate(referrer, monkeypatch):
    """ "the ship left of the bridge": two planted ships (red) around a bridge (blue);
    Grad-CAM rigged to prefer the *right* ship; the relation prior still selects the left."""
    img, regions = planted()
    enc = referrer.encode_expressions(
        ["the ship left of the bridge", "the ship right of the bridge"]
    )
    assert enc.nouns[:2] == ["ship", "bridge"]
    red = regions["left"] | regions["right"]
    n_neg = enc.noun_text.shape[0] - 2

    def fake_logits(image, masks, text):
        fr, fb = fraction_inside(masks.cpu(), red), fraction_inside(masks.cpu(), regions["middle"])
        rest = (1 - fr - fb)[:, None].expand(-1, n_neg)
        return torch.cat([10 * fr[:, None], 10 * fb[:, None], 10 * rest], 1)

    def fake_cam(images, text):
        cam = torch.full(images.shape[-2:], 0.2)
        cam[:, 80:] = 1.0  # the right half looks more like "the ship..."
        return cam.expand(images.shape[0], text.shape[0], -1, -1)

    monkeypatch.setattr(referrer, "proposal_logits", fake_logits)
    monkeypatch.setattr(referrer, "gradcam", fake_cam)
    with torch.inference_mode():
        out = referrer(torch.from_numpy(img).permute(2, 0, 1)[None], enc)
    selected = (out.mask_logits[0] > 0).numpy()
    assert np.array_equal(selected[0], regions["left"])
    assert np.array_equal(selected[1], regions["right"])
    assert out.scores.shape == (1, 2) and (out.scores > 0.5).all()


def test_superlative_and_plural_selection():
    masks = torch.zeros(3, 10, 10, dtype=torch.bool)
    masks[0, :2, :2] = True
    masks[1, :5, 5:] = True
    masks[2, 6:, :3] = True
    from drseg_cli.model.dglrsis.parser import parse_expression

    opts = DGLRSISOptions()
    same = torch.ones(3)
    largest = parse_expression("the largest tank")
    prior = globalalign.object_priors(largest, masks, {}, opts)
    chosen, _ = globalalign.select_masks(largest, same, same, prior, opts)
    assert chosen.tolist() == [1]
    two = parse_expression("two tanks")
    chosen, _ = globalalign.select_masks(two, torch.tensor([0.9, 0.5, 0.8]), same, same, opts)
    assert sorted(chosen.tolist()) == [0, 2]


def test_referrer_through_the_interface(referrer):
    assert isinstance(referrer, ReferringModel)
    assert referrer.preprocess.tile_size == 224 and referrer.random_weights
    enc = referrer.encode_expressions(["the white ship next to the harbor", "all storage tanks"])
    images = torch.rand(2, 3, 96, 96)
    with torch.inference_mode():
        out = referrer(images, enc)
    assert isinstance(out, ReferOutput)
    assert out.scores.shape == (2, 2) and out.mask_logits.shape == (2, 2, 96, 96)
    assert ((out.scores >= 0) & (out.scores <= 1)).all()
    assert set(out.mask_logits.unique().tolist()) <= {-4.0, 4.0}
    assert (out.mask_logits > 0).flatten(2).any(2).all()  # something selected in each
    # proposals=sam loads its SAM through model/sam.py: offline, a one-line error naming it
    with pytest.raises(DrsegError, match="sam-vit-base"):
        build_dglrsis_referrer("test-tiny", options=DGLRSISOptions(proposals="sam"))


# --------------------------------------------------------------------------- CLI


def drseg(*args):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def test_segment_method_dglrsis_writes_georeferenced_outputs(tmp_path):
    src = DATA / "RGB.byte.tif"
    out = tmp_path / "m.tif"
    r = drseg(
        "segment",
        src,
        "-c",
        "water,building:house",
        "-m",
        "test-tiny",
        "--method",
        "dglrsis",
        "--device",
        "cpu",
        "--tile-size",
        "800",
        "--dglrsis",
        "superpixels=24",
        "--dglrsis",
        "context_ratio=2",
        "-o",
        out,
        "--vector",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    with rasterio.open(src) as a, rasterio.open(out) as b:
        assert (a.crs, a.transform, a.shape) == (b.crs, b.transform, b.shape)
        values = set(np.unique(b.read(1)).tolist())
    assert values - {255} and values <= {0, 1, 2, 255}
    assert (tmp_path / "m.gpkg").exists()


def test_dglrsis_option_errors_are_one_line(tmp_path):
    src = DATA / "RGB.byte.tif"
    base = ["segment", src, "-c", "water", "-m", "test-tiny", "-o", tmp_path / "x.tif"]
    r = drseg(*base, "--method", "dglrsis", "--dglrsis", "context_ratio=0.2")
    assert r.exit_code == 2 and "context_ratio" in r.output and not (tmp_path / "x.tif").exists()
    r = drseg(*base, "--dglrsis", "superpixels=8")
    assert r.exit_code == 2 and "--method dglrsis" in r.output


def test_evaluate_method_dglrsis(tmp_path):
    """``drseg evaluate --method dglrsis`` scores DGL-RSIS like the other methods."""
    import json

    from tests.test_metrics import _make_generic

    root = _make_generic(tmp_path / "d", [(40, 48)])
    (tmp_path / "classes.txt").write_text("road: street\ntree\nwater\n")
    r = drseg(
        "evaluate",
        "--data",
        root,
        "--classes",
        tmp_path / "classes.txt",
        "-m",
        "test-tiny",
        "--method",
        "dglrsis",
        "--dglrsis",
        "superpixels=8",
        "--tile-size",
        "32",
        "--device",
        "cpu",
        "--json",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["images"] == 1 and 0 <= payload["mIoU"] <= 100


def test_info_tiling_table_knows_dglrsis():
    from drseg_cli.model.factory import default_tiling

    net = build_model("test-tiny", method="dglrsis")
    assert default_tiling("test-tiny", "dglrsis") == (
        net.preprocess.tile_size,
        net.preprocess.overlap,
    )


def test_python_api_takes_dglrsis_options(rgb_scene, tmp_path):
    import drseg_cli

    out = drseg_cli.segment(
        rgb_scene,
        "water,tree",
        model="test-tiny",
        method="dglrsis",
        device="cpu",
        dglrsis="superpixels=8",
        quiet=True,
    )
    assert out.mask.shape == (190, 290) and set(np.unique(out.mask)) <= {0, 1, 255}
    with pytest.raises(UsageError, match="superpixels"):
        drseg_cli.segment(
            rgb_scene,
            "water",
            model="test-tiny",
            method="dglrsis",
            dglrsis=["superpixels=0"],
            output=tmp_path / "b.tif",
            quiet=True,
        )


def test_refer_method_dglrsis_writes_georeferenced_outputs(tmp_path):
    import geopandas as gpd

    src = DATA / "rgbn_suba.tif"
    tif, gpkg = tmp_path / "r.tif", tmp_path / "r.gpkg"
    args = ["refer", src, "the small building left of the road", "--method", "dglrsis"]
    r = drseg(*args, "-m", "test-tiny", "--dglrsis", "superpixels=16", "-o", tif, "-o", gpkg,
              "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["windows_total"] == 2 and summary["objects"]  # 276×212: two 224 px windows
    with rasterio.open(src) as a, rasterio.open(tif) as b:
        assert (a.crs, a.transform, a.shape) == (b.crs, b.transform, b.shape)
        assert 1 in np.unique(b.read(1))
    layer = gpd.read_file(gpkg, layer="r")
    assert layer.crs == rasterio.open(src).crs and len(layer) == len(summary["objects"])
    assert set(layer["expression"]) == {"the small building left of the road"}
    assert (layer["area_m2"] > 0).all()


def test_refer_dglrsis_option_errors_are_one_line(tmp_path):
    src, out = DATA / "rgbn_suba.tif", tmp_path / "x.tif"
    r = drseg("refer", src, "a ship", "--method", "dglrsis", "-m", "test-tiny",
              "--checkpoint", "rsrefseg2-rrsisd", "-o", out)  # fmt: skip
    assert r.exit_code == 2 and "training-free" in r.output and not out.exists()
    r = drseg("refer", src, "a ship", "-m", "test-tiny", "--dglrsis", "superpixels=8", "-o", out)
    assert r.exit_code == 2 and "--method dglrsis" in r.output and not out.exists()


def test_segment_and_refer_with_sam_proposals_from_the_shared_loader(tmp_path):
    """proposals=sam builds its SAM with drseg refer's loader (model/sam.py; tiny here)."""
    src = DATA / "rgbn_suba.tif"
    sam = ["--dglrsis", "proposals=sam", "--dglrsis", "sam_model=test-tiny"]
    sam += ["--dglrsis", "points_per_side=4", "--dglrsis", "pred_iou_thresh=0"]
    sam += ["--dglrsis", "stability_thresh=0"]
    out = tmp_path / "m.tif"
    r = drseg("segment", src, "-c", "water,building", "-m", "test-tiny", "--method", "dglrsis",
              *sam, "-o", out, "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    with rasterio.open(src) as a, rasterio.open(out) as b:
        assert (a.crs, a.transform) == (b.crs, b.transform)
        assert set(np.unique(b.read(1)).tolist()) - {255}
    ref = tmp_path / "r.tif"
    r = drseg("refer", src, "the building", "--method", "dglrsis", "-m", "test-tiny", *sam,
              "-o", ref, "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert ref.exists()
