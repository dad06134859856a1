"""Honest charging of a job: what each attempt used, what it captured, and the settlement.

The facts come only from the job's durable events (jobs.py's JobEvents, written by the supervisor from
the trainer's own JSON lines, with the trainer's timestamps), so anyone can settle a job at any time,
again and again, and get the same lines: every line has an idempotency key, a crash between two lines
leaves the rest for the next run (the supervisor when an attempt ends, the reconciler every tick).

Per ended attempt, from its ``start`` event (what came before, data preparation, tokenizer, loading, is
preflight and free):

* completed: the device-seconds to ``done``; cancelled by its owner: to its last event (what was used);
* paused out of credits, or failed for a user's reason: to its last durable checkpoint (captured
  progress; the rest produced nothing the user keeps);
* interrupted (worker death, preemption, a crashed trainer, a lost GPU): everything it used is metered,
  then the work after its last checkpoint is credited back with a line that says why; the next attempt's
  restart overhead (its start until its first step) is credited back too.

A usage line never takes more than the job still holds: the hold is the most a run can cost. When the
job is final, one ``settle`` line returns what is left of the hold.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from typing import Any, Callable

from .. import jobs
from ..models import JobBilling, JobEvent, TrainingJob, utcnow
from . import ledger
from .ledger import CREDIT_BACK, MICRO, REVENUE, SETTLE, USAGE

log = logging.getLogger(__name__)

TRAINER_EVENTS = ("start", "step", "eval", "sample", "checkpoint", "done", "error")
ENDINGS = (jobs.COMPLETED, jobs.FAILED, jobs.CANCELLED, jobs.INTERRUPTED, jobs.PAUSED)
PAUSE_RESERVE_S = 10.0  # device-seconds of hold kept for the checkpoint a paused trainer writes

Notify = Callable[..., None]


@dataclasses.dataclass
class Attempt:
    """What the events say about one attempt (times are the trainer's clock, seconds since the epoch)."""

    number: int
    start_t: float | None = None
    first_step_t: float | None = None
    last_ckpt_t: float | None = None
    done_t: float | None = None
    last_t: float | None = None
    ended: str | None = None  # the state that ended it, None while it runs
    outcome: str | None = None  # interrupted: preempted | infrastructure | lost
    reason: str = ""
    after_interruption: bool = False  # the attempt before it was interrupted (so it restarted)


def _when(ev: JobEvent) -> float:
    t = (ev.data or {}).get("time")
    if isinstance(t, (int, float)):
        return float(t)
    return ev.created_at.replace(tzinfo=dt.timezone.utc).timestamp()


def attempts(job_id: int) -> list[Attempt]:
    """Every attempt of the job that reached the trainer or ended, oldest first."""
    found: dict[int, Attempt] = {}

    def get(n: int) -> Attempt:
        return found.setdefault(n, Attempt(n))

    few = (JobEvent.select().where((JobEvent.job == job_id)
                                   & JobEvent.kind.in_(["state", "start", "checkpoint", "done", "error"]))
           .order_by(JobEvent.seq))
    for ev in few:
        a, data = get(ev.attempt), ev.data or {}
        if ev.kind == "state":
            if a.ended is None and data.get("to") in ENDINGS and ev.attempt > 0:
                a.ended, a.outcome, a.reason = data["to"], data.get("outcome"), data.get("reason", "")
        elif ev.kind == "start":
            a.start_t = _when(ev)
        elif ev.kind == "checkpoint":
            a.last_ckpt_t = _when(ev)
        elif ev.kind == "done":
            a.done_t = _when(ev)
    # Only the first step and the last trainer event of each attempt matter; a long run has thousands.
    import peewee as pw

    bounds = (JobEvent.select(JobEvent.attempt, pw.fn.MIN(JobEvent.seq), pw.fn.MAX(JobEvent.seq))
              .where((JobEvent.job == job_id) & JobEvent.kind.in_(TRAINER_EVENTS))
              .group_by(JobEvent.attempt).tuples())
    last_seqs = {n: hi for n, _, hi in bounds}
    first_steps = dict(JobEvent.select(JobEvent.attempt, pw.fn.MIN(JobEvent.seq))
                       .where((JobEvent.job == job_id) & (JobEvent.kind == "step"))
                       .group_by(JobEvent.attempt).tuples())
    wanted = set(last_seqs.values()) | set(first_steps.values())
    if wanted:
        rows = {ev.seq: ev for ev in JobEvent.select().where((JobEvent.job == job_id) & JobEvent.seq.in_(wanted))}
        for n, seq in last_seqs.items():
            get(n).last_t = _when(rows[seq])
        for n, seq in first_steps.items():
            get(n).first_step_t = _when(rows[seq])
    out = [found[n] for n in sorted(found) if n > 0]
    for prev, cur in zip(out, out[1:]):
        cur.after_interruption = prev.ended == jobs.INTERRUPTED
    return out


def _span(a: Attempt, end: float | None) -> float:
    if a.start_t is None or end is None:
        return 0.0
    return max(0.0, end - a.start_t)


# --- the lines -----------------------------------------------------------------------------------------

def _post_capped(jb: JobBilling, key: str, kind: str, wanted: int, describe: Callable[[int, bool], str],
                 meta: dict[str, Any], notify: Notify) -> None:
    """Post a usage line of at most what the job still holds (held -> revenue), under the user's lock."""
    with ledger.write_transaction():
        available, held = ledger.lock_user(jb.user_id)
        if ledger.exists(key):
            return
        amount = min(wanted, max(0, ledger.job_held(jb.job_id)))
        capped = amount < wanted
        txn = ledger.post(key, kind, [(held, -amount), (ledger.system_account(REVENUE), amount)],
                          user_id=jb.user_id, job_id=jb.job_id, description=describe(amount, capped),
                          meta={**meta, "wanted": wanted, "capped": capped})
    if txn is not None:
        notify("posted", key=key, kind=kind, amount=amount, job_id=jb.job_id, user_id=jb.user_id)


def _credit_back(jb: JobBilling, key: str, usage_key: str, wanted: int, description: str, meta: dict,
                 notify: Notify) -> None:
    """Return ``wanted`` (at most what ``usage_key`` charged) from revenue into the job's hold."""
    if wanted <= 0:
        return
    with ledger.write_transaction():
        ledger.lock_user(jb.user_id)
        if ledger.exists(key):
            return
        charged = _charged_by(usage_key)
        amount = min(wanted, charged)
        if amount <= 0:
            return
        _, held = ledger.user_accounts(jb.user_id)
        txn = ledger.post(key, CREDIT_BACK, [(ledger.system_account(REVENUE), -amount), (held, amount)],
                          user_id=jb.user_id, job_id=jb.job_id, description=description, meta=meta)
    if txn is not None:
        notify("posted", key=key, kind=CREDIT_BACK, amount=amount, job_id=jb.job_id, user_id=jb.user_id)


def _charged_by(key: str) -> int:
    from ..models import LedgerAccount, LedgerPosting, LedgerTransaction

    return int(LedgerPosting.select(LedgerPosting.amount).join(LedgerTransaction).switch(LedgerPosting)
               .join(LedgerAccount).where((LedgerTransaction.key == key)
                                          & (LedgerAccount.name == f"system:{REVENUE}")).scalar() or 0)


def _seconds(x: float) -> str:
    return f"{x:,.1f}"


def meter_attempt(jb: JobBilling, a: Attempt, notify: Notify) -> None:
    """Post the lines of ended attempt ``a`` that are not posted yet."""
    if a.ended is None or a.start_t is None:
        return  # still running, or it never started training (preflight is free)
    gpus = max(1, jb.gpus)
    consumed = _span(a, a.last_t)
    if a.ended == jobs.COMPLETED:
        metered, why = _span(a, a.done_t or a.last_t), "to its finish"
    elif a.ended == jobs.CANCELLED:
        metered, why = consumed, "until it was cancelled"
    elif a.ended == jobs.INTERRUPTED:
        metered, why = consumed, "until it was interrupted"
    else:  # failed for a user's reason, or paused out of credits: captured progress only
        metered = min(consumed, _span(a, a.last_ckpt_t))
        lost = consumed - metered
        why = "covered by its last checkpoint" + (
            f" ({_seconds(lost * gpus)} device-seconds after it were not captured and are not charged)"
            if lost > 0.05 else "")
    device_s = metered * gpus
    label = f"Job #{jb.job_id}, attempt {a.number}"
    usage_key = f"usage:{jb.job_id}:{a.number}"

    def describe(amount: int, capped: bool) -> str:
        text = f"{label}: {_seconds(device_s)} device-seconds on {jb.device} {why}, at {jb.rate / MICRO:g} per second"
        return text + ("; capped at what the job still held" if capped else "")

    _post_capped(jb, usage_key, USAGE, ledger.cost_micro(device_s, jb.rate), describe,
                 {"attempt": a.number, "device_seconds": round(device_s, 3), "ended": a.ended}, notify)
    if a.ended == jobs.INTERRUPTED:
        lost_s = max(0.0, consumed - _span(a, a.last_ckpt_t)) * gpus
        _credit_back(jb, f"lost:{jb.job_id}:{a.number}", usage_key, ledger.cost_micro(lost_s, jb.rate),
                     f"{label} was interrupted ({a.reason or a.outcome}): the {_seconds(lost_s)} device-seconds "
                     "after its last checkpoint were lost, and are credited back",
                     {"attempt": a.number, "device_seconds": round(lost_s, 3), "why": "lost_work"}, notify)
    if a.after_interruption and a.first_step_t is not None:
        overhead_s = _span(a, a.first_step_t) * gpus
        _credit_back(jb, f"overhead:{jb.job_id}:{a.number}", usage_key, ledger.cost_micro(overhead_s, jb.rate),
                     f"{label}: restarting after the interruption of attempt {a.number - 1} took "
                     f"{_seconds(overhead_s)} device-seconds before training resumed; credited back",
                     {"attempt": a.number, "device_seconds": round(overhead_s, 3), "why": "restart_overhead"},
                     notify)


def settle_job(job_id: int, notify: Notify) -> bool:
    """Post every missing line of job ``job_id``; once the job is final (or gone), its one settlement.
    Returns whether the job is settled. Safe to run any time, anywhere, concurrently."""
    jb = JobBilling.get_or_none(JobBilling.job_id == job_id)
    if jb is None:
        return False
    if jb.settled_at is not None:
        return True
    job = TrainingJob.get_or_none(TrainingJob.id == job_id)
    for a in attempts(job_id):
        meter_attempt(jb, a, notify)
    if job is not None and job.status not in jobs.FINAL:
        return False
    return _settle(jb, job, notify)


def _settle(jb: JobBilling, job: TrainingJob | None, notify: Notify) -> bool:
    key = f"settle:{jb.job_id}"
    with ledger.write_transaction():
        available, held = ledger.lock_user(jb.user_id)
        if ledger.exists(key):
            return True
        left = max(0, ledger.job_held(jb.job_id))
        charged = ledger.job_charged(jb.job_id)
        seconds = _device_seconds(jb.job_id)
        status = job.status if job is not None else "deleted"
        txn = ledger.post(key, SETTLE, [(held, -left), (available, left)], user_id=jb.user_id, job_id=jb.job_id,
                          description=(f"Job #{jb.job_id} {status}: {ledger.credits_text(charged)} credits charged "
                                       f"for {_seconds(seconds)} device-seconds; "
                                       f"{ledger.credits_text(left)} credits of its hold returned"),
                          meta={"charged": charged, "returned": left, "device_seconds": round(seconds, 3),
                                "status": status})
        JobBilling.update(settled_at=utcnow()).where(JobBilling.job_id == jb.job_id).execute()
        if job is not None:
            TrainingJob.update(cost=charged, gpu_seconds=seconds).where(TrainingJob.id == jb.job_id).execute()
    if txn is not None:
        notify("settlement", job_id=jb.job_id, user_id=jb.user_id, charged=charged, returned=left, status=status)
    return True


def _device_seconds(job_id: int) -> float:
    """Device-seconds metered for the job: its usage lines' seconds less the credited-back ones (a line
    capped at the hold still counts its whole time: this is the run's pace, not its price)."""
    total = 0.0
    for txn in ledger.job_lines(job_id):
        seconds = float((txn.meta or {}).get("device_seconds") or 0.0)
        if txn.kind == USAGE:
            total += seconds
        elif txn.kind == CREDIT_BACK:
            total -= seconds
    return max(0.0, total)


# --- the supervisor's guard -----------------------------------------------------------------------------

class Meter:
    """Tells a supervisor when its running attempt is about to use up the job's hold, so it can stop the
    trainer (which checkpoints) and pause the job as out of credits."""

    def __init__(self, job_id: int, rate: float, gpus: int, remaining: int):
        self.job_id, self.rate, self.gpus, self.remaining = job_id, rate, max(1, gpus), remaining
        self.start_t: float | None = None
        budget_s = remaining / (rate * self.gpus) if rate > 0 else float("inf")
        # Keep enough for the checkpoint the stopped trainer writes, but never most of a small hold.
        self.reserve_s = min(PAUSE_RESERVE_S, 0.1 * budget_s)
        self.budget_s = budget_s

    def started(self, t: Any) -> None:
        self.start_t = float(t) if isinstance(t, (int, float)) else time.time()

    def should_pause(self, now: float | None = None) -> bool:
        if self.start_t is None or self.rate <= 0:
            return False
        used_s = ((now or time.time()) - self.start_t)
        return used_s >= self.budget_s - self.reserve_s

    def pause_reason(self) -> str:
        return (f"out of credits: the {ledger.credits_text(self.remaining)} credits held for this job are used "
                "up; buy credits, then resume it (it continues from its last checkpoint)")


class NullMeter(Meter):
    def __init__(self) -> None:
        super().__init__(0, 0.0, 1, 0)

    def should_pause(self, now: float | None = None) -> bool:
        return False


def meter_for(job_id: int, notify: Notify) -> Meter:
    """The guard for the attempt about to run (earlier attempts are metered first, so what remains of
    the hold is known); a NullMeter for a job that is not billed."""
    jb = JobBilling.get_or_none(JobBilling.job_id == job_id)
    if jb is None or jb.settled_at is not None:
        return NullMeter()
    for a in attempts(job_id):
        meter_attempt(jb, a, notify)
    return Meter(job_id, jb.rate, jb.gpus, max(0, ledger.job_held(job_id)))


__all__ = ["Attempt", "Meter", "NullMeter", "attempts", "meter_attempt", "meter_for", "settle_job"]
