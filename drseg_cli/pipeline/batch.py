"""Many scenes per run: output naming, a manifest written after every scene, resume, keep-going.

The manifest (``drseg_manifest.json`` in the output folder) is rewritten atomically after each
scene, so a run killed at any point leaves a manifest that matches the files on disk; outputs
themselves are atomic (see ``atomic.py``). ``--resume`` skips scenes whose outputs exist and
pass ``verify_outputs`` against their input, and redoes the rest.
"""

from __future__ import annotations

import glob
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from drseg_cli.atomic import atomic_output, remove_stale_temps
from drseg_cli.errors import DrsegError, UsageError, describe_unexpected
from drseg_cli.pipeline.segment import MASK_SUFFIXES, VECTOR_SUFFIXES, OutputPlan, SceneResult
from drseg_cli.pipeline.verify import verify_outputs

MANIFEST_NAME = "drseg_manifest.json"
RASTER_EXTENSIONS = (".tif", ".tiff", ".vrt", ".jp2", ".img")


@dataclass
class SceneRecord:
    """One line of the manifest."""

    input: str
    outputs: dict[str, str]
    status: str  # done | failed | skipped (already done, resume) | pending
    error: str | None = None
    seconds: float | None = None
    checksums: dict[str, str] = field(default_factory=dict)


@dataclass
class BatchSummary:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    interrupted: bool = False
    records: list[SceneRecord] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.failed else 0


def expand_inputs(args: Sequence[str | Path]) -> list[Path]:
    """Files as given, directories as their rasters (sorted), quoted globs expanded."""
    found: list[Path] = []
    for arg in args:
        text = str(arg)
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
    return list(dict.fromkeys(found))


def plan_outputs(
    inputs: Sequence[Path],
    outdir: Path,
    *,
    fmt: str = ".tif",
    vector: bool = False,
    probs: bool = False,
    uncertainty: bool = False,
) -> list[OutputPlan]:
    """One output set per scene in ``outdir``, named after the input file."""
    if fmt not in MASK_SUFFIXES + VECTOR_SUFFIXES:
        raise UsageError(f"--format: unknown output type {fmt}")
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
            )
        )
    return plans


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Manifest:
    """The run's manifest, rewritten atomically after every change."""

    def __init__(self, path: Path, meta: dict) -> None:
        self.path, self.meta = path, meta
        self.records: dict[str, SceneRecord] = {}

    @classmethod
    def load(cls, path: Path, meta: dict) -> Manifest:
        m = cls(path, meta)
        if path.exists():
            try:
                data = json.loads(path.read_text("utf-8"))
                for rec in data.get("scenes", []):
                    m.records[rec["input"]] = SceneRecord(**rec)
            except (ValueError, KeyError, TypeError):
                raise UsageError(
                    f"{path}: manifest is not valid; remove it to start over"
                ) from None
        return m

    def update(self, record: SceneRecord) -> None:
        self.records[record.input] = record
        self.save()

    def save(self) -> None:
        payload = dict(self.meta, scenes=[asdict(r) for r in self.records.values()])
        with atomic_output(self.path) as tmp:
            tmp.write_text(json.dumps(payload, indent=2), encoding="utf-8")


SceneRunner = Callable[[Path, OutputPlan, bool], SceneResult]


def run_batch(
    inputs: Sequence[Path],
    plans: Sequence[OutputPlan],
    run_scene: SceneRunner,
    manifest: Manifest,
    *,
    class_names: Sequence[str],
    resume: bool = False,
    overwrite: bool = False,
    keep_going: bool = True,
    on_scene: Callable[[SceneRecord], None] | None = None,
) -> BatchSummary:
    """Run every scene; a failing scene is recorded and (with keep_going) the rest go on."""
    summary = BatchSummary()
    remove_stale_temps(manifest.path.parent)
    for path, plan in zip(inputs, plans, strict=True):
        outputs = {k: str(v) for k, v in _plan_items(plan)}
        key = str(path)
        previous = manifest.records.get(key)
        if resume and previous is not None and previous.status == "done":
            try:
                verify_outputs(path, plan, class_names)
                record = SceneRecord(key, outputs, "skipped", checksums=previous.checksums)
                summary.skipped += 1
                summary.records.append(record)
                if on_scene:
                    on_scene(record)
                continue
            except DrsegError:
                pass  # outputs missing or invalid: redo the scene
        start = time.perf_counter()
        try:
            # On resume, leftovers of an unfinished scene are replaced.
            result = run_scene(path, plan, overwrite or resume)
            checksums = {k: file_sha256(Path(v)) for k, v in outputs.items() if Path(v).is_file()}
            record = SceneRecord(
                key, result.outputs, "done", seconds=result.seconds, checksums=checksums
            )
            summary.done += 1
        except KeyboardInterrupt:
            summary.interrupted = True
            manifest.update(SceneRecord(key, outputs, "pending", error="interrupted"))
            break
        except Exception as exc:  # noqa: BLE001 - one bad scene must not stop the batch
            message = (
                str(exc) if isinstance(exc, DrsegError) else f"{path}: {describe_unexpected(exc)}"
            )
            record = SceneRecord(
                key,
                outputs,
                "failed",
                error=message,
                seconds=round(time.perf_counter() - start, 3),
            )
            summary.failed += 1
        manifest.update(record)
        summary.records.append(record)
        if on_scene:
            on_scene(record)
        if record.status == "failed" and not keep_going:
            break
    return summary


def _plan_items(plan: OutputPlan) -> list[tuple[str, Path]]:
    items = [
        ("mask", plan.mask),
        ("vector", plan.vector),
        ("probs", plan.probs),
        ("uncertainty", plan.uncertainty),
    ]
    return [(k, v) for k, v in items if v is not None]
