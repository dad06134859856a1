"""The worker registry: every process running a queue consumer says in the store what it trains on and
that it is alive, so the web side (possibly on another machine) knows which workers exist.

``tasks.start_consumer`` calls :func:`register` (host, pid, role, one entry per slot with its device and
memory, GPU count, the metrics port), its reconciler thread calls :func:`heartbeat` every
``reconcile_seconds``, and ``stop_consumer`` calls :func:`unregister`. A worker counts as live while
its last heartbeat is younger than :data:`MISSED_BEATS` of its own intervals (plus a little slack), so
a SIGKILLed worker drops out within about a minute at the default settings; its row is deleted an hour
later by whoever beats next. Admission (admission.py), the job page's "why is it waiting" and the
admin page read :func:`live`.

Devices come from NVML for GPUs (name, total memory, UUID; memory 0 = unknown where NVML is missing)
and from the OS for CPU slots (the machine's RAM), without starting torch.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from typing import Any

from trainer.calibrate import cpu_name, ram_bytes

from . import __version__, gpus
from .models import WorkerProcess, utcnow
from .runner import Slot
from .settings import Settings

log = logging.getLogger(__name__)

MISSED_BEATS = 3  # a worker silent for this many of its heartbeat intervals is gone
SLACK_S = 10.0  # on top: a busy store or a GC pause is not a dead worker
FORGET_AFTER = dt.timedelta(hours=1)  # rows of workers gone this long are deleted


def describe_slots(slots: list[Slot]) -> list[dict[str, Any]]:
    """One entry per slot: {"slot", "device", "device_name", "memory_bytes", "gpus": [{"gpu", "uuid"}]}.
    ``device`` is the estimate's kind ("cuda" or "cpu"); ``memory_bytes`` 0 means unknown."""
    out = []
    nv = gpus.nvml()
    for slot in slots:
        if slot.kind == "gpu":
            cards = [(g, nv.info(int(g)) or {}) for g in slot.gpu_ids]
            out.append({"slot": slot.name, "device": "cuda",
                        "device_name": cards[0][1].get("device_name") or f"GPU {slot.gpu_ids[0]}",
                        "memory_bytes": min(int(c.get("memory_bytes") or 0) for _, c in cards),
                        "gpus": [{"gpu": g, "uuid": c.get("uuid")} for g, c in cards]})
        else:
            out.append({"slot": slot.name, "device": "cpu", "device_name": cpu_name(),
                        "memory_bytes": ram_bytes(), "gpus": []})
    return out


def register(worker_id: str, role: str, slots: list[Slot], settings: Settings,
             metrics_port: int | None = None) -> WorkerProcess:
    """Record (or refresh) this consumer's row. Raises peewee errors when the store is down."""
    devices = describe_slots(slots)
    now = utcnow()
    values = {
        WorkerProcess.host: socket.gethostname(), WorkerProcess.pid: os.getpid(), WorkerProcess.role: role,
        WorkerProcess.devices: devices, WorkerProcess.gpu_count: sum(len(d["gpus"]) for d in devices),
        WorkerProcess.metrics_port: metrics_port, WorkerProcess.version: __version__,
        WorkerProcess.beat_seconds: settings.reconcile_seconds, WorkerProcess.started_at: now,
        WorkerProcess.last_seen_at: now,
    }
    (WorkerProcess.insert({WorkerProcess.id: worker_id, **values})
     .on_conflict(conflict_target=[WorkerProcess.id], update=values).execute())
    log.info("registered worker %s: %s", worker_id, ", ".join(
        f"{d['slot']} {d['device_name']} ({d['memory_bytes'] / 2**30:.1f} GiB)" for d in devices))
    return WorkerProcess.get_by_id(worker_id)


def heartbeat(worker_id: str) -> bool:
    """Renew ``worker_id``'s row and forget workers gone long ago. False when the row is missing (an
    admin or a long outage removed it): the caller registers again."""
    now = utcnow()
    n = WorkerProcess.update(last_seen_at=now).where(WorkerProcess.id == worker_id).execute()
    WorkerProcess.delete().where(WorkerProcess.last_seen_at < now - FORGET_AFTER).execute()
    return n == 1


def unregister(worker_id: str) -> None:
    WorkerProcess.delete().where(WorkerProcess.id == worker_id).execute()


def is_live(row: WorkerProcess, now: dt.datetime | None = None) -> bool:
    now = now or utcnow()
    window = dt.timedelta(seconds=MISSED_BEATS * max(row.beat_seconds or 0.0, 1.0) + SLACK_S)
    return row.last_seen_at >= now - window


def live(now: dt.datetime | None = None) -> list[WorkerProcess]:
    """The workers whose heartbeat is recent, oldest first."""
    now = now or utcnow()
    rows = WorkerProcess.select().where(WorkerProcess.last_seen_at >= now - FORGET_AFTER).order_by(
        WorkerProcess.started_at, WorkerProcess.id)
    return [r for r in rows if is_live(r, now)]


def all_rows() -> list[WorkerProcess]:
    """Every registered worker, live or not (the admin page shows both)."""
    return list(WorkerProcess.select().order_by(WorkerProcess.started_at, WorkerProcess.id))


def summary(rows: list[WorkerProcess]) -> str:
    """"gpu-a: 2 GPUs, cpu-box: CPU only" for messages."""
    parts = []
    for r in rows:
        kind = f"{r.gpu_count} GPU{'s' if r.gpu_count != 1 else ''}" if r.gpu_count else "CPU only"
        parts.append(f"{r.host} (pid {r.pid}): {kind}")
    return "; ".join(parts)


def waiting_words(wanted_gpus: int, ahead: int) -> str:
    """What a ready queued job asking for ``wanted_gpus`` waits for, with ``ahead`` jobs before it:
    a free slot, or a worker that does not exist (yet)."""
    jobs_ahead = f"{ahead} job{'s' if ahead != 1 else ''} ahead"
    rows = live()
    if not rows:
        return ("waiting for a worker: none is running (start `nanochat-studio worker`, or `serve` with the "
                f"worker on); {jobs_ahead}")
    if wanted_gpus > 1:
        most = max(r.gpu_count for r in rows)
        if most < wanted_gpus:
            return (f"waiting for a worker with {wanted_gpus} GPUs: the running ones have at most {most} "
                    f"({summary(rows)})")
        return f"waiting for a free set of {wanted_gpus} GPUs on one worker: {jobs_ahead}"
    return f"waiting for a free {'GPU' if any(r.gpu_count for r in rows) else 'CPU slot'}: {jobs_ahead}"
