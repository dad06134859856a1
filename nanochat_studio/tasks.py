"""The huey instance and its tasks. Tasks take ids and are thin glue over jobs.py, runner.py (slots) and
supervisor.py (one training attempt).

huey is at-most-once (a task running when its consumer dies is lost), so it only rings a bell: "a job
may be ready". Whoever hears it claims the oldest fair job from the jobs table (compare-and-set) and
supervises it on a free local slot. A ticker thread per consumer reconciles lost leases every
``reconcile_seconds`` (a setting) and rings again when a backed-off job becomes ready, so nothing depends on a
message surviving.

``serve`` calls :func:`start_consumer` / :func:`stop_consumer`; ``worker`` calls :func:`run_worker`.
The API calls :func:`enqueue_job` after ``jobs.submit``. Estimates time their shapes with
:func:`calibrate_on_a_slot`, on a slot taken from the same pool as jobs.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import signal
import threading
import time
from typing import Any

import peewee as pw
from huey import Huey, RedisHuey, SqliteHuey
from huey.consumer import Consumer

from trainer.sizing import ModelShape

from . import billing, jobs, logs, metrics, quarantine, runner, supervisor, workers
from .db import database
from .models import TrainingJob, utcnow
from .settings import Settings

log = logging.getLogger(__name__)

POLL_MAX_DELAY_S = 0.2  # an idle SQL-backed queue notices a new task within this


def make_huey(settings: Settings) -> Huey:
    """The huey instance for ``settings.queue_url`` (sqlite:///path, redis://..., postgresql://...),
    with this module's tasks registered on it; one per URL per process. Raises ValueError for another
    scheme."""
    url = settings.queue_url
    with _hueys_lock:
        if url not in _hueys:
            _hueys[url] = _new_huey(url)
        return _hueys[url]


def _new_huey(url: str) -> Huey:
    if url.startswith("sqlite:///"):
        huey: Huey = SqliteHuey("nanochat-studio", results=False, filename=url[len("sqlite:///"):])
    elif url.startswith(("redis://", "rediss://", "unix://")):
        huey = RedisHuey("nanochat-studio", results=False, url=url)
    elif url.startswith(("postgresql://", "postgres://")):
        huey = Huey("nanochat-studio", results=False, storage_class=_reconnecting_sql_storage(), database=url)
    else:
        raise ValueError(f"queue_url: expected sqlite:///, redis:// or postgresql://, got {url!r}")

    @huey.task(name="ring")
    def ring(job_id: int | None = None) -> str | None:
        """Claim a ready job and supervise it on a free local slot (this worker thread owns it)."""
        return run_next_job(job_id)

    @huey.task(name="facts")
    def facts(key: str) -> str | None:
        """Prepare a dataset with the trainer's own code for the estimates (datafacts.py)."""
        from . import datafacts

        local = _local
        return datafacts.compute(key, local.settings) if local is not None else None

    huey.ring = ring  # type: ignore[attr-defined]
    huey.facts = facts  # type: ignore[attr-defined]
    return huey


def _reconnecting_sql_storage() -> type:
    """huey's SqlStorage, closing a broken connection after an error so the next call reconnects (a
    PostgreSQL restart would otherwise leave every worker thread with a dead connection forever)."""
    from huey.contrib.sql_huey import SqlStorage

    class ReconnectingSqlStorage(SqlStorage):
        pass

    def wrap(name: str) -> None:
        inner = getattr(SqlStorage, name)

        def method(self, *args, **kwargs):
            try:
                return inner(self, *args, **kwargs)
            except pw.DatabaseError:
                _close_quietly(self.database)
                raise

        setattr(ReconnectingSqlStorage, name, method)

    for name in ("enqueue", "dequeue", "queue_size", "add_to_schedule", "read_schedule", "schedule_size"):
        wrap(name)
    return ReconnectingSqlStorage


def _close_quietly(database: pw.Database) -> None:
    try:
        database.close()
    except Exception:  # already broken, or inside a transaction another frame will end
        pass


_hueys: dict[str, Huey] = {}
_hueys_lock = threading.Lock()


@dataclasses.dataclass
class _Local:
    """This process's worker side: its slots and the flag that tells trainers to checkpoint and stop."""

    settings: Settings
    free: list[runner.Slot]
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock)
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    worker_id: str = ""  # its row in the worker registry
    uuids: dict[str, str | None] = dataclasses.field(default_factory=dict)  # GPU id -> NVML UUID
    probing: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def give(self, slot: runner.Slot) -> None:
        with self.lock:
            self.free.append(slot)

    def has_free(self) -> bool:
        with self.lock:
            return bool(self.free)

    def out_of_service(self) -> set[str]:
        """This host's quarantined GPUs among ours (empty on a CPU worker: no query)."""
        if not self.uuids:
            return set()
        return quarantine.quarantined_here(self.uuids)

    def in_service(self) -> list[runner.Slot]:
        """The free slots a job may take now (call with the lock held)."""
        return quarantine.usable(self.free, self.out_of_service()) if self.uuids else list(self.free)

    def take_gpu(self, gpu: str) -> runner.Slot | None:
        """The free slot of GPU ``gpu``, out of the pool until given back (None: busy or not ours)."""
        with self.lock:
            for slot in self.free:
                if slot.gpu_ids == (gpu,):
                    self.free.remove(slot)
                    return slot
        return None


