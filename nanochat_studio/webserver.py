"""waitress as ``serve`` runs it: ``create_server`` is waitress's, with connections of :class:`QuietChannel`.

waitress's main loop asks each connection whether it is ``writable`` (output is waiting) and selects on
those sockets. A request thread writing a streamed chunk (``write_soon``) holds the connection's output
lock while it appends and sends; the loop, seeing output waiting, selects on the socket, which is
writable at once, fails to take the lock, and goes round again. Each round lets go of the GIL for a
moment and takes it back before the request thread, woken, can: the thread waits for Python's switch
interval (5 ms) while the loop spins. On POST /api/chat that was ~55 rounds and ~0.7 ms of the web
process's CPU per request (measured: webcpu.py, /work/bench/web28).
"""

from __future__ import annotations

from typing import Any

from waitress import create_server as _create_server
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer


class QuietChannel(HTTPChannel):
    """An HTTPChannel whose socket the loop leaves alone while a request thread is sending on it.

    That thread is inside ``write_soon``, which pulls waitress's trigger (waking the loop) whenever it
    leaves output unsent; so the loop loses nothing by not watching. Past the high watermark the thread
    waits for the loop to drain the output, and closing connections need the loop: both are writable
    as before."""

    def writable(self) -> bool:
        if self.will_close or self.close_when_flushed:
            return True
        if self.adj.send_bytes > 1:  # write_soon may leave output under send_bytes without waking the loop
            return bool(self.total_outbufs_len)
        if not self.total_outbufs_len:
            return False
        if self.total_outbufs_len <= self.adj.outbuf_high_watermark:
            if not self.outbuf_lock.acquire(False):  # a request thread is writing: it wakes us if need be
                return False
            self.outbuf_lock.release()
        return True


def create_server(app: Any, **options: Any) -> Any:
    """waitress.create_server(app, **options), every listening socket making QuietChannel connections."""
    socket_map: dict = {}
    server = _create_server(app, map=socket_map, **options)
    for listener in socket_map.values():
        if isinstance(listener, BaseWSGIServer):
            listener.channel_class = QuietChannel
    return server
