"""Buying credits: Stripe Checkout Sessions and Stripe's webhook, through the real ``stripe`` package
(``stripe_api_base`` points it elsewhere; tests use a loopback fake).

A session is created server-side from the catalogue (``credit_packs``): the browser names a pack, never
an amount; ``client_reference_id`` is the user's id and the metadata carry user, pack and credits (the
credits as sold at the click, whatever the catalogue says later). Each click has its own idempotency key,
so a double submit makes one session.

Fulfilment is idempotent and order-independent: a purchase is keyed by its session id (one top-up
however many events and return-page visits report it), a refund by its refund id, a dispute by its
dispute id. An event about a charge (a refund, a dispute) finds its session from Stripe by payment intent
and fulfils that purchase first, so it does not matter which event arrives first. Credits may go
negative after a refund: they were spent.

Errors: ``BadRequest`` (400) for an unknown pack or a webhook whose signature does not verify (forged,
or older than the 300 s tolerance); ``StripeUnavailable`` (502) when Stripe cannot be reached.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import stripe

from ..errors import AppError, BadRequest, NotFound
from ..models import StripeEvent, User
from ..settings import Settings
from . import ledger
from .events import notify
from .ledger import credits_text, to_micro

log = logging.getLogger(__name__)

TOLERANCE_S = 300
PAID = "paid"
FULFIL_EVENTS = ("checkout.session.completed", "checkout.session.async_payment_succeeded")
NO_MONEY_EVENTS = ("checkout.session.async_payment_failed", "checkout.session.expired")
DISPUTE_LOST = ("charge.dispute.created", "charge.dispute.funds_withdrawn", "charge.dispute.updated")
DISPUTE_WON = ("charge.dispute.funds_reinstated",)


class StripeUnavailable(AppError):
    status, code, title = 502, "stripe_unavailable", "The payment service did not answer"


# --- talking to Stripe -----------------------------------------------------------------------------------

class Gateway:
    """The Stripe calls billing makes, as plain dicts."""

    def __init__(self, settings: Settings):
        if not settings.stripe_secret_key:
            raise NotFound("Buying credits is not set up on this studio.")
        self.client = stripe.StripeClient(settings.stripe_secret_key, max_network_retries=2,
                                          base_addresses={"api": settings.stripe_api_base})

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return fn(*args, **kwargs).to_dict()
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                raise NotFound("Stripe does not know that checkout session.") from None
            raise StripeUnavailable(f"Stripe refused the request: {exc.user_message or exc}") from None
        except stripe.StripeError as exc:
            raise StripeUnavailable(f"Stripe could not be reached: {exc.user_message or type(exc).__name__}") from None

    def create_session(self, params: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        return self._call(self.client.v1.checkout.sessions.create, params=params,
                          options={"idempotency_key": idempotency_key})

    def retrieve_session(self, session_id: str) -> dict[str, Any]:
        return self._call(self.client.v1.checkout.sessions.retrieve, session_id)

    def sessions_for_payment_intent(self, payment_intent: str) -> list[dict[str, Any]]:
        return self._call(self.client.v1.checkout.sessions.list,
                          params={"payment_intent": payment_intent}).get("data", [])

    def refunds_for_charge(self, charge_id: str) -> list[dict[str, Any]]:
        return self._call(self.client.v1.refunds.list, params={"charge": charge_id, "limit": 100}).get("data", [])


_gateways: dict[tuple[str, str], Gateway] = {}
_gateways_lock = threading.Lock()


def gateway(settings: Settings) -> Gateway:
    """One client per key and API base (its HTTP session is reused)."""
    key = (settings.stripe_secret_key, settings.stripe_api_base)
    with _gateways_lock:
        if key not in _gateways:
            _gateways[key] = Gateway(settings)
        return _gateways[key]


# --- checkout -----------------------------------------------------------------------------------------

def pack_by_id(settings: Settings, pack_id: Any) -> dict[str, Any]:
    for pack in settings.credit_packs:
        if pack["id"] == pack_id:
            return pack
    ids = ", ".join(p["id"] for p in settings.credit_packs) or "none"
    raise BadRequest(f"no credit pack {pack_id!r} (packs: {ids})", code="unknown_pack")


def create_checkout(settings: Settings, user: User, pack_id: Any, click_key: str, *, success_url: str,
                    cancel_url: str) -> dict[str, str]:
    """A Checkout Session for ``pack_id`` bought by ``user``: {"session_id", "url"}. ``click_key`` makes a
    repeated click return the same session. Raises BadRequest, Forbidden (unverified), NotFound (buying
    is off), StripeUnavailable."""
    from .policy import for_settings

    policy = for_settings(settings)
    if not policy.can_buy():
        raise NotFound("Buying credits is not set up on this studio.")
    pack = pack_by_id(settings, pack_id)
    policy.require_verified(user, "buy credits")  # type: ignore[attr-defined]  # hosted only can_buy
    micro = to_micro(pack["credits"])
    meta = {"user_id": str(user.id), "pack": pack["id"], "credits": str(micro)}
    item: dict[str, Any] = ({"price": pack["price"], "quantity": 1} if pack.get("price") else
                            {"quantity": 1, "price_data": {"currency": pack["currency"], "unit_amount": pack["amount"],
                                                           "product_data": {"name": f"{credits_text(micro)} credits"}}})
    params = {"mode": "payment", "line_items": [item], "client_reference_id": str(user.id), "metadata": meta,
              "payment_intent_data": {"metadata": meta},
              "success_url": success_url + ("&" if "?" in success_url else "?") + "session_id={CHECKOUT_SESSION_ID}",
              "cancel_url": cancel_url}
    if user.email:
        params["customer_email"] = user.email
    session = gateway(settings).create_session(params, f"ncs-checkout-{user.id}-{click_key}"[:255])
    return {"session_id": session["id"], "url": session["url"]}


def fulfil_session(session: dict[str, Any], *, source: str = "", event_id: str | None = None) -> bool:
    """Credit a paid session's pack to its buyer, once. Returns whether this call credited it."""
    if session.get("payment_status") != PAID:
        return False
    meta = session.get("metadata") or {}
    try:
        user_id, micro = int(meta["user_id"]), int(meta["credits"])
    except (KeyError, TypeError, ValueError):
        log.error("checkout session %s has no user or credits in its metadata; not ours?", session.get("id"))
        return False
    if str(session.get("client_reference_id") or user_id) != str(user_id):
        log.error("checkout session %s: client_reference_id and metadata disagree", session.get("id"))
        return False
    available, _ = ledger.user_accounts(user_id)
    amount, currency = session.get("amount_total") or 0, session.get("currency") or ""
    from .policy import money_text

    txn = ledger.post(f"purchase:{session['id']}", ledger.PURCHASE,
                      [(ledger.system_account(ledger.STRIPE), -micro), (available, micro)], user_id=user_id,
                      description=f"Bought {credits_text(micro)} credits ({meta.get('pack')}, "
                                  f"{money_text(amount, currency) if currency else 'paid'})",
                      meta={"session_id": session["id"], "payment_intent": session.get("payment_intent"),
                            "amount_total": amount, "currency": currency, "pack": meta.get("pack"),
                            "event_id": event_id, "source": source})
    if txn is not None:
        notify("purchase", user_id=user_id, amount=micro, pack=meta.get("pack"), session_id=session["id"])
    return txn is not None


