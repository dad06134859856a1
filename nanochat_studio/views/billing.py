"""Credits for the person: the account page (``/account``), buying credits through Stripe Checkout, the
return page, Stripe's webhook, the account API, and resuming a job paused out of credits.

The rules live in ``billing/``; these views turn requests into calls. ``POST /stripe/webhook`` is the
one route without CSRF protection (app.py exempts it): Stripe proves itself with a signature instead.
"""

from __future__ import annotations

import secrets
from typing import Any

from flask import Blueprint, current_app, flash, jsonify, redirect, render_template, request, url_for
from flask_login import current_user

from .. import accounts, tasks
from ..auth import login_required
from ..billing import checkout, ledger
from ..errors import AppError, BadRequest, NotFound
from ..models import ApiKey, TrainingJob
from . import current_billing, current_settings, own

bp = Blueprint("billing", __name__)

PAGE = 25  # ledger lines per page
MAX_LIMIT = 200


def _me() -> Any:
    return current_user._get_current_object()


def _external(endpoint: str, **values: Any) -> str:
    base = current_settings().base_url
    if base:
        return base.rstrip("/") + url_for(endpoint, **values)
    return url_for(endpoint, _external=True, **values)


def line_json(line: dict[str, Any]) -> dict[str, Any]:
    """One ledger line as the person sees it: what it did to their available and held credits."""
    return {"id": line["id"], "kind": line["kind"], "description": line["description"], "job_id": line["job_id"],
            "available": ledger.to_credits(line["available"]), "held": ledger.to_credits(line["held"]),
            "created_at": line["created_at"].isoformat() + "Z"}


def ledger_page(user_id: int) -> tuple[list[dict[str, Any]], int | None]:
    try:
        limit = min(MAX_LIMIT, max(1, int(request.args.get("limit") or PAGE)))
        before = int(request.args["before"]) if request.args.get("before") else None
    except ValueError:
        raise BadRequest("'limit' and 'before' must be whole numbers") from None
    lines = ledger.user_lines(user_id, limit=limit + 1, before=before)
    more = len(lines) > limit
    lines = lines[:limit]
    return lines, (lines[-1]["id"] if more and lines else None)


# --- the account page ------------------------------------------------------------------------------

@bp.get("/account")
@login_required
def account_page() -> Any:
    user = _me()
    policy = current_billing()
    summary = policy.account(user)
    lines, next_before = ledger_page(user.id)
    keys = list(ApiKey.select().where((ApiKey.user == user) & ApiKey.revoked_at.is_null())
                .order_by(ApiKey.created_at.desc()))
    return render_template("account/billing.html", summary=summary, lines=lines, next_before=next_before,
                           keys=keys, policy=policy, click_key=secrets.token_urlsafe(12),
                           verified=accounts.email_verified(user), credits=ledger.credits_text)


@bp.post("/account/credits/checkout")
@login_required
def checkout_form() -> Any:
    """The buy buttons (a form per pack, its hidden click key fresh with every page)."""
    try:
        session = checkout.create_checkout(current_settings(), _me(), request.form.get("pack"),
                                           request.form.get("click") or secrets.token_urlsafe(12),
                                           success_url=_external("billing.checkout_return"),
                                           cancel_url=_external("billing.account_page"))
    except AppError as exc:
        flash(exc.message, "error")
        return redirect(url_for("billing.account_page"))
    return redirect(session["url"], code=303)


@bp.get("/account/credits/return")
@login_required
def checkout_return() -> Any:
    """Where Stripe sends the buyer back: fulfil from the session itself (the webhook may be late)."""
    try:
        session = checkout.fulfil_return(current_settings(), _me(), request.args.get("session_id", ""))
    except AppError as exc:
        flash(exc.message, "error")
        return redirect(url_for("billing.account_page"))
    if session.get("payment_status") == checkout.PAID:
        credits = ledger.credits_text(int((session.get("metadata") or {}).get("credits") or 0))
        flash(f"Thank you: {credits} credits are in your account.", "success")
    else:
        flash("Your payment is being processed; the credits arrive as soon as it clears.", "info")
    return redirect(url_for("billing.account_page"))


