"""Billing's observers: who hears, after the fact, what happened to money.

``subscribe(fn)``; ``fn(event, **fields)`` is called with ``"purchase"`` (user_id, amount, pack,
session_id), ``"hold"`` (job_id, user_id, amount), ``"settlement"`` (job_id, user_id, charged, returned,
status), ``"refused"`` (user_id, reason: ``insufficient`` | ``unverified``), ``"audit_failure"``
(problems) and ``"posted"`` (every ledger line a job's metering writes: key, kind, amount). Amounts are
micro-credits. The metrics exporter counts these; tests use them to crash between two steps. An
observer that raises is logged and ignored: it never breaks a payment.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger(__name__)

PURCHASE, HOLD, SETTLEMENT, REFUSED, AUDIT_FAILURE, POSTED = (
    "purchase", "hold", "settlement", "refused", "audit_failure", "posted")

_observers: list[Callable[..., None]] = []


def subscribe(fn: Callable[..., None]) -> Callable[..., None]:
    """Call ``fn(event, **fields)`` on every billing event (see the module doc); returns ``fn``."""
    _observers.append(fn)
    return fn


def unsubscribe(fn: Callable[..., None]) -> None:
    if fn in _observers:
        _observers.remove(fn)


def notify(event: str, **fields: Any) -> None:
    for fn in list(_observers):
        try:
            fn(event, **fields)
        except Exception:  # an observer must never break a payment
            log.exception("billing observer %r failed on %s", fn, event)
