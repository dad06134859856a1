"""Billing: the only path to money. Prepaid credits in hosted mode, device-hour allowances in lab mode,
nothing at all in solo mode, all on one double-entry ledger (ledger.py).

:func:`for_settings` answers the mode's policy: :class:`HostedBilling` (prices per device-second,
credit packs sold through Stripe Checkout, verified email required), :class:`LabBilling` (an admin's
monthly device-hour allowance; users without one are not limited) or the null :class:`Billing`, which
prices nothing and holds nothing. A policy quotes a plan (``GET /api/estimate``), places a job's hold
inside the transaction that creates it (an atomic check-and-hold: 402 when the credits do not cover it),
and extends the hold when a job paused out of credits is resumed.

What happens to a job once it holds credits does not depend on the mode: metering.py meters each ended
attempt from the job's durable events and settles the job once it is final (:func:`settle_job`, run by
the supervisor after every attempt and by :func:`reconcile` on every tick). Stripe lives in checkout.py.

Observers (events.py): :func:`subscribe` a ``fn(event, **fields)`` to hear, after the fact,
``"purchase"``, ``"hold"``, ``"settlement"``, ``"refused"``, ``"audit_failure"`` and ``"posted"``; the
metrics exporter counts them. Grants, revocations, allowances and refunds of jobs live in grants.py.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .. import jobs, metrics
from ..models import JobBilling, TrainingJob
from . import ledger, metering
from .events import notify, subscribe, unsubscribe
from .grants import grant, on_email_verified, refill_allowance, refund_job, revoke, set_allowance
from .ledger import MICRO, to_credits
from .policy import Billing, HostedBilling, InsufficientCredits, LabBilling, for_settings, money_text

subscribe(metrics.count_billing_event)  # the ncs_credits_* counters hear every money event

log = logging.getLogger(__name__)

AUDIT_EVERY_S = 3600.0


# --- mode-independent services ------------------------------------------------------------------------------

def settle_job(job_id: int) -> bool:
    """Meter job ``job_id``'s ended attempts and settle it once final (see metering.py)."""
    return metering.settle_job(job_id, notify)


def meter_for(job_id: int) -> metering.Meter:
    return metering.meter_for(job_id, notify)


def reconcile() -> list[int]:
    """Meter and settle every job whose settlement is not done (a crash or an outage may have left one
    behind). Returns the ids settled now."""
    settled = []
    for (job_id,) in JobBilling.select(JobBilling.job_id).where(JobBilling.settled_at.is_null()).tuples():
        try:
            if settle_job(job_id):
                settled.append(job_id)
        except Exception:
            log.exception("settling job %s failed; the next tick tries again", job_id)
    return settled


_last_audit = {"t": 0.0}


def periodic() -> None:
    """The worker's tick: settle what is pending; audit the ledger every AUDIT_EVERY_S."""
    reconcile()
    if time.monotonic() - _last_audit["t"] >= AUDIT_EVERY_S:
        _last_audit["t"] = time.monotonic()
        run_audit()


def run_audit() -> list[str]:
    """:func:`ledger.audit`, logged, and an ``audit_failure`` event when anything is wrong."""
    problems = ledger.audit()
    if problems:
        log.error("billing audit found %d problem(s): %s", len(problems), "; ".join(problems))
        notify("audit_failure", problems=problems)
    return problems


def job_summary(job: TrainingJob) -> dict[str, Any] | None:
    """The job JSON's ``billing``: its hold and, once settled, its charge (credits); None if unbilled."""
    jb = JobBilling.get_or_none(JobBilling.job_id == job.id)
    if jb is None:
        return None
    return {"hold": to_credits(ledger.job_hold_total(job.id)), "held_now": to_credits(max(0, ledger.job_held(job.id))),
            "charged": to_credits(ledger.job_charged(job.id)), "settled": jb.settled_at is not None,
            "credits_per_device_second": jb.rate / MICRO, "device": jb.device,
            "out_of_credits": job.status == jobs.PAUSED and job.status_reason.startswith("out of credits")}


__all__ = ["AUDIT_EVERY_S", "Billing", "HostedBilling", "InsufficientCredits", "LabBilling", "MICRO", "for_settings",
           "grant", "job_summary", "ledger", "meter_for", "metering", "money_text", "notify", "on_email_verified",
           "periodic", "reconcile", "refill_allowance", "refund_job", "revoke", "run_audit", "set_allowance",
           "settle_job", "subscribe", "unsubscribe"]
