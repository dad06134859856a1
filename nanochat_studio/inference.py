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

This module is the pool (which servers run, admission, loading, eviction) and the public API; one
server's process handle and socket protocol are modelclient.py's, whose InferenceError and Final are
re-exported here. Servers are started through runner.py, the only code that spawns processes.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

from trainer.progress import EXIT_BAD_CHECKPOINT

from . import metrics
from .modelclient import Delta, Final, InferenceError, ModelServer
from .settings import Settings

__all__ = ["MODES", "Delta", "Final", "InferenceError", "ModelPool", "TooBusy", "get_pool"]

log = logging.getLogger(__name__)

MODES = ("chat", "complete")


class TooBusy(InferenceError):
    status = 429

    def __init__(self, message: str):
        super().__init__(message, permanent=False)




class _Stream:
    """The iterator ``stream`` returns. Admission happened already, so a stream closed (or dropped)
    before its first ``next`` must still give its place back."""

    def __init__(self, pool: "ModelPool", srv: ModelServer, gen: Iterator[Any]):
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

    def __init__(self, settings: Settings, *, checkpoint_dir_of: Callable[[Any], str] | None = None,
                 max_loaded: int | None = None, idle_seconds: float | None = None,
                 queue_limit: int | None = None, device: str | None = None, max_active: int = 16,
                 load_timeout: float = 120.0, read_timeout: float = 120.0, heartbeat_s: float = 15.0,
                 poll_s: float = 0.25, start_server: Callable[..., Any] | None = None):
        # The keyword overrides are for tests that need a bound the settings' validation refuses (0).
        self.settings = settings
        self.max_loaded = max_loaded if max_loaded is not None else settings.max_loaded_models
        self.idle_seconds = idle_seconds if idle_seconds is not None else settings.model_idle_seconds
        self.queue_limit = queue_limit if queue_limit is not None else settings.chat_queue_limit
        self.device = device or settings.inference_device
        self.max_active = max_active  # decoded round-robin at once by one server; more wait
        # Every open stream holds one waitress thread: keep a few threads free for pages and the API.
        self.max_streams = max(1, settings.threads - 4)
        self.load_timeout, self.read_timeout = load_timeout, read_timeout
        self.heartbeat_s, self.poll_s = heartbeat_s, poll_s
        self._checkpoint_dir_of = checkpoint_dir_of or self._storage_path
        self._start_server = start_server
        self._servers: dict[Any, ModelServer] = {}
        self._lock = threading.Lock()
        self._dir = tempfile.mkdtemp(prefix="ncs-models-")  # short: Unix socket paths max out near 107 bytes
        self._ids = itertools.count(1)
        self._closed = threading.Event()
        self._reaper: threading.Thread | None = None
        metrics.track_pool(self)  # ncs_chat_queue_depth reads waiting()

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
        return srv.op({"op": "stats"}, timeout)

    def waiting(self) -> dict[Any, int]:
        """Requests admitted but not yet decoding, per model id (beyond ``max_active`` in a server)."""
        with self._lock:
            return {s.key: max(0, s.in_flight - self.max_active) for s in self._servers.values()}

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
    def _admit(self, model_row: Any) -> ModelServer:
        key = model_row.id
        evicted: list[ModelServer] = []
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
                srv = ModelServer(key, "", os.path.join(self._dir, f"m{n}.sock"), os.path.join(self._dir, f"m{n}.log"))
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

    def _release(self, srv: ModelServer) -> None:
        with self._lock:
            srv.in_flight -= 1
            srv.last_used = time.monotonic()

    def _starting(self, srv: ModelServer, model_row: Any) -> Iterator[None]:
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

        # Running and ready (nearly every request): no lock. alive() makes a system call (waitpid),
        # which lets go of the GIL; held under start_lock, every request arriving meanwhile queued
        # behind this one until it won the GIL back (up to a switch interval, 5 ms, on a busy process).
        if srv.ready and srv.alive():
            return
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
                        srv.op({"op": "ping"}, timeout=5.0)
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
    def _run(self, srv: ModelServer, model_row: Any, mode: str, payload: Any, sampling: dict) -> Iterator[Any]:
        rid = f"r{next(self._ids)}"
        try:
            try:
                yield from self._starting(srv, model_row)
                chan = srv.channel(self.poll_s)
            except InferenceError as e:
                if e.permanent or srv.alive():
                    raise
                # the server died between our check and the connect: one fresh start
                yield from self._starting(srv, model_row)
                chan = srv.channel(self.poll_s)
            gen = srv.generate(chan, rid, mode, payload, sampling, poll_s=self.poll_s,
                               read_timeout=self.read_timeout, heartbeat_s=self.heartbeat_s)
            try:
                for item in gen:
                    if isinstance(item, Final):
                        metrics.chat_finished(item.ttft_s, item.tokens_per_sec)
                    yield item
            finally:
                gen.close()  # as `yield from` would: a client gone mid-stream cancels the generation
        except OSError as e:
            raise srv.crashed() if not srv.alive() else InferenceError(f"model server connection failed: {e}") from e
        finally:
            self._release(srv)

    # -- where checkpoints are -----------------------------------------------------------------------------
    def _storage_path(self, model_row: Any) -> str:
        from .checkpoints import local_checkpoint_dir  # (imported late: checkpoints imports the models)

        return local_checkpoint_dir(model_row, self.settings)


def get_pool(app: Any) -> ModelPool:
    """The app's pool, made on first use and closed when the process exits."""
    pool = app.extensions.get("model_pool")
    if pool is None:
        with _APP_LOCK:
            pool = app.extensions.get("model_pool")
            if pool is None:
                import atexit

                pool = ModelPool(app.config["NCS_SETTINGS"])
                atexit.register(pool.close)
                app.extensions["model_pool"] = pool
    return pool


_APP_LOCK = threading.Lock()


def _runner_start(*args: Any, **kwargs: Any) -> Any:
    from .runner import start_model_server  # runner.py is the only code that spawns processes

    return start_model_server(*args, **kwargs)