_local: _Local | None = None  # set while this process runs a consumer


def gpus_wanted(job: TrainingJob) -> int:
    return int((job.config or {}).get("gpus") or 1)


def run_next_job(job_id: int | None = None) -> str | None:
    """Claim the next ready job that fits the free local slots (fair across users) and run it here;
    returns its final status, or None when nothing fits or nothing is ready. ``job_id`` is
    informational: the table decides. A job asking for n GPUs gets n free GPU slots (torchrun)."""
    local = _local
    if local is None:  # an enqueue-only process (e.g. the web app without a consumer)
        return None
    settings = local.settings
    # Claim and take the slots under the pool's lock so two rings cannot count the same free GPUs.
    with local.lock:
        if not local.free or local.stop.is_set():
            return None
        free = local.in_service()  # a quarantined GPU takes no new job
        if not free:
            return None
        on_gpus = free[0].kind == "gpu"

        def fits(job: TrainingJob) -> bool:
            return gpus_wanted(job) <= len(free) if on_gpus else gpus_wanted(job) == 1

        job = jobs.claim_next(jobs.owner_id(free[0].name), free[0].name,
                              lease_seconds=settings.lease_seconds,
                              max_running_jobs=settings.max_running_jobs, fits=fits)
        if job is None:
            return None
        taken = free[:gpus_wanted(job)]
        for slot in taken:
            local.free.remove(slot)
    slot = taken[0] if len(taken) == 1 else runner.Slot(
        "+".join(s.name for s in taken), "gpu", tuple(g for s in taken for g in s.gpu_ids))
    status = None
    try:
        with logs.job_context(job.id):  # every line logged while it runs names the job
            log.info("job %s attempt %s starting on %s (rung for %s)", job.id, job.attempt, slot.name, job_id)
            status = supervisor.run_training(job, slot, settings, stop=local.stop)
            log.info("job %s attempt %s ended: %s", job.id, job.attempt, status)
    except Exception as exc:
        log.exception("running a job failed; the reconciler will requeue it when its lease expires")
        if isinstance(exc, pw.DatabaseError):
            _close_quietly(database)  # this worker thread reconnects on its next ring
    finally:
        for s in taken:
            local.give(s)
    if not local.stop.is_set():
        ring_if_ready(settings)  # the slots are free again: start whatever waits
    return status


def calibrate_on_a_slot(settings: Settings, shape: ModelShape, batch_size: int) -> dict | None:
    """Time ``shape`` (runner.calibrate) on a free slot of this process, taken like a job takes one, so a
    timing run never competes with a training run outside the slot accounting. None, at once, when this
    process runs no consumer or every slot is busy. Raises runner.SpawnError."""
    local = _local
    if local is None:
        return None
    with local.lock:
        usable = local.in_service() if local.free and not local.stop.is_set() else []
        if not usable:
            return None
        slot = usable[0]
        local.free.remove(slot)
    try:
        return runner.calibrate(settings, shape, batch_size, slot=slot)
    finally:
        local.give(slot)
        if not local.stop.is_set():
            ring_if_ready(settings)  # a job that arrived meanwhile waited for this slot


