"""A small fake of Stripe on loopback, speaking the parts of its HTTP API that billing uses, so the app
talks to it through the real ``stripe`` package (``stripe_api_base``) and never knows.

API: ``POST /v1/checkout/sessions`` (form-encoded like Stripe's, ``Idempotency-Key`` honoured: the same
key and body answer the same session, a different body 400), ``GET /v1/checkout/sessions/{id}``,
``GET /v1/checkout/sessions?payment_intent=``, ``GET /v1/refunds?charge=``, ``GET /v1/events[/{id}]``;
a bearer secret key is required. A hosted Checkout page at ``/pay/{id}`` whose Pay button completes the
payment, delivers ``checkout.session.completed`` to ``webhook_url`` signed with ``webhook_secret`` (as
Stripe signs: ``t=<unix>,v1=<hex HMAC-SHA256 of "t.body">``), and redirects to the session's
``success_url``; Cancel goes to ``cancel_url``.

Test helpers build what Stripe would send: :meth:`FakeStripe.complete`, :meth:`refund`,
:meth:`dispute`, :meth:`event`, :meth:`sign` and :meth:`deliver`.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import re
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import requests

SECRET_KEY = "sk_test_fake_0123456789"
WEBHOOK_SECRET = "whsec_test_fake_0123456789"


def decode_form(body: str) -> dict[str, Any]:
    """Stripe's form encoding (``a[b][0][c]=v``) back into nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in parse_qsl(body, keep_blank_values=True):
        parts = re.findall(r"[^\[\]]+", key)
        node: Any = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nxt = None if last else parts[i + 1]
            if isinstance(node, list):
                idx = int(part)
                while len(node) <= idx:
                    node.append(None)
                if last:
                    node[idx] = value
                else:
                    if node[idx] is None:
                        node[idx] = [] if nxt.isdigit() else {}
                    node = node[idx]
            else:
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, [] if nxt.isdigit() else {})
    return root


def _id(prefix: str) -> str:
    return f"{prefix}_test_{secrets.token_hex(10)}"


