"""The job lifecycle: states, allowed transitions, and the one function that changes a job's status.

The jobs table is the truth; the queue only carries ids (huey is at-most-once). Every status change is
a compare-and-set ``UPDATE ... WHERE id=? AND status IN (...) [AND attempt=?]`` in :func:`transition`,
so of two concurrent actors exactly one wins. Running jobs hold a lease renewed by :func:`heartbeat`;
:func:`reconcile` requeues jobs whose holder stopped heartbeating.

Errors: :class:`jobconfig.JobConfigError` (400) for a bad config (jobconfig.py says what a config may
hold), :class:`JobLimitError` (429) for per-user caps.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from typing import Any, Callable, Iterable

import peewee as pw

from . import metrics, secretbox, workers
from .db import database
from .errors import TooManyRequests
from .jobconfig import validate_config
from .models import JobEvent, TrainingJob, User, utcnow
from .settings import Settings

QUEUED, PREPARING, RUNNING = "queued", "preparing", "running"
COMPLETED, FAILED, CANCELLED, INTERRUPTED = "completed", "failed", "cancelled", "interrupted"
PAUSED = "paused"  # stopped at a checkpoint until its owner resumes it (billing: out of credits)
STATES = (QUEUED, PREPARING, RUNNING, COMPLETED, FAILED, CANCELLED, INTERRUPTED, PAUSED)
ACTIVE = frozenset({PREPARING, RUNNING})  # a supervisor holds a lease
FINAL = frozenset({COMPLETED, FAILED, CANCELLED})

TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({PREPARING, CANCELLED, FAILED}),
    PREPARING: frozenset({RUNNING, FAILED, CANCELLED, INTERRUPTED}),
    RUNNING: frozenset({COMPLETED, FAILED, CANCELLED, INTERRUPTED, PAUSED}),
    INTERRUPTED: frozenset({QUEUED, FAILED, CANCELLED}),
    PAUSED: frozenset({QUEUED, CANCELLED}),
    COMPLETED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}

# A retry waits the retry_backoff_seconds setting, then doubles, up to this.
DEFAULT_BACKOFF_S: float = Settings.retry_backoff_seconds  # the setting's default, for callers without settings
MAX_BACKOFF_S = 600.0


class JobLimitError(TooManyRequests, ValueError):
    """A per-user cap was hit (429); the message says which and what to do."""

    code = "job_limit"


# --- the one place a status changes ---------------------------------------------------------------


def transition(job_id: int, to: str, *, expect: Iterable[str], attempt: int | None = None,
               reason: str = "", event: dict[str, Any] | None = None, **fields: Any) -> bool:
    """Move job ``job_id`` to ``to`` if its status is in ``expect`` (and its attempt is ``attempt``).

    Returns whether this caller won. The winner also records a ``state`` JobEvent with ``reason``
    (plus ``event``'s extra keys) in the same transaction.
    """
    expect = frozenset(expect)
    for src in expect:
        if to not in TRANSITIONS[src]:
            raise ValueError(f"a job cannot go from {src} to {to}")
    now = utcnow()
    values: dict[Any, Any] = {TrainingJob.status: to, TrainingJob.status_reason: reason,
                              TrainingJob.updated_at: now}
    if to in FINAL:
        values[TrainingJob.finished_at] = now
        values[TrainingJob.lease_owner] = None
        values[TrainingJob.lease_expires_at] = None
    for name, value in fields.items():
        # new_attempt: the claim's bump, named apart from the ``attempt`` fence above
        values[TrainingJob.attempt if name == "new_attempt" else getattr(TrainingJob, name)] = value
    where = (TrainingJob.id == job_id) & (TrainingJob.status.in_(sorted(expect)))
    if attempt is not None:
        where &= TrainingJob.attempt == attempt
    with database.atomic():
        won = TrainingJob.update(values).where(where).execute() == 1
        if won:
            data = {"to": to, "from": sorted(expect), "reason": reason}
            data.update(event or {})
            _append_event(job_id, "state", data, None)
            if to in FINAL:  # no attempt will read the dataset again: its credentials go
                secretbox.scrub_job_credentials(job_id)
    return won


def _append_event(job_id: int, kind: str, data: dict[str, Any], attempt: int | None) -> int:
    # Write first: the increment takes the job row's write lock (PostgreSQL row lock, SQLite's database
    # lock) until the transaction commits, so two writers can never read the same seq. (A SQLite
    # transaction that reads before it writes fails at once with "database is locked" under contention.)
    TrainingJob.update(last_event_seq=TrainingJob.last_event_seq + 1).where(TrainingJob.id == job_id).execute()
    seq, current = (TrainingJob.select(TrainingJob.last_event_seq, TrainingJob.attempt)
                    .where(TrainingJob.id == job_id).tuples().get())
    JobEvent.create(job=job_id, seq=seq, kind=kind, attempt=current if attempt is None else attempt, data=data)
    return seq


def record_event(job: TrainingJob | int, kind: str, data: dict[str, Any], *, attempt: int | None = None) -> int:
    """Append an event to the job's stream; returns its seq (the SSE event id), increasing per job."""
    with database.atomic():
        return _append_event(_id(job), kind, data, attempt)


def events_since(job: TrainingJob | int, seq: int = 0, limit: int = 1000) -> list[JobEvent]:
    """Events with seq greater than ``seq``, oldest first (Last-Event-ID replay)."""
    return list(JobEvent.select().where((JobEvent.job == _id(job)) & (JobEvent.seq > seq))
                .order_by(JobEvent.seq).limit(limit))


def _id(job: TrainingJob | int) -> int:
    return job if isinstance(job, int) else job.id


def get(job_id: int) -> TrainingJob:
    return TrainingJob.get_by_id(job_id)


# --- submission --------------------------------------------------------------------------------------


def submit(user: User, config: dict[str, Any], settings: Settings,
           on_create: Callable[[TrainingJob], None] | None = None,
           admit: Callable[[dict[str, Any]], str] | None = None) -> TrainingJob:
    """Validate ``config`` and queue a job for ``user``. ``admit(clean_config)`` (admission.py) may
    refuse work no worker can run (raising JobConfigError) or answer a warning kept with the job.

    ``on_create(job)`` runs inside the transaction that creates the job (billing places its hold there):
    whatever it raises undoes the job. Raises JobConfigError (400), datasets' errors for the dataset
    (DatasetError 400, Forbidden 403, NotFound 404, fetch.URLRefused 400) or JobLimitError (429: too many
    queued jobs). The caller enqueues the bell (``tasks.enqueue_job(job.id)``) after this returns.
    """
    clean = validate_config(config, user, settings)
    warning = admit(clean) if admit is not None else ""
    max_queued = settings.max_queued_jobs
    with database.atomic():
        # Write-lock the user's row first (PostgreSQL row lock, SQLite's write lock) so two concurrent
        # submits cannot both pass the count below.
        User.update({User.id: User.id}).where(User.id == user.id).execute()
        waiting = (TrainingJob.owned_by(user)
                   .where(TrainingJob.status.in_([QUEUED, INTERRUPTED])).count())
        if waiting >= max_queued:
            raise JobLimitError(f"you already have {waiting} jobs waiting to run (the limit is {max_queued}); "
                                "wait for one to start or cancel one")
        job = TrainingJob.create(user=user, name=clean.pop("name", "") or "", config=clean,
                                 max_attempts=settings.max_attempts)
        submitted = {"to": QUEUED, "from": [], "reason": "submitted"}
        if warning:
            submitted["warning"] = warning
        _append_event(job.id, "state", submitted, 0)
        if on_create is not None:
            on_create(job)
    return TrainingJob.get_by_id(job.id)


# --- claiming, leases, finishing ---------------------------------------------------------------------


def owner_id(slot_name: str = "") -> str:
    """Who holds a lease: host, boot, pid (and slot), so a restarted process on this machine can tell
    that a lease's holder is dead without waiting for it to expire."""
    return f"{socket.gethostname()}:{_boot_id()}:{os.getpid()}:{slot_name}"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()[:8]
    except OSError:
        return "-"


def _owner_is_dead(owner: str | None) -> bool:
    if not owner:
        return False
    parts = owner.split(":")
    if len(parts) < 3 or parts[0] != socket.gethostname():
        return False  # another machine: only its lease can tell
    if parts[1] != _boot_id():
        return True  # this machine rebooted since
    try:
        pid = int(parts[2])
    except ValueError:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def running_counts() -> dict[int, int]:
    rows = (TrainingJob.select(TrainingJob.user, pw.fn.COUNT(TrainingJob.id).alias("n"))
            .where(TrainingJob.status.in_(sorted(ACTIVE))).group_by(TrainingJob.user).tuples())
    return {user_id: n for user_id, n in rows}


def _ready_queue(now: dt.datetime) -> pw.ModelSelect:
    return (TrainingJob.select()
            .where((TrainingJob.status == QUEUED)
                   & (TrainingJob.not_before.is_null() | (TrainingJob.not_before <= now)))
            .order_by(TrainingJob.queued_at, TrainingJob.id))


def claim_next(owner: str, slot: str, *, lease_seconds: float = 30, max_running_jobs: int | None = None,
               now: dt.datetime | None = None,
               fits: Callable[[TrainingJob], bool] | None = None) -> TrainingJob | None:
    """Take the next job for ``slot``: the oldest ready job, preferring users with fewer running jobs,
    among those ``fits`` accepts (e.g. no more GPUs than are free).

    Bumps the attempt (the fencing token), sets the lease, moves the job to preparing. None when
    nothing is ready (or every candidate was taken by a concurrent claimer).
    """
    now = now or utcnow()
    counts = running_counts()
    candidates = list(_ready_queue(now).limit(50))
    candidates.sort(key=lambda j: (counts.get(j.user_id, 0), j.queued_at, j.id))
    for job in candidates:
        if max_running_jobs is not None and counts.get(job.user_id, 0) >= max_running_jobs:
            continue
        if fits is not None and not fits(job):
            continue
        if _claim(job, owner, slot, lease_seconds, now):
            metrics.attempt_started(attempt_reason(job.id, job.attempt))
            return TrainingJob.get_by_id(job.id)
    return None


def attempt_reason(job_id: int, previous_attempt: int) -> str:
    """Why an attempt starts (``ncs_job_attempts_total{reason}``): first, or after the previous
    attempt's outcome: retry (an infrastructure failure), lost (its worker vanished), preempted."""
    if previous_attempt == 0:
        return "first"
    last = (JobEvent.select(JobEvent.data).where((JobEvent.job == job_id) & (JobEvent.kind == "state")
                                                 & (JobEvent.attempt == previous_attempt))
            .order_by(JobEvent.seq.desc()).tuples())
    for (data,) in last:
        if data.get("to") == INTERRUPTED:
            outcome = data.get("outcome")
            return {"preempted": "preempted", "lost": "lost"}.get(outcome, "retry")
    return "retry"


def _claim(job: TrainingJob, owner: str, slot: str, lease_seconds: float, now: dt.datetime) -> bool:
    return transition(job.id, PREPARING, expect={QUEUED}, attempt=job.attempt,
                      reason=f"started on {slot} (attempt {job.attempt + 1} of {job.max_attempts})",
                      **_claim_fields(job, owner, slot, lease_seconds, now))


def _claim_fields(job: TrainingJob, owner: str, slot: str, lease_seconds: float,
                  now: dt.datetime) -> dict[str, Any]:
    return {"new_attempt": TrainingJob.attempt + 1, "lease_owner": owner, "device": slot,
            "lease_expires_at": now + dt.timedelta(seconds=lease_seconds), "not_before": None,
            "started_at": job.started_at or now}


def heartbeat(job_id: int, attempt: int, owner: str, *, lease_seconds: float = 30) -> bool:
    """Renew the lease; False means this supervisor was fenced out (the job moved on without it)."""
    now = utcnow()
    n = (TrainingJob.update(lease_expires_at=now + dt.timedelta(seconds=lease_seconds), updated_at=now)
         .where((TrainingJob.id == job_id) & (TrainingJob.attempt == attempt)
                & (TrainingJob.lease_owner == owner) & (TrainingJob.status.in_(sorted(ACTIVE))))
         .execute())
    return n == 1


def update_progress(job_id: int, attempt: int, progress: dict[str, Any]) -> bool:
    """Store the latest progress of attempt ``attempt`` (fenced like a heartbeat)."""
    n = (TrainingJob.update(progress=progress, updated_at=utcnow())
         .where((TrainingJob.id == job_id) & (TrainingJob.attempt == attempt)).execute())
    return n == 1


def request_cancel(job: TrainingJob | int) -> str:
    """Cancel: a waiting job ends at once; a running one is flagged and its supervisor sends SIGTERM.

    Returns the job's status afterwards ("cancelled", or "cancelling" while a trainer checkpoints).
    """
    job_id = _id(job)
    if transition(job_id, CANCELLED, expect={QUEUED, INTERRUPTED}, reason="cancelled before it ran"):
        metrics.job_finished("cancelled")
        return CANCELLED
    if transition(job_id, CANCELLED, expect={PAUSED}, reason="cancelled while paused"):
        metrics.job_finished("cancelled")
        return CANCELLED
    with database.atomic():
        n = (TrainingJob.update(cancel_requested=True, updated_at=utcnow())
             .where((TrainingJob.id == job_id) & TrainingJob.status.in_(sorted(ACTIVE))).execute())
        if n:
            _append_event(job_id, "cancel", {"reason": "cancel requested"}, None)
            return "cancelling"
    return TrainingJob.get_by_id(job_id).status


def backoff_seconds(failures: int, base: float = DEFAULT_BACKOFF_S) -> float:
    return min(MAX_BACKOFF_S, base * 2 ** max(0, failures - 1))


def charged_failures(job_id: int) -> int:
    """Attempts that ended in an infrastructure failure (a graceful shutdown does not count)."""
    return sum(1 for (data,) in JobEvent.select(JobEvent.data)
               .where((JobEvent.job == job_id) & (JobEvent.kind == "state")).tuples()
               if data.get("to") == INTERRUPTED and data.get("charged"))


def finish(job_id: int, attempt: int, outcome: str, *, reason: str = "", charged: bool = True,
           backoff_base: float = DEFAULT_BACKOFF_S, **fields: Any) -> str | None:
    """End attempt ``attempt`` with ``outcome``: completed, cancelled, user_error, or a retryable
    outcome (preempted / infrastructure / lost). Retryable outcomes go interrupted -> queued with
    back-off, or failed (infrastructure) when the job's attempts are used up. ``charged=False`` (a
    graceful shutdown) requeues at once without using up an attempt.

    ``out_of_credits`` pauses the job (resumable with :func:`resume`).

    Returns the job's new status, or None when this attempt was fenced out.
    """
    if outcome == "out_of_credits":
        ok = transition(job_id, PAUSED, expect={RUNNING}, attempt=attempt, reason=reason or "out of credits",
                        event={"outcome": outcome}, lease_owner=None, lease_expires_at=None, **fields)
        return PAUSED if ok else None
    if outcome == "completed":
        ok = transition(job_id, COMPLETED, expect={RUNNING}, attempt=attempt, reason=reason or "completed",
                        error_kind=None, **fields)
        return _counted(COMPLETED if ok else None, "completed")
    if outcome == "cancelled":
        ok = transition(job_id, CANCELLED, expect=ACTIVE, attempt=attempt, reason=reason or "cancelled", **fields)
        return _counted(CANCELLED if ok else None, "cancelled")
    if outcome == "user_error":
        ok = transition(job_id, FAILED, expect=ACTIVE, attempt=attempt, reason=reason, error_kind="user", **fields)
        return _counted(FAILED if ok else None, "failed_user")
    ok = transition(job_id, INTERRUPTED, expect=ACTIVE, attempt=attempt, reason=reason,
                    event={"charged": charged, "outcome": outcome},
                    lease_owner=None, lease_expires_at=None, **fields)
    if not ok:
        return None
    if outcome == "preempted":
        metrics.job_finished("preempted")
    return _requeue(job_id, attempt, charged, backoff_base)


def _counted(status: str | None, outcome: str) -> str | None:
    """``status``, having counted ``outcome`` in ncs_jobs_finished_total when this caller won."""
    if status is not None:
        metrics.job_finished(outcome)
    return status


def _requeue(job_id: int, attempt: int, charged: bool, backoff_base: float) -> str | None:
    job = TrainingJob.get_by_id(job_id)
    if job.cancel_requested:
        ok = transition(job_id, CANCELLED, expect={INTERRUPTED}, attempt=attempt,
                        reason="cancelled while interrupted")
        return _counted(CANCELLED if ok else None, "cancelled")
    failures = charged_failures(job_id)
    if failures >= job.max_attempts:
        ok = transition(job_id, FAILED, expect={INTERRUPTED}, attempt=attempt, error_kind="infrastructure",
                        reason=f"gave up after {failures} failed attempts; last: {job.status_reason}")
        return _counted(FAILED if ok else None, "failed_infra")
    delay = backoff_seconds(failures, backoff_base) if charged else 0.0
    now = utcnow()
    ok = transition(job_id, QUEUED, expect={INTERRUPTED}, attempt=attempt,
                    reason=(f"retrying in {delay:g} s after {job.status_reason}" if delay
                            else f"requeued after {job.status_reason}"),
                    event={"retry_in_s": delay, "after": job.status_reason},
                    not_before=now + dt.timedelta(seconds=delay) if delay else None, queued_at=now,
                    error_kind=None)
    return QUEUED if ok else None


def resume(job_id: int, reason: str = "resumed by its owner") -> bool:
    """Queue a paused job again (it continues from its last checkpoint); False if it is not paused."""
    now = utcnow()
    return transition(job_id, QUEUED, expect={PAUSED}, reason=reason, not_before=None, queued_at=now,
                      error_kind=None, cancel_requested=False)


def reconcile(now: dt.datetime | None = None, *, backoff_base: float = DEFAULT_BACKOFF_S) -> list[int]:
    """Requeue jobs whose supervisor is gone: an expired lease, a dead local holder, or a job left
    interrupted by a crash between two steps. Returns the ids of jobs that moved. Safe to run anywhere,
    any time, concurrently: every move is compare-and-set."""
    now = now or utcnow()
    moved: list[int] = []
    for job in TrainingJob.select().where(TrainingJob.status.in_(sorted(ACTIVE))):
        expired = job.lease_expires_at is None or job.lease_expires_at < now
        if not (expired or _owner_is_dead(job.lease_owner)):
            continue
        why = ("its worker stopped renewing the lease" if expired
               else "its worker process died")
        if finish(job.id, job.attempt, "lost", reason=why, backoff_base=backoff_base) is not None:
            moved.append(job.id)
    for job in TrainingJob.select().where(TrainingJob.status == INTERRUPTED):
        if _requeue(job.id, job.attempt, True, backoff_base) is not None:
            moved.append(job.id)
    return moved


def next_ready_at(now: dt.datetime | None = None) -> dt.datetime | None:
    """When the earliest queued job becomes ready (now if one is ready), or None if none is queued."""
    now = now or utcnow()
    row = (TrainingJob.select(pw.fn.MIN(pw.fn.COALESCE(TrainingJob.not_before, now)))
           .where(TrainingJob.status == QUEUED).scalar())
    if row is None:
        return None
    if isinstance(row, str):  # SQLite returns the COALESCE of a datetime as text
        row = dt.datetime.fromisoformat(row)
    return max(row, now)


# --- explaining the wait -----------------------------------------------------------------------------


def queue_position(job: TrainingJob) -> int:
    """How many ready jobs are ahead of ``job`` (0: it is next). -1 if it is not queued."""
    if job.status != QUEUED:
        return -1
    return (TrainingJob.select()
            .where((TrainingJob.status == QUEUED) & (TrainingJob.id != job.id)
                   & (TrainingJob.not_before.is_null() | (TrainingJob.not_before <= utcnow()))
                   & ((TrainingJob.queued_at < job.queued_at)
                      | ((TrainingJob.queued_at == job.queued_at) & (TrainingJob.id < job.id))))
            .count())


def why_waiting(job: TrainingJob, settings: Settings) -> str:
    """One sentence for the job page: why this job is not running yet (or "" when it is not waiting)."""
    now = utcnow()
    if job.status == QUEUED:
        if job.not_before and job.not_before > now:
            wait = max(1, round((job.not_before - now).total_seconds()))
            after = job.status_reason.split(" after ", 1)[-1] if " after " in job.status_reason else "a failure"
            return f"retrying in {wait} s after {after} (attempt {job.attempt + 1} of {job.max_attempts})"
        limit = settings.max_running_jobs
        mine = running_counts().get(job.user_id, 0)
        if mine >= limit:
            return f"waiting: you already have {mine} job{'s' if mine != 1 else ''} running (the limit is {limit})"
        return workers.waiting_words(int((job.config or {}).get("gpus") or 1), queue_position(job))
    if job.status == INTERRUPTED:
        return f"interrupted ({job.status_reason}); about to be requeued"
    if job.status == PAUSED:
        return f"paused: {job.status_reason}"
    if job.status == PREPARING:
        return "preparing: fetching, tokenizing and checking the data"
    return ""