def fulfil_return(settings: Settings, user: User, session_id: str) -> dict[str, Any]:
    """The return page: read the session from Stripe and fulfil it if it is this user's and paid."""
    if not isinstance(session_id, str) or not session_id.startswith("cs_"):
        raise BadRequest("no checkout session in the address")
    session = gateway(settings).retrieve_session(session_id)
    if str(session.get("client_reference_id")) != str(user.id):
        raise NotFound("Stripe does not know that checkout session.")
    fulfil_session(session, source="return page")
    return session


# --- the webhook ----------------------------------------------------------------------------------------

def verify_event(payload: bytes, signature: str | None, secrets: list[str]) -> dict[str, Any]:
    """The event in ``payload`` if ``signature`` (the Stripe-Signature header) carries a v1 signature by
    any of ``secrets`` within the tolerance; else BadRequest."""
    if not signature:
        raise BadRequest("no Stripe-Signature header", code="bad_signature")
    text = payload.decode("utf-8", errors="replace")
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(text, signature, secret, TOLERANCE_S)
        except stripe.SignatureVerificationError:
            continue
        try:
            event = json.loads(text)
        except ValueError:
            raise BadRequest("the event is not JSON", code="bad_event") from None
        if not isinstance(event, dict) or not isinstance(event.get("id"), str):
            raise BadRequest("the event has no id", code="bad_event")
        return event
    raise BadRequest("the signature does not match, or the event is too old", code="bad_signature")