class FakeStripe:
    def __init__(self, webhook_url: str | None = None, *, secret_key: str = SECRET_KEY,
                 webhook_secret: str = WEBHOOK_SECRET):
        self.secret_key, self.webhook_secret, self.webhook_url = secret_key, webhook_secret, webhook_url
        self.lock = threading.RLock()
        self.sessions: dict[str, dict] = {}
        self.charges: dict[str, dict] = {}
        self.events: list[dict] = []
        self.idempotent: dict[str, tuple[str, int, dict]] = {}
        self.prices: dict[str, dict] = {}  # price id -> {"unit_amount", "currency"}
        self.requests: list[tuple[str, str]] = []
        self.deliveries: list[int] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._serve(self, "GET")

            def do_POST(self) -> None:
                fake._serve(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-stripe", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- HTTP -------------------------------------------------------------------------------------------

    def _serve(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length).decode() if length else ""
        parts = urlsplit(h.path)
        query = dict(parse_qsl(parts.query))
        path = parts.path
        with self.lock:
            self.requests.append((method, path))
        if path.startswith("/pay/"):
            return self._pay_page(h, method, path.split("/")[2], decode_form(body))
        if h.headers.get("Authorization") != f"Bearer {self.secret_key}":
            return self._json(h, 401, self._error("Invalid API Key provided", "authentication_error"))
        if method == "POST" and path == "/v1/checkout/sessions":
            key = h.headers.get("Idempotency-Key")
            with self.lock:
                if key and key in self.idempotent:
                    seen_body, status, answer = self.idempotent[key]
                    if seen_body != body:
                        return self._json(h, 400, self._error(
                            "Keys for idempotent requests can only be used with the same parameters they were "
                            "first used with.", "idempotency_error"))
                    return self._json(h, status, answer)
                status, answer = self._create_session(decode_form(body))
                if key:
                    self.idempotent[key] = (body, status, answer)
            return self._json(h, status, answer)
        if method == "GET" and path == "/v1/checkout/sessions":
            pi = query.get("payment_intent")
            data = [s for s in self.sessions.values() if not pi or s["payment_intent"] == pi]
            return self._json(h, 200, self._list(data, path))
        m = re.fullmatch(r"/v1/checkout/sessions/([\w]+)", path)
        if method == "GET" and m:
            session = self.sessions.get(m.group(1))
            if session is None:
                return self._json(h, 404, self._error(f"No such checkout.session: '{m.group(1)}'",
                                                      "invalid_request_error", "resource_missing"))
            return self._json(h, 200, session)
        if method == "GET" and path == "/v1/refunds":
            charge = self.charges.get(query.get("charge", ""))
            return self._json(h, 200, self._list(charge["refunds"]["data"] if charge else [], path))
        if method == "GET" and path == "/v1/events":
            return self._json(h, 200, self._list(list(reversed(self.events)), path))
        m = re.fullmatch(r"/v1/events/([\w]+)", path)
        if method == "GET" and m:
            found = [e for e in self.events if e["id"] == m.group(1)]
            if not found:
                return self._json(h, 404, self._error("No such event", "invalid_request_error", "resource_missing"))
            return self._json(h, 200, found[0])
        return self._json(h, 404, self._error(f"Unrecognized request URL ({method}: {path})", "invalid_request_error"))

    @staticmethod
    def _error(message: str, kind: str, code: str | None = None) -> dict:
        return {"error": {"message": message, "type": kind, **({"code": code} if code else {})}}

    @staticmethod
    def _list(data: list, url: str) -> dict:
        return {"object": "list", "data": data, "has_more": False, "url": url}

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, status: int, body: dict) -> None:
        raw = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        h.send_header("Request-Id", _id("req"))
        h.end_headers()
        h.wfile.write(raw)

    def _create_session(self, params: dict) -> tuple[int, dict]:
        items = params.get("line_items") or []
        if params.get("mode") != "payment" or not items:
            return 400, self._error("mode=payment and line_items are required", "invalid_request_error")
        total, currency = 0, None
        for item in items:
            if "price" in item:
                price = self.prices.get(item["price"])
                if price is None:
                    return 400, self._error(f"No such price: '{item['price']}'", "invalid_request_error")
                amount, currency = price["unit_amount"], price["currency"]
            else:
                amount, currency = int(item["price_data"]["unit_amount"]), item["price_data"]["currency"]
            total += amount * int(item.get("quantity") or 1)
        sid = _id("cs")
        session = {"id": sid, "object": "checkout.session", "mode": "payment", "status": "open",
                   "payment_status": "unpaid", "amount_total": total, "currency": currency,
                   "client_reference_id": params.get("client_reference_id"), "metadata": params.get("metadata") or {},
                   "customer_email": params.get("customer_email"), "payment_intent": None,
                   "success_url": params.get("success_url"), "cancel_url": params.get("cancel_url"),
                   "url": f"{self.url}/pay/{sid}", "created": int(time.time()), "livemode": False}
        self.sessions[sid] = session
        return 200, session

    def _pay_page(self, h: BaseHTTPRequestHandler, method: str, sid: str, form: dict) -> None:
        session = self.sessions.get(sid)
        if session is None:
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if method == "POST":
            if form.get("action") == "cancel":
                target = session["cancel_url"]
            else:
                event = self.complete(sid)
                if self.webhook_url:
                    self.deliver(event)
                target = session["success_url"].replace("{CHECKOUT_SESSION_ID}", sid)
            h.send_response(303)
            h.send_header("Location", target)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        amount = f"{session['amount_total'] / 100:.2f} {str(session['currency']).upper()}"
        page = (f"<!doctype html><title>Fake Checkout</title><h1>Pay {html.escape(amount)}</h1>"
                f"<form method=post><button id=pay name=action value=pay>Pay</button>"
                f"<button id=cancel name=action value=cancel>Cancel</button></form>").encode()
        h.send_response(200)
        h.send_header("Content-Type", "text/html; charset=utf-8")
        h.send_header("Content-Length", str(len(page)))
        h.end_headers()
        h.wfile.write(page)

    # --- what Stripe would send ------------------------------------------------------------------------

    def event(self, kind: str, obj: dict, *, event_id: str | None = None) -> dict:
        ev = {"id": event_id or _id("evt"), "object": "event", "type": kind, "api_version": "2025-01-27.acacia",
              "created": int(time.time()), "livemode": False, "data": {"object": json.loads(json.dumps(obj))}}
        with self.lock:
            self.events.append(ev)
        return ev

    def complete(self, sid: str, *, paid: bool = True) -> dict:
        """The customer paid (``paid=False``: an asynchronous method, still pending). Returns the
        ``checkout.session.completed`` event."""
        with self.lock:
            s = self.sessions[sid]
            if s["payment_intent"] is None:
                pi, ch = _id("pi"), _id("ch")
                s["payment_intent"] = pi
                self.charges[ch] = {"id": ch, "object": "charge", "payment_intent": pi, "amount": s["amount_total"],
                                    "amount_refunded": 0, "currency": s["currency"], "refunded": False,
                                    "refunds": {"object": "list", "data": [], "has_more": False}}
            s["status"] = "complete"
            s["payment_status"] = "paid" if paid else "unpaid"
            return self.event("checkout.session.completed", s)

    def async_succeeded(self, sid: str) -> dict:
        with self.lock:
            self.sessions[sid]["payment_status"] = "paid"
            return self.event("checkout.session.async_payment_succeeded", self.sessions[sid])

    def charge_of(self, sid: str) -> dict:
        pi = self.sessions[sid]["payment_intent"]
        return next(c for c in self.charges.values() if c["payment_intent"] == pi)

    def refund(self, sid: str, amount: int) -> dict:
        """Refund ``amount`` of the session's payment; returns the ``charge.refunded`` event."""
        with self.lock:
            charge = self.charge_of(sid)
            refund = {"id": _id("re"), "object": "refund", "amount": amount, "charge": charge["id"],
                      "payment_intent": charge["payment_intent"], "status": "succeeded"}
            charge["refunds"]["data"].append(refund)
            charge["amount_refunded"] += amount
            charge["refunded"] = charge["amount_refunded"] >= charge["amount"]
            return self.event("charge.refunded", charge)

    def dispute(self, sid: str, amount: int, kind: str = "charge.dispute.created", status: str = "needs_response",
                dispute_id: str | None = None) -> dict:
        with self.lock:
            charge = self.charge_of(sid)
            dispute = {"id": dispute_id or _id("dp"), "object": "dispute", "amount": amount, "charge": charge["id"],
                       "payment_intent": charge["payment_intent"], "status": status, "currency": charge["currency"]}
            return self.event(kind, dispute)

    def sign(self, payload: bytes, *, secret: str | None = None, timestamp: int | None = None) -> str:
        t = int(time.time()) if timestamp is None else timestamp
        mac = hmac.new((secret or self.webhook_secret).encode(), f"{t}.".encode() + payload, hashlib.sha256)
        return f"t={t},v1={mac.hexdigest()}"

    def deliver(self, event: dict, url: str | None = None, *, secret: str | None = None,
                timestamp: int | None = None, session: requests.Session | None = None) -> requests.Response:
        payload = json.dumps(event).encode()
        r = (session or requests).post(url or self.webhook_url, data=payload, timeout=30,
                                       headers={"Content-Type": "application/json",
                                                "Stripe-Signature": self.sign(payload, secret=secret,
                                                                              timestamp=timestamp)})
        with self.lock:
            self.deliveries.append(r.status_code)
        return r
