"""Prior-Driven Graph Rectification (PDGR), as reconstructed (docs/METHOD.md §PDGR).

A sparse affinity graph is built on the DINO patch grid from the DINO features G: every node
keeps its ``k`` most cosine-similar nodes among the (2r+1)² candidates of a local window of
radius ``r`` around it (itself always, in slot 0, when ``self_loops``; equal similarities go
to the spatially nearer candidate), with edge weights softmax(cos/τ) over the k chosen.
The structure-dominated CLIP features are then propagated APPNP-style,
X ← (1−α)·X₀ + α·W·X for L steps, so they follow DINO's boundaries while (1−α)·X₀ anchors
them to the original CLIP signal.

Cost is linear in the number of nodes N: similarities are computed one window offset at a
time over padded shifts (at most ``[B, N, (2r+1)²]`` floats), the graph is stored as
indices + weights ``[B, N, k]``, and each propagation step is one block-diagonal CSR
sparse × dense product over exactly those entries (or k row gathers of ``[B·N, C]``). No
dense N×N matrix is ever built. Similarities and the softmax run in fp32 even under autocast.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class NeighbourGraph:
    """Sparse row-stochastic graph on an ``height × width`` grid (nodes row-major).

    ``index`` ``[B, N, k]`` (int64, node ids within the same image) and ``weight``
    ``[B, N, k]`` (fp32, ≥ 0, each row sums to 1). A slot left empty (fewer than k in-image
    candidates, e.g. at corners of tiny grids, or an exact tie cut at k) has weight 0 and points
    at the node itself, so gathers stay in range and padding never contributes.
    """

    index: torch.Tensor
    weight: torch.Tensor
    height: int
    width: int

    @property
    def num_nodes(self) -> int:
        return self.height * self.width


def window_offsets(radius: int, device: torch.device | None = None) -> torch.Tensor:
    """The (2r+1)² window offsets ``[C, 2]`` as (dy, dx), row-major; the centre is ``C // 2``."""
    span = torch.arange(-radius, radius + 1, device=device)
    dy, dx = torch.meshgrid(span, span, indexing="ij")
    return torch.stack([dy.reshape(-1), dx.reshape(-1)], dim=1)


def window_similarities(guide: torch.Tensor, radius: int) -> torch.Tensor:
    """Cosine similarity of every node to each window candidate: ``[B, N, (2r+1)²]`` fp32.

    Candidates outside the image are ``-inf``, so a top-k can never select padding. One pass
    per offset over a zero-padded channels-last copy keeps memory at O(N·(E + (2r+1)²)).
    """
    if guide.ndim != 4:
        raise ValueError(f"guide features must be [B, E, H, W], got {tuple(guide.shape)}")
    if radius < 0:
        raise ValueError(f"window radius must be >= 0, got {radius}")
    batch, _, height, width = guide.shape
    with torch.autocast(device_type=guide.device.type, enabled=False):
        unit = F.normalize(guide.float(), dim=1).permute(0, 2, 3, 1).contiguous()  # [B,H,W,E]
        padded = F.pad(unit, (0, 0, radius, radius, radius, radius))
        offsets = window_offsets(radius).tolist()
        sims = unit.new_empty(batch, height, width, len(offsets))
        for slot, (dy, dx) in enumerate(offsets):  # (2r+1)² vectorised passes, not per node
            top, left = radius + dy, radius + dx
            shifted = padded[:, top : top + height, left : left + width]
            sims[..., slot] = torch.linalg.vecdot(unit, shifted)
        sims.masked_fill_(~_inside(height, width, radius, guide.device), float("-inf"))
    return sims.view(batch, height * width, len(offsets))


def _inside(height: int, width: int, radius: int, device: torch.device) -> torch.Tensor:
    """``[H, W, C]`` bool: is candidate ``slot`` of node (y, x) inside the image?"""
    off = window_offsets(radius, device)
    ys = torch.arange(height, device=device).view(height, 1, 1) + off[:, 0]
    xs = torch.arange(width, device=device).view(1, width, 1) + off[:, 1]
    return (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)


