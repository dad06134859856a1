"""One model server: a ``trainer/serve.py`` subprocess for one checkpoint and the newline-framed JSON
protocol spoken over its Unix socket (ping, stats, generate, cancel).

inference.py's :class:`~nanochat_studio.inference.ModelPool` decides which servers run (loading, LRU and
idle eviction, queue bounds) and starts them through runner.py; this module talks to one of them. It
defines the error type and the final stream item that inference.py re-exports as its public API:
:class:`InferenceError` (``permanent``, HTTP ``status``) and :class:`Final`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import queue
import socket
import struct
import threading
import time
from typing import Any, Iterator

log = logging.getLogger(__name__)


class InferenceError(Exception):
    """Generation failed. ``permanent``: the same request will fail again; ``status``: HTTP status."""

    status = 503

    def __init__(self, message: str, permanent: bool = False, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.permanent = permanent
        if status is not None:
            self.status = status


@dataclasses.dataclass
class Final:
    """The last item of a stream."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None  # request sent -> first text
    elapsed_s: float  # request sent -> done

    @property
    def tokens_per_sec(self) -> float | None:
        # decoding speed after the first token (prefill and queueing are in ttft)
        if self.ttft_s is None or self.completion_tokens < 2 or self.elapsed_s <= self.ttft_s:
            return None
        return (self.completion_tokens - 1) / (self.elapsed_s - self.ttft_s)

    def as_dict(self) -> dict:
        tps = self.tokens_per_sec
        return {
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1000, 1),
            "elapsed_ms": round(self.elapsed_s * 1000, 1),
            "tokens_per_sec": None if tps is None else round(tps, 1),
        }


class Delta(str):
    """Text of a stream (it is a str) carrying what the server sent with it: ``logprobs`` (the entries
    of the tokens behind this text, when the request asked for them) and ``echo`` (this is the echoed
    prompt, not generated text). See trainer/serve.py for the entries' shape."""

    logprobs: list | None
    echo: bool

    def __new__(cls, text: str, logprobs: list | None = None, echo: bool = False) -> "Delta":
        obj = super().__new__(cls, text)
        obj.logprobs, obj.echo = logprobs, echo
        return obj


# --- one server --------------------------------------------------------------------------------------


