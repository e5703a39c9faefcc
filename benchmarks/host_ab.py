"""Two source trees of drseg, interleaved in one run: pipeline tiles/s and CPU ms per tile.

    git archive 522b75c | tar -x -C /tmp/base
    PYTHONPATH=$PWD python benchmarks/host_ab.py /tmp/base . --rounds 3 --size 4096

Each round runs every tree once, in a fresh interpreter each (``import drseg_cli`` first, as
the CLI does, so each tree's process settings apply), on the same synthetic scene, with
test-tiny's CLIP-only model (a near-free model: what is measured is the pipeline's own
host cost). Per run: tiles/s; CPU ms per tile (all threads) of the tile loop (read, model,
stitch, write rows) and of the commit (COG); the naive peer loop (batch 1, synchronous
reads, whole-scene logits) in the same interpreter. Printed: each run, then per tree the
median, and the ratio of the last tree's tiles/s over the first's within each round (the
machine's load changes between rounds, far less within one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

#: The caller's own OpenMP setting, kept from before anything here imports drseg (which sets
#: one): each tree's child decides for itself, as its CLI would.
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import drseg_cli  # noqa: F401  (before torch, as the CLI)
from pathlib import Path
import numpy as np, rasterio, torch
import torch.nn.functional as F
from rasterio.windows import Window
from drseg_cli.classes import parse_classes
from drseg_cli.model.factory import build_model
from drseg_cli.pipeline.runtime import TilePredictor
from drseg_cli.pipeline.segment import OutputPlan, SegmentConfig, segment_scene
from drseg_cli.raster.tiling import TileGrid

def cpu():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime

scene, out = Path(sys.argv[2]), Path(sys.argv[3])
batch, naive_too = int(sys.argv[4]), sys.argv[5] == "1"
classes = parse_classes("water,building,road,tree,grass,bare soil")
net = build_model("test-tiny", method="clip", device="cpu", random_weights=True)
pred = TilePredictor(net, [c.prompt_names for c in classes], torch.device("cpu"))
marks = []
stage = lambda name: marks.append((time.perf_counter(), cpu()))
w0, c0 = time.perf_counter(), cpu()
res = segment_scene(scene, OutputPlan(out), pred, classes,
                    SegmentConfig(batch_size=batch, overwrite=True),
                    tile_multiple=16, default_tile_size=224, stage=stage)
w1, c1 = time.perf_counter(), cpu()
n = res.tiles_run
wm, cm = marks[0]
fig = {"tiles": n, "tiles_per_s": n / (w1 - w0),
       "loop_cpu_ms": 1000 * (cm - c0) / n, "commit_cpu_ms": 1000 * (c1 - cm) / n,
       "cpu_ms": 1000 * (c1 - c0) / n, "loop_wall_ms": 1000 * (wm - w0) / n,
       "commit_wall_ms": 1000 * (w1 - wm) / n}
if naive_too:
    with rasterio.open(scene) as ds, torch.inference_mode():
        grid = TileGrid.from_fraction(ds.width, ds.height, 224, 0.25)
        acc = np.zeros((pred.num_classes, ds.height, ds.width), np.float32)
        t0 = time.perf_counter()
        for t in grid:
            data = ds.read(window=Window(t.x0, t.y0, t.width, t.height))
            x = torch.from_numpy(data.astype(np.float32) / 255.0)[None]
            lg = F.interpolate(net(x, pred.text), size=(t.height, t.width), mode="bilinear")
            acc[:, t.y0:t.y0 + t.height, t.x0:t.x0 + t.width] += lg[0].numpy()
        acc.argmax(0)
        fig["naive_tiles_per_s"] = len(grid) / (time.perf_counter() - t0)
print("RESULT " + json.dumps(fig))
"""


def run(tree: Path, scene: Path, out: Path, batch: int, naive: bool) -> dict:
    cmd = [sys.executable, "-c", CHILD, str(tree), str(scene), str(out), str(batch)]
    cmd.append(str(int(naive)))
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if USER_OMP_WAIT_POLICY is not None:
        env["OMP_WAIT_POLICY"] = USER_OMP_WAIT_POLICY
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tree, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{tree}: failed\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("trees", nargs="+", type=Path, help="source trees; last compared to first")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--naive", action="store_true", help="also time the naive peer loop")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from throughput import make_scene

    trees = [t.resolve() for t in args.trees]
    runs: dict[str, list[dict]] = {str(t): [] for t in trees}
    with tempfile.TemporaryDirectory(prefix="drseg-ab-") as tmp:
        scene = make_scene(Path(tmp) / "scene.tif", args.size)
        for r in range(args.rounds):
            for i, tree in enumerate(trees):
                fig = run(tree, scene, Path(tmp) / f"mask{i}.tif", args.batch_size, args.naive)
                runs[str(tree)].append(fig)
                print(f"round {r} {tree}: " + json.dumps({k: round(v, 3) for k, v in fig.items()}))
    first, last = runs[str(trees[0])], runs[str(trees[-1])]
    summary = {
        t: {k: round(statistics.median(f[k] for f in figs), 3) for k in figs[0]}
        for t, figs in runs.items()
    }
    summary["ratio_per_round"] = [
        round(b["tiles_per_s"] / a["tiles_per_s"], 3) for a, b in zip(first, last, strict=True)
    ]
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