def webhook_secrets(settings: Settings) -> list[str]:
    return [s.strip() for s in settings.stripe_webhook_secret.split(",") if s.strip()]


def handle_event(settings: Settings, event: dict[str, Any]) -> str:
    """Act on a verified event; returns what was done. An event id seen before does nothing."""
    event_id, kind = event["id"], str(event.get("type") or "")
    if StripeEvent.get_or_none(StripeEvent.id == event_id) is not None:
        return "duplicate"
    obj = (event.get("data") or {}).get("object") or {}
    if kind in FULFIL_EVENTS:
        outcome = "credited" if fulfil_session(obj, source=kind, event_id=event_id) else "nothing to credit"
    elif kind in NO_MONEY_EVENTS:
        outcome = "no payment"
    elif kind == "charge.refunded":
        outcome = f"{_apply_refunds(settings, obj)} refund(s) applied"
    elif kind.startswith("charge.dispute."):
        outcome = _apply_dispute(settings, kind, obj)
    else:
        outcome = "ignored"
    StripeEvent.insert(id=event_id, type=kind[:64]).on_conflict_ignore().execute()
    return outcome


def _purchase_of(settings: Settings, payment_intent: str | None) -> dict[str, Any] | None:
    """The paid session behind ``payment_intent``, its purchase fulfilled first (events may come in any
    order), or None when it is not one of ours."""
    if not payment_intent:
        return None
    for session in gateway(settings).sessions_for_payment_intent(payment_intent):
        if session.get("payment_status") == PAID and (session.get("metadata") or {}).get("credits"):
            fulfil_session(session, source="charge event")
            return session
    return None


def _share(session: dict[str, Any], amount: int) -> tuple[int, int]:
    """(user id, micro-credits) that ``amount`` of the session's money bought."""
    meta = session["metadata"]
    total = session.get("amount_total") or 0
    micro = int(meta["credits"]) * amount // total if total else 0
    return int(meta["user_id"]), min(micro, int(meta["credits"]))


def _apply_refunds(settings: Settings, charge: dict[str, Any]) -> int:
    session = _purchase_of(settings, charge.get("payment_intent"))
    if session is None:
        return 0
    refunds = (charge.get("refunds") or {}).get("data")
    if refunds is None:  # newer API versions leave the list out of the charge
        refunds = gateway(settings).refunds_for_charge(charge["id"])
    done = 0
    for refund in refunds:
        if refund.get("status") not in ("succeeded", None):
            continue
        user_id, micro = _share(session, int(refund.get("amount") or 0))
        if micro <= 0:
            continue
        available, _ = ledger.user_accounts(user_id)
        if ledger.post(f"refund:{refund['id']}", ledger.REFUND,
                       [(available, -micro), (ledger.system_account(ledger.STRIPE), micro)], user_id=user_id,
                       description=f"Payment refunded: {credits_text(micro)} credits taken back",
                       meta={"refund_id": refund["id"], "charge": charge.get("id"),
                             "session_id": session["id"]}) is not None:
            done += 1
    return done


def _apply_dispute(settings: Settings, kind: str, dispute: dict[str, Any]) -> str:
    session = _purchase_of(settings, dispute.get("payment_intent"))
    if session is None:
        return "not ours"
    user_id, micro = _share(session, int(dispute.get("amount") or 0))
    available, _ = ledger.user_accounts(user_id)
    stripe_acct = ledger.system_account(ledger.STRIPE)
    meta = {"dispute_id": dispute["id"], "session_id": session["id"]}
    # A dispute takes the credits back until it is won; a win given before its opening is seen still
    # nets to zero, because the debit is always posted first.
    ledger.post(f"dispute:{dispute['id']}", ledger.DISPUTE, [(available, -micro), (stripe_acct, micro)],
                user_id=user_id, meta=meta,
                description=f"Payment disputed: {credits_text(micro)} credits held back while it is open")
    won = kind in DISPUTE_WON or (kind == "charge.dispute.closed" and dispute.get("status") == "won")
    if won:
        ledger.post(f"dispute-won:{dispute['id']}", ledger.DISPUTE_REVERSAL,
                    [(stripe_acct, -micro), (available, micro)], user_id=user_id, meta=meta,
                    description=f"Dispute resolved in your favour: {credits_text(micro)} credits back")
        return "dispute won"
    return "dispute debited"


__all__ = ["Gateway", "StripeUnavailable", "create_checkout", "fulfil_return", "fulfil_session", "gateway",
           "handle_event", "pack_by_id", "verify_event", "webhook_secrets"]
