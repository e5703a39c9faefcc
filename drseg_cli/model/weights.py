"""Model weights: the registry, the cache dir, downloads, offline errors, checkpoint reading.

Every backbone file drseg uses is described here (what it is, the file name in the cache, an
approximate size, its sha256 where it is truly known, where it comes from). A file is found,
in this order:

1. an explicit local path (``--clip-pretrained FILE``, ``--dino-checkpoint FILE``);
2. the cache dir: ``$DRSEG_CACHE``, else a platform cache dir (``~/.cache/drseg`` on Linux);
3. a download into the cache dir, unless offline (``DRSEG_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``);
4. otherwise :class:`~drseg_cli.errors.ModelUnavailableError`, one line saying which file is
   missing, where it was looked for, the command that fetches it on a connected machine
   (``drseg models download NAME``) and that copying the file into the cache dir is a complete
   offline install.

Checksums: the OpenAI CLIP URLs carry the file's sha256 in their path (open_clip checks the
same); the ``mlfoundations`` release URLs carry its first 8 hex digits (kept as a prefix). For
files from the Hugging Face hub no checksum is known to us and none is made up: ``verify``
then checks that the file is structurally complete (safetensors header / zip directory).

File formats are told apart by content, not by name: safetensors, torch zip pickles, legacy
torch pickles and TorchScript archives (the OpenAI ``.pt`` files) are all read.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
import sys
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drseg_cli.atomic import temp_path_for
from drseg_cli.errors import ModelUnavailableError, UsageError

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Names of the test-tiny backbones (built with random weights, never downloaded).
TINY_CLIP = "drseg-test-tiny-clip"
TINY_DINO = "drseg-test-tiny-dino"

_TRUE = {"1", "true", "yes", "on"}
OFFLINE_VARS = ("DRSEG_OFFLINE", "HF_HUB_OFFLINE")


@dataclass(frozen=True)
class Source:
    """Where a file can be fetched: a plain URL, or a file in a Hugging Face hub repo."""

    kind: str  # "url" | "hf"
    location: str  # the URL, or the hub repo id
    filename: str | None = None  # the file in the hub repo

    def describe(self) -> str:
        if self.kind == "hf":
            return f"https://huggingface.co/{self.location} ({self.filename})"
        return self.location


@dataclass(frozen=True)
class WeightSpec:
    """One downloadable weights file and how drseg uses it.

    ``name`` is what ``drseg models download`` takes: ``ARCH/TAG`` for open_clip weights
    (``ViT-B-16/openai``), the timm model name with its tag for DINO
    (``vit_base_patch8_224.dino``). ``sha256`` may be a prefix (see the module docstring);
    ``aliases`` are other file names accepted in the cache dir (e.g. the original DINO
    release file).
    """

    name: str
    kind: str  # "clip" | "dino"
    arch: str  # open_clip model name / timm model name (without tag)
    tag: str | None
    filename: str
    size_mb: float | None  # approximate download size, MB (10^6 bytes)
    sha256: str | None
    sources: tuple[Source, ...]
    quick_gelu: bool = False  # OpenAI-trained CLIPs use QuickGELU activations
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    aliases: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()  # other registry files a download also fetches
    default: bool = False
    note: str = ""
    registered: bool = field(default=True, compare=False)

    @property
    def filenames(self) -> tuple[str, ...]:
        return (self.filename, *self.aliases)


def _openai(arch: str, sha256: str, size_mb: float, *, default: bool = False) -> WeightSpec:
    # The URL is open_clip's pretrained cfg for this tag; its path component is the sha256.
    url = f"https://openaipublic.azureedge.net/clip/models/{sha256}/{arch}.pt"
    return WeightSpec(
        name=f"{arch}/openai",
        kind="clip",
        arch=arch,
        tag="openai",
        filename=f"{arch}.pt",
        size_mb=size_mb,
        sha256=sha256,
        sources=(Source("url", url),),
        quick_gelu=True,
        default=default,
        note="OpenAI CLIP (TorchScript archive, fp16)",
    )


def _dino(arch: str, size_mb: float, original: str, *, default: bool = False) -> WeightSpec:
    return WeightSpec(
        name=f"{arch}.dino",
        kind="dino",
        arch=arch,
        tag="dino",
        filename=f"{arch}.dino.safetensors",
        size_mb=size_mb,
        sha256=None,
        sources=(Source("hf", f"timm/{arch}.dino", "model.safetensors"),),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        aliases=(original,),
        default=default,
        note=f"DINO ViT (timm hub copy; the original release file {original} also works)",
    )


def _hf(
    name: str,
    kind: str,
    repo: str,
    file: str,
    local: str,
    mb: float | None,
    note: str,
    requires: tuple[str, ...] = (),
) -> WeightSpec:
    return WeightSpec(
        name=name,
        kind=kind,
        arch=repo,
        tag=None,
        filename=local,
        size_mb=mb,
        sha256=None,
        sources=(Source("hf", repo, file),),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        note=note,
        requires=requires,
    )


def _refer_specs() -> tuple[WeightSpec, ...]:
    """SAM 1 (transformers layout), SigLIP 2 and the RSRefSeg 2 checkpoints (docs/REFER.md).

    The RSRefSeg 2 files are the authors' mmengine checkpoints on the hub repo the public
    README names (KyanChen/RSRefSeg2); their file names there could not be checked from
    here: a file fetched by hand works the same, copied into the cache or given as a path.
    """
    sam = [
        _hf(f"facebook/sam-vit-{s}", "sam", f"facebook/sam-vit-{s}", "model.safetensors",
            f"sam-vit-{s}.safetensors", mb, f"SAM ViT-{s[0].upper()} (transformers layout)")
        for s, mb in (("base", 375), ("large", 1250), ("huge", 2560))
    ]  # fmt: skip
    sam += [
        WeightSpec(
            name="facebook/sam2.1-hiera-large",
            kind="sam",
            arch="sam2.1_hiera_l",
            tag=None,
            filename="sam2.1_hiera_large.pt",
            size_mb=898,
            sha256=None,
            sources=(
                Source("hf", "facebook/sam2.1-hiera-large", "sam2.1_hiera_large.pt"),
                Source(
                    "url",
                    "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
                    "sam2.1_hiera_large.pt",
                ),
            ),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            note="SAM 2.1 Hiera-L (sam2 package layout)",
        )
    ]
    siglip = [
        _hf("google/siglip2-so400m-patch16-512", "siglip", "google/siglip2-so400m-patch16-512",
            "model.safetensors", "siglip2-so400m-patch16-512.safetensors", 4550,
            "SigLIP 2 so400m/16, 512 px (RSRefSeg 2's dual encoder)"),
        _hf("google/siglip2-so400m-patch16-512/tokenizer", "tokenizer",
            "google/siglip2-so400m-patch16-512", "tokenizer.json",
            "siglip2-so400m-patch16-512.tokenizer.json", 34, "SigLIP 2 (Gemma) tokenizer"),
    ]  # fmt: skip
    refer = [
        _hf(f"rsrefseg2-{d}", "rsrefseg2", "KyanChen/RSRefSeg2", f"{d}.pth",
            f"rsrefseg2-{d}.pth", None, f"RSRefSeg 2 trained on {title} (authors' checkpoint)",
            requires=("google/siglip2-so400m-patch16-512/tokenizer",))
        for d, title in (("rrsisd", "RRSIS-D"), ("refsegrs", "RefSegRS"), ("risbench", "RISBench"))
    ]  # fmt: skip
    return (*sam, *siglip, *refer)


REGISTRY: dict[str, WeightSpec] = {
    s.name: s
    for s in (
        _openai(
            "ViT-B-16",
            "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
            335,
            default=True,
        ),
        _openai(
            "ViT-L-14", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", 890
        ),
        WeightSpec(
            name="ViT-B-16/laion2b_s34b_b88k",
            kind="clip",
            arch="ViT-B-16",
            tag="laion2b_s34b_b88k",
            filename="ViT-B-16-laion2b_s34b_b88k.safetensors",
            size_mb=599,
            sha256=None,
            sources=(
                Source(
                    "hf", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K", "open_clip_model.safetensors"
                ),
            ),
            note="OpenCLIP trained on LAION-2B",
        ),
        _dino("vit_base_patch8_224", 343, "dino_vitbase8_pretrain.pth", default=True),
        _dino("vit_small_patch8_224", 87, "dino_deitsmall8_pretrain.pth"),
        _dino("vit_base_patch16_224", 343, "dino_vitbase16_pretrain.pth"),
        *_refer_specs(),
    )
}


# --------------------------------------------------------------------------- cache dir, offline


def cache_dir(override: str | Path | None = None) -> Path:
    """The weights cache: ``override``, else ``$DRSEG_CACHE``, else the platform cache dir."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("DRSEG_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    return _platform_cache_root() / "drseg"


