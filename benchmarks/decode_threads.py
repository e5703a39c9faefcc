"""GDAL decoding threads for one read thread: row windows of a deflate scene, each handle
opened in a worker thread with and without ``GDAL_NUM_THREADS`` (as ``TileReader`` opens
its handles), interleaved in one run.

    PYTHONPATH=$PWD python benchmarks/decode_threads.py --size 4096 --rounds 3 --json

Figures (not a test): milliseconds to read every 224-row window of the scene (two
half-width windows per row, stride 164, as the pipeline's row runs), per setting and round,
and the ratio one-core / all-cores per round. Each run opens a fresh handle, so every block
is decoded once per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import rasterio
from rasterio.windows import Window

import drseg_cli  # noqa: F401  (process settings first, as the CLI)
from drseg_cli.raster.gdal_env import scene_gdal_env


def read_all(path: Path, size: int, threads: str | None) -> float:
    """Seconds to read every row window of ``path`` in a new thread's new handle."""
    took: list[float] = []

    def work() -> None:
        options = {"GDAL_NUM_THREADS": threads} if threads else {}
        with rasterio.Env(**options):
            ds = rasterio.open(path)
        with ds:
            t0 = time.perf_counter()
            half = size // 2
            for y in range(0, size - 224 + 1, 164):
                for x in (0, half):
                    ds.read(window=Window(x, y, half, 224))
            took.append(time.perf_counter() - t0)

    with scene_gdal_env(256 * 1024**2):
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    return took[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from throughput import make_scene

    ms: dict[str, list[float]] = {"1": [], "ALL_CPUS": []}
    with tempfile.TemporaryDirectory(prefix="drseg-decode-") as tmp:
        scene = make_scene(Path(tmp) / "scene.tif", args.size)
        for _ in range(args.rounds):
            for key in ms:
                ms[key].append(1000 * read_all(scene, args.size, None if key == "1" else key))
    ratios = [a / b for a, b in zip(ms["1"], ms["ALL_CPUS"], strict=True)]
    result = {
        "size": args.size,
        "ms_one_core": [round(v, 1) for v in ms["1"]],
        "ms_all_cores": [round(v, 1) for v in ms["ALL_CPUS"]],
        "ratio_per_round": [round(r, 2) for r in ratios],
        "ratio_median": round(statistics.median(ratios), 2),
    }
    print(json.dumps(result, indent=2) if args.json else result)


if __name__ == "__main__":
    main()
