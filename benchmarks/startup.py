"""Start-up cost of the light commands, against the bare ``import typer, rasterio, rich``.

Each command runs in a fresh subprocess (``python -m drseg_cli``, this checkout first on
``sys.path``) on a tiny made-up raster; the figures are the median wall seconds and peak
RSS (``wait4``'s ``ru_maxrss``) over ``--repeats`` runs, and their ratio to the baseline.
``segment`` is timed up to its first tile: a bootstrap makes the process exit when
``TilePredictor.predict`` is first called, so the figure is imports + model build + reading.

    .venv/bin/python benchmarks/startup.py --repeats 5
    .venv/bin/python benchmarks/startup.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs drseg's __main__ in this process; exits (status 0) at the first predicted tile.
FIRST_TILE_BOOTSTRAP = """
import importlib.abc, importlib.machinery, os, runpy, sys

class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "drseg_cli.pipeline.runtime":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.TilePredictor.predict = lambda *a, **k: os._exit(0)

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _Hook())
sys.argv = ["drseg", *sys.argv[1:]]
runpy.run_module("drseg_cli", run_name="__main__")
sys.exit("drseg: benchmark: no tile was predicted")
"""


def make_raster(path: Path) -> Path:
    """A 10 x 15 px RGB GeoTIFF in UTM: small enough that only start-up counts."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    data = np.random.default_rng(0).integers(0, 255, (3, 10, 15), dtype=np.uint8)
    profile = {
        "driver": "GTiff",
        "width": 15,
        "height": 10,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": from_origin(500000, 4500000, 1.0, 1.0),
    }
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return path


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process; fails loudly on a bad exit."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}:\n{err}")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def cases(raster: Path, out_dir: Path) -> dict[str, list[str]]:
    """Name -> argv of each measured command."""
    py = sys.executable
    drseg = [py, "-m", "drseg_cli"]
    return {
        "baseline: import typer, rasterio, rich": [py, "-c", "import typer, rasterio, rich"],
        "drseg --help": [*drseg, "--help"],
        "drseg --version": [*drseg, "--version"],
        "drseg info": [*drseg, "info", str(raster)],
        "drseg check": [*drseg, "check", str(out_dir / "mask.tif"), "-i", str(raster)],
        "drseg models list": [*drseg, "models", "list"],
        "drseg segment (to first tile)": [
            py,
            "-c",
            FIRST_TILE_BOOTSTRAP,
            "segment",
            str(raster),
            "--classes",
            "water,grass",
            "--model",
            "test-tiny",
            "--device",
            "cpu",
            "-o",
            str(out_dir / "first.tif"),
        ],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="Runs per command (median kept).")
    p.add_argument("--json", action="store_true", help="Print JSON on stdout.")
    args = p.parse_args()

    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    env.setdefault("DRSEG_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        raster = make_raster(tmp_dir / "tiny.tif")
        env["DRSEG_CACHE"] = str(tmp_dir / "cache")
        # `check` needs a real mask: make one once (not timed).
        subprocess.run(
            [sys.executable, "-m", "drseg_cli", "segment", str(raster), "--classes", "water,grass",
             "--model", "test-tiny", "--device", "cpu", "-o", str(tmp_dir / "mask.tif")],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        figures: dict[str, dict[str, float]] = {}
        for name, argv in cases(raster, tmp_dir).items():
            runs = [run_once(argv, env) for _ in range(args.repeats)]
            figures[name] = {
                "seconds": statistics.median(s for s, _ in runs),
                "peak_rss_mb": statistics.median(m for _, m in runs),
            }
    base = next(iter(figures.values()))
    for fig in figures.values():
        fig["time_ratio"] = fig["seconds"] / base["seconds"]
        fig["rss_ratio"] = fig["peak_rss_mb"] / base["peak_rss_mb"]
    if args.json:
        print(json.dumps({"repeats": args.repeats, "python": sys.version.split()[0],
                          "commands": figures}, indent=2))  # fmt: skip
        return
    print(f"{'command':<40} {'seconds':>8} {'x base':>7} {'RSS MB':>8} {'x base':>7}")
    for name, fig in figures.items():
        print(
            f"{name:<40} {fig['seconds']:>8.3f} {fig['time_ratio']:>7.2f} "
            f"{fig['peak_rss_mb']:>8.0f} {fig['rss_ratio']:>7.2f}"
        )


if __name__ == "__main__":
    main()