def _platform_cache_root() -> Path:
    home = Path.home()
    if sys.platform.startswith("win"):
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    if sys.platform == "darwin":
        return home / "Library" / "Caches"
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return Path(xdg) if xdg else home / ".cache"


def offline() -> bool:
    """True when downloads are off (``DRSEG_OFFLINE`` or ``HF_HUB_OFFLINE`` set truthy)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in OFFLINE_VARS)


def _offline_reason() -> str:
    set_vars = [v for v in OFFLINE_VARS if os.environ.get(v, "").strip().lower() in _TRUE]
    return f"downloads are off ({', '.join(f'{v}=1' for v in set_vars)})"


# --------------------------------------------------------------------------- lookup


def get_spec(name: str) -> WeightSpec:
    """The spec for ``name`` (registry, else derived from open_clip/timm); UsageError if none."""
    if name in REGISTRY:
        return REGISTRY[name]
    if "/" in name:  # its error lists the tags open_clip knows for the model
        arch, _, tag = name.partition("/")
        return clip_spec(arch, tag)
    try:
        return dino_spec(name)
    except UsageError:
        raise UsageError(
            f"unknown weights {name!r}; known: {', '.join(REGISTRY)} (or any open_clip "
            "MODEL/TAG, or timm model.tag)"
        ) from None


def clip_spec(arch: str, tag: str) -> WeightSpec:
    """Weights of open_clip model ``arch`` with pretrained ``tag``.

    Registered entries first; other tags open_clip knows are described from its pretrained
    cfg (hub repo or URL, QuickGELU, checksum from the URL where it has one).
    """
    name = f"{arch}/{tag}"
    if name in REGISTRY:
        return REGISTRY[name]
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag) if arch in open_clip.list_models() else {}
    if not cfg:
        tags = (
            open_clip.list_pretrained_tags_by_model(arch) if arch in open_clip.list_models() else []
        )
        known = ", ".join(tags[:12]) or "none (unknown model)"
        raise UsageError(f"no weights {name!r} for open_clip; tags of {arch}: {known}")
    url = cfg.get("url") or ""
    hub = (cfg.get("hf_hub") or "").strip("/")
    sha256 = None
    if url and ("openaipublic" in url or not hub):
        # A plain URL: OpenAI's carry the sha256 in the path, mlfoundations' an 8-hex prefix.
        base = url.rsplit("/", 1)[-1]
        if "openaipublic" in url:
            sha256, filename = url.split("/")[-2], base
        else:
            if "mlfoundations" in url:
                sha256 = base.rsplit(".", 1)[0].split("-")[-1]
            filename = f"{arch}-{tag}{Path(base).suffix or '.pt'}"
        sources: tuple[Source, ...] = (Source("url", url),)
    elif hub:
        # No checksum is known for hub files; the .bin is a fallback for repos without
        # safetensors (the format is told by content, so one cache name fits both).
        filename = f"{arch}-{tag}.safetensors"
        sources = (
            Source("hf", hub, "open_clip_model.safetensors"),
            Source("hf", hub, "open_clip_pytorch_model.bin"),
        )
    else:
        raise UsageError(f"open_clip has no download for {name!r}")
    return WeightSpec(
        name=name,
        kind="clip",
        arch=arch,
        tag=tag,
        filename=filename,
        size_mb=None,
        sha256=sha256 if sha256 and all(c in "0123456789abcdef" for c in sha256) else None,
        sources=sources,
        quick_gelu=bool(cfg.get("quick_gelu", False)),
        mean=tuple(cfg.get("mean", OPENAI_MEAN)),
        std=tuple(cfg.get("std", OPENAI_STD)),
        registered=False,
    )


def dino_spec(model_name: str) -> WeightSpec:
    """Weights of a timm model (``name.tag``; the default tag when none is given)."""
    if model_name in REGISTRY:
        return REGISTRY[model_name]
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, tag = split_model_name_tag(model_name)
    if not timm.is_model(arch):
        raise UsageError(f"unknown timm model {model_name!r} (e.g. {', '.join(_names('dino'))})")
    cfg = get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise UsageError(f"timm has no pretrained weights for {model_name!r}")
    full = f"{arch}.{cfg.tag}" if getattr(cfg, "tag", None) else arch
    if full in REGISTRY:
        return REGISTRY[full]
    sources = []
    if cfg.hf_hub_id:
        sources.append(Source("hf", cfg.hf_hub_id.strip("/"), "model.safetensors"))
    elif cfg.url:
        sources.append(Source("url", cfg.url))
    suffix = ".safetensors" if cfg.hf_hub_id else Path(cfg.url).suffix or ".pth"
    return WeightSpec(
        name=full,
        kind="dino",
        arch=arch,
        tag=getattr(cfg, "tag", None),
        filename=f"{full}{suffix}",
        size_mb=None,
        sha256=None,
        sources=tuple(sources),
        mean=tuple(cfg.mean or IMAGENET_MEAN),
        std=tuple(cfg.std or IMAGENET_STD),
        registered=False,
    )


def _names(kind: str) -> list[str]:
    return [s.name for s in REGISTRY.values() if s.kind == kind]


def spec_for_file(path: str | Path) -> WeightSpec | None:
    """The registered spec whose cache file name (or alias) is ``path``'s name, if any."""
    base = Path(path).name
    return next((s for s in REGISTRY.values() if base in s.filenames), None)