# --- the API ---------------------------------------------------------------------------------------

@bp.get("/api/account")
@login_required
def api_account() -> Any:
    user = _me()
    summary = current_billing().account(user)
    if summary is None:  # nothing is metered for this person: zeros, and say so
        micro = ledger.balances(user.id)
        summary = {"mode": "off", "unit": "credits", **{k: ledger.to_credits(v) for k, v in micro.items()},
                   "micro_credits": micro, "packs": [], "can_buy": False}
    summary["email_verified"] = accounts.email_verified(user)
    summary["urls"] = {"transactions": url_for("billing.api_transactions"), "page": url_for("billing.account_page"),
                       "checkout": url_for("billing.api_checkout") if summary.get("can_buy") else None}
    return jsonify(summary)


@bp.get("/api/account/transactions")
@login_required
def api_transactions() -> Any:
    lines, next_before = ledger_page(_me().id)
    return jsonify({"transactions": [line_json(x) for x in lines],
                    "next": url_for("billing.api_transactions", before=next_before) if next_before else None})


@bp.post("/api/credits/checkout")
@login_required
def api_checkout() -> Any:
    """``{"pack": ID}`` -> ``{"session_id", "url"}``. A script may send an Idempotency-Key header (or
    ``idempotency_key``) per purchase, so a retried request does not make a second session."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or "pack" not in body:
        raise BadRequest('send {"pack": ID} as JSON')
    click = request.headers.get("Idempotency-Key") or body.get("idempotency_key") or secrets.token_urlsafe(12)
    if not isinstance(click, str) or len(click) > 100:
        raise BadRequest("the idempotency key must be a string of at most 100 characters")
    return jsonify(checkout.create_checkout(current_settings(), _me(), body["pack"], click,
                                            success_url=_external("billing.checkout_return"),
                                            cancel_url=_external("billing.account_page")))


@bp.post("/stripe/webhook")
def stripe_webhook() -> Any:
    """Stripe's events, verified on the raw body against every configured secret."""
    settings = current_settings()
    secrets_ = checkout.webhook_secrets(settings)
    if not secrets_:
        raise BadRequest("webhooks are not configured (NCS_STRIPE_WEBHOOK_SECRET)", code="webhook_off")
    try:
        event = checkout.verify_event(request.get_data(cache=False), request.headers.get("Stripe-Signature"),
                                      secrets_)
    except AppError as exc:
        current_app.logger.warning("refused a Stripe webhook: %s", exc.message)
        return jsonify({"error": {"code": exc.code, "message": exc.message}}), 400
    outcome = checkout.handle_event(settings, event)
    return jsonify({"received": True, "outcome": outcome})


# --- resuming a job paused out of credits ------------------------------------------------------------

def _resume(job_id: int) -> TrainingJob:
    job = own(TrainingJob, job_id)
    current_billing().resume(job, _me())
    tasks.enqueue_job(job.id, current_settings())
    return TrainingJob.get_by_id(job.id)


@bp.post("/api/jobs/<int:job_id>/resume")
@login_required
def api_resume(job_id: int) -> Any:
    from .api import job_json

    return jsonify(job_json(_resume(job_id), current_settings()))


@bp.post("/jobs/<int:job_id>/resume")
@login_required
def resume_form(job_id: int) -> Any:
    try:
        _resume(job_id)
        flash(f"Job #{job_id} is queued again; it continues from its last checkpoint.", "success")
    except NotFound:
        raise  # another user's job answers like a missing one: 404, not a redirect to its page
    except AppError as exc:
        flash(exc.message, "error")
    return redirect(url_for("jobs.show", job_id=job_id))
