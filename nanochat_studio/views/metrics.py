"""``GET /metrics`` (Prometheus text format) and the request timing behind
``ncs_http_request_duration_seconds``.

/metrics sits outside sign-in: it answers a direct request from this machine (``auth.request_is_local``:
a loopback peer that nobody forwarded), or one with ``Authorization: Bearer <metrics_token>``. What it
exports and how to add it up across processes: metrics.py.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Flask, Response, g, request

from .. import auth, metrics
from ..errors import Forbidden
from . import current_settings

bp = Blueprint("metrics", __name__)

UNMATCHED_ROUTE = "unmatched"  # a path no rule matched (a 404): one series, not one per probed path
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # others: "other"


@bp.get("/metrics")
def scrape() -> Any:
    settings = current_settings()
    if not metrics.allowed(request.headers.get("Authorization"), auth.request_is_local(), settings.metrics_token):
        raise Forbidden("Metrics are served to this machine, or with the metrics token as a bearer token "
                        "(NCS_METRICS_TOKEN).", code="metrics_forbidden")
    body, content_type = metrics.exposition()
    return Response(body, status=200, content_type=content_type)


def init_app(app: Flask) -> None:
    """Time every request to its response's headers (a stream's body is not waited for)."""

    @app.before_request
    def _start_timer() -> None:
        g.ncs_started = time.perf_counter()

    @app.after_request
    def _observe(response: Any) -> Any:
        started = g.pop("ncs_started", None)
        if started is not None:
            rule = request.url_rule.rule if request.url_rule is not None else UNMATCHED_ROUTE
            method = request.method if request.method in METHODS else "other"
            metrics.observe_request(rule, method, response.status_code, time.perf_counter() - started)
        return response
