"""DGL-RSIS peak memory against scene size (not a test; not run by CI).

For each scene edge given, writes a synthetic RGB GeoTIFF (textured ground with random
"buildings", "roads" and "ponds", so SLIC finds real regions; deflate-compressed tiles,
written in row blocks) and runs ``drseg segment --method dglrsis`` with superpixel proposals
and ``--proposals`` on it in a fresh child process, which reports its own peak RSS
(``ru_maxrss``), CPU seconds and the outputs' sizes. Peak RSS that stays flat while the
scene grows is the point: proposals, crops and the proposals layer are per tile, and the
stitching band is ``K × T × width`` floats.

    .venv/bin/python benchmarks/dglrsis_memory.py --sizes 2048,4096 --model test-tiny
    .venv/bin/python benchmarks/dglrsis_memory.py --sizes 1024,2048 --model vit-b16 --random
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_scene(path: Path, size: int, seed: int = 0, block: int = 512) -> None:
    """A ``size``² RGB uint8 GeoTIFF (UTM, 0.5 m) written ``block`` rows at a time: ground
    in 64 px patches of varying colour (per-pixel noise alone makes SLIC return a handful of
    segments), rectangles of roof and pond colours, straight roads."""
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    profile = dict(
        driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32633",
        transform=from_origin(500000, 4600000, 0.5, 0.5), tiled=True, blockxsize=512,
        blockysize=512, compress="deflate",
    )  # fmt: skip
    # objects: (kind, y0, x0, h, w); roads span the scene
    n = size * size // 20000
    objects = [
        ("building", *rng.integers(0, size, 2), *rng.integers(12, 60, 2), rng.integers(140, 230, 3))
        for _ in range(n)
    ]
    objects += [
        ("pond", *rng.integers(0, size, 2), *rng.integers(40, 160, 2), np.array([30, 60, 110]))
        for _ in range(n // 20)
    ]
    roads = rng.integers(0, size, max(2, size // 512))
    with rasterio.open(path, "w", **profile) as ds:
        for y0 in range(0, size, block):
            h = min(block, size - y0)
            ground = np.array([70, 110, 60], np.float32)[:, None, None]
            fields = rng.normal(0, 20, (3, -(-h // 64), -(-size // 64))).astype(np.float32)
            patches = np.kron(fields, np.ones((1, 64, 64), np.float32))[:, :h, :size]
            tile = ground + patches + rng.normal(0, 2, (3, h, size)).astype(np.float32)
            for _kind, oy, ox, oh, ow, colour in objects:
                a, b = max(oy, y0), min(oy + oh, y0 + h)
                if a < b:
                    tile[:, a - y0 : b - y0, ox : ox + ow] = colour[:, None, None]
            for r in roads:  # one horizontal and one vertical road per draw, 8 m wide
                tile[:, :, r : r + 16] = 120
                a, b = max(r, y0), min(r + 16, y0 + h)
                if a < b:
                    tile[:, a - y0 : b - y0, :] = 120
            ds.write(np.clip(tile, 0, 255).astype(np.uint8), window=((y0, y0 + h), (0, size)))


def child(args: argparse.Namespace) -> None:
    """Run ``drseg segment`` in this process; print its peak RSS and CPU time as JSON."""
    sys.path.insert(0, str(ROOT))
    from typer.testing import CliRunner

    from drseg_cli import cli

    cli._register()
    if args.random:  # a full-size preset with seeded random weights: nothing is downloaded
        import functools

        from drseg_cli.model import factory

        factory.build_model = functools.partial(factory.build_model, random_weights=True)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    argv = [
        "segment", args.scene, "-c", "building,road,water,tree,low vegetation",
        "-m", args.model, "--method", "dglrsis", "--device", "cpu", "--tile-size", str(args.tile),
        "--dglrsis", f"superpixels={args.superpixels}", "-o", str(out / "mask.tif"),
        "--json", "--quiet", "--overwrite",
    ]  # fmt: skip
    if not args.no_proposals:
        argv += ["--proposals", str(out / "proposals.gpkg")]
    start = time.perf_counter()
    r = CliRunner().invoke(cli.app, argv)
    wall = time.perf_counter() - start
    if r.exit_code:
        raise SystemExit(r.output)
    summary = json.loads(r.stdout)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    row = {
        "tiles": summary["tiles"]["run"],
        "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
    }
    if not args.no_proposals:
        import pyogrio

        gpkg = out / "proposals.gpkg"
        row["proposals_written"] = pyogrio.read_info(gpkg, layer="proposals")["features"]
        row["proposals_gpkg_mib"] = round(gpkg.stat().st_size / 2**20, 2)
    print(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2048,4096", help="scene edges (px), comma-separated")
    ap.add_argument("--model", default="test-tiny", help="preset (test-tiny: tiny random CLIP)")
    ap.add_argument("--random", action="store_true", help="random weights (full-size presets)")
    ap.add_argument("--tile", type=int, default=448)
    ap.add_argument("--superpixels", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice)")
    ap.add_argument("--no-proposals", action="store_true", help="without --proposals")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scene", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="drseg-mem-") as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            scene = Path(tmp) / f"scene_{size}.tif"
            write_scene(scene, size)
            out = Path(tmp) / f"out_{size}"
            out.mkdir()
            cmd = [sys.executable, __file__, "--child", "--scene", str(scene), "--out", str(out)]
            cmd += ["--model", args.model, "--tile", str(args.tile), "--threads", str(args.threads)]
            cmd += ["--superpixels", str(args.superpixels)] + (["--random"] if args.random else [])
            cmd += ["--no-proposals"] if args.no_proposals else []
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if done.returncode:
                raise SystemExit(done.stderr[-2000:] or done.stdout[-2000:])
            row = {"size": size, "megapixels": round(size * size / 1e6, 2)}
            row |= json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), file=sys.stderr if args.json else sys.stdout, flush=True)
    report = {
        "model": args.model,
        "tile": args.tile,
        "superpixels": args.superpixels,
        "threads": args.threads,
        "proposals": not args.no_proposals,
        "load_average": os.getloadavg()[0],
        "runs": rows,
    }
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
