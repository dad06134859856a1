"""GPUs taken out of service after a device error, and how they come back.

A training attempt that fails on a GPU is judged by :func:`judge` from the trainer's ``error`` event
(code ``device``, see trainer/progress.py: a CUDA error, out of memory, a GPU that fell off the bus, an
uncorrectable ECC error, NCCL) and from the Xid errors NVML reported for its GPUs during the attempt:

* a device fault quarantines the GPU (:func:`quarantine`; every GPU of a multi-GPU attempt when the
  trainer could not say which one) and the job retries from its checkpoint as an infrastructure
  failure, on a GPU that is not quarantined (tasks.py skips those slots);
* out of memory is a device fault only at a size that fits: where the estimate's memory verdict for
  that GPU is "tight" or "wont_fit" it is the job's own problem (a user error, with the numbers); where
  the GPU's memory is unknown the attempt is retried without a quarantine.

A quarantined GPU is shown on the admin page (/admin/workers) and as ``ncs_gpu_quarantined``. It stays
out until an admin clears it, or until a health probe passes: ``gpu_probe_seconds`` after the
quarantine (and again as often), the consumer that owns it times a tiny training step on it with the real
trainer (:func:`probe_due`). Rows are keyed by host and index, and carry NVML's UUID so a card keeps its
quarantine when its pod is rescheduled under another host name.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import socket
from typing import Any

from trainer import progress

from . import estimate, gpus, runner
from .workers import describe_slots
from .models import GpuQuarantine, utcnow
from .runner import Slot
from .settings import Settings

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What a failed GPU attempt was: ``device`` (quarantine ``gpus``, retry elsewhere) or ``user``
    (the job does not fit: fail it with ``message``)."""

    kind: str
    fault: str
    gpus: tuple[str, ...]
    message: str


def this_host() -> str:
    return socket.gethostname()


# --- judging a failed attempt ---------------------------------------------------------------------------

def judge(error: dict[str, Any] | None, xids: dict[str, list[int]], slot: Slot, config: dict[str, Any],
          device: dict[str, Any]) -> Verdict | None:
    """The verdict on an attempt on ``slot`` that ended in an infrastructure failure, or None when
    nothing points at the device. ``error`` is the trainer's error event, ``xids`` the Xids seen per GPU
    during the attempt, ``device`` the slot's {"device", "device_name", "memory_bytes"}."""
    if slot.kind != "gpu":
        return None
    by_xid = {g: gpus.device_faults(x) for g, x in xids.items() if gpus.device_faults(x)}
    if error and error.get("code") == progress.DEVICE_ERROR_CODE:
        fault = str(error.get("fault") or "cuda")
        index = error.get("device_index")
        named = isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(slot.gpu_ids)
        target = (slot.gpu_ids[index],) if named else tuple(slot.gpu_ids)
        message = str(error.get("message") or fault)[:500]
        if fault == "oom" and not by_xid:
            return _judge_oom(per_device_config(config, len(slot.gpu_ids)), device, target, message)
        return Verdict("device", fault, target, message)
    if by_xid:
        listed = ", ".join(f"GPU {g}: Xid {', '.join(map(str, x))}" for g, x in sorted(by_xid.items()))
        return Verdict("device", "xid", tuple(sorted(by_xid)), f"NVML reported {listed}")
    return None


