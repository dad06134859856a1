"""How much one client may ask for: sign-in throttling, API rate limits, open streams, password hashing.

- **Sign-in throttling**: failed sign-ins per account (``login_limit_per_account``) and every sign-in,
  sign-up and email-sending attempt per client address (``login_limit_per_address``).
- **API rate limits**: requests to ``/api/`` and ``/v1/`` per user (``api_rate_limit``, all their keys and
  sessions together) and per API key (``api_key_rate_limit``); anonymous requests count per address.
- Beyond a limit: 429 with ``Retry-After`` (seconds), in the caller's error shape (OpenAI's on /v1).
  Counts live in the ``limits`` library's storage (moving windows): Redis when the queue is on Redis,
  so several web processes share them; this process's memory otherwise.
- **Open streams** (job events, chat, OpenAI streams, model downloads): each holds one waitress thread
  for as long as it lasts, so at most ``max_streams_per_user`` per user and ``max_streams`` in all are
  open in this process; the settings size waitress's threads above ``max_streams`` so pages, sign-ins
  and /healthz always find a thread.
- **Password hashing**: at most ``password_hash_concurrency`` at once (accounts.py holds the semaphore).

The client address is the TCP peer, or what the ``trusted_proxy`` says it forwards for (waitress
rewrites it; nothing else is believed).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections import Counter
from typing import Any, Callable

from flask import Flask, current_app, g, make_response, request
from flask_login import current_user
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import MovingWindowRateLimiter

from . import accounts
from .errors import API_PREFIXES, TooManyRequests
from .settings import Settings

log = logging.getLogger(__name__)

EXEMPT_PATHS = ("/healthz", "/static/")


def client_address() -> str:
    return request.remote_addr or "unknown"


def storage_uri(settings: Settings) -> str:
    """Redis when the queue is there (every web process sees the same counts), else memory."""
    return settings.queue_url if settings.queue_url.startswith(("redis://", "rediss://")) else "memory://"


class _MemoryStorage(MemoryStorage):
    """The ``limits`` library's in-memory counts, without a thread per request. After each hit the
    library starts a ``threading.Timer`` (a new thread) to drop expired entries, whenever the previous
    one has finished, i.e. 10 ms on: for most API requests of a busy web process, ~0.4 ms of its CPU each
    (measured on /api/chat). Here the same pass runs in the thread that hits, at most once a second.
    Dropping entries only frees memory: a hit or a test compares the times of the entries it reads."""

    EXPIRE_EVERY = 1.0  # seconds

    def __init__(self, uri: str | None = None, **options: Any) -> None:
        super().__init__(uri, **options)
        self._expiring = threading.Lock()
        self._next_expiry = 0.0

    # The library's private hook, which its hits, increments and decrements call.
    def _MemoryStorage__schedule_expiry(self) -> None:
        now = time.monotonic()
        if now >= self._next_expiry and self._expiring.acquire(blocking=False):
            try:
                self._next_expiry = now + self.EXPIRE_EVERY
                self._MemoryStorage__expire_events()
            finally:
                self._expiring.release()


def _storage(settings: Settings) -> Any:
    uri = storage_uri(settings)
    return _MemoryStorage(uri) if uri == "memory://" else storage_from_string(uri)


class StreamGate:
    """Counts the open streams of this process, per user and in all (a stream holds a thread)."""

    def __init__(self, total: int, per_user: int) -> None:
        self.total, self.per_user = total, per_user
        self._lock = threading.Lock()
        self._by_user: Counter[int] = Counter()

    @property
    def open(self) -> int:
        return sum(self._by_user.values())

    def acquire(self, user_id: int) -> Callable[[], None]:
        """Take a slot for ``user_id``; returns its release (idempotent). Raises TooManyRequests."""
        with self._lock:
            if self._by_user[user_id] >= self.per_user:
                raise TooManyRequests(
                    f"You have {self._by_user[user_id]} streams open (job pages, chats, downloads); the limit "
                    f"is {self.per_user}. Close one and try again.", code="too_many_streams",
                    headers={"Retry-After": "5"})
            if self.open >= self.total:
                raise TooManyRequests("The server has as many streams open as it allows; try again in a "
                                      "moment.", code="server_busy", headers={"Retry-After": "5"})
            self._by_user[user_id] += 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if not released.is_set():
                    released.set()
                    self._by_user[user_id] -= 1
                    if self._by_user[user_id] <= 0:
                        del self._by_user[user_id]

        return release


class Limits:
    """One app's limits: the ``limits`` library's storage and moving-window strategy (used directly:
    flask-limiter around it added three hooks to every request for decorators we do not use), parsed
    limits and the stream gate."""

    def __init__(self, settings: Settings) -> None:
        self.strategy = MovingWindowRateLimiter(_storage(settings))
        self.login_account = parse_many(settings.login_limit_per_account)
        self.login_address = parse_many(settings.login_limit_per_address)
        self.api_user = parse_many(settings.api_rate_limit)
        self.api_key = parse_many(settings.api_key_rate_limit)
        self.streams = StreamGate(settings.max_streams, settings.max_streams_per_user)

    # Fail open when the shared storage is unreachable (Redis down): the queue is down too then, and a
    # sign-in page that answers 500 helps nobody. Logged loudly.
    def _call(self, method: str, item: RateLimitItem, *keys: str) -> bool:
        try:
            return bool(getattr(self.strategy, method)(item, *keys))
        except Exception:
            log.exception("rate-limit storage failed; letting the request through")
            return True

    def _retry_after(self, item: RateLimitItem, *keys: str) -> int:
        try:
            reset = self.strategy.get_window_stats(item, *keys).reset_time
        except Exception:
            return 60
        return max(1, math.ceil(reset - time.time()))

    def hit(self, items: list[RateLimitItem], *keys: str, message: str) -> None:
        """Count one attempt against every limit of ``items``; TooManyRequests if one is used up."""
        for item in items:
            if not self._call("hit", item, *keys):
                raise self._refusal(item, keys, message)

    def test(self, items: list[RateLimitItem], *keys: str, message: str) -> None:
        """Raise TooManyRequests if a limit of ``items`` is used up, counting nothing."""
        for item in items:
            if not self._call("test", item, *keys):
                raise self._refusal(item, keys, message)

    def count(self, items: list[RateLimitItem], *keys: str) -> None:
        """Count one attempt (a failure after the test passed), refusing nothing now."""
        for item in items:
            self._call("hit", item, *keys)

    def _refusal(self, item: RateLimitItem, keys: tuple[str, ...], message: str) -> TooManyRequests:
        wait = self._retry_after(item, *keys)
        log.warning("limit %s reached for %s (%s): refused for %d s", item, keys[0], keys[-1], wait)
        return TooManyRequests(f"{message} Try again in {wait} seconds.", code="rate_limited",
                               headers={"Retry-After": str(wait)})


def current() -> Limits:
    return current_app.extensions["ncs_limits"]


def init_app(app: Flask, settings: Settings) -> None:
    """Install the limits; call after the hooks that open the database (the API check loads the user)."""
    app.extensions["ncs_limits"] = Limits(settings)
    accounts.set_hash_concurrency(settings.password_hash_concurrency)

    @app.before_request
    def _api_rate_limit() -> None:
        if not request.path.startswith(API_PREFIXES) or not current_app.config.get("RATELIMIT_ENABLED", True):
            return
        limits = current()
        who = current_user.id if current_user.is_authenticated else None
        message = "Too many requests."
        if g.get("api_key") is not None:
            limits.hit(limits.api_key, "api-key", str(g.api_key.id), message=message + " (this API key)")
        if who is not None:
            limits.hit(limits.api_user, "api-user", str(who), message=message)
        else:
            limits.hit(limits.api_user, "api-address", client_address(), message=message)


# ------------------------------------------------------------------------------------ sign-in attempts

def _enabled() -> bool:
    return bool(current_app.config.get("RATELIMIT_ENABLED", True))


def attempt_from_address() -> None:
    """Count a sign-in, sign-up or email-sending attempt from this address; 429 past the limit."""
    if _enabled():
        current().hit(current().login_address, "login-address", client_address(),
                      message="Too many attempts from your address.")


def check_account(email: str) -> None:
    """429 when the account ``email`` has used up its failed sign-ins (counts nothing)."""
    if _enabled():
        current().test(current().login_account, "login-account", _account_key(email),
                       message="Too many failed sign-ins to this account.")


def account_failed(email: str) -> None:
    if _enabled():
        current().count(current().login_account, "login-account", _account_key(email))


def _account_key(email: str) -> str:
    try:
        return accounts.normalize_email(email)
    except accounts.AccountError:
        return (email or "").strip().lower()[:320]


# ---------------------------------------------------------------------------------------- streams

def streaming(view: Callable) -> Callable:
    """For views that answer a long stream: take one of the user's stream slots first (429 when none is
    free) and give it back when the response is closed (the stream ended or the client went away)."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        release = current().streams.acquire(current_user.id)
        try:
            response = make_response(view(*args, **kwargs))
        except BaseException:
            release()
            raise
        response.call_on_close(release)
        return response

    return wrapped
