"""Atomic outputs: write under a temporary name in the destination folder, rename when complete.

An interrupted run (exception, SIGINT, kill -9) therefore never leaves a partial file under a
final name; leftovers carry the ``.drseg-tmp`` marker and the id of the process that made them,
so a later run removes those of dead processes only. ``commit_together`` puts several files in
place all or none; ``folder_lock`` keeps a second batch run out of a folder.

Outputs on an object store (GDAL ``/vsis3/``, ``/vsigs/``, ``/vsiaz/``… paths) have no rename:
they are written to a local staging folder by the same writers, then each finished file is
uploaded (``publish``); an object appears whole or not at all, a scene's set of objects is not
atomic (docs/SCALE.md). ``folder_lock`` there is a lock object (``_object_lock``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path

from drseg_cli.errors import DrsegError, OutputError, UsageError
from drseg_cli.raster.vsi import is_vsi

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: What cleaning up after a failure may meet (it must not hide the first error).
_CLEANUP_ERRORS = (DrsegError, OSError)

TMP_MARKER = ".drseg-tmp"
LOCK_NAME = ".drseg.lock"
_TMP_OWNER = re.compile(re.escape(TMP_MARKER) + r"-(\d+)-[0-9a-f]{8}")
#: This host in staging folder names (letters, digits and dashes only: safe in a glob).
_HOST = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname())[:40] or "host"

log = logging.getLogger(__name__)


def check_writable(paths: Sequence[Path], overwrite: bool) -> None:
    """Fail before any work if an output exists (no ``overwrite``) or its folder is unusable.

    An object-store path is checked against the store (one ``VSIStat`` each); it has no
    folder to check (a missing bucket fails at the first upload: the lock object of a batch).
    """
    for path in paths:
        if is_vsi(path):
            from drseg_cli.raster import vsi

            vsi.check_writable_prefix(path)
            if not overwrite and vsi.exists(path):
                raise UsageError(f"{path}: output exists; pass --overwrite to replace it")
            continue
        if path.exists() and not overwrite:
            raise UsageError(f"{path}: output exists; pass --overwrite to replace it")
        if path.is_dir():
            raise UsageError(f"{path}: output path is a directory")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise OutputError(f"{path}: output folder {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"{path}: output folder {parent} is not writable")


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (an object-store path: read through GDAL)."""
    h = hashlib.sha256()
    if is_vsi(path):
        from drseg_cli.raster import vsi

        for chunk in vsi.iter_chunks(path):
            h.update(chunk)
        return h.hexdigest()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_file(path: Path) -> bool:
    """``Path.is_file`` that also answers for object-store paths (through GDAL)."""
    if is_vsi(path):
        from drseg_cli.raster import vsi

        return vsi.exists(path)
    return path.is_file()


def temp_path_for(path: Path) -> Path:
    """A unique temporary sibling of ``path`` that keeps its extension (drivers look at it).

    The name carries this process's id, so ``remove_stale_temps`` can tell a live run's files.
    """
    tag = f"{TMP_MARKER}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return path.with_name(f"{path.stem}{tag}{path.suffix}")


def raise_output_error(path: Path, exc: OSError) -> None:
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
    An object-store ``path``: written in a local staging folder, then uploaded.
    """
    if is_vsi(path):
        with staging_folder() as folder:
            tmp = folder / path.name
            yield tmp
            publish([(tmp.with_suffix(s), path.with_suffix(s)) for s in sidecar_suffixes], True)
            publish([(tmp, path)], True)
        return
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
        raise_output_error(path, exc)
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
    if is_vsi(folder):
        return 0  # nothing is written to an object store under a temp name
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
            raise_output_error(current, exc)
        raise
    for _, backup in aside:
        with contextlib.suppress(OSError):
            backup.unlink()


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder`` for one run; a second run on it gets a UsageError naming the holder.

    An OS lock (``flock``) on ``folder/.drseg.lock``: released by the kernel even on kill -9.
    Where the OS has none (Windows, some network file systems) nothing is locked.
    On an object store: a lock object (``_object_lock``).
    """
    if is_vsi(folder):
        with _object_lock(Path(folder)):
            yield
        return
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
            raise_output_error(path, exc)
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


# -- object stores ---------------------------------------------------------------------------


@contextlib.contextmanager
def staging_folder() -> Iterator[Path]:
    """A fresh local folder for outputs bound to an object store (``TMPDIR``), removed after.

    Its name carries this host and process id: the folders a killed run of this host left
    (``kill -9``) are removed when the next one starts staging; a live run's, and other
    hosts' (a shared ``TMPDIR``), are left alone.
    """
    base = Path(tempfile.gettempdir())
    prefix = f"drseg-stage-{_HOST}"
    for old in base.glob(f"{prefix}{TMP_MARKER}-*"):
        owner = _TMP_OWNER.search(old.name)
        if owner and old.is_dir() and not _pid_alive(int(owner.group(1))):
            shutil.rmtree(old, ignore_errors=True)
    folder = temp_path_for(base / prefix)
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def staged_paths(finals: Sequence[Path | None], folder: Path) -> list[Path | None]:
    """Local stand-ins for ``finals`` in ``folder``, keeping each file name (drivers and layer
    names see the same name); outputs from different folders land in numbered subfolders."""
    parents: dict[str, Path] = {}
    staged: list[Path | None] = []
    for final in finals:
        if final is None:
            staged.append(None)
            continue
        sub = parents.setdefault(str(final.parent), folder / str(len(parents)))
        sub.mkdir(exist_ok=True)
        staged.append(sub / final.name)
    return staged


