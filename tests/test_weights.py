"""The weights registry: cache dir, resolution order, downloads, verification, ``drseg models``.

Downloads are exercised with ``file://`` URLs (no network); hub sources are never contacted.
"""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from drseg_cli.errors import ModelUnavailableError, UsageError
from drseg_cli.model import weights
from drseg_cli.model.weights import Source, WeightSpec


def fake_spec(tmp_path, payload: bytes = b"weights!" * 1000, *, sha: str | None = "auto", **kw):
    """A registered-looking spec whose only source is a local file:// URL."""
    src = tmp_path / "origin.bin"
    src.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest() if sha == "auto" else sha
    fields = dict(
        name="Fake-1/test",
        kind="clip",
        arch="Fake-1",
        tag="test",
        filename="Fake-1.pt",
        size_mb=0.008,
        sha256=digest,
        sources=(Source("url", src.as_uri()),),
        aliases=("fake-original.pth",),
    )
    fields.update(kw)
    return WeightSpec(**fields)


@pytest.fixture
def online(monkeypatch):
    for var in weights.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("DRSEG_CACHE", str(root))
    return root


# --------------------------------------------------------------------------- cache dir, offline


def test_cache_dir_precedence(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DRSEG_CACHE", str(tmp_path / "env"))
    assert weights.cache_dir() == tmp_path / "env"
    assert weights.cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("DRSEG_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(weights.sys, "platform", "linux")
    assert weights.cache_dir() == tmp_path / "xdg" / "drseg"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert weights.cache_dir() == tmp_path / "home" / ".cache" / "drseg"


@pytest.mark.parametrize(
    "env, expected",
    [({}, False), ({"HF_HUB_OFFLINE": "1"}, True), ({"DRSEG_OFFLINE": "true"}, True),
     ({"HF_HUB_OFFLINE": "0"}, False)],
)  # fmt: skip
def test_offline_switches(monkeypatch, env, expected) -> None:
    for var in weights.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert weights.offline() is expected


# --------------------------------------------------------------------------- registry


def test_registry_entries_are_consistent() -> None:
    import open_clip
    import timm

    defaults = {s.kind for s in weights.REGISTRY.values() if s.default}
    assert defaults == {"clip", "dino"}
    for spec in weights.REGISTRY.values():
        assert spec.sources and spec.filename
        assert spec.size_mb or spec.kind == "rsrefseg2"  # authors' files: size unknown here
        assert all(r in weights.REGISTRY for r in spec.requires)
        if spec.kind in ("sam", "siglip", "tokenizer", "rsrefseg2"):  # hub files (docs/REFER.md)
            assert spec.sources[0].kind == "hf" and spec.sha256 is None
        elif spec.kind == "clip":
            assert spec.arch in open_clip.list_models()
            cfg = open_clip.get_pretrained_cfg(spec.arch, spec.tag)
            assert cfg, spec.name
            assert spec.quick_gelu == bool(cfg.get("quick_gelu", False))
            if spec.sha256:  # only where open_clip's own URL carries it
                assert spec.sha256 in cfg["url"] and len(spec.sha256) == 64
        else:
            assert timm.is_model(spec.name) and spec.sha256 is None
            assert spec.sources[0].location == f"timm/{spec.name}"


def test_lookup_of_registered_derived_and_unknown_names() -> None:
    assert weights.get_spec("ViT-B-16/openai") is weights.REGISTRY["ViT-B-16/openai"]
    assert weights.get_spec("vit_base_patch8_224.dino").default
    derived = weights.get_spec("ViT-B-32/openai")  # open_clip knows it: derived, sha from URL
    assert not derived.registered and derived.quick_gelu and len(derived.sha256) == 64
    assert derived.filename == "ViT-B-32.pt"
    hub = weights.get_spec("ViT-B-16/datacomp_xl_s13b_b90k")
    assert hub.sources[0].kind == "hf" and hub.sha256 is None
    timm_spec = weights.get_spec("vit_small_patch16_224.dino")
    assert timm_spec.sources[0].location == "timm/vit_small_patch16_224.dino"
    with pytest.raises(UsageError, match="unknown weights 'nope'.*ViT-B-16/openai"):
        weights.get_spec("nope")
    with pytest.raises(UsageError, match="tags of ViT-B-16: openai"):
        weights.get_spec("ViT-B-16/nope")
    assert weights.spec_for_file("/x/dino_vitbase8_pretrain.pth").name == (
        "vit_base_patch8_224.dino"
    )


# --------------------------------------------------------------------------- resolution


def test_resolution_order_explicit_then_cache_then_error(tmp_path, cache) -> None:
    spec = fake_spec(tmp_path)
    explicit = tmp_path / "mine.pt"
    explicit.write_bytes(b"x")
    assert weights.resolve(spec, explicit) == explicit
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        weights.resolve(spec, tmp_path / "absent.pt")

    with pytest.raises(ModelUnavailableError) as err:  # offline (conftest) and nothing cached
        weights.resolve(spec)
    msg = str(err.value)
    assert "Fake-1.pt" in msg and str(cache) in msg and "DRSEG_OFFLINE=1" in msg
    assert "`drseg models download Fake-1/test`" in msg and f"copy Fake-1.pt into {cache}" in msg
    assert "\n" not in msg

    cache.mkdir()
    (cache / "fake-original.pth").write_bytes(b"alias")  # an accepted alias name
    assert weights.resolve(spec) == cache / "fake-original.pth"
    (cache / "Fake-1.pt").write_bytes(b"main")  # the main name wins
    assert weights.resolve(spec) == cache / "Fake-1.pt"


def test_resolution_downloads_when_online(tmp_path, cache, online) -> None:
    spec = fake_spec(tmp_path)
    path = weights.resolve(spec)
    assert path == cache / "Fake-1.pt"
    assert path.read_bytes() == (tmp_path / "origin.bin").read_bytes()
    assert [p.name for p in cache.iterdir()] == ["Fake-1.pt"]  # no temp files left


def test_download_checks_the_sha256_and_leaves_nothing_behind(tmp_path, cache, online) -> None:
    spec = fake_spec(tmp_path, sha="0" * 64)
    with pytest.raises(ModelUnavailableError, match="corrupt: sha256"):
        weights.download(spec, progress=False)
    assert list(cache.iterdir()) == []
    prefix = hashlib.sha256((tmp_path / "origin.bin").read_bytes()).hexdigest()[:8]
    assert weights.download(fake_spec(tmp_path, sha=prefix), progress=False).is_file()


def test_download_failures_and_offline_are_one_line_errors(tmp_path, cache, online, monkeypatch):
    bad = fake_spec(tmp_path, sources=(Source("url", (tmp_path / "gone.bin").as_uri()),))
    with pytest.raises(ModelUnavailableError, match="cannot download Fake-1/test: .*gone.bin"):
        weights.download(bad, progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError) as err:
        weights.download(fake_spec(tmp_path))
    assert "HF_HUB_OFFLINE=1" in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- verify, formats


def write_safetensors(path, n: int = 16) -> None:
    save_file({"w": torch.arange(n, dtype=torch.float32)}, path)


def test_file_formats_are_told_by_content(tmp_path) -> None:
    write_safetensors(tmp_path / "a.pt")  # misleading suffix on purpose
    torch.save({"w": torch.ones(2)}, tmp_path / "b.safetensors")
    (tmp_path / "c.bin").write_bytes(b"hello world, not weights")
    assert weights.file_format(tmp_path / "a.pt") == "safetensors"
    assert weights.file_format(tmp_path / "b.safetensors") == "torch-zip"
    assert weights.file_format(tmp_path / "c.bin") == "unknown"
    assert torch.equal(weights.read_checkpoint(tmp_path / "a.pt")["w"], torch.arange(16.0))
    assert torch.equal(weights.read_checkpoint(tmp_path / "b.safetensors")["w"], torch.ones(2))
    with pytest.raises(ModelUnavailableError, match="c.bin"):
        weights.read_checkpoint(tmp_path / "c.bin")


def test_unsafe_pickles_are_refused(tmp_path) -> None:
    torch.save({"w": torch.ones(1), "obj": _Unpicklable()}, tmp_path / "evil.pth")
    with pytest.raises(ModelUnavailableError, match="evil.pth: cannot read weights"):
        weights.read_checkpoint(tmp_path / "evil.pth")


class _Unpicklable:
    """Any class outside torch's weights_only allow-list."""


def test_verify_reports_ok_present_corrupt_and_missing(tmp_path, cache) -> None:
    cache.mkdir()
    payload = b"weights!" * 1000
    good = fake_spec(tmp_path, payload)
    (cache / "Fake-1.pt").write_bytes(payload)
    assert weights.verify_one(good, cache).status == "corrupt"  # right sha, not a weights file
    write_safetensors(cache / "Fake-1.pt")
    digest = weights.sha256_file(cache / "Fake-1.pt")
    assert weights.verify_one(fake_spec(tmp_path, sha=digest), cache).status == "ok"
    assert weights.verify_one(fake_spec(tmp_path, sha="ab" * 32), cache).status == "corrupt"
    assert weights.verify_one(fake_spec(tmp_path, sha=None), cache).status == "present"
    # A truncated safetensors file is caught without any checksum.
    data = (cache / "Fake-1.pt").read_bytes()
    (cache / "Fake-1.pt").write_bytes(data[:-8])
    result = weights.verify_one(fake_spec(tmp_path, sha=None), cache)
    assert result.status == "corrupt" and "does not match its header" in result.detail
    (cache / "Fake-1.pt").unlink()
    assert weights.verify_one(good, cache).status == "missing"


def test_structure_check_of_zip_checkpoints(tmp_path) -> None:
    path = tmp_path / "m.pth"
    torch.save({"w": torch.arange(1000.0)}, path)
    assert weights.check_structure(path) is None
    data = bytearray(path.read_bytes())
    pos = data.find(struct.pack("<f", 500.0))
    data[pos : pos + 4] = struct.pack("<f", -1.0)  # flip stored bytes: zip CRC must catch it
    path.write_bytes(bytes(data))
    assert "damaged" in (weights.check_structure(path) or "")


def test_state_dict_helpers() -> None:
    state = {"module.backbone.a": 1, "backbone.module.b": 2, "c": 3}
    assert weights.strip_prefixes(state, ("module.", "backbone.")) == {"a": 1, "b": 2, "c": 3}
    nested = {"epoch": 1, "teacher": {"state_dict": {"x": 1}}}
    assert weights.unwrap_state_dict(nested, ("teacher", "state_dict"), lambda: "f") == {"x": 1}
    with pytest.raises(ModelUnavailableError, match="no state dict"):
        weights.unwrap_state_dict([], ("teacher",), lambda: "f")
    text = weights.describe_key_mismatch([f"k{i}" for i in range(6)], ["u"])
    assert text == "missing keys k0, k1, k2, k3 (+2 more); unexpected keys u"


# --------------------------------------------------------------------------- drseg models


def models_cli(*args: str):
    from drseg_cli import cli

    if not any(g.name == "models" for g in cli.app.registered_groups):
        cli._register()
    return CliRunner().invoke(cli.app, ["models", *args])


def test_models_list_json_and_path(cache) -> None:
    cache.mkdir()
    write_safetensors(cache / "vit_small_patch8_224.dino.safetensors")
    r = models_cli("list", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["cache_dir"] == str(cache)
    rows = {w["name"]: w for w in data["weights"]}
    assert set(rows) == set(weights.REGISTRY)
    assert rows["vit_small_patch8_224.dino"]["cached"] is True
    assert rows["ViT-B-16/openai"]["cached"] is False
    assert rows["ViT-B-16/openai"]["sha256"] == weights.REGISTRY["ViT-B-16/openai"].sha256
    assert [p["name"] for p in data["presets"]] == [
        "vit-b16",
        "vit-l14",
        "vit-b16-cpu",
        "test-tiny",
        "test-tiny-cpu",
    ]

    r = models_cli("path")
    assert r.exit_code == 0 and r.stdout.strip() == str(cache)
    r = models_cli("path", "ViT-L-14/openai")
    assert r.stdout.strip() == str(cache / "ViT-L-14.pt")

    r = models_cli("list")
    assert r.exit_code == 0 and "ViT-B-16/openai" in r.stdout and "test-tiny" in r.stdout


def test_models_download_offline_and_verify_exit_codes(cache) -> None:
    r = models_cli("download", "vit-b16")  # a preset: both of its files
    assert r.exit_code == 1
    assert r.stderr.startswith("drseg: error: cannot download ViT-B-16/openai")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    r = models_cli("download", "nope")
    assert r.exit_code == 2 and "unknown weights 'nope'" in r.stderr

    r = models_cli("verify", "--json")  # nothing cached: nothing wrong
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"] is True
    cache.mkdir()
    (cache / "ViT-B-16.pt").write_bytes(b"PK\x03\x04 definitely not the OpenAI archive")
    r = models_cli("verify")
    assert r.exit_code == 1 and "ViT-B-16/openai: corrupt" in r.stderr
    r = models_cli("verify", "vit_small_patch8_224.dino")  # asked for and missing
    assert r.exit_code == 1 and "missing" in r.stderr
