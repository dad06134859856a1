"""Credits given by people rather than bought: an admin's grant or revocation, the sign-up credits of a
verified account, a lab user's monthly allowance, an admin's refund of a job. Each is one ledger line
with the reason the person reads. Errors: ``BadRequest`` (no reason, a bad amount, revoking more than is
available), ``NotFound`` / ``Conflict`` (refunding a job that was not billed, not settled, or refunded).
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from typing import Any

from flask import current_app, has_app_context

from ..errors import BadRequest, Conflict, NotFound
from ..models import DeviceAllowance, JobBilling, User, utcnow
from ..settings import Settings
from . import ledger
from .ledger import credits_text, to_micro


# --- lab allowances --------------------------------------------------------------------------------------

def _month(now: dt.datetime | None = None) -> str:
    return (now or utcnow()).strftime("%Y-%m")


def refill_allowance(user_id: int, now: dt.datetime | None = None) -> None:
    """Once a month (lazily, at the user's first billing action), reset the user's available device-hours
    to their allowance: what is left of last month's lapses."""
    row = DeviceAllowance.get_or_none(DeviceAllowance.user_id == user_id)
    month = _month(now)
    key = f"allowance:{user_id}:{month}"
    if row is None or ledger.exists(key):
        return
    with ledger.write_transaction():
        available, _ = ledger.lock_user(user_id)
        delta = to_micro(row.hours) - available.balance
        ledger.post(key, ledger.ALLOWANCE, [(ledger.system_account(ledger.ALLOWANCES), -delta), (available, delta)],
                    user_id=user_id, description=f"Allowance for {month}: {row.hours:g} device-hours "
                                                 "(what was left of last month lapses)",
                    meta={"hours": row.hours, "month": month})


def set_allowance(user: User, hours: float | None, by: User | None = None) -> None:
    """Give ``user`` a monthly allowance of ``hours`` device-hours (None: no quota). A change within the
    month adjusts this month's available hours by the difference."""
    if hours is not None and (not math.isfinite(hours) or hours < 0):
        raise BadRequest("the allowance must be a number of hours, 0 or more")
    with ledger.write_transaction():
        old = DeviceAllowance.get_or_none(DeviceAllowance.user_id == user.id)
        if hours is None:
            DeviceAllowance.delete().where(DeviceAllowance.user_id == user.id).execute()
            return
        DeviceAllowance.insert(user_id=user.id, hours=hours, set_by=by.id if by else None, updated_at=utcnow()) \
            .on_conflict(conflict_target=[DeviceAllowance.user_id],
                         update={DeviceAllowance.hours: hours, DeviceAllowance.updated_at: utcnow()}).execute()
        if old is not None and ledger.exists(f"allowance:{user.id}:{_month()}"):
            delta = to_micro(hours) - to_micro(old.hours)
            if delta:
                available, _ = ledger.lock_user(user.id)
                ledger.post(f"allowance-change:{uuid.uuid4().hex}", ledger.ALLOWANCE,
                            [(ledger.system_account(ledger.ALLOWANCES), -delta), (available, delta)],
                            user_id=user.id, description=f"Allowance changed from {old.hours:g} to {hours:g} "
                                                         f"device-hours{_by(by)}", meta={"by": by.id if by else None})


def _by(admin: User | None) -> str:
    return f" by {admin.email or admin.name}" if admin is not None else ""


def grant(user: User, credits: Any, reason: str, by: User | None = None) -> Any:
    """Give ``user`` credits (an admin's grant). BadRequest without a reason or a positive amount."""
    micro = _amount(credits)
    if not (reason or "").strip():
        raise BadRequest("say why (--reason): it is the ledger line the person reads")
    available, _ = ledger.user_accounts(user.id)
    return ledger.post(f"grant:{uuid.uuid4().hex}", ledger.GRANT,
                       [(ledger.system_account(ledger.GRANTS), -micro), (available, micro)], user_id=user.id,
                       description=f"Granted{_by(by)}: {reason.strip()}", meta={"by": by.id if by else None})


def revoke(user: User, credits: Any, reason: str, by: User | None = None) -> Any:
    """Take back up to the user's available credits. BadRequest beyond them or without a reason."""
    micro = _amount(credits)
    if not (reason or "").strip():
        raise BadRequest("say why (--reason): it is the ledger line the person reads")
    with ledger.write_transaction():
        available, _ = ledger.lock_user(user.id)
        if micro > available.balance:
            raise BadRequest(f"{user.email or user.name} has only {credits_text(available.balance)} credits available")
        return ledger.post(f"revoke:{uuid.uuid4().hex}", ledger.REVOKE,
                           [(available, -micro), (ledger.system_account(ledger.GRANTS), micro)], user_id=user.id,
                           description=f"Revoked{_by(by)}: {reason.strip()}", meta={"by": by.id if by else None})


def refund_job(job_id: int, reason: str, by: User | None = None) -> int:
    """Give back what a settled job was charged (an admin's decision); once per job. Returns the amount."""
    jb = JobBilling.get_or_none(JobBilling.job_id == job_id)
    if jb is None:
        raise NotFound(f"job {job_id} was not billed")
    if jb.settled_at is None:
        raise Conflict(f"job {job_id} is not settled yet; refund it once it has ended")
    with ledger.write_transaction():
        available, _ = ledger.lock_user(jb.user_id)
        charged = ledger.job_charged(job_id)
        if ledger.exists(f"jobrefund:{job_id}"):
            raise Conflict(f"job {job_id} was refunded already")
        if charged <= 0:
            raise Conflict(f"job {job_id} cost nothing")
        ledger.post(f"jobrefund:{job_id}", ledger.JOB_REFUND,
                    [(ledger.system_account(ledger.REVENUE), -charged), (available, charged)], user_id=jb.user_id,
                    job_id=job_id, description=f"Job #{job_id} refunded{_by(by)}: {(reason or '').strip() or 'no reason given'}",
                    meta={"by": by.id if by else None})
    return charged


def _amount(credits: Any) -> int:
    try:
        micro = to_micro(credits)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if micro <= 0:
        raise BadRequest("the number of credits must be above 0")
    return micro


def on_email_verified(user: User, settings: Settings | None = None) -> int:
    """Grant the sign-up credits, once per account (hosted mode; the security branch's verification
    calls this). Returns the micro-credits granted now (0: none, or granted before)."""
    if settings is None:
        if not has_app_context():
            raise RuntimeError("on_email_verified needs settings outside a request")
        settings = current_app.config["NCS_SETTINGS"]
    if settings.mode != "hosted" or settings.signup_credits <= 0:
        return 0
    micro = to_micro(settings.signup_credits)
    available, _ = ledger.user_accounts(user.id)
    txn = ledger.post(f"signup:{user.id}", ledger.SIGNUP,
                      [(ledger.system_account(ledger.GRANTS), -micro), (available, micro)], user_id=user.id,
                      description=f"Welcome: {credits_text(micro)} credits for verifying your email")
    return micro if txn is not None else 0
