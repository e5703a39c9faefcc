"""Scenes/s of ``segment --ray`` (or ``refer --ray``) with 1 and 2 local workers, and a
scaling model for N GPUs.

    python benchmarks/ray_scaling.py                       # test-tiny on CPU, 8 scenes
    python benchmarks/ray_scaling.py --command refer       # refer, tiny RSRefSeg 2, CPU
    python benchmarks/ray_scaling.py --model vit-b16 --device auto --gpus-per-worker 1 \\
        --workers 1,2 --worker-tiles-per-s 40             # on a GPU machine

Figures (not a test; CI does not run it):
- per worker count: actor start (model load) seconds, batch seconds, scenes/s, tiles/s,
  speed-up over one worker. Runs go through ``RayExecutor`` + ``run_batch`` as the CLI does.
- per-worker tiles/s (``r``), end to end (the small scene's open, stretch, COG and commit
  included), from the one-worker run.
- the driver's cost per scene (``c_d``): the two manifest rewrites (pending, done),
  measured for manifests of 100, 1 000 and 10 000 scenes (it grows with the manifest: it
  is rewritten whole); and sha256 MB/s, which workers spend on their outputs.
- the model on paper: a cluster of N workers does
  ``min(N / (T·/r + c_s), 1 / c_d(S))`` scenes/s for scenes of T tiles, i.e. linear in N
  until the driver's bookkeeping is the bottleneck. ``--worker-tiles-per-s`` puts in a
  measured per-GPU figure (``benchmarks/throughput.py`` pipeline_tiles_per_s on that GPU),
  ``--scene-fixed-s`` a large scene's fixed cost on a worker (``c_s``: stretch, COG
  overviews, polygons; default 0).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rasterio  # noqa: E402

from drseg_cli.api import REFER_OPTIONS  # noqa: E402
from drseg_cli.classes import parse_classes  # noqa: E402
from drseg_cli.commands._model import ModelChoice, SegmentRunner, segment_config  # noqa: E402
from drseg_cli.commands.refer import ReferRunner  # noqa: E402
from drseg_cli.pipeline.batch import (  # noqa: E402
    Manifest,
    SceneRecord,
    expand_inputs,
    file_sha256,
    plan_outputs,
    run_batch,
)
from drseg_cli.pipeline.distributed import RayExecutor, RayOptions  # noqa: E402
from drseg_cli.pipeline.refer import plan_refer_outputs  # noqa: E402
from drseg_cli.raster.tiling import TileGrid  # noqa: E402

SCENE = ROOT / "tests" / "data" / "world.rgb.tif"  # 512 × 256: 6 tiles of 224 px
CLASSES = parse_classes("water,land,cloud")
EXPRESSION = "the white building"


def run(scenes: Path, out: Path, workers: int, args: argparse.Namespace) -> dict:
    """One batch on ``workers`` Ray actors; actor start is timed apart from the batch."""
    inputs = expand_inputs([scenes])
    out.mkdir(parents=True)
    if args.command == "refer":  # what ``drseg refer --ray`` ships to its actors
        scene_options = ("bands", "percentiles", "allow_no_crs", "overwrite", "quiet")
        options = {k: v for k, v in REFER_OPTIONS.items() if k not in scene_options} | {
            "method": args.method or REFER_OPTIONS["method"],
            "model": args.model,
            "batch_size": args.batch_size,
            "device": args.device,
        }
        runner = ReferRunner((EXPRESSION,), options, None, (2.0, 98.0), warn=False)
        plans = plan_refer_outputs(inputs, out, "tif")
    else:
        runner = SegmentRunner(
            ModelChoice(model=args.model, method=args.method or "drseg"),
            CLASSES,
            segment_config(),
            device=args.device,
            warn=False,
        )
        plans = plan_outputs(inputs, out)
    options = RayOptions(workers=workers, gpus_per_worker=args.gpus_per_worker, log_to_driver=False)
    t0 = time.perf_counter()
    with RayExecutor(runner, options) as executor:
        started = time.perf_counter() - t0
        scene = executor.info["scene"]
        with rasterio.open(SCENE) as ds:
            grid = TileGrid.from_fraction(ds.width, ds.height, scene["tile_size"], scene["overlap"])
        manifest = Manifest.load(out / "drseg_manifest.json", {})
        t1, cpu = time.perf_counter(), time.process_time()
        summary = run_batch(inputs, plans, executor, manifest, class_names=["water"] * 3)
        seconds, driver_cpu = time.perf_counter() - t1, time.process_time() - cpu
    assert summary.done == len(inputs), summary
    records = [r for r in summary.records if r.status == "done"]
    tiles = len(grid) * len(records)
    return {
        "workers": workers,
        "actor_start_s": round(started, 2),
        "driver_cpu_s": round(driver_cpu, 2),
        "batch_s": round(seconds, 2),
        "scenes": len(records),
        "scenes_per_s": round(len(records) / seconds, 3),
        "tiles_per_scene": len(grid),
        "tiles_per_s": round(tiles / seconds, 2),
        "worker_scene_s": [r.seconds for r in records],
    }


def driver_cost(folder: Path, sizes: tuple[int, ...] = (100, 1000, 10000)) -> dict:
    """sha256 seconds per MB (workers hash their outputs) and the seconds of one manifest
    rewrite after a record changed (the driver does two per scene: pending, done), for
    manifests of several sizes."""
    mask = next(iter([*folder.glob("*_mask.tif"), *folder.glob("*_refer.tif")]))
    t = time.perf_counter()
    for _ in range(20):
        file_sha256(mask)
    mb = mask.stat().st_size / 1e6
    sha_s_per_mb = (time.perf_counter() - t) / 20 / max(mb, 1e-6)
    rewrite = {}
    for n in sizes:
        m = Manifest(folder / f"m{n}.json", {"classes": ["a"]})
        for i in range(n):
            m.records[f"/data/scene_{i:06d}.tif"] = SceneRecord(
                f"/data/scene_{i:06d}.tif",
                {"mask": f"/out/scene_{i:06d}_mask.tif"},
                "done",
                seconds=1.0,
                checksums={"mask": "0" * 64, "style": "0" * 64},
                settings="f" * 64,
                source={"size": 1, "mtime_ns": 1},
            )
        m.save()  # the first write serialises every record; later ones only the new one
        reps = 5
        t = time.perf_counter()
        for i in range(reps):
            key = f"/data/scene_{i:06d}.tif"
            m.update(SceneRecord(key, {"mask": "/out/x.tif"}, "pending", checksums={}))
        rewrite[n] = (time.perf_counter() - t) / reps
    return {"sha256_s_per_mb": sha_s_per_mb, "manifest_rewrite_s": rewrite}


def paper_model(r: float, c_s: float, driver: dict, args: argparse.Namespace) -> list[dict]:
    """Scenes/s and tiles/s of N workers for a large scene (``--scene-px`` square)."""
    tile, stride = args.tile, int(args.tile * (1 - args.overlap))
    per_side = math.ceil(max(args.scene_px - tile, 0) / stride) + 1
    tiles = per_side**2
    out_mb = args.scene_px**2 / 1e6  # uint8 mask (compressed: less)
    rows = []
    scene_s = tiles / r + c_s + out_mb * driver["sha256_s_per_mb"]  # on one worker
    c_d = {s: 2 * cost for s, cost in driver["manifest_rewrite_s"].items()}
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
        worker = n / scene_s
        row = {"gpus": n, "scene_tiles": tiles}
        for s, cost in c_d.items():
            row[f"scenes_per_s_manifest_{s}"] = round(min(worker, 1 / cost), 4)
        row["tiles_per_s"] = round(min(worker, 1 / max(c_d.values())) * tiles, 1)
        row["scenes_per_hour"] = round(min(worker, 1 / max(c_d.values())) * 3600, 1)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--command", choices=("segment", "refer"), default="segment")
    parser.add_argument("--model", default="test-tiny")
    parser.add_argument("--method", default=None, help="default: drseg / rsrefseg2")
    parser.add_argument("--batch-size", type=int, default=4, help="refer: windows per call")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--address", default=None, help="Ray cluster (default: local)")
    parser.add_argument("--num-cpus", type=int, default=2, help="local Ray instance CPUs")
    parser.add_argument(
        "--worker-tiles-per-s",
        type=float,
        default=None,
        help="per-GPU pipeline tiles/s for the paper model (default: measured here)",
    )
    parser.add_argument("--scene-px", type=int, default=10980, help="paper scene side (px)")
    parser.add_argument("--scene-fixed-s", type=float, default=0.0, help="paper c_s")
    parser.add_argument("--tile", type=int, default=448)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import ray

    kw = {"address": args.address} if args.address else {"num_cpus": args.num_cpus}
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR", **kw)
    tmp = Path(tempfile.mkdtemp(prefix="drseg-ray-bench-"))
    try:
        scenes = tmp / "in"
        scenes.mkdir()
        for i in range(args.scenes):
            shutil.copy(SCENE, scenes / f"s{i:03d}.tif")
        runs = []
        for w in (int(v) for v in args.workers.split(",")):
            runs.append(run(scenes, tmp / f"out{w}", w, args))
        base = runs[0]["scenes_per_s"]
        for row in runs:
            row["speedup"] = round(row["scenes_per_s"] / base, 2)
        r = runs[0]["tiles_per_s"]
        c_s = args.scene_fixed_s
        driver = driver_cost(tmp / f"out{runs[0]['workers']}")
        r_paper = args.worker_tiles_per_s or r
        report = {
            "command": args.command,
            "model": args.model,
            "device": args.device,
            "scene": f"{SCENE.name} × {args.scenes}",
            "runs": runs,
            "worker_tiles_per_s": r,
            "driver": driver,
            "paper": {
                "worker_tiles_per_s": r_paper,
                "scene_fixed_s": c_s,
                "scene_px": args.scene_px,
                "rows": paper_model(r_paper, c_s, driver, args),
            },
        }
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for row in runs:
        print(
            f"{row['workers']} worker(s): start {row['actor_start_s']} s, "
            f"{row['scenes']} scenes in {row['batch_s']} s = {row['scenes_per_s']} scenes/s, "
            f"{row['tiles_per_s']} tiles/s, ×{row['speedup']} "
            f"(driver CPU {row['driver_cpu_s']} s)"
        )
    print(f"per worker: {r} tiles/s end to end")
    print(f"driver: sha256 {driver['sha256_s_per_mb'] * 1e3:.2f} ms/MB; manifest rewrite ", end="")
    print(
        ", ".join(f"{n} scenes {s * 1e3:.1f} ms" for n, s in driver["manifest_rewrite_s"].items())
    )
    print(
        f"paper model: {r_paper} tiles/s per worker, {c_s} s fixed per scene, "
        f"{args.scene_px}² px scenes; scenes/s by manifest size"
    )
    for row in report["paper"]["rows"]:
        print("  " + ", ".join(f"{k} {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
