"""Credits for administrators: every user's balance, grant or revoke credits with a reason, set a lab
allowance, read any user's ledger, refund a job. The same calls as ``nanochat-studio credits ...``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask_login import current_user

from .. import billing
from ..auth import admin_required
from ..billing import ledger
from ..errors import AppError, NotFound
from ..models import DeviceAllowance, JobBilling, LedgerAccount, LedgerTransaction, TrainingJob, User
from . import current_billing
from .billing import ledger_page

bp = Blueprint("billing_admin", __name__, url_prefix="/account/admin/credits")


def _user(user_id: int) -> User:
    user = User.get_or_none(User.id == user_id)
    if user is None:
        raise NotFound("No such user.")
    return user


@bp.get("/")
@admin_required
def overview() -> Any:
    users = list(User.select().order_by(User.id))
    sums: dict[int, dict[str, int]] = {}
    for uid, kind, bal in (LedgerAccount.select(LedgerAccount.user_id, LedgerAccount.kind, LedgerAccount.balance)
                           .where(LedgerAccount.user_id.is_null(False)).tuples()):
        sums.setdefault(uid, {})[kind] = bal
    allowances = {a.user_id: a.hours for a in DeviceAllowance.select()}
    return render_template("account/billing_admin.html", users=users, sums=sums, allowances=allowances,
                           policy=current_billing(), credits=ledger.credits_text)


@bp.get("/<int:user_id>")
@admin_required
def user_ledger(user_id: int) -> Any:
    user = _user(user_id)
    lines, next_before = ledger_page(user.id)
    billed = {jb.job_id: jb for jb in JobBilling.select().where(JobBilling.user_id == user.id)}
    jobs = list(TrainingJob.select().where(TrainingJob.id.in_(list(billed) or [0])).order_by(TrainingJob.id.desc()))
    refunded = {t.job_id for t in LedgerTransaction.select().where(
        (LedgerTransaction.user_id == user.id) & (LedgerTransaction.kind == ledger.JOB_REFUND))}
    return render_template("account/billing_user.html", user=user, lines=lines, next_before=next_before,
                           balances=ledger.balances(user.id), jobs=jobs, billed=billed, refunded=refunded,
                           allowance=DeviceAllowance.get_or_none(DeviceAllowance.user_id == user.id),
                           policy=current_billing(), credits=ledger.credits_text,
                           charged=lambda job_id: ledger.credits_text(ledger.job_charged(job_id)))


def _act(user_id: int, call: Callable[[], Any], done: Callable[[Any], str]) -> Any:
    """Make a billing ``call`` for the signed-in admin, then go back to the user's ledger page with
    ``done(what the call answered)`` or the reason billing refused (its AppError's message)."""
    try:
        answer = call()
    except AppError as exc:
        flash(exc.message, "error")
    else:
        flash(done(answer), "info")
    return redirect(url_for("billing_admin.user_ledger", user_id=user_id))


@bp.post("/<int:user_id>/grant")
@admin_required
def grant(user_id: int) -> Any:
    user = _user(user_id)
    return _act(user.id, lambda: billing.grant(user, request.form.get("credits", ""), request.form.get("reason", ""),
                                               by=current_user._get_current_object()),
                lambda _: f"Granted {request.form.get('credits')} credits to {user.email or user.name}.")


@bp.post("/<int:user_id>/revoke")
@admin_required
def revoke(user_id: int) -> Any:
    user = _user(user_id)
    return _act(user.id, lambda: billing.revoke(user, request.form.get("credits", ""), request.form.get("reason", ""),
                                                by=current_user._get_current_object()),
                lambda _: f"Revoked {request.form.get('credits')} credits from {user.email or user.name}.")


@bp.post("/<int:user_id>/allowance")
@admin_required
def allowance(user_id: int) -> Any:
    user = _user(user_id)
    raw = (request.form.get("hours") or "").strip()
    try:
        hours = None if raw in ("", "off") else float(raw)
    except ValueError:
        flash(f"The allowance must be a number of hours, or empty for none; got {raw!r}.", "error")
        return redirect(url_for("billing_admin.user_ledger", user_id=user.id))
    return _act(user.id, lambda: billing.set_allowance(user, hours, by=current_user._get_current_object()),
                lambda _: "No quota now." if hours is None else f"Allowance set to {hours:g} device-hours a month.")


@bp.post("/jobs/<int:job_id>/refund")
@admin_required
def refund_job(job_id: int) -> Any:
    jb = JobBilling.get_or_none(JobBilling.job_id == job_id)
    if jb is None:
        raise NotFound(f"Job {job_id} was not billed.")
    return _act(jb.user_id, lambda: billing.refund_job(job_id, request.form.get("reason", ""),
                                                       by=current_user._get_current_object()),
                lambda amount: f"Job #{job_id} refunded: {ledger.credits_text(amount)} credits returned.")