def build_graph(
    guide: torch.Tensor,
    k: int = 16,
    radius: int = 3,
    tau: float = 0.1,
    self_loops: bool = True,
) -> NeighbourGraph:
    """kNN graph of ``guide`` ``[B, E, H, W]`` restricted to a window of ``radius``.

    ``k`` is capped at the (2r+1)² window size. With ``self_loops`` the node itself is always
    kept, in slot 0 (APPNP's Â = A + I); without, it is no candidate, and a node with no
    in-image neighbour at all keeps weight 1 on itself. Equal similarities rank the spatially
    nearer candidate first; candidates still tied (equal similarity and distance) with the
    first one left out are left out too, so no direction is favoured (docs/METHOD.md §PDGR).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    batch, _, height, width = guide.shape
    n_nodes = height * width
    sims = window_similarities(guide, radius)
    n_slots = sims.shape[-1]
    if not self_loops:
        sims[..., n_slots // 2] = float("-inf")
    off = window_offsets(radius, guide.device)
    dist2 = off.square().sum(dim=1)
    by_distance = dist2.argsort(stable=True)  # nearest first (the centre), then row-major
    key = sims[..., by_distance]  # [B, N, C] candidates in distance order
    if self_loops:
        key[..., 0] = float("inf")  # the node itself, whatever its (computed) similarity
    key, rank = key.sort(dim=-1, descending=True, stable=True)  # ties: the nearer first
    kept = min(k, n_slots)
    slots = by_distance[rank[..., :kept]]  # [B, N, k] window slots
    values = sims.gather(-1, slots)
    if kept < n_slots:  # an exact tie across the cut: drop the whole tied group
        first_out = by_distance[rank[..., kept]]
        tied = (key[..., :kept] == key[..., kept : kept + 1]) & (
            dist2[slots] == dist2[first_out].unsqueeze(-1)
        )
        values = values.masked_fill(tied, float("-inf"))
    del key, rank

    node = torch.arange(n_nodes, device=guide.device).view(1, n_nodes, 1)
    neighbour = node + off[slots, 0] * width + off[slots, 1]
    unused = torch.isinf(values)  # only -inf (out of image / excluded self / cut tie) here
    isolated = unused.all(dim=-1, keepdim=True)
    first = torch.zeros_like(unused)
    first[..., 0] = True
    logits = (values / tau).masked_fill(unused, float("-inf"))
    logits = torch.where(isolated & first, torch.zeros_like(logits), logits)
    index = torch.where(unused, node.expand_as(neighbour), neighbour)
    weight = torch.softmax(logits, dim=-1)
    return NeighbourGraph(index, weight, height, width)


#: Propagation backends: "sparse" = one CSR sparse × dense product per step (few large ops;
#: cpu/cuda), "gather" = k row gathers per step (any device); "auto" picks sparse where it can.
BACKENDS = ("auto", "sparse", "gather")


def propagate(
    x0: torch.Tensor,
    graph: NeighbourGraph,
    alpha: float = 0.8,
    steps: int = 10,
    backend: str = "auto",
) -> torch.Tensor:
    """APPNP propagation of ``x0`` ``[B, C, H, W]`` on ``graph``: X ← (1−α)·X₀ + α·W·X.

    Runs in fp32 (autocast off) and returns ``x0``'s dtype; differentiable in ``x0``. α = 0 or
    steps = 0 gives ``x0`` back exactly. Memory O(N·(C + k)) with either backend: W is the
    graph's own indices/weights (as a block-diagonal CSR matrix, or gathered slot by slot).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    batch, channels, height, width = x0.shape
    if (height, width) != (graph.height, graph.width) or graph.index.shape[0] != batch:
        raise ValueError(
            f"features {tuple(x0.shape)} do not match the graph "
            f"({graph.index.shape[0]} × {graph.height}×{graph.width})"
        )
    if backend == "auto":
        backend = "sparse" if x0.device.type in ("cpu", "cuda") else "gather"
    n_rows = batch * height * width
    with torch.autocast(device_type=x0.device.type, enabled=False):
        # Node-major rows, contiguous (a reshape of the permuted view can be column-major,
        # which makes every row gather a strided walk over the whole tensor).
        start = x0.float().permute(0, 2, 3, 1).contiguous().view(n_rows, channels)
        offset = torch.arange(batch, device=x0.device).view(batch, 1, 1) * (height * width)
        rows = (graph.index + offset).reshape(n_rows, -1)  # global row ids, block-diagonal
        weight = graph.weight.float().reshape(n_rows, -1)
        step = _sparse_step(rows, weight) if backend == "sparse" else _gather_step(rows, weight)
        x = start
        for _ in range(steps):
            x = (1.0 - alpha) * start + alpha * step(x)
    out = x.view(batch, height, width, channels).permute(0, 3, 1, 2)
    return out.to(x0.dtype).contiguous()


def _sparse_step(
    rows: torch.Tensor, weight: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """x ↦ W·x with W the CSR matrix whose row i holds ``weight[i]`` at columns ``rows[i]``.

    Zero-weight slots (unused ones point at the node itself, so they may repeat a column)
    are dropped and each row's columns are sorted: a canonical CSR for every kernel.
    """
    n_rows = rows.shape[0]
    key = torch.where(weight > 0, rows, torch.full_like(rows, n_rows))  # dropped → end
    key, order = key.sort(dim=1)
    values = weight.gather(1, order)
    keep = key < n_rows
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = keep.sum(dim=1).cumsum(0)
    with warnings.catch_warnings():  # torch flags all CSR use as "beta" (once per process)
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        matrix = torch.sparse_csr_tensor(
            crow, key[keep], values[keep], (n_rows, n_rows), check_invariants=False
        )
    return lambda x: torch.sparse.mm(matrix, x)


def _gather_step(
    rows: torch.Tensor, weight: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """x ↦ W·x as k vectorised row gathers (one per neighbour slot), never per node."""

    def step(x: torch.Tensor) -> torch.Tensor:
        agg = torch.zeros_like(x)
        for slot in range(rows.shape[1]):
            agg.addcmul_(x.index_select(0, rows[:, slot]), weight[:, slot : slot + 1])
        return agg

    return step


def rectify(
    x0: torch.Tensor,
    guide: torch.Tensor,
    *,
    k: int = 16,
    radius: int = 3,
    tau: float = 0.1,
    alpha: float = 0.8,
    steps: int = 10,
    self_loops: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Build the graph from ``guide`` and propagate ``x0`` (both on the same grid)."""
    if guide.shape[-2:] != x0.shape[-2:]:
        raise ValueError(f"grids differ: {tuple(x0.shape[-2:])} vs {tuple(guide.shape[-2:])}")
    graph = build_graph(guide, k=k, radius=radius, tau=tau, self_loops=self_loops)
    return propagate(x0, graph, alpha=alpha, steps=steps, backend=backend)