def publish(pairs: Sequence[tuple[Path, Path]], replace: bool) -> dict[str, str]:
    """Put complete local files in place: each ``(staged, final)`` whose staged file exists is
    uploaded (object store) or renamed (local), a final without one is deleted (a stale
    sidecar); returns the sha256 of each published file by its final path.

    Each object is atomic, the set is not: if one upload fails, those already made are
    deleted when nothing was being replaced (``replace`` false), else left for the manifest
    (the scene is still ``pending``: ``--resume`` redoes it).
    """
    from drseg_cli.raster import vsi

    local = [(a, b) for a, b in pairs if not is_vsi(b)]
    sums: dict[str, str] = {}
    uploaded: list[Path] = []
    try:
        for staged, final in pairs:
            if not is_vsi(final):
                continue
            if staged.exists():
                sums[str(final)] = vsi.upload(staged, final)
                uploaded.append(final)
            elif vsi.exists(final):
                vsi.remove(final)
        if local:
            present = [(a, b) for a, b in local if a.exists()]
            commit_together(present, remove=[b for a, b in local if not a.exists()])
            sums.update({str(b): file_sha256(b) for _, b in present})
    except BaseException:
        if not replace:
            for final in uploaded:
                with contextlib.suppress(_CLEANUP_ERRORS):
                    vsi.remove(final)
        raise
    return sums


@contextlib.contextmanager
def fetched(finals: Sequence[Path | None]) -> Iterator[list[Path | None]]:
    """Local copies of the object-store files among ``finals`` (local ones as they are; a
    missing object: a path that does not exist), for checks that read files (``--resume``)."""
    from drseg_cli.raster import vsi

    if not any(p is not None and is_vsi(p) for p in finals):
        yield list(finals)  # all local: nothing to copy
        return
    with staging_folder() as folder:
        copies = staged_paths(finals, folder)
        out: list[Path | None] = []
        for final, copy in zip(finals, copies, strict=True):
            if final is None or not is_vsi(final):
                out.append(final)
                continue
            assert copy is not None
            if vsi.exists(final):
                vsi.download(final, copy)
            out.append(copy)
        yield out


def as_objects(text: str, copies: Mapping[Path, Path | None]) -> str:
    """``text`` naming the objects instead of their local copies (``fetched``'s
    ``{final: copy}``): what a check of the copies says, in the user's names."""
    for final, copy in copies.items():
        if copy is not None and copy != final:
            text = text.replace(str(copy), str(final))
    return text


def _lock_holder(text: str) -> dict:
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


#: Lock objects this process holds (``_object_lock``).
_HELD: set[str] = set()


@contextlib.contextmanager
def _object_lock(folder: Path) -> Iterator[None]:
    """One run per object-store prefix, by a lock object ``folder/.drseg.lock``.

    Object stores (as GDAL writes them) have no atomic create-if-absent and no rename, so
    this is a check, a write and a read-back: it stops a second run started on the same
    prefix (the common mistake), not two started in the same instant. The object names its
    run (id, host, pid); a lock left by a killed run on this host (its pid is gone) is taken
    over, one from another host must be deleted by hand (the error says which). Writing it
    is also the batch's first write: a missing bucket or no permission fails here, at once.
    """
    from drseg_cli.raster import vsi

    path = folder / LOCK_NAME
    me = {
        "run": uuid.uuid4().hex,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if vsi.exists(path):
        holder = _lock_holder(vsi.read_bytes(path).decode("utf-8", "replace"))
        pid = holder.get("pid")
        here = holder.get("host") == me["host"] and isinstance(pid, int)
        # a dead pid here, or our own pid in a lock we do not hold (a container restarted
        # with the same host name and pid: the previous run of this container left it)
        stale = here and (not _pid_alive(pid) or (pid == me["pid"] and str(path) not in _HELD))
        if not stale:
            who = f"pid {pid} on {holder.get('host')} since {holder.get('started')}"
            raise UsageError(
                f"{folder}: another drseg run is writing here ({who}); wait for it, or delete "
                f"{path} if no run is using it"
            )
        log.warning("%s: taking over the lock of a finished run (pid %s)", folder, pid)
    with staging_folder() as staging:
        (staging / LOCK_NAME).write_text(json.dumps(me), encoding="utf-8")
        vsi.upload(staging / LOCK_NAME, path)
    if _lock_holder(vsi.read_bytes(path).decode("utf-8", "replace")).get("run") != me["run"]:
        raise UsageError(f"{folder}: another drseg run started here at the same time")
    _HELD.add(str(path))
    try:
        yield
    finally:
        _HELD.discard(str(path))
        with contextlib.suppress(_CLEANUP_ERRORS):
            if _lock_holder(vsi.read_bytes(path).decode()).get("run") == me["run"]:
                vsi.remove(path)