class ModelServer:
    """One ``trainer/serve.py`` process (started by the pool through runner.py) and its socket. The
    pool owns the fields it mutates under its lock (``in_flight``, ``last_used``) and the start."""

    def __init__(self, key: Any, checkpoint_dir: str, socket_path: str, log_path: str):
        self.key = key
        self.checkpoint_dir = checkpoint_dir
        self.socket_path = socket_path
        self.log_path = log_path
        self.proc: Any = None
        self.in_flight = 0
        self.last_used = time.monotonic()
        self.restarts = 0
        self.ready = False  # answered a ping since it was (re)started
        self.started_at = 0.0
        self.start_lock = threading.Lock()
        self._channel: Channel | None = None
        self._channel_lock = threading.Lock()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 3) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                lines = [ln.strip() for ln in f.readlines()[-n:] if ln.strip()]
            return " | ".join(lines)
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        self.ready = False
        with self._channel_lock:
            chan, self._channel = self._channel, None
        if chan is not None:
            chan.close()
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, 15)
                os.killpg(proc.pid, 18)  # SIGCONT: a stopped (hung) server must be able to act on it
            except (ProcessLookupError, PermissionError):
                proc.terminate()
            try:
                proc.wait(timeout)
            except Exception:
                proc.kill()
                proc.wait(timeout)
        try:
            os.unlink(self.socket_path)
        except OSError:
            pass

    # -- the socket protocol -------------------------------------------------------------------------------
    def connect(self, timeout: float) -> socket.socket:
        """A new connection to the server. Raises InferenceError."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.socket_path)
        except OSError as e:
            s.close()
            raise InferenceError(f"cannot reach the model server: {e}") from e
        return s

    def channel(self, timeout: float) -> "Channel":
        """The connection every generation request of this process shares (opened on first use, again
        after the server restarted or the connection broke). Raises InferenceError."""
        with self._channel_lock:
            if self._channel is None or not self._channel.alive:
                sock = self.connect(timeout)
                sock.settimeout(None)  # the reader thread blocks; sends are bounded by SO_SNDTIMEO
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 10, 0))
                self._channel = Channel(sock, name=f"model-{self.key}-reader")
            return self._channel

    def op(self, msg: dict, timeout: float) -> dict:
        """One request-reply operation (ping, stats) on its own connection. Raises InferenceError."""
        s = self.connect(timeout)
        try:
            s.sendall((json.dumps(msg) + "\n").encode())
            reply = Lines(s).read()
            if not reply:
                raise InferenceError("the model server did not answer")
            return reply
        except OSError as e:
            raise InferenceError(f"the model server did not answer: {e}") from e
        finally:
            s.close()

    def generate(self, chan: "Channel", rid: str, mode: str, payload: Any, sampling: dict, *,
                 poll_s: float, read_timeout: float, heartbeat_s: float) -> Iterator[Any]:
        """Send generation request ``rid`` on ``chan`` (from :meth:`channel`) and yield str deltas (a
        :class:`Delta` when they carry log-probabilities or echo the prompt), None after ``heartbeat_s``
        of silence, then a Final. Keys of ``sampling`` other than the sampling settings (``echo``,
        ``logprobs``) reach the server as they are. Closed early (or failing), it asks the server to
        cancel the request. Raises InferenceError; OSError when the connection fails."""
        done = False
        replies = chan.register(rid)
        try:
            req = {"id": rid, "mode": mode, "sampling": sampling,
                   ("messages" if mode == "chat" else "prompt"): payload}
            t0 = time.monotonic()
            chan.send(req)
            ttft = None
            last_msg = last_yield = time.monotonic()
            pending: collections.deque = collections.deque()
            while True:
                if pending:
                    msg = pending.popleft()
                else:
                    try:
                        msg = replies.get(timeout=poll_s)
                    except queue.Empty:
                        msg = None
                now = time.monotonic()
                if msg is None:
                    if now - last_msg > read_timeout:
                        self.stop()  # hung: the next request starts a fresh one
                        raise InferenceError(f"the model server gave no answer for {read_timeout:.0f} s "
                                             "and was stopped; try again")
                    if now - last_yield >= heartbeat_s:
                        last_yield = now
                        yield None
                    continue
                if msg is False:
                    raise self.crashed()
                last_msg = now
                if "delta" in msg:
                    echo = bool(msg.get("echo"))
                    if ttft is None and not echo:
                        ttft = now - t0
                    text, entries = msg["delta"], msg.get("logprobs")
                    # A reader slower than the model (a busy machine, a slow client) gets what has
                    # piled up as one delta instead of paying per-event costs for each token.
                    while not pending:
                        try:
                            more = replies.get_nowait()
                        except queue.Empty:
                            break
                        if more is not False and "delta" in more and bool(more.get("echo")) == echo:
                            text += more["delta"]
                            if more.get("logprobs") is not None:
                                entries = (entries or []) + more["logprobs"]
                        else:
                            pending.append(more)
                    last_yield = now
                    yield Delta(text, entries, echo) if entries is not None or echo else text
                elif msg.get("done"):
                    done = True
                    yield Final(msg.get("finish_reason") or "stop", int(msg.get("prompt_tokens") or 0),
                                int(msg.get("completion_tokens") or 0), ttft, now - t0)
                    return
                elif "error" in msg:
                    done = True
                    permanent = bool(msg.get("permanent"))
                    raise InferenceError(str(msg["error"]), permanent=permanent, status=400 if permanent else 503)
        finally:
            chan.unregister(rid)
            if not done:  # the caller stopped early (client gone) or we failed: stop generating
                try:
                    chan.send({"cancel": rid})
                except OSError:
                    pass

    def crashed(self) -> InferenceError:
        """The error for a request whose server went away mid-answer (waits briefly for its exit code)."""
        proc = self.proc
        rc = None
        if proc is not None:
            try:
                rc = proc.wait(timeout=1.0)
            except Exception:
                rc = proc.poll()
        what = f"exit code {rc}" if rc is not None else "connection lost"
        log.warning("model server for model %s stopped mid-request (%s)", self.key, what)
        return InferenceError(f"the model server stopped unexpectedly ({what}) while answering; "
                              "it will be restarted on your next request")


class Channel:
    """One connection to a model server shared by many requests: the server's protocol lets a client
    send several requests on one connection, replies carrying their id. A reader thread hands every
    line to the queue of the request it names (unbounded, so the server's sends never wait on a slow
    HTTP client), and False to every queue when the connection ends. A connection per request cost a
    connect and a thread in the server each time (~1-3 ms of a request's first token on a busy CPU)."""

    def __init__(self, sock: socket.socket, name: str = "model-reader"):
        self.sock = sock
        self.alive = True
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._queues: dict[str, queue.SimpleQueue] = {}
        threading.Thread(target=self._read, name=name, daemon=True).start()

    def register(self, rid: str) -> queue.SimpleQueue:
        q: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            self._queues[rid] = q
            if not self.alive:
                q.put(False)
        return q

    def unregister(self, rid: str) -> None:
        with self._lock:
            self._queues.pop(rid, None)

    def send(self, msg: dict) -> None:
        """Raises OSError when the connection is gone."""
        data = (json.dumps(msg) + "\n").encode()
        with self._send_lock:
            if not self.alive:
                raise OSError("the connection to the model server is closed")
            self.sock.sendall(data)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader, which ends the queues
        except OSError:
            pass

    def _read(self) -> None:
        lines = Lines(self.sock)
        try:
            while True:
                msg = lines.read()
                if msg is False or msg is None:
                    return
                with self._lock:
                    q = self._queues.get(msg.get("id"))
                if q is not None:  # (replies to a request that was given up are dropped)
                    q.put(msg)
        except ValueError:  # a line that is not JSON: the stream cannot be trusted any more
            log.warning("model server sent a line that is not JSON; closing the connection")
        finally:
            with self._lock:
                self.alive = False
                for q in self._queues.values():
                    q.put(False)
            try:
                self.sock.close()
            except OSError:
                pass


class Lines:
    """Newline-framed JSON over a socket, with a short poll so waits can be interleaved with checks."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def read(self) -> dict | None | bool:
        """A message; None on timeout; False at end of stream (the server closed or crashed)."""
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            except OSError:
                return False
            if not chunk:
                return False
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def ready(self) -> list[dict]:
        """Messages that have already arrived, without waiting for more."""
        # Non-blocking for real: on a socket with a timeout CPython polls for up to that timeout before
        # recv, MSG_DONTWAIT or not, so this would wait for the next message (a token late on every
        # delta) or, when none is coming (the last delta and "done" arrived together), the whole timeout.
        timeout = self.sock.gettimeout()
        self.sock.settimeout(0.0)
        try:
            while True:
                chunk = self.sock.recv(65536)
                self.buf += chunk
                if len(chunk) < 65536:  # drained (or b"" at end of stream: read() reports that)
                    break
        except OSError:  # BlockingIOError: nothing waiting; anything worse surfaces in read()
            pass
        finally:
            self.sock.settimeout(timeout)
        out = []
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            out.append(json.loads(line))
        return out
