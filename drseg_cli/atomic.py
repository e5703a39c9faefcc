"""Atomic outputs: write under a temporary name in the destination folder, rename when complete.

An interrupted run (exception, SIGINT, kill -9) therefore never leaves a partial file under a
final name; leftovers carry the ``.drseg-tmp`` marker and the id of the process that made them,
so a later run removes those of dead processes only. ``commit_together`` puts several files in
place all or none; ``folder_lock`` keeps a second batch run out of a folder.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import uuid
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

from drseg_cli.errors import OutputError, UsageError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

TMP_MARKER = ".drseg-tmp"
LOCK_NAME = ".drseg.lock"
_TMP_OWNER = re.compile(re.escape(TMP_MARKER) + r"-(\d+)-[0-9a-f]{8}")

log = logging.getLogger(__name__)


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
    """A unique temporary sibling of ``path`` that keeps its extension (drivers look at it).

    The name carries this process's id, so ``remove_stale_temps`` can tell a live run's files.
    """
    tag = f"{TMP_MARKER}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return path.with_name(f"{path.stem}{tag}{path.suffix}")


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


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate it: assume alive, never delete
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def remove_stale_temps(folder: Path, dead_pids: Collection[int] = ()) -> int:
    """Delete temp files that dead runs left in ``folder``; returns how many were removed.

    Temps of a live process (its id is in the name, see ``temp_path_for``) are left alone,
    except those of ``dead_pids``: processes known to be finished (e.g. Ray workers of this
    run, possibly on other machines, where this one cannot check their ids).
    """
    n = 0
    for p in folder.glob(f"*{TMP_MARKER}*"):
        owner = _TMP_OWNER.search(p.name)
        if owner and int(owner.group(1)) not in dead_pids and _pid_alive(int(owner.group(1))):
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n


def commit_together(pairs: Sequence[tuple[Path, Path]], remove: Sequence[Path] = ()) -> None:
    """Rename every complete ``(staged, final)`` file into place, all or none.

    Existing finals (and the stale files in ``remove``) are first moved aside; if any rename
    fails they are put back and the new files removed, so outputs are never a mix of two runs.
    """
    aside: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    current = pairs[0][1] if pairs else Path(".")
    try:
        for current in [final for _, final in pairs] + list(remove):
            if current.exists():
                backup = temp_path_for(current)
                os.replace(current, backup)
                aside.append((current, backup))
        for staged, current in pairs:
            os.replace(staged, current)
            placed.append(current)
    except BaseException as exc:
        for final in placed:
            with contextlib.suppress(OSError):
                final.unlink()
        for final, backup in reversed(aside):
            try:
                os.replace(backup, final)
            except OSError:
                log.error("%s: could not restore the previous file from %s", final, backup)
        if isinstance(exc, OSError):
            _raise_output_error(current, exc)
        raise
    for _, backup in aside:
        with contextlib.suppress(OSError):
            backup.unlink()


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder`` for one run; a second run on it gets a UsageError naming the holder.

    An OS lock (``flock``) on ``folder/.drseg.lock``: released by the kernel even on kill -9.
    Where the OS has none (Windows, some network file systems) nothing is locked.
    """
    path = Path(folder) / LOCK_NAME
    fd = None if fcntl is None else _acquire(path, folder)
    if fd is None:
        yield
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def _acquire(path: Path, folder: Path) -> int | None:
    """The locked descriptor of ``path``; None where the file system has no locks."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            _raise_output_error(path, exc)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            who = f" (pid {owner})" if owner.isdigit() else ""
            raise UsageError(
                f"{folder}: another drseg run is writing to this folder{who}; "
                "wait for it or use another folder"
            ) from None
        except OSError as exc:  # no locks here (e.g. NFS without lockd): run unlocked
            os.close(fd)
            log.warning("%s: cannot lock the folder (%s); not guarding it", folder, exc)
            return None
        try:  # the previous holder may have removed the file between our open and flock
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
