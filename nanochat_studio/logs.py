"""The process log: text for people or one JSON object per line (``log_format``), with who and what a
line is about.

:func:`configure` installs the root handler once per process. Every record gets ``request_id``,
``user_id`` and ``job_id`` from context variables: :func:`init_app` sets the first two per request (an
incoming ``X-Request-ID`` is honoured when it is a sane token, else one is made, and it is returned on
the response), and :func:`job_context` sets ``job_id`` around the code that runs one job (the
supervisor's thread), so a line logged anywhere below it says which job it was about. A JSON line is
``{"time", "level", "logger", "message"}`` plus those three when known, and ``exc`` for a traceback.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import re
import sys
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Flask, g, request

from .settings import Settings

REQUEST_ID_HEADER = "X-Request-ID"
# Accepted as is from a client or proxy: a bounded token that cannot forge a log line or a header.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(context)s: %(message)s"
# The trainer's stderr lines in the process log (supervisor.py writes them with the job's id).
TRAINER_LOGGER = "nanochat_studio.trainer"

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("ncs_request_id", default=None)
_job_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("ncs_job_id", default=None)
_HANDLER_MARK = "_ncs_handler"


class ContextFilter(logging.Filter):
    """Puts request_id, user_id and job_id on every record (None where unknown)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = _request_id.get()
        if not hasattr(record, "user_id"):
            record.user_id = _current_user_id()
        if getattr(record, "job_id", None) is None:
            record.job_id = _job_id.get()
        parts = [f"{k}={getattr(record, k)}" for k in ("request_id", "user_id", "job_id")
                 if getattr(record, k) is not None]
        record.context = f" [{' '.join(parts)}]" if parts else ""
        return True


def _current_user_id() -> int | None:
    # Only a user flask-login already loaded: logging must never query the database itself.
    try:
        from flask import has_request_context

        if not has_request_context():
            return None
        user = g.get("_login_user")
    except Exception:
        return None
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    return getattr(user, "id", None)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; values that JSON cannot hold become their text."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "user_id", "job_id"):
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["exc"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(settings: Settings, stream: Any = None) -> logging.Handler:
    """Install (or replace) this app's handler on the root logger, in ``settings.log_format`` at
    ``settings.log_level``; other handlers (pytest's, a host's) are left alone. Returns the handler."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    return handler


@contextlib.contextmanager
def job_context(job_id: int) -> Iterator[None]:
    """Every line logged inside (in this thread) carries ``job_id``."""
    token = _job_id.set(job_id)
    try:
        yield
    finally:
        _job_id.reset(token)


def current_request_id() -> str | None:
    return _request_id.get()


def init_app(app: Flask) -> None:
    """A request id for every request: the caller's ``X-Request-ID`` when sane, else a new one;
    logged with every line of the request and returned on the response."""

    @app.before_request
    def _request_identity() -> None:
        incoming = request.headers.get(REQUEST_ID_HEADER, "")
        rid = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        g.ncs_request_id = rid
        g.ncs_request_token = _request_id.set(rid)
        job_id = (request.view_args or {}).get("job_id")
        if isinstance(job_id, int):
            g.ncs_job_token = _job_id.set(job_id)

    @app.after_request
    def _return_request_id(response: Any) -> Any:
        rid = g.get("ncs_request_id")
        if rid:
            response.headers[REQUEST_ID_HEADER] = rid
        return response

    @app.teardown_request
    def _forget_request(exc: BaseException | None) -> None:
        # waitress reuses its threads: the next request must not inherit this one's ids
        for name, var in (("ncs_request_token", _request_id), ("ncs_job_token", _job_id)):
            token = g.pop(name, None)
            if token is not None:
                try:
                    var.reset(token)
                except ValueError:  # set in another context (a streamed response's generator)
                    var.set(None)


class LineRelay:
    """Copies the lines a trainer appends to its log file (its stderr: the job log) into the process log,
    each with the job's id. The trainer writes to the file, never to a pipe of ours, so it survives its
    supervisor; this reads behind it. Call :meth:`pump` often and once more with ``final=True``."""

    MAX_LINE = 4000  # a runaway line (a tensor printed whole) is cut in the process log, not in the job log

    def __init__(self, path: Any, job_id: int, logger: str = TRAINER_LOGGER) -> None:
        self.job_id = job_id
        self.log = logging.getLogger(logger)
        self._fh = open(path, "rb")
        self._fh.seek(0, 2)  # only what this attempt writes
        self._partial = b""

    def pump(self, final: bool = False) -> int:
        """Log every complete line written since the last call (and a last unterminated one when
        ``final``); returns how many."""
        data = self._partial + self._fh.read()
        lines = data.split(b"\n")
        self._partial = b"" if final else lines.pop()
        n = 0
        for raw in lines:
            text = raw.decode("utf-8", "replace").rstrip("\r")
            if text.strip():
                self.log.info("%s", text[:self.MAX_LINE], extra={"job_id": self.job_id})
                n += 1
        return n

    def close(self) -> None:
        self._fh.close()
