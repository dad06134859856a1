"""Server-Sent Events: formatting, heartbeats, Last-Event-ID, and a response that streams them.

Rules every stream here follows (STYLE habit 11): headers go out before the first event; a generator
never touches the session (read what it needs before it starts); a comment line every
``HEARTBEAT_S`` keeps proxies from closing an idle stream and lets waitress notice a client that went
away at the next write; events carry ids so a reconnecting browser resumes from ``Last-Event-ID``; the
final event is always last.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterable, Iterator

from flask import Response, request

HEARTBEAT_S = 15.0
RETRY_MS = 2000  # how long a browser waits before reconnecting


def format_event(data: Any, event: str | None = None, id: int | str | None = None) -> str:
    """One SSE frame; ``data`` that is not a str is sent as compact JSON (never containing newlines)."""
    lines = []
    if id is not None:
        lines.append(f"id: {id}")
    if event:
        lines.append(f"event: {event}")
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False,
                                                         default=str)
    lines.extend(f"data: {part}" for part in text.split("\n"))
    return "\n".join(lines) + "\n\n"


def heartbeat() -> str:
    return ": keep-alive\n\n"


def last_event_id() -> int:
    """The id to resume after: the Last-Event-ID header (browser reconnects) or ``?since=`` (first load);
    0 when neither is given. BadRequest (400) for anything but a non-negative 64-bit integer."""
    from .inputs import event_id

    return event_id(request.headers.get("Last-Event-ID") or request.args.get("since"))


def with_heartbeats(frames: Callable[[], Iterable[str]], poll: Callable[[], Iterable[str] | None],
                    *, interval: float = 0.5, heartbeat_s: float = HEARTBEAT_S,
                    clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep
                    ) -> Iterator[str]:
    """Yield ``frames()`` once, then poll every ``interval`` s; ``poll`` returns frames, or None to end.

    A heartbeat comment goes out whenever ``heartbeat_s`` passed without a frame.
    """
    last = clock()
    for frame in frames():
        last = clock()
        yield frame
    while True:
        got = poll()
        if got is None:
            return
        sent = False
        for frame in got:
            sent = True
            yield frame
        now = clock()
        if sent:
            last = now
        elif now - last >= heartbeat_s:
            last = now
            yield heartbeat()
        sleep(interval)


def response(stream: Iterable[str]) -> Response:
    """A streaming text/event-stream response; the proxy and cache headers keep events flowing."""
    def body() -> Iterator[bytes]:
        yield f"retry: {RETRY_MS}\n\n".encode()  # a frame without data dispatches no event
        for frame in stream:
            yield frame.encode("utf-8")

    resp = Response(body(), mimetype="text/event-stream")
    resp.headers["Cache-Control"] = "no-cache, no-transform"
    resp.headers["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    return resp
