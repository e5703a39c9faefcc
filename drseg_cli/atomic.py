"""Atomic outputs: write under a temporary name in the destination folder, rename when complete.

An interrupted run (exception, SIGINT, kill -9) therefore never leaves a partial file under a
final name; leftovers carry the ``.drseg-tmp`` marker and are ignored (and cleaned) later.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from drseg_cli.errors import OutputError, UsageError

TMP_MARKER = ".drseg-tmp"


def check_writable(paths: Sequence[Path], overwrite: bool) -> None:
    """Fail before any work if an output exists (no ``overwrite``) or its folder is unusable."""
    for path in paths:
        if path.exists() and not overwrite:
            raise UsageError(f"{path}: output exists; pass --overwrite to replace it")
        if path.is_dir():
            raise UsageError(f"{path}: output path is a directory")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise OutputError(f"{path}: output folder {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"{path}: output folder {parent} is not writable")


def temp_path_for(path: Path) -> Path:
    """A unique temporary sibling of ``path`` that keeps its extension (drivers look at it)."""
    return path.with_name(f"{path.stem}{TMP_MARKER}-{uuid.uuid4().hex[:8]}{path.suffix}")


def _raise_output_error(path: Path, exc: OSError) -> None:
    if exc.errno == errno.ENOSPC:
        raise OutputError(f"{path}: no space left on device") from None
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        raise OutputError(f"{path}: permission denied") from None
    raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None


@contextlib.contextmanager
def atomic_output(path: Path, sidecar_suffixes: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a temp path to write; on success rename it (and its sidecars) onto ``path``.

    ``sidecar_suffixes`` (e.g. ``.shx .dbf .prj .cpg`` for shapefiles, ``.aux.xml``) are
    renamed alongside when present. On failure every temporary file is removed.
    """
    tmp = temp_path_for(path)
    tmp_files = [tmp] + [tmp.with_suffix(s) for s in sidecar_suffixes]
    try:
        yield tmp
        for s in sidecar_suffixes:
            src = tmp.with_suffix(s)
            if src.exists():
                os.replace(src, path.with_suffix(s))
        os.replace(tmp, path)
    except OSError as exc:
        _cleanup(tmp_files)
        _raise_output_error(path, exc)
    except BaseException:
        _cleanup(tmp_files)
        raise


def _cleanup(paths: Sequence[Path]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        with contextlib.suppress(OSError):
            Path(f"{p}.aux.xml").unlink()


def remove_stale_temps(folder: Path) -> int:
    """Delete temp files a killed run left in ``folder``; returns how many were removed."""
    n = 0
    for p in folder.glob(f"*{TMP_MARKER}*"):
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n