def enqueue_job(job_id: int, settings: Settings | None = None) -> bool:
    """Ring the bell for a submitted job (called by the API after ``jobs.submit``). ``settings`` may be
    left out in a process that runs the consumer. Never raises for a queue outage: the job is already
    in the table and a reconciler rings again within ``reconcile_seconds``; returns whether it rang."""
    if settings is None:
        if _local is None:
            raise RuntimeError("enqueue_job needs settings in a process without a consumer")
        settings = _local.settings
    huey = make_huey(settings)
    for attempt in (1, 2):  # a connection the queue's server dropped fails once, then reconnects
        try:
            huey.ring(job_id)  # type: ignore[attr-defined]
            return True
        except Exception:
            if attempt == 2:
                log.warning("could not ring the queue for job %s; the reconciler will", job_id, exc_info=True)
    return False


def enqueue_facts(key: str, settings: Settings) -> bool:
    """Queue the preparation of a dataset's facts (datafacts.compute) for whichever consumer is free;
    never raises for a queue outage (the next estimate asks again once the request is stale)."""
    try:
        make_huey(settings).facts(key)  # type: ignore[attr-defined]
        return True
    except Exception:
        log.warning("could not queue the facts of %s", key, exc_info=True)
        return False


def ring_if_ready(settings: Settings | None = None) -> bool:
    """Ring once if a queued job is ready now. Returns whether it rang."""
    settings = settings if settings is not None else (_local.settings if _local else None)
    ready_at = jobs.next_ready_at()
    if settings is None or ready_at is None or ready_at > utcnow():
        return False
    make_huey(settings).ring(None)  # type: ignore[attr-defined]
    return True


def reconcile_and_ring(settings: Settings) -> list[int]:
    moved = jobs.reconcile(backoff_base=settings.retry_backoff_seconds)
    if moved:
        log.info("reconciled jobs %s", moved)
    try:
        billing.periodic()  # settle jobs whose attempts ended without it; audit the ledger now and then
    except Exception:
        log.exception("billing's periodic work failed")
    ring_if_ready(settings)
    return moved


