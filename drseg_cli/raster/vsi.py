"""Whole-file I/O on GDAL virtual file systems (``/vsis3/``, ``/vsigs/``, ``/vsiaz/``, …).

drseg writes every output to a local file first (the same writers as a local run) and copies
finished files to an object store here; the manifest and resume checks read them back here.
rasterio exposes no byte-level VSI calls, so this module calls GDAL's public C API
(``cpl_vsi.h``: ``VSIFOpenExL``, ``VSIFWriteL``, ``VSIStatExL``, ``VSIUnlink``,
``VSIGetFileMetadata``) through ``ctypes`` on the very libgdal rasterio loaded: the same
drivers, the same credentials (GDAL's ``AWS_*``, ``GS_*``/``GOOGLE_*``, ``AZURE_*``
environment variables and ``rasterio.Env`` options), the same HTTP stack.

An object written through ``/vsis3/`` & co. appears only when its handle is closed (one PUT,
or a multipart upload completed at close; GDAL aborts it on failure), so a reader never sees
a partial object under its final name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from drseg_cli.errors import OutputError

#: Chunk of a copy (GDAL's S3 writer uploads 50 MB parts on its own).
CHUNK = 8 * 1024**2
_STAT_EXISTS, _STAT_NATURE, _STAT_SET_ERROR = 0x1, 0x2, 0x8
#: Prefixes drseg writes to through GDAL (read-only ones, e.g. ``/vsicurl/``, excluded).
WRITABLE_PREFIXES = (
    "/vsis3/",
    "/vsigs/",
    "/vsiaz/",
    "/vsiadls/",
    "/vsioss/",
    "/vsiswift/",
    "/vsiwebhdfs/",
    "/vsimem/",
)


def is_vsi(path: str | os.PathLike[str]) -> bool:
    """True for a GDAL virtual path (``/vsi…/``): not a local file, not for ``os`` calls."""
    return os.fspath(path).startswith("/vsi")


def check_writable_prefix(path: str | os.PathLike[str]) -> None:
    """One line for a virtual path GDAL cannot write to (``/vsicurl/``, ``/vsizip/``…)."""
    text = os.fspath(path)
    if not text.startswith(WRITABLE_PREFIXES):
        kinds = ", ".join(p for p in WRITABLE_PREFIXES if p != "/vsimem/")
        raise OutputError(f"{text}: GDAL cannot write there; outputs go to {kinds} or a folder")


#: ``s3://b/k`` as a ``Path`` is ``s3:/b/k``: the URL schemes GDAL can write, as typed.
_WRITABLE_SCHEMES = {"s3:/": "/vsis3/", "gs:/": "/vsigs/", "az:/": "/vsiaz/"}


def output_path(path: Path) -> Path:
    """An output given as ``s3://``, ``gs://`` or ``az://`` URL → its ``/vsi…/`` path (the
    shell passes ``-o s3://b/k`` through a ``Path``, which keeps one slash); an ``http(s)``
    URL is an error (GDAL writes no plain HTTP); anything else as given."""
    text = str(path)
    for scheme, prefix in _WRITABLE_SCHEMES.items():
        if text.startswith(scheme) and not text.startswith(scheme + "/"):
            return Path(prefix + text[len(scheme) :])
    if text.startswith(("http:/", "https:/")) or text.startswith("/vsicurl"):
        raise OutputError(
            f"{text}: cannot write to a URL; give /vsis3/…, /vsigs/…, /vsiaz/… or s3://…"
        )
    return path


@functools.cache
def store_path(path: Path) -> Path:
    """An input given as ``s3://``, ``gs://`` or ``az://`` → its ``/vsi…/`` path (GDAL reads
    it there, as ``output_path`` writes it); anything else, URLs included, as given."""
    if str(path).startswith(("http:/", "https:/")):
        return Path(path)
    return output_path(Path(path))


def _gdal() -> ctypes.CDLL:
    """rasterio's libgdal (already loaded by rasterio: the same library and settings)."""
    import rasterio
    import rasterio._base

    candidates = [rasterio._base.__file__]  # dlsym searches its dependencies (libgdal)
    here = Path(rasterio.__file__).parent
    for pattern in ("../rasterio.libs/*gdal*", ".dylibs/*gdal*", "../rasterio.libs/gdal*.dll"):
        candidates += sorted(glob.glob(str(here / pattern)))
    candidates += [p for p in (ctypes.util.find_library("gdal"),) if p]
    for candidate in candidates:
        try:
            lib = ctypes.CDLL(candidate)
            lib.VSIFOpenExL  # noqa: B018 - raises AttributeError when not GDAL
        except (OSError, AttributeError):
            continue
        return _declare(lib)
    raise OutputError("cannot find rasterio's GDAL library to write to /vsi… paths")


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    c_char_p, c_void_p, c_int = ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int
    c_size_t = ctypes.c_size_t
    signatures = {
        "VSIFOpenExL": (c_void_p, [c_char_p, c_char_p, c_int]),
        "VSIFReadL": (c_size_t, [c_void_p, c_size_t, c_size_t, c_void_p]),
        "VSIFWriteL": (c_size_t, [c_void_p, c_size_t, c_size_t, c_void_p]),
        "VSIFCloseL": (c_int, [c_void_p]),
        "VSIStatExL": (c_int, [c_char_p, c_void_p, c_int]),
        "VSIUnlink": (c_int, [c_char_p]),
        "VSIGetFileMetadata": (ctypes.POINTER(c_char_p), [c_char_p, c_char_p, c_void_p]),
        "CSLDestroy": (None, [ctypes.POINTER(c_char_p)]),
        "VSICurlPartialClearCache": (None, [c_char_p]),
        "CPLErrorReset": (None, []),
        "CPLGetLastErrorMsg": (c_char_p, []),
        "CPLPushErrorHandler": (None, [c_void_p]),
        "CPLPopErrorHandler": (None, []),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


class _Quiet:
    """GDAL errors of the calls inside kept for our message, not logged by rasterio."""

    def __enter__(self) -> ctypes.CDLL:
        self.lib = _gdal()
        self.lib.CPLPushErrorHandler(ctypes.cast(self.lib.CPLQuietErrorHandler, ctypes.c_void_p))
        self.lib.CPLErrorReset()
        return self.lib

    def __exit__(self, *exc: object) -> None:
        self.lib.CPLPopErrorHandler()


def _last_error(lib: ctypes.CDLL, default: str) -> str:
    message = (lib.CPLGetLastErrorMsg() or b"").decode("utf-8", "replace").strip()
    return (message.splitlines() or [default])[0] or default


def _b(path: str | os.PathLike[str]) -> bytes:
    return os.fspath(path).encode("utf-8")


def forget(path: str | os.PathLike[str]) -> None:
    """Drop what GDAL cached about ``path`` (and below): another process may have written it."""
    with _Quiet() as lib:
        lib.VSICurlPartialClearCache(_b(path))


def exists(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an object (or, for a bucket / prefix, a directory) right now."""
    forget(path)
    buf = ctypes.create_string_buffer(1024)  # room for any platform's struct stat
    with _Quiet() as lib:
        return lib.VSIStatExL(_b(path), buf, _STAT_EXISTS | _STAT_NATURE) == 0


def upload(local: Path, remote: str | os.PathLike[str]) -> str:
    """Copy the local file ``local`` to ``remote``; returns its sha256 (computed on the way).

    The object appears whole when the handle closes, or not at all (GDAL reports a failed
    PUT or multipart completion as a failed close).
    """
    h = hashlib.sha256()
    with _Quiet() as lib:
        fp = lib.VSIFOpenExL(_b(remote), b"wb", 1)
        if not fp:
            raise OutputError(f"{remote}: cannot write ({_last_error(lib, 'open failed')})")
        ok = True
        try:
            with open(local, "rb") as f:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    h.update(chunk)
                    if lib.VSIFWriteL(chunk, 1, len(chunk), fp) != len(chunk):
                        ok = False
                        break
        finally:
            closed = lib.VSIFCloseL(fp) == 0
        if not (ok and closed):
            raise OutputError(f"{remote}: upload failed ({_last_error(lib, 'write failed')})")
    return h.hexdigest()


def iter_chunks(path: str | os.PathLike[str]) -> Iterator[bytes]:
    """The bytes of ``path`` in chunks; a missing or unreadable object is an ``OutputError``."""
    forget(path)
    with _Quiet() as lib:
        fp = lib.VSIFOpenExL(_b(path), b"rb", 1)
        if not fp:
            raise OutputError(f"{path}: cannot read ({_last_error(lib, 'not found')})")
    try:
        buf = ctypes.create_string_buffer(CHUNK)
        while True:
            with _Quiet() as lib:
                n = lib.VSIFReadL(buf, 1, CHUNK, fp)
            if n:
                yield buf.raw[:n]
            if n < CHUNK:
                return
    finally:
        _gdal().VSIFCloseL(fp)


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    return b"".join(iter_chunks(path))


def download(path: str | os.PathLike[str], local: Path) -> str:
    """Copy ``path`` to the local file ``local``; returns its sha256."""
    h = hashlib.sha256()
    with open(local, "wb") as f:
        for chunk in iter_chunks(path):
            h.update(chunk)
            f.write(chunk)
    return h.hexdigest()


def remove(path: str | os.PathLike[str]) -> None:
    """Delete the object ``path`` (already gone: nothing to do)."""
    with _Quiet() as lib:
        if lib.VSIUnlink(_b(path)) != 0 and exists(path):
            raise OutputError(f"{path}: cannot delete ({_last_error(lib, 'delete failed')})")


def identity(path: str | os.PathLike[str]) -> dict[str, int | str] | None:
    """A remote file's size and version tag (HTTP ``Content-Length`` and ``ETag``, else
    ``Last-Modified``): what ``--resume`` compares to tell an input changed; None if unknown."""
    forget(path)
    with _Quiet() as lib:
        items = lib.VSIGetFileMetadata(_b(path), b"HEADERS", None)
        if not items:
            return None
        headers: dict[str, str] = {}
        try:
            i = 0
            while items[i] is not None:
                key, _, value = items[i].decode("utf-8", "replace").partition("=")
                headers[key.strip().lower()] = value.strip()
                i += 1
        finally:
            lib.CSLDestroy(items)
    tag = headers.get("etag") or headers.get("last-modified")
    # GDAL's first request is a ranged GET: the total is after the slash of Content-Range
    size = headers.get("content-range", "").rpartition("/")[2] or headers.get("content-length")
    if tag is None or size is None or not size.isdigit():
        return None
    return {"size": int(size), "etag": tag.strip('"')}
