"""Light commands start without the model stack: no torch, open_clip, timm or geopandas.

Each case runs in a fresh interpreter (an import made by another test would hide one made
by drseg) and reports which heavy modules ``sys.modules`` holds when it exits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import DATA

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "open_clip", "timm", "geopandas", "pandas", "scipy", "ray")

# Runs drseg with the given arguments; at exit prints the heavy modules it imported.
CHILD = f"""
import atexit, json, runpy, sys
atexit.register(lambda: print("MODULES=" + json.dumps(
    [m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr))
if sys.argv[1:] == ["--import-only"]:
    import drseg_cli.cli
    sys.exit(0)
sys.argv = ["drseg", *sys.argv[1:]]
runpy.run_module("drseg_cli", run_name="__main__")
"""


def heavy_modules(*args: str) -> tuple[list[str], subprocess.CompletedProcess]:
    """The heavy modules a fresh ``drseg ARGS`` process imported, and the process."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, timeout=60
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("MODULES=")]
    assert len(lines) == 1, proc.stderr
    return json.loads(lines[0].removeprefix("MODULES=")), proc


@pytest.mark.parametrize(
    "args",
    [
        ["--import-only"],
        ["--help"],
        ["--version"],
        ["info", str(DATA / "RGB.byte.tif"), "--json"],
        ["models", "list", "--json"],
        ["segment", "--help"],
    ],
    ids=lambda a: " ".join(a[:2]).replace(str(DATA) + "/", ""),
)
def test_light_commands_do_not_import_the_model_stack(args):
    modules, proc = heavy_modules(*args)
    assert proc.returncode == 0, proc.stderr
    assert modules == [], f"drseg {' '.join(args)} imported {modules}"


def test_check_of_a_mask_imports_neither_torch_nor_geopandas():
    """``check`` runs its verifier (which answers: not a drseg mask) without the model stack
    or the vector stack: checking a mask needs neither."""
    modules, proc = heavy_modules("check", str(DATA / "RGB.byte.tif"))
    assert proc.returncode == 1 and "drseg: error:" in proc.stderr, proc.stderr
    assert modules == [], f"drseg check imported {modules}"
