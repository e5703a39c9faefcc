"""Cloud and catalogue inputs: URLs read by range requests, STAC Items, against a loopback
HTTP server that honours ``Range`` and counts the bytes it serves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from typer.testing import CliRunner

from drseg_cli import cli
from drseg_cli.pipeline.batch import expand_inputs
from drseg_cli.raster.gdal_env import remote_gdal_options, scene_gdal_env
from drseg_cli.raster.reader import TileReader, inspect_raster
from drseg_cli.raster.remote import RasterSource, as_input
from tests.helpers import DATA, error_line

cli._register()
TINY = ["--model", "test-tiny", "--device", "cpu"]


class RangeServer:
    """``tests/range_server.py`` serving ``root`` on 127.0.0.1 in a child process."""

    def __init__(self, root: Path) -> None:
        self.root = root
        script = Path(__file__).with_name("range_server.py")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(root)], stdout=subprocess.PIPE, text=True
        )
        port = self.proc.stdout.readline().strip()  # the child prints its port, then serves
        if not port.isdigit():
            self.stop()
            raise RuntimeError("range server did not start")
        self.url = f"http://127.0.0.1:{port}"

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/_stats", timeout=10) as response:
            return json.load(response)

    @property
    def served(self) -> dict[str, int]:
        """Body bytes served per URL path."""
        return self.stats()["served"]

    @property
    def paths(self) -> set[str]:
        """Every path asked for, 404s included."""
        return set(self.stats()["paths"])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc.stdout.close()


def write_cog(path: Path, data: np.ndarray, **extra) -> Path:
    """A cloud-optimised GeoTIFF of ``data`` [bands, h, w] with 128-px blocks and overviews."""
    profile = dict(
        driver="COG",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype,
        crs="EPSG:32633",
        transform=from_origin(500000, 4600000, 10, 10),
        blocksize=128,
        compress="NONE",
    )
    profile.update(extra)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return path


def _mask(path: Path) -> tuple[np.ndarray, rasterio.Affine, rasterio.crs.CRS]:
    with rasterio.open(path) as ds:
        return ds.read(1), ds.transform, ds.crs


@pytest.fixture(scope="module")
def cogs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cogs")
    rng = np.random.default_rng(0)
    big = rng.integers(0, 255, (3, 2048, 2048), dtype=np.uint8)  # 12 MB, incompressible
    with rasterio.open(DATA / "RGB.byte.tif") as src:  # a 300 px crop: a few tiles to run
        window = rasterio.windows.Window(250, 0, 300, 300)  # with the scene's nodata corner
        rgb, grid = src.read(window=window), dict(transform=src.window_transform(window))
    grid.update(crs="EPSG:32618", nodata=0)
    files = {
        "big": write_cog(root / "big.tif", big),
        "rgb": write_cog(root / "rgb.tif", rgb, **grid),
    }
    for i, name in enumerate(("B04", "B03", "B02")):
        files[name] = write_cog(root / f"{name}.tif", rgb[i : i + 1], **grid)
    return files


@pytest.fixture(scope="module")
def local_mask(cogs, tmp_path_factory) -> tuple[np.ndarray, rasterio.Affine, rasterio.crs.CRS]:
    """The mask of the local run every remote run must reproduce."""
    out = tmp_path_factory.mktemp("local") / "local.tif"
    r = drseg("segment", cogs["rgb"], "-c", "water,land", "-o", out, *TINY)
    assert r.exit_code == 0, r.output
    return _mask(out)


@pytest.fixture
def server(cogs, monkeypatch):
    """A fresh server per test (unique port: GDAL's per-URL caches cannot hide requests)."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("GDAL_HTTP_TIMEOUT", "20")  # a stuck request fails, never hangs
    srv = RangeServer(cogs["big"].parent)
    yield srv
    srv.stop()


def drseg(*args: object):
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_urls_map_to_gdal_virtual_file_systems_and_keep_the_users_string():
    cases = {
        "https://example.com/a/scene.tif?sig=x": ("/vsicurl/https://example.com/a/scene.tif?sig=x"),
        "s3://bucket/k/b.tif": "/vsis3/bucket/k/b.tif",
        "gs://bucket/c.tif": "/vsigs/bucket/c.tif",
        "az://container/d.tif": "/vsiaz/container/d.tif",
        "/vsizip//vsicurl/https://h/e.zip/e.tif": "/vsizip//vsicurl/https://h/e.zip/e.tif",
    }
    scenes = expand_inputs(list(cases))
    assert [str(s) for s in scenes] == list(cases)
    assert [os.fspath(s) for s in scenes] == list(cases.values())
    assert [s.stem for s in scenes] == ["scene", "b", "c", "d", "e"]
    assert all(isinstance(s, RasterSource) for s in scenes)
    assert remote_gdal_options(scenes[1])["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR"
    assert remote_gdal_options(DATA / "RGB.byte.tif") == {}


def test_info_on_a_url_reads_only_the_header(server, cogs):
    url = f"{server.url}/data/big.tif"
    r = drseg("info", url, "--json", "--model", "test-tiny")
    assert r.exit_code == 0, r.output
    facts = json.loads(r.stdout)
    assert facts["path"] == url and facts["size"] == [2048, 2048] and facts["georeferenced"]
    size = cogs["big"].stat().st_size
    served = server.served["/data/big.tif"]
    assert 0 < served < size / 20, (served, size)
    assert server.paths == {"/data/big.tif"}  # no sidecar guesses (.aux.xml, .ovr, .msk)


def test_remote_options_are_held_for_a_remote_scene_only():
    with scene_gdal_env(64 * 1024**2, as_input("s3://bucket/scene.tif")):
        assert rasterio.env.getenv()["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR"
        assert rasterio.env.getenv()["GDAL_HTTP_MERGE_CONSECUTIVE_RANGES"] == "YES"
    with scene_gdal_env(64 * 1024**2, DATA / "RGB.byte.tif"):  # local sidecars stay visible
        assert "GDAL_DISABLE_READDIR_ON_OPEN" not in rasterio.env.getenv()


def test_tile_reader_fetches_only_the_window(server, cogs):
    info = inspect_raster(as_input(f"{server.url}/data/big.tif"))
    with TileReader(info, None) as reader:
        rgb, valid = reader.read(512, 768, 224)
    with rasterio.open(cogs["big"]) as ds:
        expected = ds.read(window=((768, 992), (512, 736))).astype(np.float32) / 255.0
    np.testing.assert_array_equal(rgb, expected)
    assert valid.all()
    size = cogs["big"].stat().st_size
    served = server.served["/data/big.tif"]
    # 224 px at 128-px blocks: at most 3×3 blocks of 48 KiB plus the header
    assert 0 < served < size / 20, (served, size)


def test_segment_a_url_equals_the_local_run_and_is_named_after_it(
    server, cogs, local_mask, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    remote = drseg("segment", f"{server.url}/data/rgb.tif", "-c", "water,land", *TINY)
    assert remote.exit_code == 0, remote.output
    mask, transform, crs = _mask(tmp_path / "rgb_mask.tif")  # named after the URL's stem
    with rasterio.open(cogs["rgb"]) as src:
        assert (transform, crs) == (src.transform, src.crs) == local_mask[1:]
    np.testing.assert_array_equal(mask, local_mask[0])


def test_missing_url_is_one_line_error(server, tmp_path):
    url = f"{server.url}/data/nope.tif"
    r = drseg("segment", url, "-c", "water,land", "-o", tmp_path / "m.tif", *TINY)
    assert r.exit_code != 0
    line = error_line(r)
    assert url in line and "not a raster GDAL can read" in line, line
    assert not list(tmp_path.iterdir())


def _item(tmp_path: Path, assets: dict[str, dict], name: str = "item.json") -> Path:
    item = {
        "type": "Feature",
        "stac_version": "1.0.0",
        "id": "S2_tile_20240601",
        "geometry": {"type": "Point", "coordinates": [0.0, 0.0]},
        "bbox": [0.0, 0.0, 0.0, 0.0],
        "properties": {"datetime": "2024-06-01T00:00:00Z"},
        "links": [],
        "assets": assets,
    }
    path = tmp_path / name
    path.write_text(json.dumps(item), encoding="utf-8")
    return path


def test_stac_item_visual_asset_is_segmented_and_named_after_the_item(
    server, local_mask, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    item = _item(
        tmp_path,
        {
            "B04": {"href": f"{server.url}/data/B04.tif", "roles": ["data"]},
            "rendered": {"href": f"{server.url}/data/rgb.tif", "roles": ["visual"]},
        },
    )
    info = drseg("info", item, "--json")
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["bands"] == 3  # the visual asset, not B04
    r = drseg("segment", item, "-c", "water,land", *TINY)
    assert r.exit_code == 0, r.output
    assert _mask(tmp_path / "S2_tile_20240601_mask.tif")[1:] == local_mask[1:]
    np.testing.assert_array_equal(_mask(tmp_path / "S2_tile_20240601_mask.tif")[0], local_mask[0])
    assert server.served["/data/rgb.tif"] > 0 and "/data/B04.tif" not in server.served


def test_stac_band_assets_are_stacked_as_rgb(server, cogs, local_mask, tmp_path, monkeypatch):
    """Three single-band assets named with --assets, hrefs relative to an Item served by URL."""
    monkeypatch.chdir(tmp_path)
    item = _item(tmp_path, {n: {"href": f"./{n}.tif"} for n in ("B02", "B03", "B04")})
    served_item = cogs["rgb"].with_name(f"item_{tmp_path.name}.json")  # beside the assets
    served_item.write_text(item.read_text(encoding="utf-8"), encoding="utf-8")
    url = f"{server.url}/data/{served_item.name}"
    r = drseg("segment", url, "--assets", "B04,B03,B02", "-c", "water,land", *TINY)
    assert r.exit_code == 0, r.output
    mask, transform, crs = _mask(tmp_path / "S2_tile_20240601_mask.tif")
    assert (transform, crs) == local_mask[1:]
    np.testing.assert_array_equal(mask, local_mask[0])
    assert all(server.served[f"/data/{n}.tif"] > 0 for n in ("B02", "B03", "B04"))


def test_stac_asset_errors_are_one_line(server, tmp_path):
    item = _item(tmp_path, {"B04": {"href": f"{server.url}/data/B04.tif"}})
    r = drseg("segment", item, "-c", "water,land", *TINY)
    assert r.exit_code == 2 and "no visual asset" in error_line(r) and "B04" in error_line(r)
    r = drseg("segment", item, "--assets", "B08", "-c", "water,land", *TINY)
    assert r.exit_code == 2 and "no asset 'B08'" in error_line(r)
    r = drseg("segment", item, "--assets", "B04,B04", "-c", "water,land", *TINY)
    assert r.exit_code == 2 and "three band assets" in error_line(r)
    (tmp_path / "not_stac.json").write_text("{}", encoding="utf-8")
    r = drseg("info", tmp_path / "not_stac.json")
    assert r.exit_code != 0 and "not a STAC Item" in error_line(r)
