"""Many scenes per run: output naming, a manifest written after every scene, resume, keep-going.

The manifest (``drseg_manifest.json`` in the output folder) is rewritten atomically before and
after each scene, so a run killed at any point leaves a manifest that matches the files on disk;
a scene's outputs are put in place together (see ``atomic.py``). Scenes are keyed by their
resolved path. Each records the fingerprint of the settings that shaped its outputs (the
settings themselves sit once in the manifest's ``settings`` table), its input's size and
modification time, and the sha256 of every output. ``--resume`` skips a scene only when all of
these still match and its outputs pass ``verify_outputs``; otherwise it redoes the scene.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from drseg_cli.atomic import (
    as_objects,
    atomic_output,
    check_writable,
    fetched,
    file_sha256,
    is_file,
    remove_stale_temps,
)
from drseg_cli.errors import DrsegError, UsageError, describe_unexpected
from drseg_cli.pipeline.segment import (
    MASK_SUFFIXES,
    VECTOR_SUFFIXES,
    OutputPlan,
    SceneResult,
    plan_files,
)
from drseg_cli.pipeline.verify import verify_outputs
from drseg_cli.raster.remote import RasterSource, as_input, is_remote
from drseg_cli.raster.stac import is_stac_candidate, stac_input
from drseg_cli.raster.vsi import is_vsi

MANIFEST_NAME = "drseg_manifest.json"
RASTER_EXTENSIONS = (".tif", ".tiff", ".vrt", ".jp2", ".img")


@dataclass
class SceneRecord:
    """One line of the manifest.

    ``status``: done | failed | skipped (already done, resume) | pending (started, not
    finished). ``checksums`` lists the outputs drseg put in place for this scene (sha256),
    ``settings`` the fingerprint of what produced them, ``source`` the input's size and
    mtime, ``note`` why a resumed scene was redone.
    """

    input: str
    outputs: dict[str, str]
    status: str
    error: str | None = None
    seconds: float | None = None
    checksums: dict[str, str] = field(default_factory=dict)
    settings: str | None = None
    source: dict[str, int | str] | None = None
    note: str | None = None

    @property
    def owns_outputs(self) -> bool:
        """Files under this scene's output names are drseg's own (resume may replace them)."""
        return self.status == "pending" or bool(self.checksums)


#: Why a resumed scene is redone instead of skipped; BatchSummary.redone counts each.
REDO_REASONS = ("changed_settings", "changed_input", "changed_outputs", "invalid_outputs")


@dataclass
class BatchSummary:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    interrupted: bool = False
    records: list[SceneRecord] = field(default_factory=list)
    redone: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REDO_REASONS, 0))

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.failed else 0


def expand_inputs(
    args: Sequence[str | Path | RasterSource], assets: Sequence[str] | None = None
) -> list[Path | RasterSource]:
    """Files as given, directories as their rasters (sorted), quoted globs expanded; URLs and
    ``/vsi…`` paths as ``RasterSource`` (never checked as local files); ``*.json`` as STAC
    Items, read with their ``assets`` (``raster/stac.py``)."""
    found: list[Path | RasterSource] = []
    for arg in args:
        text = str(arg)
        if is_stac_candidate(arg):
            found.append(stac_input(text, assets))
            continue
        if assets:
            raise UsageError(f"--assets: {text}: is not a STAC Item (.json)")
        if is_remote(arg):
            found.append(as_input(arg))
            continue
        path = Path(text)
        if path.is_dir():
            rasters = sorted(
                p for p in path.iterdir() if p.suffix.lower() in RASTER_EXTENSIONS and p.is_file()
            )
            if not rasters:
                kinds = ", ".join(RASTER_EXTENSIONS)
                raise UsageError(f"{path}: is a folder with no raster files ({kinds})")
            found += rasters
        elif not path.exists() and glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text))
            if not matches:
                raise UsageError(f"{text}: no file matches this pattern")
            found += matches
        else:
            found.append(path)  # missing files are reported per scene, not here
    if not found:
        raise UsageError("no input scenes found")
    unique: dict[Path | RasterSource, Path | RasterSource] = {}
    for path in found:  # the same file given twice (e.g. relative and absolute) runs once
        unique.setdefault(scene_key(path), path)
    return list(unique.values())


def scene_key(path: Path | RasterSource) -> Path | RasterSource:
    """The identity of a scene: its resolved absolute path (a remote source: itself)."""
    return as_input(path).resolve()


def plan_outputs(
    inputs: Sequence[Path],
    outdir: Path,
    *,
    fmt: str = ".tif",
    vector: bool = False,
    probs: bool = False,
    uncertainty: bool = False,
    proposals: str | None = None,
) -> list[OutputPlan]:
    """One output set per scene in ``outdir``, named after the input file; ``proposals``:
    the polygon format (``.gpkg``, …) of each scene's ``<stem>_proposals`` layer."""
    if fmt not in MASK_SUFFIXES + VECTOR_SUFFIXES:
        raise UsageError(f"--format: unknown output type {fmt}")
    if proposals is not None and proposals not in VECTOR_SUFFIXES:
        raise UsageError(f"--proposals: unknown polygon format {proposals}")
    stems: dict[str, Path] = {}
    plans = []
    for path in inputs:
        stem = path.stem
        if stem in stems:
            raise UsageError(
                f"{path}: same file name as {stems[stem]}; outputs would collide in {outdir}"
            )
        stems[stem] = path
        if fmt in MASK_SUFFIXES:
            main = outdir / f"{stem}_mask{fmt}"
        else:
            main = outdir / f"{stem}{fmt}"
        plan = OutputPlan.from_output(main, vector=vector)
        plans.append(
            OutputPlan(
                plan.mask,
                plan.vector,
                outdir / f"{stem}_probs.tif" if probs else None,
                outdir / f"{stem}_uncertainty.tif" if uncertainty else None,
                outdir / f"{stem}_proposals{proposals}" if proposals else None,
            )
        )
    return plans


