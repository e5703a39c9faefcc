"""Shared fixtures; helpers live in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import write_geotiff

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DRSEG_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """No test may reach a real cache or the network."""
    monkeypatch.setenv("DRSEG_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DRSEG_OFFLINE", "1")


@pytest.fixture
def rgb_scene(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (3, 20, 30)).astype(np.float32)
    img = np.kron(base, np.ones((1, 10, 10), np.float32))[:, :190, :290]
    return write_geotiff(tmp_path / "scene.tif", img.astype(np.uint8))