class _ThreadConsumer(Consumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started = threading.Event()  # set once start() has started every worker thread

    def start(self) -> None:
        super().start()
        self.started.set()

    def _set_signal_handlers(self) -> None:
        # Signals belong to the main thread (serve's waitress loop, or run_worker); it stops us.
        pass


@dataclasses.dataclass
class ConsumerHandle:
    huey: Huey
    consumer: Consumer
    thread: threading.Thread
    ticker: threading.Thread
    local: _Local
    ticker_stop: threading.Event


_consumer_ids = itertools.count(1)


def start_consumer(settings: Settings, *, role: str = "serve", metrics_port: int | None = None) -> ConsumerHandle:
    """Run the queue consumer in background threads of this process: register it in the worker
    registry, reconcile, then serve rings on this process's slots (``gpus`` / ``cpu_slots``)."""
    global _local
    huey = make_huey(settings)
    slots = runner.local_slots(settings)
    local = _Local(settings=settings, free=list(slots),
                   worker_id=f"{jobs.owner_id('')}c{next(_consumer_ids)}")
    _local = local
    devices = _register(local, slots, role, metrics_port)
    local.uuids = {c["gpu"]: c.get("uuid") for d in devices for c in d["gpus"]}
    metrics.consumer_started(sorted(local.uuids, key=int), _quarantined_reader(local))
    workers = max(settings.worker_threads, len(slots) + 1)
    consumer = _ThreadConsumer(huey, workers=workers, periodic=False, initial_delay=0.05, backoff=1.5,
                               max_delay=POLL_MAX_DELAY_S, worker_type="thread", check_worker_health=True)
    try:
        reconcile_and_ring(settings)
    except Exception:
        log.exception("reconcile at start failed")
    thread = threading.Thread(target=consumer.run, name="huey-consumer", daemon=True)
    thread.start()
    ticker_stop = threading.Event()
    every = settings.reconcile_seconds

    def tick() -> None:
        while not ticker_stop.is_set():
            wait = every
            try:
                _beat(local, slots, role, metrics_port)
            except Exception as exc:  # the registry row ages; reconciling must go on regardless
                log.warning("worker heartbeat failed: %s", exc)
                if isinstance(exc, pw.DatabaseError):
                    _close_quietly(database)
            try:
                reconcile_and_ring(settings)
                ready_at = jobs.next_ready_at()
                if ready_at is not None:  # wake when a backed-off job becomes ready
                    wait = min(every, max(0.05, (ready_at - utcnow()).total_seconds() + 0.05))
            except Exception as exc:
                log.exception("reconcile failed")
                if isinstance(exc, pw.DatabaseError):
                    _close_quietly(database)
            ticker_stop.wait(wait)

    ticker = threading.Thread(target=tick, name="job-reconciler", daemon=True)
    ticker.start()
    return ConsumerHandle(huey, consumer, thread, ticker, local, ticker_stop)


def stop_consumer(handle: ConsumerHandle, timeout: float = 150.0) -> None:
    """Stop taking work, SIGTERM running trainers (they checkpoint and their jobs are requeued without
    using up an attempt), and wait up to ``timeout`` seconds for them to exit."""
    global _local
    handle.local.stop.set()
    handle.ticker_stop.set()
    handle.consumer.shutdown_timeout = timeout
    # A stop right after the start (serve told to stop as it came up) found the consumer thread still
    # starting its workers, and huey's graceful stop joined a thread not started yet (RuntimeError):
    # wait for the start to finish, unless that thread died first (then no worker ever ran).
    deadline = time.monotonic() + timeout
    while not handle.consumer.started.wait(0.05):
        if not handle.thread.is_alive() or time.monotonic() > deadline:
            break
    if handle.consumer.started.is_set():
        handle.consumer.stop(graceful=True)
    else:
        handle.consumer.stop_flag.set()
    handle.thread.join(timeout)
    handle.ticker.join(5)
    metrics.consumer_stopped()
    try:
        workers.unregister(handle.local.worker_id)
    except Exception:  # the row ages out of the registry on its own
        log.warning("could not unregister worker %s", handle.local.worker_id, exc_info=True)
    finally:
        _close_quietly(database)
    if _local is handle.local:
        _local = None


def _register(local: _Local, slots: list[runner.Slot], role: str, metrics_port: int | None) -> list[dict]:
    """Register in the worker registry; its devices. A store outage is survived: the next heartbeat
    registers."""
    try:
        return workers.register(local.worker_id, role, slots, local.settings, metrics_port).devices
    except pw.DatabaseError:
        log.warning("could not register in the worker registry; retrying with the next heartbeat", exc_info=True)
        _close_quietly(database)
        return workers.describe_slots(slots)


def _beat(local: _Local, slots: list[runner.Slot], role: str, metrics_port: int | None) -> None:
    """The registry heartbeat, and the health probes of this host's quarantined GPUs (in their own
    thread: a probe starts the trainer and may take a minute)."""
    if local.stop.is_set():
        return  # stopping: stop_consumer removes the row, and a late beat must not bring it back
    if not workers.heartbeat(local.worker_id):
        workers.register(local.worker_id, role, slots, local.settings, metrics_port)
    if local.uuids and local.settings.gpu_probe_seconds and not local.stop.is_set() and \
            not local.probing.locked() and quarantine.any_due():
        threading.Thread(target=_probe_quarantined, args=(local,), name="gpu-probe", daemon=True).start()


def _probe_quarantined(local: _Local) -> None:
    if not local.probing.acquire(blocking=False):
        return
    try:
        back = quarantine.probe_due(local.settings, local.take_gpu, local.give)
        if back and not local.stop.is_set():
            ring_if_ready(local.settings)  # a GPU came back: waiting jobs may start on it
    except Exception:
        log.exception("probing quarantined GPUs failed")
    finally:
        local.probing.release()
        _close_quietly(database)  # this thread's own connection


def _quarantined_reader(local: _Local) -> Any:
    def read() -> set[str]:
        opened = database.is_closed()
        try:
            return local.out_of_service()
        finally:
            if opened:
                _close_quietly(database)
    return read


def run_worker(settings: Settings, *, metrics_port: int | None = None, metrics_host: str | None = None,
               on_listening: Any = None) -> None:
    """The ``worker`` command: a consumer alone in this process until SIGINT/SIGTERM. With
    ``metrics_port`` it serves /metrics and /healthz there (metrics.serve_worker_metrics), on
    ``metrics_host`` (default: the ``host`` setting); ``on_listening(port)`` is told the port bound.
    Raises OSError when the port is taken."""
    listener = None
    handle: ConsumerHandle | None = None
    if metrics_port is not None:
        listener = metrics.serve_worker_metrics(metrics_host or settings.host, metrics_port, settings.metrics_token,
                                                healthy=lambda: handle is not None and handle.thread.is_alive())
        metrics_port = listener.effective_port
        if on_listening is not None:
            on_listening(metrics_port)
    handle = start_consumer(settings, role="worker", metrics_port=metrics_port)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        while not done.wait(1.0):
            if not handle.thread.is_alive():
                break
        stop_consumer(handle)
    finally:
        if listener is not None:
            listener.close()
