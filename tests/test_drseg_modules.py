"""Properties of the DR-Seg modules (SPSD, PDGR, UGAF, DRSegModel) that hold whatever the weights.

Stand-in encoders with the backbones interface keep these fast and independent of the real
CLIP/DINO; a last group runs the same properties through the project's test-tiny encoders.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from drseg_cli.errors import UsageError
from drseg_cli.model.drseg import DRSegModel, DRSegOptions, resize
from drseg_cli.model.pdgr import build_graph, propagate, rectify, window_similarities
from drseg_cli.model.spsd import channel_scores, decouple, semantic_count, structural_scores
from drseg_cli.model.ugaf import fuse, normalized_entropy

CLASSES = [["road"], ["building", "roof"], ["tree"], ["water"], ["low vegetation"]]


# --------------------------------------------------------------------------- stand-in encoders


class StubClip(nn.Module):
    """ClipDenseEncoder interface: patch conv + nonlinearity, text from a name hash."""

    mean = (0.48145466, 0.4578275, 0.40821073)
    std = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, patch_size: int = 4, embed_dim: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.embed = nn.Conv2d(3, 32, patch_size, patch_size)
        self.mix = nn.Conv2d(32, embed_dim, 3, padding=1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.mix(F.gelu(self.embed(x)))

    def encode_text(self, class_prompts):
        rows = []
        for names in class_prompts:
            gen = torch.Generator().manual_seed(zlib.crc32("|".join(names).encode()))
            rows.append(torch.randn(self.embed_dim, generator=gen))
        return F.normalize(torch.stack(rows), dim=1)


class StubDino(nn.Module):
    """DinoEncoder interface: patch conv + a 3×3 conv so neighbouring patches correlate."""

    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(self, patch_size: int = 2, embed_dim: int = 12, seed: int = 1) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.embed = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.mix = nn.Conv2d(embed_dim, embed_dim, 3, padding=1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.mix(torch.relu(self.embed(x)))


def make_model(**options) -> DRSegModel:
    return DRSegModel(StubClip(), StubDino(), DRSegOptions(**options), tile_size=32).eval()


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, 3, size // 8, size // 8, generator=gen)  # blocky "scenes"
    noise = 0.05 * torch.rand(batch, 3, size, size, generator=gen)
    return (F.interpolate(base, size=size, mode="nearest") + noise).clamp(0, 1)


def clip_baseline(clip: nn.Module, imgs: torch.Tensor, text: torch.Tensor, grid) -> torch.Tensor:
    """The CLIP-only method (100·F̂Tᵀ on the CLIP grid), resampled like the pipeline does."""
    mean = torch.tensor(clip.mean).view(1, 3, 1, 1)
    std = torch.tensor(clip.std).view(1, 3, 1, 1)
    feats = F.normalize(clip((imgs - mean) / std), dim=1)
    logits = 100.0 * torch.einsum("bdhw,kd->bkhw", feats, text)
    return F.interpolate(logits, size=grid, mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- SPSD


def test_spsd_split_is_exact_and_keeps_the_top_scores() -> None:
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(3, 20, 5, 6, generator=gen) * torch.rand(3, 20, 1, 1, generator=gen)
    text = F.normalize(torch.randn(4, 20, generator=gen), dim=1)
    split = decouple(feats, text, rho=0.3)

    assert torch.equal(split.semantic(feats) + split.structural(feats), feats)
    assert split.semantic_index.shape == (3, 6) and split.structural_index.shape == (3, 14)
    assert split.mask.sum(1).tolist() == [6, 6, 6]
    scores = channel_scores(feats, text)
    for b in range(3):
        both = torch.cat([split.semantic_index[b], split.structural_index[b]]).sort().values
        assert torch.equal(both, torch.arange(20))
        sem, struct = scores[b, split.semantic_index[b]], scores[b, split.structural_index[b]]
        assert sem.min() > struct.max()
    # Masks are per image: the three random images do not pick the same channels.
    assert not torch.equal(split.mask[0], split.mask[1])
    # ...and each image's split is the one it gets alone.
    alone = decouple(feats[1:2], text, rho=0.3)
    assert torch.equal(alone.mask[0], split.mask[1])


def test_spsd_score_is_class_spread_times_spatial_variance() -> None:
    gen = torch.Generator().manual_seed(4)
    feats, text = torch.randn(2, 8, 3, 3, generator=gen), torch.randn(5, 8, generator=gen)
    feats[1, 3] = 7.0  # a channel that does not vary over the image: the most semantic
    f, t = feats.double().numpy(), text.double().numpy()
    expected = t.var(axis=0)[None, :] * f.var(axis=(2, 3))
    np.testing.assert_allclose(structural_scores(feats, text).numpy(), expected, rtol=1e-5)
    semantic = channel_scores(feats, text)
    assert (semantic > 0).all() and torch.isfinite(semantic).all()
    assert int(semantic[1].argmax()) == 3
    # semantic = the reciprocal ranking: least spatial class contrast first
    want = torch.from_numpy(expected).argsort(dim=1, stable=True)
    assert torch.equal(semantic.argsort(dim=1, descending=True, stable=True), want)


def test_spsd_extremes_and_single_class() -> None:
    gen = torch.Generator().manual_seed(5)
    feats, text = torch.randn(2, 10, 4, 4, generator=gen), torch.randn(3, 10, generator=gen)
    assert decouple(feats, text, rho=1.0).mask.all()
    assert not decouple(feats, text, rho=0.0).mask.any()
    assert semantic_count(10, 0.3) == 3 and semantic_count(10, 0.31) == 4
    one = decouple(feats, text[:1], rho=0.5)  # Var over one class is 0: spatial variance alone
    variation = feats.var(dim=(2, 3), unbiased=False)
    least = (-variation).topk(5, dim=1).indices.sort(dim=1).values
    assert torch.equal(one.semantic_index, least)


# --------------------------------------------------------------------------- PDGR graph


def brute_force_neighbours(guide: np.ndarray, y: int, x: int, radius: int, k: int):
    """Top-k (ids, cosines) of node (y, x) among in-image window candidates, by full search."""
    _, height, width = guide.shape
    unit = guide / np.linalg.norm(guide, axis=0, keepdims=True)
    cands = [
        (yy * width + xx, float(unit[:, y, x] @ unit[:, yy, xx]))
        for yy in range(max(0, y - radius), min(height, y + radius + 1))
        for xx in range(max(0, x - radius), min(width, x + radius + 1))
    ]
    cands.sort(key=lambda c: -c[1])
    return cands[:k]


def test_graph_picks_exactly_the_k_most_similar_in_the_window() -> None:
    gen = torch.Generator().manual_seed(6)
    guide = torch.randn(2, 8, 9, 11, generator=gen)
    radius, k, tau = 2, 6, 0.2
    graph = build_graph(guide, k=k, radius=radius, tau=tau)
    assert graph.index.shape == graph.weight.shape == (2, 99, k)
    for b in range(2):
        g = guide[b].double().numpy()
        for node in range(99):
            y, x = divmod(node, 11)
            expected = brute_force_neighbours(g, y, x, radius, k)
            ids = [i for i, _ in expected]
            assert sorted(graph.index[b, node].tolist()) == sorted(ids)
            cos = torch.tensor([c for _, c in expected], dtype=torch.float64)
            want = dict(zip(ids, torch.softmax(cos / tau, 0).tolist(), strict=True))
            got = dict(
                zip(graph.index[b, node].tolist(), graph.weight[b, node].tolist(), strict=True)
            )
            for i in ids:
                assert got[i] == pytest.approx(want[i], abs=1e-5)


@pytest.mark.parametrize("self_loops", [True, False])
def test_graph_rows_normalised_and_never_padding(self_loops: bool) -> None:
    gen = torch.Generator().manual_seed(7)
    height, width, radius = 5, 4, 1
    guide = torch.randn(2, 6, height, width, generator=gen)
    graph = build_graph(guide, k=6, radius=radius, tau=0.1, self_loops=self_loops)  # corners: 4
    w, idx = graph.weight, graph.index
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, height * width))
    assert ((idx >= 0) & (idx < height * width)).all()
    node = torch.arange(height * width).view(1, -1, 1).expand_as(idx)
    ny, nx = idx // width, idx % width
    sy, sx = node // width, node % width
    used = w > 0
    # Every edge that carries weight stays in the image and in the window: no wrap-around.
    assert ((ny - sy).abs()[used] <= radius).all() and ((nx - sx).abs()[used] <= radius).all()
    assert not (used & (idx == node)).any() if not self_loops else (used & (idx == node)).any()
    # Corner (0, 0) has 4 in-image candidates (3 without itself): the rest are unused slots.
    n_candidates = 4 if self_loops else 3
    assert int(used[:, 0].sum(-1).min()) == n_candidates == int(used[:, 0].sum(-1).max())
    # Interior nodes have 9 (8) candidates, enough for all k = 6 slots.
    interior = (1 * width + 1) if height > 2 else 0
    assert used[:, interior].all()


def test_graph_isolated_node_keeps_itself() -> None:
    graph = build_graph(torch.randn(1, 4, 1, 1), k=3, radius=2, self_loops=False)
    assert graph.index.tolist() == [[[0, 0, 0]]]
    assert graph.weight.tolist() == [[[1.0, 0.0, 0.0]]]


def offsets_of(graph, node: int) -> list[tuple[int, int]]:
    """(dy, dx) of the neighbours that carry weight, in slot order."""
    y, x = divmod(node, graph.width)
    used = graph.weight[0, node] > 0
    return [
        (i // graph.width - y, i % graph.width - x) for i in graph.index[0, node][used].tolist()
    ]


def test_graph_keeps_itself_first_and_breaks_ties_by_distance() -> None:
    side, radius = 9, 3
    nodes = torch.arange(side * side)
    # Constant guide: every candidate ties. Self first, then the nearest; the ring that the
    # cut at k = 16 would split (d² = 5: 8 knight moves, room for 3) is left out entirely.
    graph = build_graph(torch.ones(1, 4, side, side), k=16, radius=radius)
    assert torch.equal(graph.index[0, :, 0], nodes)
    assert (graph.weight[0, :, 0] >= graph.weight[0].amax(-1) - 1e-7).all()
    centre = 4 * side + 4
    got = offsets_of(graph, centre)
    assert got[0] == (0, 0) and len(got) == 13
    assert sorted(dy * dy + dx * dx for dy, dx in got) == [0] + [1] * 4 + [2] * 4 + [4] * 4
    assert sum(dy for dy, _ in got) == sum(dx for _, dx in got) == 0  # no direction favoured
    # Checkerboard of two features: similarity ranks first, distance only among equals, so
    # the 4 diagonal twins (d² = 2) come before the 4 unlike direct neighbours (d² = 1).
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.8])
    parity = (torch.arange(side).view(-1, 1) + torch.arange(side)) % 2
    board = torch.where(parity.bool(), b.view(2, 1, 1), a.view(2, 1, 1))[None]
    graph = build_graph(board, k=5, radius=radius)
    assert torch.equal(graph.index[0, :, 0], nodes)
    assert sorted(offsets_of(graph, centre)) == [(-1, -1), (-1, 1), (0, 0), (1, -1), (1, 1)]
    # Near-duplicate neighbours whose rounded cos exceeds the node's own (1.0 vs 1.0000001)
    # still rank after it.
    gen = torch.Generator().manual_seed(0)
    for _ in range(1000):
        u = torch.randn(8, generator=gen)
        v = u + 1e-6 * torch.randn(8, generator=gen)
        guide = v.view(1, 8, 1, 1).repeat(1, 1, 3, 3)
        guide[0, :, 1, 1] = u
        sims = window_similarities(guide, radius=1)[0, 4]
        if int((sims > sims[4]).sum()) == 8:
            break
    assert int((sims > sims[4]).sum()) == 8, "no rounding case found"
    assert build_graph(guide, k=4, radius=1).index[0, 4, 0] == 4


@pytest.mark.parametrize("backend", ["sparse", "gather"])
def test_constant_guide_propagation_does_not_shift_features(backend: str) -> None:
    side = 15
    impulse = torch.zeros(1, 1, side, side)
    impulse[..., 7, 7] = 1.0
    out = rectify(impulse, torch.ones(1, 4, side, side), k=16, radius=3, backend=backend)[0, 0]
    # Ties broken symmetrically: the spread stays centred (it drifted to (4.5, 6.9) before).
    torch.testing.assert_close(out, out.flip(0), atol=1e-7, rtol=0)
    torch.testing.assert_close(out, out.T, atol=1e-7, rtol=0)
    other = "gather" if backend == "sparse" else "sparse"
    graph = build_graph(torch.ones(2, 4, side, side), k=16, radius=3)
    x0 = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(
        propagate(x0, graph, backend=backend), propagate(x0, graph, backend=other)
    )
    constant = torch.full((2, 3, side, side), -1.5)
    torch.testing.assert_close(propagate(constant, graph, backend=backend), constant)


def test_window_similarities_mark_padding_minus_inf() -> None:
    sims = window_similarities(torch.randn(1, 3, 5, 6), radius=2)
    assert sims.shape == (1, 30, 25)
    assert torch.isinf(sims[0, 0]).sum() == 25 - 9  # corner: 3×3 of the 5×5 window inside
    assert not torch.isinf(sims[0, 2 * 6 + 2]).any()  # (2, 2): the whole window is inside
    assert torch.isinf(sims[0, 2 * 6 + 5]).sum() == 10  # right edge: two columns outside
    assert sims[0, 7, 12] == pytest.approx(1.0)  # the centre slot is the node itself


# --------------------------------------------------------------------------- PDGR propagation


@pytest.mark.parametrize("backend", ["sparse", "gather"])
def test_propagation_alpha_zero_and_zero_steps_give_back_x0(backend: str) -> None:
    gen = torch.Generator().manual_seed(8)
    guide, x0 = torch.randn(2, 6, 7, 8, generator=gen), torch.randn(2, 5, 7, 8, generator=gen)
    graph = build_graph(guide, k=5, radius=2)
    assert torch.equal(propagate(x0, graph, alpha=0.0, steps=10, backend=backend), x0)
    assert torch.equal(propagate(x0, graph, alpha=0.9, steps=0, backend=backend), x0)
    assert not torch.allclose(propagate(x0, graph, alpha=0.5, steps=3, backend=backend), x0)


def test_propagation_backends_agree_and_are_differentiable() -> None:
    gen = torch.Generator().manual_seed(11)
    guide = torch.randn(3, 6, 6, 7, generator=gen)
    graph = build_graph(guide, k=40, radius=2, self_loops=False)  # k > window: unused slots
    x0 = torch.randn(3, 4, 6, 7, generator=gen, requires_grad=True)
    outs = [propagate(x0, graph, alpha=0.8, steps=4, backend=b) for b in ("sparse", "gather")]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad((o**2).sum(), x0)[0] for o in outs]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)
    graph1 = build_graph(guide[1:2], k=40, radius=2, self_loops=False)
    single = propagate(x0[1:2].detach(), graph1, alpha=0.8, steps=4)
    torch.testing.assert_close(single, outs[0][1:2].detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sparse", "gather"])
def test_propagation_matches_dense_appnp_on_a_small_grid(backend: str) -> None:
    gen = torch.Generator().manual_seed(9)
    guide, x0 = torch.randn(2, 6, 5, 6, generator=gen), torch.randn(2, 4, 5, 6, generator=gen)
    graph = build_graph(guide, k=4, radius=1, tau=0.3)
    n = 30
    alpha, steps = 0.7, 5
    for b in range(2):  # the dense N×N reference is fine for 30 nodes
        dense = torch.zeros(n, n).index_put_(
            (torch.arange(n).repeat_interleave(4), graph.index[b].reshape(-1)),
            graph.weight[b].reshape(-1),
            accumulate=True,
        )
        start = x0[b].reshape(4, n).T
        x = start
        for _ in range(steps):
            x = (1 - alpha) * start + alpha * dense @ x
        got = propagate(x0, graph, alpha=alpha, steps=steps, backend=backend)[b].reshape(4, n).T
        torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-5)
    constant = torch.full((2, 3, 5, 6), 2.5)  # rows sum to 1: constants are fixed points
    torch.testing.assert_close(
        propagate(constant, graph, alpha=0.9, steps=7, backend=backend), constant
    )


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor storage any torch op produces inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, self.nbytes(t))
        return out

    @staticmethod
    def nbytes(t: torch.Tensor) -> int:
        if t.layout == torch.sparse_csr:
            parts = (t.crow_indices(), t.col_indices(), t.values())
            return sum(p.untyped_storage().nbytes() for p in parts)
        return t.untyped_storage().nbytes()


@pytest.mark.parametrize("backend", ["sparse", "gather"])
def test_pdgr_memory_grows_linearly_with_the_number_of_patches(backend: str) -> None:
    def largest(side: int) -> int:
        gen = torch.Generator().manual_seed(side)
        guide = torch.randn(1, 32, side, side, generator=gen)
        x0 = torch.randn(1, 16, side, side, generator=gen)
        with LargestAllocation() as meter:
            rectify(x0, guide, k=16, radius=3, alpha=0.8, steps=2, backend=backend)
        return meter.largest

    small, big = largest(24), largest(48)  # 4× the nodes
    ratio = big / small
    assert 3.0 <= ratio <= 5.0, ratio  # an N×N matrix would make it 16×
    # In absolute terms: at most one [N, (2r+1)², fp32]-sized buffer (plus slack), not N².
    assert big <= 2 * 48 * 48 * 49 * 4


# --------------------------------------------------------------------------- UGAF


def test_ugaf_identical_branches_give_back_the_branch() -> None:
    logits = torch.randn(2, 5, 6, 7, generator=torch.Generator().manual_seed(10)) * 10
    out = fuse([logits, logits.clone()], gamma=0.2)
    assert torch.equal(out.logits, logits)
    torch.testing.assert_close(out.weights, torch.full((2, 2, 6, 7), 0.5))
    torch.testing.assert_close(out.uncertainty, normalized_entropy(logits))


def test_ugaf_weights_follow_confidence_and_entropy_is_normalised() -> None:
    confident = torch.zeros(1, 4, 2, 2)
    confident[:, 0] = 50.0
    flat = torch.zeros(1, 4, 2, 2)
    assert torch.allclose(normalized_entropy(flat), torch.ones(1, 1, 2, 2))
    assert normalized_entropy(confident).max() < 1e-6
    out = fuse([flat, confident], gamma=0.2)
    assert (out.weights[:, 1] > 0.99).all()
    torch.testing.assert_close(out.weights.sum(1), torch.ones(1, 2, 2))
    assert ((out.uncertainty >= 0) & (out.uncertainty <= 1)).all()


def test_ugaf_single_class_is_finite() -> None:
    a, b = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    out = fuse([a, b])
    assert torch.isfinite(out.logits).all()
    assert torch.equal(out.uncertainty, torch.zeros(2, 1, 3, 3))
    torch.testing.assert_close(out.logits, (a + b) / 2)


# --------------------------------------------------------------------------- DRSegModel


@pytest.fixture(scope="module")
def text() -> torch.Tensor:
    return StubClip().encode_text(CLASSES)


def test_rho_one_reproduces_the_clip_baseline(text) -> None:
    model, imgs = make_model(rho=1.0), images()
    with torch.no_grad():
        out = model.forward_details(imgs, text)
        want = clip_baseline(model.clip, imgs, text, (8, 8))
    assert out.logits.shape == (2, 5, 8, 8)  # the baseline itself, on the CLIP grid
    torch.testing.assert_close(out.logits, want, atol=2e-4, rtol=1e-5)
    assert model.dino.calls == 0  # nothing structural to rectify: DINO is not run


@pytest.mark.parametrize("nothing", [{"alpha": 0.0}, {"steps": 0}])
def test_no_propagation_is_the_clip_baseline_and_skips_dino(text, nothing) -> None:
    model, imgs = make_model(**nothing), images()
    with torch.no_grad():
        out = model.forward_details(imgs, text)
        want = clip_baseline(model.clip, imgs, text, (8, 8))
    # Same grid, same resampling ahead as --method clip: the pipeline writes the same mask.
    torch.testing.assert_close(out.logits, want, atol=2e-4, rtol=1e-5)
    assert model.dino.calls == 0


def test_output_is_the_clip_baseline_plus_the_correction_on_the_pixel_grid(text) -> None:
    model, imgs = make_model(), images()
    with torch.no_grad():
        out = model.forward_details(imgs, text)
        coarse = clip_baseline(model.clip, imgs, text, (8, 8))
    assert out.logits.shape == (2, 5, 32, 32) and out.refined.shape == (2, 5, 16, 16)
    torch.testing.assert_close(out.original, resize(coarse, (16, 16)), atol=2e-4, rtol=1e-5)
    fused = out.weights[:, :1] * out.original + out.weights[:, 1:] * out.refined
    # CLIP resampled once to the pixels (as the pipeline does for --method clip), plus
    # DR-Seg's change to it, made on the DINO grid and resampled once from there.
    want = resize(coarse, (32, 32)) + resize(fused - out.original, (32, 32))
    torch.testing.assert_close(out.logits, want, atol=2e-4, rtol=1e-5)
    assert not torch.allclose(out.logits, resize(fused, (32, 32)), atol=1e-2)


def test_default_rectification_changes_the_prediction(text) -> None:
    model, imgs = make_model(), images()
    with torch.no_grad():
        out = model.forward_details(imgs, text)
        want = clip_baseline(model.clip, imgs, text, (16, 16))
    assert model.dino.calls == 1 and out.split is not None and out.weights is not None
    assert (out.refined - want).abs().max() > 1e-2
    assert torch.isfinite(out.logits).all()


def test_permuting_classes_permutes_output_channels(text) -> None:
    model, imgs = make_model(), images()
    perm = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad():
        logits = model(imgs, text)
        permuted = model(imgs, text[perm])
    torch.testing.assert_close(permuted, logits[:, perm], atol=1e-4, rtol=1e-5)


def test_batch_equals_single_forwards(text) -> None:
    model, imgs = make_model(), images(batch=3, seed=2)
    with torch.no_grad():
        batched, unc = model.forward_with_uncertainty(imgs, text)
        singles = [model.forward_with_uncertainty(imgs[i : i + 1], text) for i in range(3)]
    torch.testing.assert_close(batched, torch.cat([s[0] for s in singles]), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(unc, torch.cat([s[1] for s in singles]), atol=1e-5, rtol=1e-5)


def test_autocast_bf16_forward_is_finite(text) -> None:
    model, imgs = make_model(), images()
    with torch.no_grad():
        ref = model(imgs, text)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, unc = model.forward_with_uncertainty(imgs, text)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert ((unc >= 0) & (unc <= 1)).all()
    agree = (logits.argmax(1) == ref.argmax(1)).float().mean()
    assert agree > 0.8, agree


def test_uncertainty_is_the_entropy_of_the_output(text) -> None:
    model = make_model()
    with torch.no_grad():
        logits, unc = model.forward_with_uncertainty(images(), text)
    assert unc.shape == (2, 1, 32, 32)
    torch.testing.assert_close(unc, normalized_entropy(logits))


def test_ablation_switches(text) -> None:
    imgs = images()
    with torch.no_grad():
        no_pdgr = make_model(pdgr=False)
        torch.testing.assert_close(
            no_pdgr(imgs, text), clip_baseline(StubClip(), imgs, text, (8, 8)), atol=2e-4, rtol=1e-5
        )
        base = clip_baseline(StubClip(), imgs, text, (16, 16))
        assert no_pdgr.dino.calls == 0
        no_ugaf = make_model(ugaf=False).forward_details(imgs, text)
        assert no_ugaf.weights is None
        correction = resize(no_ugaf.refined - no_ugaf.original, (32, 32))
        pixels = clip_baseline(StubClip(), imgs, text, (32, 32))
        torch.testing.assert_close(no_ugaf.logits, pixels + correction, atol=2e-4, rtol=1e-5)
        no_spsd = make_model(spsd=False).forward_details(imgs, text)
        assert no_spsd.split is None
        full = make_model().forward_details(imgs, text)
        # Rectifying every channel moves the refined branch further from CLIP than half of them.
        assert (no_spsd.refined - base).abs().mean() > (full.refined - base).abs().mean()


def test_options_are_validated_and_preprocess_is_consistent() -> None:
    bads = [{"rho": 1.5}, {"k": 0}, {"tau": 0.0}, {"alpha": -0.1}, {"gamma": 0}, {"rho": math.nan}]
    for bad in bads:
        with pytest.raises(UsageError):
            DRSegOptions(**bad)
    opts = DRSegOptions(rho=0.25)
    assert dataclasses.replace(opts, k=8).as_dict()["k"] == 8
    model = DRSegModel(StubClip(patch_size=16), StubDino(patch_size=8), opts)
    assert model.preprocess.multiple == 16 and model.preprocess.tile_size == 448
    assert model.preprocess.mean == StubClip.mean and model.preprocess.std == StubClip.std
    odd = DRSegModel(StubClip(patch_size=14), StubDino(patch_size=8), tile_size=112)
    assert odd.preprocess.multiple == 56
    with pytest.raises(UsageError):
        DRSegModel(StubClip(patch_size=14), StubDino(patch_size=8), tile_size=200)
    with pytest.raises(ValueError):
        make_model()(torch.rand(1, 3, 30, 32), StubClip().encode_text(CLASSES))
    assert torch.equal(make_model().encode_text(CLASSES), StubClip().encode_text(CLASSES))


def test_resize_is_identity_on_the_same_grid() -> None:
    x = torch.randn(1, 2, 5, 5)
    assert resize(x, (5, 5)) is x


def test_stage_timings_are_recorded_without_changing_the_result(text) -> None:
    model, imgs = make_model(), images()
    timings: dict[str, float] = {}
    with torch.no_grad():
        plain = model(imgs, text)
        timed = model.forward_details(imgs, text, timings=timings).logits
    assert torch.equal(plain, timed)
    assert set(timings) == {"clip", "dino", "spsd", "pdgr", "ugaf", "head"}
    assert all(v >= 0 for v in timings.values())


# --------------------------------------------------------------------------- test-tiny encoders


@pytest.fixture(scope="module")
def tiny_encoders():
    backbones = pytest.importorskip("drseg_cli.model.backbones")
    return backbones.load_clip(backbones.TINY_CLIP, None), backbones.load_dino(backbones.TINY_DINO)


def test_tiny_encoders_properties(tiny_encoders) -> None:
    clip, dino = tiny_encoders
    model = DRSegModel(clip, dino, DRSegOptions(), tile_size=128).eval()
    assert model.random_weights and model.preprocess.multiple == math.lcm(16, 8)
    text = model.encode_text(CLASSES)
    imgs = images(batch=3, size=128, seed=4)
    grid = (128 // dino.patch_size, 128 // dino.patch_size)
    with torch.no_grad():
        full = model.forward_details(imgs, text)
        base = clip_baseline(clip, imgs, text, grid)
        rho1 = DRSegModel(clip, dino, DRSegOptions(rho=1.0), tile_size=128)(imgs, text)
        alpha0 = DRSegModel(clip, dino, DRSegOptions(alpha=0.0), tile_size=128)(imgs, text)
        single = model(imgs[1:2], text)
        permuted = model(imgs, text[[2, 4, 0, 1, 3]])
    assert full.logits.shape == (3, 5, 128, 128) and torch.isfinite(full.logits).all()
    clip_grid = (128 // clip.patch_size,) * 2
    clip_logits = clip_baseline(clip, imgs, text, clip_grid)
    torch.testing.assert_close(rho1, clip_logits, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(alpha0, clip_logits, atol=2e-4, rtol=1e-5)
    assert (full.refined - base).abs().max() > 1e-3  # rectification does something
    torch.testing.assert_close(single, full.logits[1:2], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(permuted, full.logits[:, [2, 4, 0, 1, 3]], atol=1e-4, rtol=1e-5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, unc = model.forward_with_uncertainty(imgs, text)
    assert torch.isfinite(logits).all() and ((unc >= 0) & (unc <= 1)).all()


def test_rho_one_equals_the_clip_method_model(tiny_encoders) -> None:
    clipseg = pytest.importorskip("drseg_cli.model.clipseg")
    clip, dino = tiny_encoders
    baseline = clipseg.ClipSegModel(clip)
    drseg = DRSegModel(clip, dino, DRSegOptions(rho=1.0), tile_size=128)
    text = drseg.encode_text(CLASSES)
    imgs = images(batch=2, size=128, seed=5)
    with torch.no_grad():
        want = baseline(imgs, text)
        got = drseg(imgs, text)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-5)


def test_factory_builds_drseg(tiny_encoders) -> None:
    factory = pytest.importorskip("drseg_cli.model.factory")
    model = factory.build_model("test-tiny", method="drseg")
    assert isinstance(model, DRSegModel)
    text = model.encode_text(CLASSES)
    size = model.preprocess.multiple * 4
    with torch.no_grad():
        logits = model(torch.rand(2, 3, size, size), text)
    assert logits.shape[:2] == (2, 5) and torch.isfinite(logits).all()
