"""waitress as `serve` runs it (webserver.py): its main loop leaves a connection alone while a request
thread is sending on it, and streamed output still arrives whole, in order and without delay."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from waitress.adjustments import Adjustments

from nanochat_studio.webserver import QuietChannel, create_server


def channel(**state) -> QuietChannel:
    """A QuietChannel's state without a socket (writable() reads nothing else)."""
    ch = QuietChannel.__new__(QuietChannel)
    ch.adj, ch.outbuf_lock = Adjustments(), threading.Condition()
    ch.will_close = ch.close_when_flushed = False
    ch.total_outbufs_len = 0
    for name, value in state.items():
        setattr(ch, name, value)
    return ch


def held_elsewhere(ch: QuietChannel):
    """Hold ch's output lock in another thread (a request thread inside write_soon) until released."""
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with ch.outbuf_lock:
            taken.set()
            release.wait(5)

    threading.Thread(target=hold, daemon=True).start()
    assert taken.wait(5)
    return release


def test_a_connection_is_writable_when_output_waits_and_no_request_thread_is_sending():
    assert not channel().writable()
    assert channel(total_outbufs_len=10).writable()
    assert channel(will_close=True).writable() and channel(close_when_flushed=True).writable()


def test_the_loop_leaves_a_connection_alone_while_a_request_thread_sends_on_it():
    ch = channel(total_outbufs_len=10)
    release = held_elsewhere(ch)
    try:
        assert not ch.writable()
        ch.close_when_flushed = True  # closing needs the loop whoever holds the lock
        assert ch.writable()
        ch.close_when_flushed = False
        ch.total_outbufs_len = ch.adj.outbuf_high_watermark + 1  # the thread waits for the loop to drain
        assert ch.writable()
        ch.total_outbufs_len = 10
        ch.adj = Adjustments()
        ch.adj.send_bytes = 18000  # (deprecated in waitress) write_soon would leave 10 bytes unsent, the loop asleep
        assert ch.writable()
    finally:
        release.set()
    with ch.outbuf_lock:  # the loop's own thread holding it: writable as before
        assert ch.writable()


def stream_app(chunks: list[bytes], pause: float):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream")])

        def body():
            for chunk in chunks:
                yield chunk
                time.sleep(pause)

        return body()

    return app


def serve(app):
    server = create_server(app, host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    return server


def read_response(port: int, on_chunk=None) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
            if on_chunk:
                on_chunk(data)
    return data


def test_create_server_makes_quiet_channels():
    server = serve(stream_app([b"x"], 0))
    try:
        assert read_response(server.effective_port).endswith(b"0\r\n\r\n")
        assert all(getattr(s, "channel_class", QuietChannel) is QuietChannel for s in server._map.values())
    finally:
        server.close()


def test_streamed_chunks_arrive_in_order_and_each_soon_after_it_is_written():
    """An SSE-like stream: a lost wake-up would hold a chunk until the loop's 1 s select timeout."""
    chunks = [f"event {i}\n".encode() for i in range(40)]
    server = serve(stream_app(chunks, 0.02))
    seen: list[tuple[float, int]] = []
    try:
        body = read_response(server.effective_port, lambda data: seen.append((time.monotonic(), len(data))))
    finally:
        server.close()
    text = body.split(b"\r\n\r\n", 1)[1]
    assert all(c in text for c in chunks) and text.index(chunks[0]) < text.index(chunks[-1])
    gaps = [b[0] - a[0] for a, b in zip(seen, seen[1:])]
    assert max(gaps) < 0.5, max(gaps)


@pytest.mark.parametrize("pause", [0, 0.001])
def test_a_body_past_the_high_watermark_reaches_a_slow_reader_whole(pause):
    """Past outbuf_high_watermark (16 MiB) the request thread waits for the loop to drain the output."""
    block = bytes(range(256)) * 4096  # 1 MiB
    server = serve(stream_app([block] * 24, pause))
    try:
        with socket.create_connection(("127.0.0.1", server.effective_port), timeout=30) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 14)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            time.sleep(0.5)  # let the output pile up past the watermark
            start, received = time.monotonic(), 0
            while chunk := sock.recv(1 << 16):
                received += len(chunk)
            elapsed = time.monotonic() - start
    finally:
        server.close()
    assert received > 24 * len(block)
    assert elapsed < 20