def list_weights(cache: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per registered file: what it is and whether (where) it is cached."""
    root = cache_dir(cache)
    rows = []
    for spec in REGISTRY.values():
        found = cached_file(spec, root)
        rows.append(
            {
                "name": spec.name,
                "kind": spec.kind,
                "file": spec.filename,
                "size_mb": spec.size_mb,
                "sha256": spec.sha256,
                "cached": found is not None,
                "path": str(found) if found else None,
                "default": spec.default,
                "source": spec.sources[0].describe(),
                "note": spec.note,
            }
        )
    return rows


# --------------------------------------------------------------------------- resolution


def cached_file(spec: WeightSpec, cache: str | Path | None = None) -> Path | None:
    """The file for ``spec`` in the cache dir (its name or an alias), or None."""
    root = cache_dir(cache)
    for name in spec.filenames:
        candidate = root / name
        if candidate.is_file():
            return candidate
    return None


def target_path(spec: WeightSpec, cache: str | Path | None = None) -> Path:
    """Where ``spec``'s file lives in the cache dir (whether or not it is there)."""
    return cache_dir(cache) / spec.filename


def explicit_file(path: str | Path, what: str = "weights file") -> Path:
    """An explicit local file, or ModelUnavailableError naming it."""
    p = Path(path).expanduser()
    if not p.is_file():
        reason = "is a directory" if p.is_dir() else "does not exist"
        raise ModelUnavailableError(f"{what} {p} {reason}")
    return p


def missing_message(spec: WeightSpec, root: Path, reason: str) -> str:
    """The one-line 'weights not found' message (what, where, how to fetch, how offline)."""
    looked = ", ".join(spec.filenames)
    return (
        f"weights {spec.name} not found: no {looked} in {root} (the cache dir; set DRSEG_CACHE "
        f"to change it) and {reason}; on a connected machine run `drseg models download "
        f"{spec.name}`, or for a fully offline install copy {spec.filename} into {root}"
    )


def resolve(
    spec: WeightSpec | str,
    explicit: str | Path | None = None,
    *,
    cache: str | Path | None = None,
    allow_download: bool = True,
) -> Path:
    """The local file for ``spec``: explicit path → cache dir → download → clear error."""
    if explicit is not None:
        return explicit_file(explicit)
    if isinstance(spec, str):
        spec = get_spec(spec)
    root = cache_dir(cache)
    found = cached_file(spec, root)
    if found is not None:
        return found
    if not allow_download:
        raise ModelUnavailableError(missing_message(spec, root, "downloading was not allowed"))
    if offline():
        raise ModelUnavailableError(missing_message(spec, root, _offline_reason()))
    log.warning("downloading %s (%s MB) into %s", spec.name, spec.size_mb or "?", root)
    return download(spec, cache=root)


# --------------------------------------------------------------------------- download


def download(
    spec: WeightSpec | str,
    *,
    cache: str | Path | None = None,
    force: bool = False,
    progress: bool | None = None,
) -> Path:
    """Fetch ``spec`` into the cache dir (atomically, checksum verified where known)."""
    if isinstance(spec, str):
        spec = get_spec(spec)
    root = cache_dir(cache)
    if not force and (found := cached_file(spec, root)) is not None:
        return found
    if offline():
        raise ModelUnavailableError(
            f"cannot download {spec.name}: {_offline_reason()}; run `drseg models download "
            f"{spec.name}` on a connected machine and copy {spec.filename} into {root}"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelUnavailableError(
            f"cannot create the cache dir {root} ({exc.strerror or exc}); set DRSEG_CACHE"
        ) from None
    target = root / spec.filename
    show = sys.stderr.isatty() if progress is None else progress
    errors = []
    for source in spec.sources:
        try:
            tmp = _fetch(source, target, show)
        except Exception as exc:  # noqa: BLE001 - network/hub errors of every library
            errors.append(f"{source.describe()}: {_first_line(exc)}")
            continue
        try:
            if spec.sha256:
                digest = sha256_file(tmp)
                if not digest.startswith(spec.sha256):
                    raise ModelUnavailableError(
                        f"download of {spec.name} is corrupt: sha256 {digest[:16]}... does not "
                        f"match {spec.sha256[:16]}...; retry `drseg models download {spec.name}`"
                    )
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return target
    raise ModelUnavailableError(
        f"cannot download {spec.name}: {'; '.join(errors)}; on a connected machine run "
        f"`drseg models download {spec.name}` and copy {spec.filename} into {root}"
    )


def _fetch(source: Source, target: Path, show: bool) -> Path:
    """Download one source to a temp file next to ``target``; returns the temp path."""
    tmp = temp_path_for(target)
    if source.kind == "url":
        _fetch_url(source.location, tmp, show)
        return tmp
    if source.kind == "hf":
        from huggingface_hub import hf_hub_download

        scratch = Path(f"{tmp}.d")
        try:
            got = hf_hub_download(source.location, source.filename, local_dir=scratch)
            os.replace(got, tmp)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return tmp
    raise ValueError(f"unknown source kind {source.kind!r}")


def _fetch_url(url: str, dest: Path, show: bool) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "drseg"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp, open(dest, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            from tqdm import tqdm

            with tqdm(
                total=total, unit="B", unit_scale=True, disable=not show, desc=dest.name
            ) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except BaseException:
        with contextlib.suppress(OSError):
            dest.unlink()
        raise


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------- verify


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_format(path: str | Path) -> str:
    """``safetensors``, ``torchscript``, ``torch-zip``, ``torch-pickle`` or ``unknown``."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            return "unknown"
        # TorchScript archives hold their code under <archive>/code/ and a constants.pkl.
        if any(n.endswith("constants.pkl") for n in names) or any("/code/" in n for n in names):
            return "torchscript"
        return "torch-zip"
    if head[:1] == b"\x80":
        return "torch-pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def check_structure(path: str | Path) -> str | None:
    """Cheap completeness check of a weights file; returns a problem or None."""
    path = Path(path)
    try:
        kind = file_format(path)
        if kind == "safetensors":
            size = path.stat().st_size
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    return "truncated safetensors header"
                header = json.loads(f.read(header_len))
            end = max(
                (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                default=0,
            )
            if 8 + header_len + end != size:
                return f"size {size} does not match its header ({8 + header_len + end})"
            return None
        if kind in ("torch-zip", "torchscript"):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            return f"zip member {bad} is damaged" if bad else None
        if kind == "torch-pickle":
            return None
        if path.suffix == ".json":  # tokenizer files
            json.loads(path.read_text(encoding="utf-8"))
            return None
        return "not a weights file (unknown format)"
    except (OSError, ValueError, zipfile.BadZipFile, struct.error) as exc:
        return _first_line(exc)


@dataclass(frozen=True)
class VerifyResult:
    """What ``verify`` found for one registered file."""

    name: str
    path: str | None
    status: str  # "ok" | "present" | "corrupt" | "missing"
    detail: str = ""


def verify_one(spec: WeightSpec, cache: str | Path | None = None) -> VerifyResult:
    """Check ``spec``'s cached file (see :func:`verify` for the statuses)."""
    root = cache_dir(cache)
    path = cached_file(spec, root)
    if path is None:
        return VerifyResult(spec.name, None, "missing", f"not in {root}")
    problem = check_structure(path)
    if problem:
        return VerifyResult(spec.name, str(path), "corrupt", problem)
    if spec.sha256 and path.name == spec.filename:
        digest = sha256_file(path)
        if digest.startswith(spec.sha256):
            return VerifyResult(spec.name, str(path), "ok", "sha256 matches")
        detail = f"sha256 {digest[:12]}... expected {spec.sha256[:12]}..."
        return VerifyResult(spec.name, str(path), "corrupt", detail)
    return VerifyResult(spec.name, str(path), "present", "complete; no checksum known")


def verify(
    names: Iterable[str] | None = None, *, cache: str | Path | None = None
) -> list[VerifyResult]:
    """Check cached files: sha256 where known, structure always.

    ``ok``: checksum matches; ``present``: no checksum known but the file is structurally
    complete; ``corrupt``: checksum or structure is wrong; ``missing``: not in the cache.
    """
    specs = [get_spec(n) for n in names] if names else list(REGISTRY.values())
    return [verify_one(spec, cache) for spec in specs]


# --------------------------------------------------------------------------- reading


def read_checkpoint(path: str | Path) -> Any:
    """Load a weights file without executing pickled code.

    safetensors → dict; TorchScript archive → its state dict; torch pickles → whatever they
    hold, loaded with ``weights_only=True`` (plus ``argparse.Namespace``, which DINO's full
    training checkpoints carry). Anything else is a ModelUnavailableError naming the file.
    """
    path = Path(path)
    kind = file_format(path)
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        import torch

        if kind == "torchscript":
            with warnings.catch_warnings():  # torch.jit.load is deprecated, not going away yet
                warnings.simplefilter("ignore", FutureWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
            for key in ("input_resolution", "context_length", "vocab_size"):
                state.pop(key, None)
            return dict(state)
        if kind in ("torch-zip", "torch-pickle"):
            # A file object, not the name: torch must not pick a reader by the suffix.
            with open(path, "rb") as f, torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure to read is the same clear error
        raise ModelUnavailableError(f"{path}: cannot read weights ({_first_line(exc)})") from None
    raise ModelUnavailableError(f"{path}: not a weights file (safetensors or torch checkpoint)")


def describe_key_mismatch(missing: list[str], unexpected: list[str], limit: int = 4) -> str:
    """``missing keys a, b (+3 more); unexpected keys c`` for one-line errors."""

    def few(keys: list[str]) -> str:
        more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    parts = []
    if missing:
        parts.append(f"missing keys {few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {few(unexpected)}")
    return "; ".join(parts)


def strip_prefixes(state: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
    """Remove any of ``prefixes`` from the start of every key, repeatedly, in any order."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if key.startswith(p):
                    key, changed = key[len(p) :], True
        out[key] = value
    return out


def unwrap_state_dict(obj: Any, keys: tuple[str, ...], where: Callable[[], str]) -> dict[str, Any]:
    """Follow nested ``keys`` (e.g. ``teacher``, ``model``, ``state_dict``) to a tensor dict."""
    for _ in range(4):
        if not isinstance(obj, dict):
            break
        nested = next((k for k in keys if isinstance(obj.get(k), dict)), None)
        if nested is None:
            break
        obj = obj[nested]
    if not isinstance(obj, dict) or not obj:
        raise ModelUnavailableError(f"{where()}: no state dict found in the checkpoint")
    return obj
