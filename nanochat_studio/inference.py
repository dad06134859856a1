"""Client of the model-server subprocesses (``trainer/serve.py``); the web process never imports torch.

A :class:`ModelPool` keeps up to ``max_loaded_models`` servers warm, one per model: loaded on first use,
stopped after ``model_idle_seconds`` without requests, and the least recently used idle one stopped when
another model needs the slot. :meth:`ModelPool.stream` yields text deltas, ``None`` while nothing has
arrived for ``heartbeat_s`` (so a caller can keep its connection alive), and a :class:`Final` last.

Errors: one type, :class:`InferenceError`, with ``permanent`` (retrying the same request will not help:
a checkpoint that cannot load, a request the model rejects) and an HTTP ``status``. :class:`TooBusy`
(429) is raised by ``stream`` itself, before anything starts, when more than ``chat_queue_limit``
requests would be waiting for one model, or when open streams over all models would leave fewer than
four of the web server's ``threads`` for everything else (each open stream holds one). A server that crashed is reported as an error to the request it
was serving and restarted by the next one; every wait has a timeout, so nothing hangs.

Closing a stream before its end (the HTTP client went away) cancels the generation in the server.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

MODES = ("chat", "complete")
EXIT_BAD_CHECKPOINT = 3  # trainer/serve.py's exit code for a checkpoint that cannot load


class InferenceError(Exception):
    """Generation failed. ``permanent``: the same request will fail again; ``status``: HTTP status."""

    status = 503

    def __init__(self, message: str, permanent: bool = False, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.permanent = permanent
        if status is not None:
            self.status = status


class TooBusy(InferenceError):
    status = 429

    def __init__(self, message: str):
        super().__init__(message, permanent=False)


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


# --- one server --------------------------------------------------------------------------------------


class _Server:
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


class _Lines:
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
        try:
            while True:
                chunk = self.sock.recv(65536, socket.MSG_DONTWAIT)
                self.buf += chunk
                if len(chunk) < 65536:  # drained (or b"" at end of stream: read() reports that)
                    break
        except OSError:  # BlockingIOError: nothing waiting; anything worse surfaces in read()
            pass
        out = []
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            out.append(json.loads(line))
        return out


class _Stream:
    """The iterator ``stream`` returns. Admission happened already, so a stream closed (or dropped)
    before its first ``next`` must still give its place back."""

    def __init__(self, pool: "ModelPool", srv: _Server, gen: Iterator[Any]):
        self._pool, self._srv, self._gen = pool, srv, gen
        self._started = self._closed = False

    def __iter__(self) -> "_Stream":
        return self

    def __next__(self) -> Any:
        self._started = True
        return next(self._gen)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._started:
            self._pool._release(self._srv)
        self._gen.close()

    def __del__(self) -> None:
        self.close()


# --- the pool ------------------------------------------------------------------------------------------


class ModelPool:
    """Model servers kept warm. Thread-safe; one per web process (see :func:`get_pool`)."""

    def __init__(self, settings: Any = None, *, checkpoint_dir_of: Callable[[Any], str] | None = None,
                 max_loaded: int | None = None, idle_seconds: float | None = None,
                 queue_limit: int | None = None, device: str | None = None, max_active: int = 16,
                 load_timeout: float = 120.0, read_timeout: float = 120.0, heartbeat_s: float = 15.0,
                 poll_s: float = 0.25, start_server: Callable[..., Any] | None = None,
                 max_streams: int | None = None):
        self.settings = settings
        self.max_loaded = int(max_loaded if max_loaded is not None else getattr(settings, "max_loaded_models", 2))
        self.idle_seconds = float(idle_seconds if idle_seconds is not None
                                  else getattr(settings, "model_idle_seconds", 600))
        self.queue_limit = int(queue_limit if queue_limit is not None else getattr(settings, "chat_queue_limit", 16))
        self.device = device or getattr(settings, "inference_device", "auto") or "auto"
        self.max_active = max_active  # decoded round-robin at once by one server; more wait
        # Every open stream holds one waitress thread: keep a few threads free for pages and the API.
        threads = int(getattr(settings, "threads", 0) or 0)
        self.max_streams = max_streams if max_streams is not None else (max(1, threads - 4) if threads else 10**9)
        self.load_timeout, self.read_timeout = load_timeout, read_timeout
        self.heartbeat_s, self.poll_s = heartbeat_s, poll_s
        self._checkpoint_dir_of = checkpoint_dir_of or self._storage_path
        self._start_server = start_server
        self._servers: dict[Any, _Server] = {}
        self._lock = threading.Lock()
        self._dir = tempfile.mkdtemp(prefix="ncs-models-")  # short: Unix socket paths max out near 107 bytes
        self._ids = itertools.count(1)
        self._closed = threading.Event()
        self._reaper: threading.Thread | None = None

    # -- public ----------------------------------------------------------------------------------------
    def stream(self, model_row: Any, mode: str, payload: Any, sampling: dict | None = None) -> Iterator[Any]:
        """Admit a request now (TooBusy past the bound) and return its iterator: str deltas, None while
        waiting, then a Final. Raises InferenceError (also during iteration)."""
        if mode not in MODES:
            raise InferenceError(f"mode must be one of {', '.join(MODES)}", permanent=True, status=400)
        srv = self._admit(model_row)
        return _Stream(self, srv, self._run(srv, model_row, mode, payload, dict(sampling or {})))

    def loaded(self) -> list[Any]:
        """Keys (model ids) of the servers running now, least recently used first."""
        with self._lock:
            return [s.key for s in sorted(self._servers.values(), key=lambda s: s.last_used) if s.alive()]

    def server_stats(self, model_row: Any, timeout: float = 5.0) -> dict:
        """The server's own counters (active, queued, served, cancelled, ...); {} if not running."""
        srv = self._servers.get(model_row.id)
        if srv is None or not srv.alive():
            return {}
        return self._op(srv, {"op": "stats"}, timeout)

    def server_pid(self, model_row: Any) -> int | None:
        srv = self._servers.get(model_row.id)
        return srv.proc.pid if srv is not None and srv.alive() else None

    def evict_idle(self) -> list[Any]:
        """Stop servers idle longer than ``idle_seconds``; returns their keys."""
        now = time.monotonic()
        with self._lock:
            idle = [s for s in self._servers.values()
                    if s.in_flight == 0 and now - s.last_used >= self.idle_seconds]
            for s in idle:
                del self._servers[s.key]
        for s in idle:
            log.info("stopping idle model server for model %s", s.key)
            s.stop()
        return [s.key for s in idle]

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            servers, self._servers = list(self._servers.values()), {}
        for s in servers:
            s.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- admission, loading, eviction --------------------------------------------------------------------
    def _admit(self, model_row: Any) -> _Server:
        key = model_row.id
        evicted: list[_Server] = []
        with self._lock:
            streams = sum(s.in_flight for s in self._servers.values())
            if streams >= self.max_streams:
                raise TooBusy(f"the server is already answering {streams} chats (limit {self.max_streams}); "
                              "try again in a moment")
            srv = self._servers.get(key)
            if srv is None:
                running = [s for s in self._servers.values()]
                while len(running) >= self.max_loaded:
                    idle = sorted((s for s in running if s.in_flight == 0), key=lambda s: s.last_used)
                    if not idle:
                        raise TooBusy(f"all {self.max_loaded} model slots are busy answering other chats; "
                                      "try again in a moment")
                    victim = idle[0]
                    del self._servers[victim.key]
                    running.remove(victim)
                    evicted.append(victim)
                n = next(self._ids)
                srv = _Server(key, "", os.path.join(self._dir, f"m{n}.sock"), os.path.join(self._dir, f"m{n}.log"))
                self._servers[key] = srv
            if srv.in_flight >= self.max_active + self.queue_limit:
                raise TooBusy(f"this model already has {srv.in_flight} requests running or waiting "
                              f"(limit {self.max_active} at once + {self.queue_limit} queued); try again shortly")
            srv.in_flight += 1
            srv.last_used = time.monotonic()
        for v in evicted:  # outside the lock: stopping waits for the process
            log.info("stopping model server for model %s to make room (LRU)", v.key)
            v.stop()
        self._ensure_reaper()
        return srv

    def _release(self, srv: _Server) -> None:
        with self._lock:
            srv.in_flight -= 1
            srv.last_used = time.monotonic()

    def _starting(self, srv: _Server, model_row: Any) -> Iterator[None]:
        """Start the server if it is not running and wait until it answers a ping. A generator: it
        yields None every ``heartbeat_s`` while waiting, so the HTTP stream above it stays alive
        during a long load. Raises InferenceError (permanent when the checkpoint cannot load)."""
        last = time.monotonic()

        def beat() -> bool:
            nonlocal last
            if time.monotonic() - last >= self.heartbeat_s:
                last = time.monotonic()
                return True
            return False

        while not srv.start_lock.acquire(timeout=self.poll_s):  # another request is starting it
            if beat():
                yield None
        try:
            if srv.alive() and srv.ready:
                return
            if not srv.alive():
                if srv.proc is not None:
                    rc = srv.proc.poll()
                    srv.restarts += 1
                    log.warning("model server for model %s had exited (code %s: %s); restarting",
                                srv.key, rc, srv.log_tail(1))
                    srv.stop()
                try:
                    srv.checkpoint_dir = self._checkpoint_dir_of(model_row)
                except Exception as e:
                    raise InferenceError(f"the checkpoint of this model is not available: {e}",
                                         permanent=True) from e
                start = self._start_server or _runner_start
                with open(srv.log_path, "ab") as logf:
                    try:
                        srv.proc = start(srv.checkpoint_dir, srv.socket_path, self.device, self.settings,
                                         stderr=logf, max_active=self.max_active)
                    except OSError as e:
                        raise InferenceError(f"cannot start the model server: {e}", permanent=True) from e
                srv.started_at = time.monotonic()
            # (a server started by a request that went away before it was ready is waited for here)
            deadline = srv.started_at + self.load_timeout
            while True:
                rc = srv.proc.poll()
                if rc is not None:
                    why = srv.log_tail()
                    srv.proc = None
                    if rc == EXIT_BAD_CHECKPOINT:
                        raise InferenceError(f"the model could not be loaded: {why}", permanent=True)
                    raise InferenceError(f"the model server exited while loading (code {rc}): {why}")
                if os.path.exists(srv.socket_path):
                    try:
                        self._op(srv, {"op": "ping"}, timeout=5.0)
                        srv.ready = True
                        return
                    except InferenceError:
                        pass
                if time.monotonic() > deadline:
                    srv.stop()
                    raise InferenceError(f"the model did not load within {self.load_timeout:.0f} s")
                if beat():
                    yield None
                time.sleep(0.02)
        finally:
            srv.start_lock.release()

    def _connect(self, srv: _Server, timeout: float) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(srv.socket_path)
        except OSError as e:
            s.close()
            raise InferenceError(f"cannot reach the model server: {e}") from e
        return s

    def _op(self, srv: _Server, msg: dict, timeout: float) -> dict:
        s = self._connect(srv, timeout)
        try:
            s.sendall((json.dumps(msg) + "\n").encode())
            reply = _Lines(s).read()
            if not reply:
                raise InferenceError("the model server did not answer")
            return reply
        except OSError as e:
            raise InferenceError(f"the model server did not answer: {e}") from e
        finally:
            s.close()

    def _ensure_reaper(self) -> None:
        if self._reaper is None or not self._reaper.is_alive():
            self._reaper = threading.Thread(target=self._reap, name="model-pool-reaper", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        while not self._closed.wait(max(0.05, min(5.0, self.idle_seconds / 4))):
            try:
                self.evict_idle()
            except Exception:  # the reaper must outlive any one failure
                log.exception("idle eviction failed")

    # -- one request -------------------------------------------------------------------------------------
    def _run(self, srv: _Server, model_row: Any, mode: str, payload: Any, sampling: dict) -> Iterator[Any]:
        sock = None
        done = False
        rid = f"r{next(self._ids)}"
        try:
            try:
                yield from self._starting(srv, model_row)
                sock = self._connect(srv, self.poll_s)
            except InferenceError as e:
                if e.permanent or srv.alive():
                    raise
                # the server died between our check and the connect: one fresh start
                yield from self._starting(srv, model_row)
                sock = self._connect(srv, self.poll_s)
            req = {"id": rid, "mode": mode, "sampling": sampling,
                   ("messages" if mode == "chat" else "prompt"): payload}
            t0 = time.monotonic()
            sock.sendall((json.dumps(req) + "\n").encode())
            lines = _Lines(sock)
            ttft = None
            last_msg = last_yield = time.monotonic()
            pending: collections.deque = collections.deque()
            while True:
                msg = pending.popleft() if pending else lines.read()
                now = time.monotonic()
                if msg is None:
                    if now - last_msg > self.read_timeout:
                        srv.stop()  # hung: the next request starts a fresh one
                        raise InferenceError(f"the model server gave no answer for {self.read_timeout:.0f} s "
                                             "and was stopped; try again")
                    if now - last_yield >= self.heartbeat_s:
                        last_yield = now
                        yield None
                    continue
                if msg is False:
                    raise self._crashed(srv)
                last_msg = now
                if msg.get("id") != rid:
                    continue
                if "delta" in msg:
                    if ttft is None:
                        ttft = now - t0
                    text = msg["delta"]
                    if not pending:
                        # A reader slower than the model (a busy machine, a slow client) gets what has
                        # piled up as one delta instead of paying per-event costs for each token.
                        for more in lines.ready():
                            if not pending and more.get("id") == rid and "delta" in more:
                                text += more["delta"]
                            else:
                                pending.append(more)
                    last_yield = now
                    yield text
                elif msg.get("done"):
                    done = True
                    yield Final(msg.get("finish_reason") or "stop", int(msg.get("prompt_tokens") or 0),
                                int(msg.get("completion_tokens") or 0), ttft, now - t0)
                    return
                elif "error" in msg:
                    done = True
                    permanent = bool(msg.get("permanent"))
                    raise InferenceError(str(msg["error"]), permanent=permanent, status=400 if permanent else 503)
        except OSError as e:
            raise self._crashed(srv) if not srv.alive() else InferenceError(f"model server connection failed: {e}") from e
        finally:
            if sock is not None:
                if not done:  # the caller stopped early (client gone) or we failed: stop generating
                    try:
                        sock.sendall((json.dumps({"cancel": rid}) + "\n").encode())
                    except OSError:
                        pass
                sock.close()
            self._release(srv)

    def _crashed(self, srv: _Server) -> InferenceError:
        proc = srv.proc
        rc = None
        if proc is not None:
            try:
                rc = proc.wait(timeout=1.0)
            except Exception:
                rc = proc.poll()
        what = f"exit code {rc}" if rc is not None else "connection lost"
        log.warning("model server for model %s stopped mid-request (%s)", srv.key, what)
        return InferenceError(f"the model server stopped unexpectedly ({what}) while answering; "
                              "it will be restarted on your next request")

    # -- where checkpoints are -----------------------------------------------------------------------------
    def _storage_path(self, model_row: Any) -> str:
        key = model_row.checkpoint_key
        # a finished job's row points at its run directory until the upload to storage is done
        if os.path.isabs(key) and os.path.isdir(key):
            return key
        from .storage import Storage

        return Storage.from_settings(self.settings).local_path(key)


def get_pool(app: Any) -> ModelPool:
    """The app's pool, made on first use and closed when the process exits."""
    pool = app.extensions.get("model_pool")
    if pool is None:
        with _APP_LOCK:
            pool = app.extensions.get("model_pool")
            if pool is None:
                import atexit

                pool = ModelPool(app.config.get("NCS_SETTINGS"))
                atexit.register(pool.close)
                app.extensions["model_pool"] = pool
    return pool


_APP_LOCK = threading.Lock()


def _runner_start(*args: Any, **kwargs: Any) -> Any:
    from .runner import start_model_server  # runner.py is the only code that spawns processes

    return start_model_server(*args, **kwargs)