def output_checksums(outputs: Mapping[str, str]) -> dict[str, str]:
    """sha256 of each output file of a scene, by kind (what the manifest records)."""
    return {k: file_sha256(Path(v)) for k, v in outputs.items() if is_file(Path(v))}


def file_identity(path: Path) -> dict[str, Any]:
    """Resolved path, size and mtime of a file: a cheap stand-in for its content hash."""
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``settings`` (everything that shapes a scene's outputs)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _source_stat(path: Path | RasterSource) -> dict[str, int | str] | None:
    """What tells a changed input: size and mtime; a remote object's size and ETag (None:
    unknown, e.g. an HTTP server without ETag or Last-Modified: resume redoes the scene)."""
    if isinstance(path, RasterSource):
        gdal_path = os.fspath(path)
        if not is_vsi(gdal_path) or gdal_path.startswith("/vsimem/"):
            return None
        from drseg_cli.raster import vsi

        return vsi.identity(gdal_path)
    try:
        st = path.stat()
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


class Manifest:
    """The run's manifest, rewritten atomically after every change.

    Each record's JSON text is kept until the record is replaced (records are replaced,
    never changed in place), so a rewrite serialises one record, not the whole batch: the
    driver of a large (Ray) batch rewrites it twice per scene (docs/SCALE.md).
    """

    def __init__(self, path: Path, meta: dict) -> None:
        self.path, self.meta = path, meta
        self.records: dict[str, SceneRecord] = {}
        self.settings: dict[str, dict] = {}  # fingerprint -> the settings it hashes
        self._texts: dict[str, tuple[SceneRecord, str]] = {}  # key -> (record, its JSON)

    @classmethod
    def load(cls, path: Path, meta: dict) -> Manifest:
        m = cls(path, meta)
        if is_file(path):  # an object-store manifest is read through GDAL
            try:
                data = json.loads(_read_text(path))
                m.settings = dict(data.get("settings", {}))
                for rec in data.get("scenes", []):
                    record = SceneRecord(**rec)
                    record.input = str(scene_key(as_input(record.input)))
                    m.records[record.input] = record
            except (ValueError, KeyError, TypeError, AttributeError):
                raise UsageError(
                    f"{path}: manifest is not valid; remove it to start over"
                ) from None
        return m

    def update(self, record: SceneRecord) -> None:
        self.records[record.input] = record
        self.save()

    def save(self) -> None:
        used = {r.settings for r in self.records.values()}
        settings = {k: v for k, v in self.settings.items() if k in used}
        with atomic_output(self.path) as tmp:
            tmp.write_text(self._json(dict(self.meta, settings=settings)), encoding="utf-8")

    def _json(self, head: dict) -> str:
        """``json.dumps(head | {"scenes": [...]}, indent=2)``, from the records' kept texts."""
        scenes = []
        for key, record in self.records.items():
            kept = self._texts.get(key)
            if kept is None or kept[0] is not record:
                text = json.dumps(asdict(record), indent=2).replace("\n", "\n    ")
                kept = self._texts[key] = (record, "    " + text)
            scenes.append(kept[1])
        text = json.dumps(dict(head, scenes=[]), indent=2)
        if not scenes:
            return text
        return text.removesuffix("[]\n}") + "[\n" + ",\n".join(scenes) + "\n  ]\n}"


def _read_text(path: Path) -> str:
    if is_vsi(path):
        from drseg_cli.raster import vsi

        return vsi.read_bytes(path).decode("utf-8")
    return path.read_text("utf-8")


SceneRunner = Callable[[Path, OutputPlan, bool], SceneResult]
#: ``(input, plan)``: raises a ``DrsegError`` when a done scene's outputs are not valid.
OutputVerifier = Callable[[Path, OutputPlan], None]


def _verify_classes(
    path: Path, plan: OutputPlan, *, class_names: Sequence[str], clipped: bool
) -> None:
    """``segment``'s check: class masks and polygons of ``class_names`` (``verify.py``)."""
    verify_outputs(path, plan, class_names, clipped)


@dataclass
class SceneJob:
    """One scene to run: its outputs, whether existing ones may be replaced, and what the
    manifest keeps of it meanwhile (``kept``: the checksums of its previous outputs)."""

    index: int
    path: Path
    plan: OutputPlan
    replace: bool
    key: str
    outputs: dict[str, str]
    kept: dict[str, str]
    source: dict[str, int | str] | None
    note: str | None
    started: float = 0.0


class SceneExecutor(Protocol):
    """Runs scene jobs: ``run`` pulls jobs from the iterator when it has room for one and
    yields ``(job, SceneResult or the exception it raised)`` as each one ends, in any order.

    ``SequentialExecutor`` runs them one by one here; ``pipeline/distributed.py`` on Ray
    actors. ``worker_pids``: processes that wrote temp files for it (their leftovers are
    removed at the end of the batch). Interrupted (KeyboardInterrupt, or closed) ``run``
    stops its workers before it returns: none of ``worker_pids`` may write after that.
    """

    worker_pids: Sequence[int]

    def run(
        self, jobs: Iterator[SceneJob]
    ) -> Iterator[tuple[SceneJob, SceneResult | Exception]]: ...


class SequentialExecutor:
    """Scenes one after the other in this process."""

    worker_pids: Sequence[int] = ()

    def __init__(self, run_scene: SceneRunner) -> None:
        self.run_scene = run_scene

    def run(self, jobs: Iterator[SceneJob]) -> Iterator[tuple[SceneJob, SceneResult | Exception]]:
        for job in jobs:
            try:
                result = self.run_scene(job.path, job.plan, job.replace)
            except Exception as exc:  # noqa: BLE001 - reported by run_batch, per scene
                yield job, exc
            else:
                yield job, result


def run_batch(
    inputs: Sequence[Path],
    plans: Sequence[OutputPlan],
    run_scene: SceneRunner | SceneExecutor,
    manifest: Manifest,
    *,
    class_names: Sequence[str],
    settings: Mapping[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    keep_going: bool = True,
    on_scene: Callable[[SceneRecord], None] | None = None,
    clipped: bool = False,
    verify: OutputVerifier | None = None,
) -> BatchSummary:
    """Run every scene; a failing scene is recorded and (with keep_going) the rest go on.

    ``run_scene``: a function run here scene after scene, or a ``SceneExecutor`` (several
    scenes at once, e.g. on Ray); either way this function alone decides what runs (resume)
    and writes the manifest, so the two give the same manifest and outputs.
    ``settings``: everything that shapes the outputs (see ``settings_fingerprint``); a resumed
    scene done with other settings is redone. The caller holds ``atomic.folder_lock``.
    ``clipped``: outputs cut to an area of interest (how ``--resume`` verifies polygons).
    ``verify``: how ``--resume`` checks a done scene's outputs (default: ``verify_outputs``
    against ``class_names``); commands whose outputs are no class masks pass their own.
    """
    if verify is None:
        verify = functools.partial(_verify_classes, class_names=class_names, clipped=clipped)
    executor = run_scene if hasattr(run_scene, "run") else SequentialExecutor(run_scene)
    summary = BatchSummary()
    fingerprint = settings_fingerprint(settings or {})
    manifest.settings[fingerprint] = json.loads(json.dumps(settings or {}, default=str))
    remove_stale_temps(manifest.path.parent)
    running: dict[str, SceneJob] = {}  # handed to the executor, not finished
    order = {str(scene_key(p)): i for i, p in enumerate(inputs)}
    stop = False

    def finish(record: SceneRecord, *, write: bool = True) -> None:
        nonlocal stop
        if write:
            manifest.update(record)
        summary.records.append(record)
        if on_scene:
            on_scene(record)
        if record.status == "failed" and not keep_going:
            stop = True

    def failed(job: SceneJob, exc: BaseException) -> SceneRecord:
        summary.failed += 1
        message = (
            str(exc) if isinstance(exc, DrsegError) else f"{job.path}: {describe_unexpected(exc)}"
        )
        return SceneRecord(
            job.key,
            job.outputs,
            "failed",
            error=message,
            seconds=round(time.perf_counter() - job.started, 3),
            checksums=job.kept,  # a failed scene leaves its previous outputs as they were
            note=job.note,
        )

    def jobs() -> Iterator[SceneJob]:
        for index, (path, plan) in enumerate(zip(inputs, plans, strict=True)):
            if stop:
                return
            outputs = {k: str(v) for k, v in plan.items()}
            key = str(scene_key(path))
            previous = manifest.records.get(key)
            source = _source_stat(path)
            note = None
            if resume and previous is not None and previous.status == "done":
                reason = _redo_reason(previous, fingerprint, source, path, plan, verify)
                if reason is None:
                    summary.skipped += 1
                    finish(dataclasses.replace(previous, status="skipped"), write=False)
                    continue  # the manifest keeps it as done
                summary.redone[reason[0]] += 1
                note = f"redone: {reason[1]}"
            # Existing outputs are replaced with --overwrite, or on resume when drseg made them.
            replace = overwrite or (resume and previous is not None and previous.owns_outputs)
            kept = previous.checksums if previous is not None else {}  # old outputs, if any
            job = SceneJob(index, path, plan, replace, key, outputs, kept, source, note)
            job.started = time.perf_counter()
            try:
                check_writable(plan.final_paths(), replace)
                manifest.update(SceneRecord(key, outputs, "pending", checksums=kept, note=note))
            except Exception as exc:  # noqa: BLE001 - one bad scene must not stop the batch
                finish(failed(job, exc))
                continue
            running[key] = job
            yield job

    runs = executor.run(jobs())
    try:
        for job, outcome in runs:
            running.pop(job.key, None)
            if isinstance(outcome, BaseException):
                record = failed(job, outcome)
            else:
                checksums = outcome.checksums
                if checksums is None:
                    checksums = output_checksums(outcome.outputs)
                record = SceneRecord(
                    job.key,
                    outcome.outputs,
                    "done",
                    seconds=outcome.seconds,
                    checksums=checksums,
                    settings=fingerprint,
                    source=job.source,
                    note=job.note,
                )
                summary.done += 1
            finish(record)
    except KeyboardInterrupt:
        runs.close()  # the executor stops its workers (RayExecutor: kills them, waits)
        summary.interrupted = True
        for job in running.values():
            manifest.update(
                SceneRecord(
                    job.key, job.outputs, "pending", error="interrupted", checksums=job.kept
                )
            )
    # temps of workers that died mid-scene (the executor retried their scenes elsewhere) or
    # were stopped by an interrupt: ``run`` ends only once none of them can still write
    remove_stale_temps(manifest.path.parent, dead_pids=executor.worker_pids)
    summary.records.sort(key=lambda r: order.get(r.input, len(order)))
    return summary


def _redo_reason(
    previous: SceneRecord,
    fingerprint: str,
    source: dict[str, int] | None,
    path: Path,
    plan: OutputPlan,
    verify: OutputVerifier,
) -> tuple[str, str] | None:
    """Why a scene recorded as done must be redone (key of ``REDO_REASONS``, text), or None."""
    if previous.settings != fingerprint:
        return "changed_settings", "settings changed since it was done"
    if source is None or previous.source != source:
        return "changed_input", "input file changed since it was done"
    if not previous.checksums:
        return "changed_outputs", "no checksums recorded"
    finals = plan_files(plan)
    # object-store outputs are checked on local copies (verify reads whole files anyway)
    with fetched(finals) as copies:
        local = dict(zip(finals, copies, strict=True))
        here = OutputPlan(*(p if p is None else local[p] for p in dataclasses.astuple(plan)))
        current = dict(here.items())  # today's names: the run may start from another folder
        named = dict(plan.items())
        for kind, sha in previous.checksums.items():
            out = current.get(kind)
            if out is None or not out.is_file() or file_sha256(out) != sha:
                what = f"{kind} output {named.get(kind)}"
                return "changed_outputs", f"{what} missing or changed since it was done"
        try:
            verify(path, here)
        except DrsegError as exc:
            return "invalid_outputs", as_objects(str(exc), local)
    return None
