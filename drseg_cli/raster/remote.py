"""Inputs that are not plain local files: URLs, GDAL ``/vsi…/`` paths and STAC assets.

They are read through GDAL's virtual file systems (``/vsicurl/``, ``/vsis3/``, ``/vsigs/``,
``/vsiaz/``) by range requests, so a windowed read fetches only the blocks it needs; cloud
credentials come from GDAL's usual environment variables (``AWS_*``, ``GOOGLE_*``,
``AZURE_*``). A ``RasterSource`` keeps the user's string for messages and output names and
gives GDAL its own path through ``os.fspath``; it is never checked with ``Path.exists()``:
a missing URL is reported with GDAL's own error.
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from urllib.parse import unquote, urlsplit

#: URL schemes and the GDAL virtual file system that reads them.
SCHEMES = {
    "http": "/vsicurl/",
    "https": "/vsicurl/",
    "s3": "/vsis3/",
    "gs": "/vsigs/",
    "az": "/vsiaz/",
}


class RasterSource:
    """An input GDAL opens by a path other than the one the user typed (a URL, a STAC asset).

    ``str()`` is the user's string (messages, manifest), ``os.fspath()`` the GDAL path,
    ``stem`` names the outputs (the URL's file stem, or a STAC Item's id).
    """

    __slots__ = ("text", "gdal_path", "stem")

    def __init__(self, text: str, gdal_path: str | None = None, stem: str | None = None) -> None:
        self.text = text
        self.gdal_path = gdal_path if gdal_path is not None else to_gdal_path(text)
        self.stem = stem if stem is not None else posixpath.splitext(self.name)[0] or "scene"

    @property
    def name(self) -> str:
        """Last component of the URL's path (query and fragment left out)."""
        path = urlsplit(self.text).path if "://" in self.text else self.text
        return unquote(posixpath.basename(path.rstrip("/")))

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    def resolve(self) -> RasterSource:
        """A remote path is already absolute: its identity is itself."""
        return self

    def stat(self) -> None:
        """No local file to stat (resume treats the input as changed)."""
        raise OSError(f"{self.text}: not a local file")

    def __fspath__(self) -> str:
        return self.gdal_path

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"RasterSource({self.text!r}, {self.gdal_path!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RasterSource) and (self.text, self.gdal_path) == (
            other.text,
            other.gdal_path,
        )

    def __hash__(self) -> int:
        return hash((self.text, self.gdal_path))


def is_remote(text: str | Path | RasterSource) -> bool:
    """True for URLs of a supported scheme and GDAL ``/vsi…/`` paths."""
    if isinstance(text, RasterSource):
        return is_remote(text.gdal_path)
    value = str(text)
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    return scheme in SCHEMES or value.startswith("/vsi")


def to_gdal_path(text: str) -> str:
    """``https://h/a.tif`` → ``/vsicurl/https://h/a.tif``, ``s3://b/k`` → ``/vsis3/b/k``, …;
    ``/vsi…`` paths are passed through."""
    if "://" not in text:
        return text
    scheme, rest = text.split("://", 1)
    prefix = SCHEMES.get(scheme.lower())
    if prefix is None:
        return text
    return prefix + (text if prefix == "/vsicurl/" else rest)


def as_input(text: str | Path | RasterSource) -> Path | RasterSource:
    """A command-line input as drseg handles it: a ``RasterSource`` for URLs and ``/vsi…``
    paths, else a local ``Path``."""
    if isinstance(text, RasterSource):
        return text
    value = str(text)
    return RasterSource(value) if is_remote(value) else Path(value)
