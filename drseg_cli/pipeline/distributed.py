"""A batch's scenes on Ray actors (``drseg segment --ray``, ``drseg refer --ray``): thousands
of scenes across GPUs and machines, with the same manifest and outputs as one machine.

Each actor loads the model once (a picklable *runner factory* called in the actor) and then
runs whole scenes: one scene is one task, read, predicted, stitched and renamed into place by
one actor. Tiles of one scene are never split across actors: the stitch accumulator, the
row-band writers and the all-or-none commit stay exactly those of a single-process run, so the
outputs are the same files (docs/SCALE.md says why this beats row bands for drseg's scenes).

The driver keeps what a single-machine batch keeps (``pipeline/batch.py``): the folder lock,
resume decisions, the manifest and exit codes; this module only runs the jobs it is handed,
at most one per idle actor. Workers hash the outputs they wrote (the manifest's sha256), so
the driver never reads outputs back over the network. A worker that dies (killed, out of
memory, node lost) is restarted by Ray and its scene retried from the start
(``max_restarts`` / ``max_task_retries``); its temp files never carry a final name and are
removed at the end of the batch. Errors raised by a scene (a corrupt input) are not
retried: they are reported as in a local batch.

The factory is generic: ``factory(gpu_share=…)`` returns a callable
``runner(path, plan, replace, *, progress=None) -> SceneResult`` with an ``info`` dict
(device, precision, … whatever the command fingerprints). ``commands/_model.SegmentRunner``
is segment's, ``commands/refer.ReferRunner`` refer's.

Ctrl-C (KeyboardInterrupt in the driver) or a batch that ends on an error: ``run`` kills every
worker and waits until they are gone before it returns (``stop``), so ``run_batch`` may
remove their temp files and no worker writes into the folder after the lock is released.
Ray's driver prints its error events (a worker killed, a task retried) on stdout: they are
sent to stderr, where they do not break ``--json``.

Ray is imported only when ``--ray`` is used; without it ``import_ray`` is one error line
naming the extra (``pip install 'drseg[ray]'``).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from drseg_cli.errors import DrsegError, UsageError, describe_unexpected, first_line
from drseg_cli.pipeline.batch import SceneJob, output_checksums
from drseg_cli.pipeline.segment import SceneResult

log = logging.getLogger(__name__)

RAY_EXTRA = "pip install 'drseg[ray]'"
#: Times a dead worker is restarted and its scene retried before the scene is failed.
DEFAULT_RETRIES = 3
#: How often the driver refreshes the cluster's tile count (seconds).
POLL_SECONDS = 0.5
#: How long an interrupted batch waits for its killed workers to end (seconds).
STOP_SECONDS = 30


class SceneRunner(Protocol):
    """A loaded model that runs one scene per call (segment's: ``SceneSegmenter``)."""

    info: dict  # what the command reports and fingerprints; workers must agree on it

    def __call__(
        self,
        path: Path,
        plan: Any,
        replace: bool,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> SceneResult: ...


class RunnerFactory(Protocol):
    """A picklable recipe, called once in each worker (segment's: ``SegmentRunner``);
    ``gpu_share``: the worker's fraction of a GPU (sizes its automatic batch)."""

    def __call__(self, gpu_share: float = 1.0) -> SceneRunner: ...


class WorkerError(DrsegError):
    """A scene that failed on a worker, or a worker that could not start, as one line."""

    exit_code = 1


def import_ray() -> Any:
    """The ``ray`` module, or a one-line UsageError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--ray needs the ray package: {RAY_EXTRA}") from None
    return ray


def errors_to_stderr(ray: Any) -> None:
    """Ray's driver prints the cluster's error events (a worker killed, a task retried) on
    stdout, where ``--json`` puts its one document: send them to stderr (once a process).
    A Ray without this private hook prints them as it does."""
    worker = getattr(getattr(ray, "_private", None), "worker", None)
    show = getattr(worker, "print_to_stdstream", None)
    if show is None or getattr(show, "drseg_stderr", False):
        return

    def to_stderr(data: dict, *args: Any, **kwargs: Any) -> Any:
        return show(dict(data, is_err=True), *args, **kwargs)

    to_stderr.drseg_stderr = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = to_stderr


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run. ``address``: ``local`` (a new local instance), ``auto``
    (the running cluster), ``host:port``, ``ray://host:port``; None: ``ray.init()``'s default
    (``RAY_ADDRESS``, else a new local instance). ``workers``/``gpus_per_worker`` None: from
    the cluster's resources."""

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0
    retries: int = DEFAULT_RETRIES
    log_to_driver: bool = True


class _Tracker:
    """Ray actor gathering the cluster's progress and its workers' process ids."""

    def __init__(self) -> None:
        self.tiles: dict[str, int] = {}
        self.totals: dict[str, int] = {}
        self.pids: set[int] = set()
        self.hosts: dict[int, str] = {}

    def register(self, pid: int, host: str = "") -> None:
        self.pids.add(pid)
        self.hosts[pid] = host

    def where(self) -> list[tuple[str, int]]:
        """``(host, pid)`` of every worker process started (restarts included)."""
        return sorted((self.hosts.get(pid, ""), pid) for pid in self.pids)

    def start(self, key: str) -> None:
        self.tiles[key] = 0  # a retried scene starts again from zero

    def add(self, key: str, tiles: int, total: int) -> None:
        self.tiles[key] = self.tiles.get(key, 0) + tiles
        self.totals[key] = total

    def snapshot(self) -> tuple[int, int, list[int]]:
        return sum(self.tiles.values()), sum(self.totals.values()), sorted(self.pids)


class _SceneWorker:
    """Ray actor: builds the runner once (the model), then runs one scene per call."""

    def __init__(self, factory: RunnerFactory, tracker: str, gpu_share: float) -> None:
        """``tracker``: the name of the run's ``_Tracker`` (a handle as argument would keep
        Ray from restarting this actor reliably, ray-project/ray#53727)."""
        import ray

        self.tracker, self.error = ray.get_actor(tracker), None
        self.tracker.register.remote(os.getpid(), socket.gethostname())
        try:
            self.runner = factory(gpu_share=gpu_share)
        except Exception as exc:  # noqa: BLE001 - reported by the driver as one line
            self.error = _as_error(exc, None)

    def info(self) -> dict:
        """The runner's info, with where it runs; ``error``: the model did not load."""
        where = {"host": socket.gethostname(), "pid": os.getpid()}
        if self.error is not None:
            return dict(where, error=self.error)
        return dict(self.runner.info, **where)

    def run(
        self, key: str, path: Path, plan: Any, replace: bool
    ) -> tuple[SceneResult | None, Exception | None]:
        if self.error is not None:  # a replacement worker whose model did not load
            return None, self.error
        tracker = self.tracker
        tracker.start.remote(key)

        def progress(tiles: int, total: int) -> None:
            tracker.add.remote(key, tiles, total)

        try:
            result = self.runner(path, plan, replace, progress=progress)
            if result.checksums is None:  # (object-store outputs: computed at upload)
                result.checksums = output_checksums(result.outputs)  # here, not in the driver
            return result, None
        except Exception as exc:  # noqa: BLE001 - one bad scene is reported, not retried
            return None, _as_error(exc, path)


def _as_error(exc: BaseException, path: Path | None) -> DrsegError:
    """The exception as drseg reports it, in a form that survives pickling to the driver."""
    if isinstance(exc, DrsegError):
        return exc
    where = f"{path}: " if path is not None else ""
    return WorkerError(f"{where}{describe_unexpected(exc)}")


def _alive(pid: int) -> bool:
    """A process of this host still runs (a zombie counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class RayExecutor:
    """Runs a batch's ``SceneJob``s on Ray actors (a ``pipeline.batch.SceneExecutor``).

    Use as a context manager: entering connects to (or starts) Ray and starts the actors,
    which load the model; ``info`` is then the first actor's runner info. Leaving kills
    the actors and shuts down a Ray instance this executor started.
    """

    def __init__(
        self,
        factory: RunnerFactory,
        options: RayOptions,
        *,
        max_workers: int | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """``max_workers``: no more actors than this (the number of scenes);
        ``on_progress(tiles_done, tiles_total)`` (all workers) is called from the driver."""
        self.factory, self.options = factory, options
        self.max_workers, self.on_progress = max_workers, on_progress
        self.actors: list[Any] = []
        self._ready: list[Any] = []
        self.info: dict = {}
        self.worker_pids: set[int] = set()
        self._ray: Any = None
        self._started_ray = False

    # -- life cycle ---------------------------------------------------------------------

    def __enter__(self) -> RayExecutor:
        ray = self._ray = import_ray()
        opts = self.options
        errors_to_stderr(ray)
        if not ray.is_initialized():
            local = opts.address in (None, "local") and not os.environ.get("RAY_ADDRESS")
            try:
                ray.init(
                    address=opts.address,
                    logging_level=logging.WARNING,
                    log_to_driver=opts.log_to_driver,
                    **({"include_dashboard": False} if local else {}),
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = opts.address or "a local instance"
                raise UsageError(f"--ray {where}: cannot start Ray ({first_line(exc)})") from None
            self._started_ray = True
        try:
            self._start_workers()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        ray = self._ray
        if ray is None:
            return
        for actor in [*self.actors, getattr(self, "tracker", None)]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        self.actors = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def _start_workers(self) -> None:
        ray, opts = self._ray, self.options
        resources = ray.cluster_resources()
        gpus = opts.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
        if gpus < 0 or opts.cpus_per_worker <= 0:
            raise UsageError("--gpus-per-worker must be >= 0 and --cpus-per-worker > 0")
        capacity = int(resources.get("CPU", 0) // opts.cpus_per_worker)
        if gpus:
            capacity = min(capacity, int(resources.get("GPU", 0) // gpus))
        if capacity < 1:  # no worker could ever start: say so rather than wait forever
            raise UsageError(
                f"--gpus-per-worker {gpus:g} --cpus-per-worker {opts.cpus_per_worker:g}: the "
                f"Ray cluster has {resources.get('GPU', 0):g} GPU(s) and "
                f"{resources.get('CPU', 0):g} CPU(s) now (an autoscaling cluster needs one "
                "such node running)"
            )
        workers = opts.workers or capacity  # default: as many as the cluster holds
        if self.max_workers is not None:
            workers = min(workers, self.max_workers)
        if workers > capacity:
            log.warning(
                "--workers %d: the Ray cluster has room for %d now; the others start when "
                "it has more",
                workers,
                capacity,
            )
        self._tracker_name = f"drseg-tracker-{uuid.uuid4().hex}"
        self.tracker = ray.remote(num_cpus=0)(_Tracker).options(name=self._tracker_name).remote()
        self._worker_class = ray.remote(_SceneWorker).options(
            num_cpus=opts.cpus_per_worker,
            num_gpus=gpus,
            max_restarts=opts.retries,
            max_task_retries=opts.retries,
        )
        self._gpu_share = min(gpus, 1.0) if gpus else 1.0
        self._starting: dict[Any, Any] = {}  # info() reference -> actor loading its model
        for _ in range(max(1, workers)):
            self._new_actor()
        self._ready = self._started(wait=True)  # the first worker's info: the run's

    def _new_actor(self) -> Any:
        actor = self._worker_class.remote(self.factory, self._tracker_name, self._gpu_share)
        self.actors.append(actor)
        self._starting[actor.info.remote()] = actor
        return actor

    def _started(self, wait: bool) -> list[Any]:
        """Workers whose model loaded since the last call (``wait``: at least one). Workers
        that wait for resources do not hold up the others."""
        ray = self._ray
        if not self._starting:
            return []
        refs = list(self._starting)
        if wait:
            done, _ = ray.wait(refs, num_returns=1)
        else:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        ready = []
        for ref in done:
            actor = self._starting.pop(ref)
            try:
                info = ray.get(ref)
            except ray.exceptions.RayError as exc:
                raise WorkerError(f"Ray worker could not start: {first_line(exc)}") from None
            self.worker_pids.add(info["pid"])
            if "error" in info:  # the model did not load: the worker's one-line error
                raise info["error"]
            self._check_same(info)
            ready.append(actor)
        return ready

    def _check_same(self, info: dict) -> None:
        """The first worker's info is the run's; the others must agree on what shapes the
        outputs (a CPU worker beside GPU ones would write other pixels)."""
        if not self.info:
            self.info = info
            return
        shaping = ("device", "precision", "batch_size", "drseg_options", "scene")
        differs = [k for k in shaping if info.get(k) != self.info.get(k)]
        if differs:
            raise UsageError(
                f"--ray: workers differ in {', '.join(differs)} ({self.info['host']}: "
                f"{[self.info.get(k) for k in differs]}, {info['host']}: "
                f"{[info.get(k) for k in differs]}); outputs would depend on the worker"
            )

    # -- scheduling ---------------------------------------------------------------------

    def run(self, jobs: Iterator[SceneJob]) -> Iterator[tuple[SceneJob, SceneResult | Exception]]:
        """One job per idle actor; results as they come (a ``SceneExecutor``). Interrupted
        (Ctrl-C, or closed before the end) it stops every worker before it returns."""
        ray = self._ray
        idle, self._ready = self._ready, []
        running: dict[Any, tuple[SceneJob, Any]] = {}
        more = True
        last_poll = 0.0
        try:
            while True:
                idle += self._started(wait=False)
                while idle and more:
                    job = next(jobs, None)
                    if job is None:
                        more = False
                        break
                    actor = idle.pop(0)
                    ref = actor.run.remote(job.key, job.path, job.plan, job.replace)
                    running[ref] = (job, actor)
                if not running:
                    if more and self._starting:  # every worker lost: wait for a replacement
                        idle += self._started(wait=True)
                        continue
                    break
                ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
                if time.monotonic() - last_poll >= POLL_SECONDS:
                    self._poll()
                    last_poll = time.monotonic()
                for ref in ready:
                    job, actor = running.pop(ref)
                    outcome, actor = self._outcome(ref, job, actor)
                    if actor is not None:
                        idle.append(actor)
                    yield job, outcome
        except BaseException:  # KeyboardInterrupt, GeneratorExit: no worker goes on writing
            self.stop(list(running))
            raise
        self._poll()

    def stop(self, running: Sequence[Any] = ()) -> None:
        """Kill every worker now and wait until the scenes they ran (``running``: their
        result references) have ended and, on this host, their processes are gone: their
        temp files are then the batch's to remove (``worker_pids``). Should that not happen
        in ``STOP_SECONDS`` (or Ray fail meanwhile), ``worker_pids`` is emptied: no temp
        file of a process that may still write is removed."""
        ray = self._ray
        if not self.actors:  # stopped already, or left (``__exit__`` killed them)
            return
        actors, self.actors, self._starting = self.actors, [], {}
        # none until all have ended (a second Ctrl-C meanwhile leaves every temp in place)
        pids, self.worker_pids = self.worker_pids, set()
        try:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            ended = True
            if running:
                _, pending = ray.wait(list(running), num_returns=len(running), timeout=STOP_SECONDS)
                ended = not pending
            where = ray.get(self.tracker.where.remote(), timeout=STOP_SECONDS)
            pids |= {pid for _, pid in where}
            here = {pid for host, pid in where if host == socket.gethostname()}
            deadline = time.monotonic() + STOP_SECONDS
            while ended and any(_alive(pid) for pid in here):
                ended = time.monotonic() < deadline
                time.sleep(0.05)
        except Exception as exc:  # noqa: BLE001 - stopping must not hide the interrupt
            log.warning("stopping the Ray workers: %s", first_line(exc))
            ended = False
        if not ended:
            log.warning("Ray workers did not stop in %d s; their temp files are kept", STOP_SECONDS)
            return
        self.worker_pids = pids

    def _outcome(self, ref: Any, job: SceneJob, actor: Any) -> tuple[Any, Any]:
        """The scene's result or error, and the actor to use next (None if it died more
        often than the retries allow: a fresh one starts in its place)."""
        ray = self._ray
        try:
            result, error = ray.get(ref)
        except ray.exceptions.RayActorError as exc:  # the worker died retries + 1 times
            self.actors.remove(actor)
            self._new_actor()
            message = (
                f"{job.path}: Ray worker died {self.options.retries + 1} times on this scene "
                f"({first_line(exc)})"
            )
            return WorkerError(message), None
        return (error if error is not None else result), actor

    def _poll(self) -> None:
        """Worker ids (for temp cleanup) and the cluster's tiles, to ``on_progress``."""
        tiles, total, pids = self._ray.get(self.tracker.snapshot.remote())
        self.worker_pids.update(pids)
        if self.on_progress is not None:
            self.on_progress(tiles, total)
