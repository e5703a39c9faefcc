"""Install route of the README (issue 16 item 10): CPU-only torch first, then ``make demo`` and
``make test`` still the two commands, reusing that venv and its torch."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def readme_install() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text[text.index("## Install") : text.index("## Commands")]


def test_readme_installs_cpu_torch_and_torchvision_first_from_one_index():
    lines = [ln.strip() for ln in readme_install().splitlines()]
    cpu = [i for i, ln in enumerate(lines) if CPU_INDEX in ln]
    assert len(cpu) == 1, "one CPU-only install line"
    words = lines[cpu[0]].split()
    assert "torch" in words and "torchvision" in words  # the same index for both
    drseg = [i for i, ln in enumerate(lines) if re.search(r"pip install -e \.(\s|$)", ln)]
    assert any(i > cpu[0] for i in drseg), "drseg installed after the CPU torch"
    assert "make demo" in readme_install() and "make test" in readme_install()


def dry_run(target: str, venv: Path) -> str:
    return subprocess.run(
        ["make", "-n", target, f"VENV={venv}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.parametrize("target", ["demo", "test"])
def test_make_reuses_a_venv_made_by_hand_and_keeps_its_torch(tmp_path, target):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "drseg").write_text("")  # the README's `pip install -e .` made it
    commands = dry_run(target, venv)
    # the dev extra is installed into that venv once (a plain install has no pytest/ruff)...
    install = [ln for ln in commands.splitlines() if "pip install" in ln]
    assert install and all(f"{venv}/bin/python -m pip" in ln for ln in install)
    assert all(not re.search(r"--upgrade|-U\b|--force-reinstall|--clear", ln) for ln in install)
    assert not re.search(rf"rm -rf \S*{re.escape(venv.name)}|venv --clear", commands)
    # ...and then never again: the next run goes straight to work
    (venv / ".drseg-dev-installed").write_text("")
    again = dry_run(target, venv)
    assert "pip install" not in again and f"{venv}/bin/" in again
