"""``segment --ray`` and ``refer --ray``: their options checked, and the cluster's progress
shown by the driver."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from drseg_cli.commands._common import err_console
from drseg_cli.errors import UsageError

if TYPE_CHECKING:
    from drseg_cli.pipeline.batch import SceneRecord
    from drseg_cli.pipeline.distributed import RayOptions


def ray_options(
    address: str | None,
    workers: int | None,
    gpus_per_worker: float | None,
    cpus_per_worker: float,
    *,
    quiet: bool,
) -> RayOptions | None:
    """``--ray``'s options, or None without ``--ray``; a missing ``ray`` package is one line
    naming the extra, before anything else happens."""
    if address is None:
        if workers is not None or gpus_per_worker is not None or cpus_per_worker != 1.0:
            raise UsageError("--workers, --gpus-per-worker and --cpus-per-worker need --ray")
        return None
    if workers is not None and workers < 1:
        raise UsageError(f"--workers {workers}: must be at least 1")
    if gpus_per_worker is not None and gpus_per_worker < 0:
        raise UsageError(f"--gpus-per-worker {gpus_per_worker}: must be 0 or more")
    if cpus_per_worker <= 0:
        raise UsageError(f"--cpus-per-worker {cpus_per_worker}: must be more than 0")
    from drseg_cli.pipeline.distributed import RayOptions, import_ray

    import_ray()
    return RayOptions(
        address=address,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
        log_to_driver=not quiet,
    )


def check_ray_inputs(scenes: list, output: Path | None, batch_mode: bool) -> None:
    """What Ray workers cannot do: write a single named file (a batch has a manifest and a
    lock), or read an input that lives in this process's memory (a STAC band stack)."""
    if not batch_mode:
        raise UsageError("--ray runs a batch: give -o OUTDIR/ (outputs named after each scene)")
    for scene in scenes:
        if str(getattr(scene, "gdal_path", "")).startswith("/vsimem/"):
            raise UsageError(
                f"{scene}: --assets band stacks are built in memory and cannot be sent to Ray "
                "workers; give the Item's RGB asset or a VRT file on shared storage"
            )


class ClusterProgress:
    """The whole cluster's progress, aggregated in the driver: scenes done of the batch,
    tiles done (all workers) and the cluster's tiles/s. Drawn as a bar on a terminal; kept
    either way for the ``--json`` summary (``summary``)."""

    def __init__(self, enabled: bool, scenes: int, workers: int) -> None:
        self.bar, self.task, self.start = None, None, time.monotonic()
        self.tiles, self.tiles_total, self.scenes, self.last = 0, 0, 0, self.start
        self.workers, self.total = workers, scenes
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("scenes  {task.fields[tiles]}"),
            console=err_console,
            transient=True,
        )
        self.task = self.bar.add_task(f"ray ({workers} workers)", total=scenes, tiles="")

    def __enter__(self) -> ClusterProgress:
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar:
            self.bar.stop()

    @property
    def rate(self) -> float:
        """The cluster's tiles/s, from the first worker ready to the last tile counted."""
        return self.tiles / max(self.last - self.start, 1e-6)

    def __call__(self, tiles: int, tiles_total: int) -> None:
        """Called by the executor's loop in the driver (``RayExecutor.on_progress``)."""
        if tiles != self.tiles:
            self.last = time.monotonic()
        self.tiles, self.tiles_total = tiles, tiles_total
        if self.bar is None:
            return
        text = f"{tiles}/{tiles_total} tiles  {self.rate:.2f} tiles/s"
        self.bar.update(self.task, tiles=text)

    def scene(self) -> None:
        """A scene ended (done, skipped or failed): one step of the bar."""
        self.scenes += 1
        if self.bar is not None:
            self.bar.advance(self.task)

    def report(self, record: SceneRecord, quiet: bool) -> None:
        """A batch's scene ended: one step of the bar and, unless ``quiet``, its line
        (``[i/n] input: status (note)``, or ``drseg: failed: [i/n] error``)."""
        self.scene()
        if quiet:
            return
        count = f"[{self.scenes}/{self.total}]"
        if record.status == "failed":
            err_console.print(f"drseg: failed: {count} {record.error}", markup=False)
        else:
            note = f" ({record.note})" if record.note else ""
            err_console.print(f"{count} {record.input}: {record.status}{note}", markup=False)

    def summary(self) -> dict:
        """The ``--json`` fields of a Ray batch: workers, tiles run on them (a retried
        scene's last try), the cluster's tiles/s."""
        return {
            "ray_workers": self.workers,
            "ray_tiles": self.tiles,
            "ray_tiles_per_s": round(self.rate, 3),
        }