def per_device_config(config: dict[str, Any], n_gpus: int) -> dict[str, Any]:
    """``config`` as one GPU of ``n_gpus`` sees it: the batch is split across the data-parallel ranks."""
    if n_gpus > 1 and config.get("batch_size"):
        return {**config, "batch_size": max(1, -(-int(config["batch_size"]) // n_gpus))}
    return config


def _judge_oom(config: dict[str, Any], device: dict[str, Any], target: tuple[str, ...],
               message: str) -> Verdict | None:
    try:
        plan = estimate.estimate(config, device)
    except (ValueError, KeyError, TypeError):
        return None
    memory = plan["memory"]
    verdict = memory["verdict"]
    if verdict == "fits":  # out of memory at a size that fits: the card is not what it claims
        return Verdict("device", "oom", target, f"out of memory at a size that fits ({_gib(memory['needed_bytes'])} "
                                               f"of {_gib(memory['device_bytes'])} GiB): {message}")
    if verdict in ("tight", "wont_fit"):
        return Verdict("user", "oom", (), f"the run ran out of GPU memory: it needs about "
                                        f"{_gib(memory['needed_bytes'])} GiB and the GPU ({device.get('device_name')}) "
                                        f"has {_gib(memory['device_bytes'])} GiB. Lower batch_size, seq_len or depth.")
    return None  # the GPU's memory is unknown: retry, but accuse nothing


def _gib(n: Any) -> str:
    return f"{(n or 0) / 2**30:.1f}"


# --- the quarantine table ------------------------------------------------------------------------------------

def quarantine(gpu: str, *, fault: str, reason: str, job_id: int | None, settings: Settings,
               uuid: str | None = None, device_name: str = "") -> GpuQuarantine:
    """Take GPU ``gpu`` of this host out of service (again: a second fault restarts its probe clock)."""
    now = utcnow()
    probe_at = now + dt.timedelta(seconds=settings.gpu_probe_seconds) if settings.gpu_probe_seconds else None
    values = {GpuQuarantine.uuid: uuid, GpuQuarantine.device_name: device_name, GpuQuarantine.fault: fault,
              GpuQuarantine.reason: reason[:2000], GpuQuarantine.job: job_id, GpuQuarantine.created_at: now,
              GpuQuarantine.probe_at: probe_at, GpuQuarantine.probes: 0, GpuQuarantine.last_probe: ""}
    (GpuQuarantine.insert({GpuQuarantine.host: this_host(), GpuQuarantine.gpu: gpu, **values})
     .on_conflict(conflict_target=[GpuQuarantine.host, GpuQuarantine.gpu], update=values).execute())
    log.error("GPU %s quarantined (%s) after job %s: %s", gpu, fault, job_id, reason)
    return GpuQuarantine.get((GpuQuarantine.host == this_host()) & (GpuQuarantine.gpu == gpu))


def quarantined_here(uuids: dict[str, str | None] | None = None) -> set[str]:
    """The GPU ids of this host that are out of service: by host name, or by a UUID in ``uuids``
    ({gpu id: uuid} of this host's cards)."""
    by_uuid = {u: g for g, u in (uuids or {}).items() if u}
    out = set()
    query = GpuQuarantine.select(GpuQuarantine.host, GpuQuarantine.gpu, GpuQuarantine.uuid)
    if by_uuid:
        query = query.where((GpuQuarantine.host == this_host()) | GpuQuarantine.uuid.in_(list(by_uuid)))
    else:
        query = query.where(GpuQuarantine.host == this_host())
    for host, gpu, uuid in query.tuples():
        if uuid and uuid in by_uuid:
            out.add(by_uuid[uuid])
        elif host == this_host():
            out.add(gpu)
    return out


def usable(slots: list[Slot], out_of_service: set[str]) -> list[Slot]:
    """``slots`` without those on a quarantined GPU."""
    return [s for s in slots if not set(s.gpu_ids) & out_of_service]


def clear(row_id: int) -> GpuQuarantine | None:
    """Return a GPU to service (an admin's decision); the row that was removed, or None."""
    row = GpuQuarantine.get_or_none(GpuQuarantine.id == row_id)
    if row is not None:
        GpuQuarantine.delete().where(GpuQuarantine.id == row_id).execute()
        log.warning("GPU %s on %s returned to service by an admin", row.gpu, row.host)
    return row


def rows() -> list[GpuQuarantine]:
    return list(GpuQuarantine.select().order_by(GpuQuarantine.host, GpuQuarantine.gpu))


# --- health probes ----------------------------------------------------------------------------------------------

def _due(now: dt.datetime) -> Any:
    return GpuQuarantine.select().where((GpuQuarantine.host == this_host()) & GpuQuarantine.probe_at.is_null(False)
                                        & (GpuQuarantine.probe_at <= now))


def any_due(now: dt.datetime | None = None) -> bool:
    """Whether a GPU of this host waits for its health probe (one cheap query per consumer tick)."""
    return _due(now or utcnow()).exists()


def probe_due(settings: Settings, take_slot: Any, give_slot: Any, now: dt.datetime | None = None) -> list[str]:
    """Probe this host's quarantined GPUs whose probe time came; returns the ids returned to service.
    ``take_slot(gpu_id)`` takes that GPU's free slot from the consumer's pool (None when busy), and
    ``give_slot(slot)`` hands it back, so no job lands on a GPU while it is probed."""
    now = now or utcnow()
    back = []
    for row in list(_due(now)):
        slot = take_slot(row.gpu)
        if slot is None:
            continue
        try:
            ok, said = _probe(settings, slot)
        finally:
            give_slot(slot)
        if ok:
            GpuQuarantine.delete().where(GpuQuarantine.id == row.id).execute()
            log.warning("GPU %s passed its health probe and is back in service", row.gpu)
            back.append(row.gpu)
        else:
            later = utcnow() + dt.timedelta(seconds=settings.gpu_probe_seconds)
            (GpuQuarantine.update(probes=GpuQuarantine.probes + 1, probe_at=later, last_probe=said[:2000])
             .where(GpuQuarantine.id == row.id).execute())
            log.warning("GPU %s failed its health probe (%s); next probe at %s", row.gpu, said, later)
    return back


def _probe(settings: Settings, slot: Slot) -> tuple[bool, str]:
    try:
        result = runner.probe_gpu(settings, slot)
    except runner.SpawnError as exc:
        return False, str(exc)
    if result.get("device") != "cuda":
        return False, f"the trainer trained on {result.get('device')!r}, not the GPU"
    return True, "ok"


def after_failure(job_id: int, config: dict[str, Any], slot: Slot, error: dict[str, Any] | None, since: float,
                  settings: Settings) -> Verdict | None:
    """Judge an attempt of job ``job_id`` on ``slot`` that failed for infrastructure reasons (``since``:
    its start, time.monotonic()) and quarantine its GPU when the device was at fault."""
    if slot.kind != "gpu":
        return None
    nv = gpus.nvml()
    xids = {g: nv.xids_since(int(g), since) for g in slot.gpu_ids}
    (device,) = describe_slots([slot])
    verdict = judge(error, xids, slot, config, device)
    if verdict is None or verdict.kind != "device":
        return verdict
    uuids = {c["gpu"]: c.get("uuid") for c in device["gpus"]}
    for gpu in verdict.gpus:
        quarantine(gpu, fault=verdict.fault, reason=verdict.message, job_id=job_id, settings=settings,
                   uuid=uuids.get(gpu), device_name=device["device_name"])
    return verdict
