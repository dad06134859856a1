"""The model server: one checkpoint behind a Unix socket, speaking JSON lines, decoding in batches.

    python -m trainer.serve --socket /tmp/ncs-m1.sock --checkpoint runs/r1/checkpoints/step_000200 --device cpu

CPU recipe: OMP_NUM_THREADS=1 (tiny models run faster on one thread than two on a 2-core machine).

The web app never imports torch: ``nanochat_studio/inference.py`` starts one of these per loaded model
(through ``runner.py``) and talks to it over the socket. This module never imports nanochat_studio.

Protocol: one JSON object per line, both ways. A client may open any number of connections and send
several requests on one, concurrently; replies carry the request ``id``.

  -> {"id": "r1", "mode": "chat", "messages": [{"role": "user", "content": "hi"}], "sampling": {...}}
  -> {"id": "r2", "mode": "complete", "prompt": "Once upon a time", "sampling": {...}}
  -> {"id": "r3", "mode": "complete", "prompt": [1021, 72, 105], "echo": true, "logprobs": 5,
      "sampling": {"max_tokens": 0}}
  <- {"id": "r1", "delta": "Hel"}                      whole UTF-8 characters, in order
  <- {"id": "r3", "delta": "Hi", "echo": true, "logprobs": [ENTRY, ...]}   the prompt, first
  <- {"id": "r1", "delta": "lo", "logprobs": [ENTRY, ...]}                 with "logprobs" only
  <- {"id": "r1", "done": true, "finish_reason": "stop" | "length" | "cancelled",
      "prompt_tokens": 9, "completion_tokens": 12}    always the last line for an id
  <- {"id": "r1", "error": "what went wrong", "permanent": true}   instead of "done"
  -> {"cancel": "r1"}                                  stops generating at the next step
  -> {"op": "ping"}   <- {"op": "pong", "device": "cpu", "checkpoint": "...", "context": 512, ...}
  -> {"op": "stats"}  <- {"op": "stats", "active": 1, "queued": 0, "served": 7, "cancelled": 1, ...}

Requests:
- ``prompt`` (complete): text, or a list of token ids. Text gets <|bos|> in front as every training
  document has; token ids are used as given, with <|bos|> put in front unless they start with it.
  A prompt longer than the model's context is cut to its last ``context`` tokens (unless it must
  be scored, see ``echo``, which is then an error).
- ``sampling``: temperature (0 = greedy; default 1), top_k, top_p, max_tokens (default 256; 0 with
  ``echo`` scores the prompt only), seed (the same seed and request give the same text), stop (a
  string or a list; the text before the first match is kept).
- ``echo`` (complete only): send the prompt's text back first, as a delta marked ``"echo": true``
  (prompt tokens that were put in front, such as <|bos|>, are not echoed).
- ``logprobs``: null (off) or N in 0..20: every generated token (and every echoed prompt token)
  comes with an ENTRY, on the delta that carries its text:
  ``{"token": id, "text": "...", "bytes": [..], "logprob": -1.2, "top": [[id, text, logprob, bytes], ...N],
  "offset": characters of this request's text before this token}``. Log-probabilities are of the
  model's own distribution (temperature 1), not of the sampling settings. The first token of a
  prompt has no prediction: its logprob and top are null. Tokens past a stop string are dropped
  with their text; a stop token (<|bos|>, <|assistant_end|>) has an entry marked ``"special": true``
  that adds no text (a client asking for one token's log-probability gets it, whatever the token).
  Each alternative of ``top`` also carries the token's bytes: ``[id, text, logprob, bytes]``.
  ``echo`` and ``logprobs`` may also be given inside ``sampling``.

Closing a connection cancels every request it sent.

Scheduling: up to --max-active requests are decoded together, every running one advancing by one
token in each step (one batched forward pass, ``trainer/engine.py``): continuous batching, so a
request joins at the next step and leaves when done, and nobody waits for anybody's whole answer.
A newcomer's prompt is fed in chunks, at most --prefill-tokens per step over all newcomers (oldest
first), so others keep decoding meanwhile. With several requests running, each one's text is sent
at most every --flush-ms (its first text at once): fewer, larger deltas, the same text. More requests wait in a FIFO bounded by --max-queue (past
it: an error with "permanent": false). The web client keeps its own, tighter bound and answers 429
before this one bites.

A scripted stand-in (``trainer/scripted.py``): a checkpoint directory holding ``fake_model.json``
({"text": ..., "delay_s": ..., "tokens_per_delta": 1, "load_delay_s": 0}) is served without torch by
replaying that text, one delta per step. Tests use it to exercise the plumbing (crashes, queues, hostile output) independently
of the network weights.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from trainer.batching import Sequence, parse_logprobs

# ---------------------------------------------------------------------------------------------------------
# Backends: trainer.batching.TorchBackend (a checkpoint) or trainer.scripted.ScriptedBackend (fake_model.json);
# each opens a request as a Sequence and advances all running ones by a step


from trainer.progress import EXIT_BAD_CHECKPOINT


def log(msg: str) -> None:
    print(f"[serve {os.getpid()}] {msg}", file=sys.stderr, flush=True)


def load_backend(checkpoint: str, device: str, max_active: int = 16, prefill_tokens: int = 256,
                 kv_cache_mb: int = 4096):
    fake = os.path.join(checkpoint, "fake_model.json")
    if os.path.isfile(fake):
        from trainer.scripted import ScriptedBackend

        with open(fake, encoding="utf-8") as f:
            return ScriptedBackend(json.load(f))
    from trainer.batching import TorchBackend

    return TorchBackend(checkpoint, device, max_active=max_active, prefill_tokens=prefill_tokens,
                        kv_cache_mb=kv_cache_mb)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
    except ImportError:
        pass
    return "cpu"


# ---------------------------------------------------------------------------------------------------------
# Connections and the batching scheduler


class Conn:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lock = threading.Lock()
        self.alive = True
        self.pending: list[bytes] = []  # lines the scheduler thread put, sent together by flush()

    def send(self, obj: dict) -> bool:
        return self._write((json.dumps(obj) + "\n").encode())

    def put(self, obj: dict) -> None:
        """Queue a line for the next :meth:`flush` (the scheduler thread only: it sends everything a
        step produced for this connection at once)."""
        self.pending.append((json.dumps(obj) + "\n").encode())

    def flush(self) -> bool:
        data, self.pending = b"".join(self.pending), []
        return self._write(data) if data else self.alive

    def _write(self, data: bytes) -> bool:
        with self.lock:
            if not self.alive:
                return False
            try:
                self.sock.sendall(data)
                return True
            except OSError:  # the client went away or stopped reading (send timeout): drop it
                self.alive = False
                return False

    def close(self) -> None:
        with self.lock:
            self.alive = False
        try:
            self.sock.close()
        except OSError:
            pass


@dataclass
class Request:
    id: str
    conn: Conn
    mode: str
    payload: Any
    sampling: dict
    echo: bool = False
    logprobs: int | None = None
    cancelled: bool = False
    seq: Sequence | None = None
    enqueued_at: float = field(default_factory=time.monotonic)
    held: list = field(default_factory=list)  # output not sent yet: [text, entries] (see Scheduler._flush)
    sent_at: float = 0.0  # when output was last sent (0: never)


class Scheduler:
    """Owns the backend; its :meth:`run` is the one thread that touches the model."""

    def __init__(self, backend, max_active: int, max_queue: int, flush_s: float = 0.02):
        self.backend = backend
        self.max_active, self.max_queue = max_active, max_queue
        self.flush_s = flush_s
        self.cv = threading.Condition()
        self.queue: collections.deque[Request] = collections.deque()
        self.active: list[Request] = []
        self.by_key: dict[tuple[int, str], Request] = {}
        self.counters = collections.Counter()
        # connections with lines put in this iteration: one send each per step, not one per request
        # (the web app shares one connection among all its requests, and every send wakes its reader:
        # 16 streams made 16 wake-ups and context switches a step, ~15% of the step's time here)
        self.touched: dict[int, Conn] = {}

    # called from connection threads ------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        with self.cv:
            key = (id(req.conn), req.id)
            if key in self.by_key:
                req.conn.send({"id": req.id, "error": "duplicate request id on this connection", "permanent": True})
                return
            if len(self.queue) >= self.max_queue:
                self.counters["rejected"] += 1
                req.conn.send({"id": req.id, "error": "model server queue is full", "permanent": False})
                return
            self.by_key[key] = req
            self.queue.append(req)
            self.counters["received"] += 1
            self.cv.notify()

    def cancel(self, conn: Conn, rid: str | None = None) -> None:
        with self.cv:
            for (cid, r_id), req in list(self.by_key.items()):
                if cid == id(conn) and (rid is None or r_id == rid):
                    req.cancelled = True
            self.cv.notify()

    def stats(self) -> dict:
        with self.cv:
            return {"active": len(self.active), "queued": len(self.queue), **self.counters}

    # the scheduler thread ------------------------------------------------------------------------------
    def run(self) -> None:
        while True:
            try:
                self._iteration()
            finally:
                self._send_pending()

    def _put(self, conn: Conn, msg: dict) -> None:
        conn.put(msg)
        self.touched[id(conn)] = conn

    def _send_pending(self) -> None:
        touched, self.touched = self.touched, {}
        for conn in touched.values():
            conn.flush()

    def _iteration(self) -> None:
        """Admit, step once, hand out what the step produced (its lines go out after this returns)."""
        with self.cv:
            while not self.queue and not self.active:
                self.cv.wait()
            # queued requests cancelled before they started end here, without touching the model
            for req in [r for r in self.queue if r.cancelled or not r.conn.alive]:
                self.queue.remove(req)
                self._finish(req, "cancelled")
            admitted = []
            while self.queue and len(self.active) + len(admitted) < self.max_active \
                    and len(admitted) < self.backend.capacity():
                admitted.append(self.queue.popleft())
        for req in admitted:
            self._open(req)
        for req in [r for r in self.active if r.cancelled or not r.conn.alive]:
            self._finish(req, "cancelled")
        if not self.active:
            return
        batch = [r.seq for r in self.active]
        try:
            self.backend.step(batch)
        except Exception as e:  # a failure in one step fails its requests, never the server
            log(f"decoding step failed: {e!r}")
            for req in list(self.active):
                self._finish(req, None, error=f"generation failed: {e}", permanent=False)
            return
        self.counters["steps"] += 1
        self.counters["batched"] += len(batch)
        for req in list(self.active):
            self._flush(req, final=req.seq.done)
            if req.seq.done:
                self._finish(req, req.seq.finish_reason)

    def _open(self, req: Request) -> None:
        try:
            req.seq = self.backend.open(req.mode, req.payload, req.sampling, echo=req.echo, logprobs=req.logprobs)
        except Exception as e:  # a bad request (too long a prompt, bad values...) must not take the server down
            log(f"request {req.id} rejected: {e!r}")
            self._finish(req, None, error=f"generation failed: {e}", permanent=True)
            return
        with self.cv:
            self.active.append(req)
        self._flush(req, final=True)  # an echo without scores is ready before any step
        if req.seq.done:
            self._finish(req, req.seq.finish_reason)

    def _flush(self, req: Request, final: bool = False) -> None:
        """Send what the request's sequence produced. Alone, every token goes out as it is made; with
        others running, one message per request every ``flush_s`` at most (the first at once): with 16
        streams a step takes ~2 ms, and a line per token per stream would cost the client (the web
        process, on the same CPU) more than the decoding."""
        for text, entries, echo in req.seq.take_output():
            if echo:  # the echoed prompt is its own message, before any generated text
                msg = {"id": req.id, "delta": text, "echo": True}
                if entries is not None:
                    msg["logprobs"] = entries
                self._put(req.conn, msg)
            elif req.held:
                req.held[0] += text
                if entries is not None:
                    req.held[1] = (req.held[1] or []) + entries
            else:
                req.held = [text, entries]
        now = time.monotonic()
        if req.held and (final or len(self.active) <= 1 or now - req.sent_at >= self.flush_s):
            text, entries = req.held
            msg = {"id": req.id, "delta": text}
            if entries is not None:
                msg["logprobs"] = entries
            self._put(req.conn, msg)
            req.held, req.sent_at = [], now

    def _finish(self, req: Request, reason: str | None, error: str | None = None, permanent: bool = True) -> None:
        with self.cv:
            self.by_key.pop((id(req.conn), req.id), None)
            if req in self.active:
                self.active.remove(req)
        seq = req.seq
        if seq is not None:
            self.backend.release(seq)
        if error is not None:
            self.counters["errors"] += 1
            self._put(req.conn, {"id": req.id, "error": error, "permanent": permanent})
            return
        if reason == "cancelled":
            self.counters["cancelled"] += 1
        else:
            self.counters["served"] += 1
        done = {
            "id": req.id,
            "done": True,
            "finish_reason": reason,
            "prompt_tokens": int(getattr(seq, "prompt_tokens", 0) or 0),
            "completion_tokens": int(getattr(seq, "completion_tokens", 0) or 0),
        }
        self.counters["completion_tokens"] += done["completion_tokens"]
        self._put(req.conn, done)


def handle_conn(conn: Conn, sched: Scheduler, info: dict) -> None:
    f = conn.sock.makefile("rb")
    try:
        for line in f:
            try:
                msg = json.loads(line)
                if not isinstance(msg, dict):
                    raise ValueError("not an object")
            except ValueError:
                conn.send({"error": "bad JSON line", "permanent": True})
                continue
            if "cancel" in msg:
                sched.cancel(conn, str(msg["cancel"]))
            elif msg.get("op") == "ping":
                conn.send({"op": "pong", "id": msg.get("id"), "pid": os.getpid(), **info})
            elif msg.get("op") == "stats":
                conn.send({"op": "stats", "id": msg.get("id"), **sched.stats()})
            else:
                req = parse_request(msg, conn)
                if isinstance(req, str):
                    conn.send({"id": msg.get("id"), "error": req, "permanent": True})
                else:
                    sched.submit(req)
    except (OSError, ValueError):
        pass
    finally:
        sched.cancel(conn)  # a closed connection cancels what it asked for
        conn.close()


def parse_request(msg: dict, conn: Conn) -> Request | str:
    """A Request, or the error message for a malformed one."""
    rid = msg.get("id")
    if not isinstance(rid, str) or not rid:
        return "request needs a string id"
    mode = msg.get("mode")
    sampling = msg.get("sampling") or {}
    if not isinstance(sampling, dict):
        return "sampling must be an object"
    echo = msg.get("echo", sampling.get("echo", False))
    if not isinstance(echo, bool):
        return "echo must be true or false"
    try:
        logprobs = parse_logprobs(msg.get("logprobs", sampling.get("logprobs")))
    except ValueError as e:
        return str(e)
    if mode == "chat":
        messages = msg.get("messages")
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant")
            for m in messages
        ):
            return "chat needs messages: a non-empty list of {role, content}"
        if echo:
            return "echo applies to completions, not chat"
        return Request(rid, conn, mode, messages, sampling, False, logprobs)
    if mode == "complete":
        prompt = msg.get("prompt")
        ids_ok = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        if not isinstance(prompt, str) and not ids_ok:
            return "complete needs a prompt: a string or a non-empty list of token ids"
        return Request(rid, conn, mode, prompt, sampling, echo, logprobs)
    return "mode must be 'chat' or 'complete'"


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # where
    p.add_argument("--socket", required=True, help="Unix socket path to listen on")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (trainer.checkpoint layout)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto")
    # how much at once
    p.add_argument("--max-active", type=int, default=16, help="requests decoded together in one batch")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond those")
    p.add_argument("--prefill-tokens", type=int, default=256,
                   help="prompt tokens fed per step over all newcomers (bounds the others' stall)")
    p.add_argument("--flush-ms", type=float, default=20.0,
                   help="with several requests running, send each one's text at most this often (ms)")
    p.add_argument("--kv-cache-mb", type=int, default=4096,
                   help="memory for the KV cache; fewer requests run at once when --max-active would not fit")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as OMP_NUM_THREADS says)")
    args = p.parse_args(argv)
    if args.max_active < 1 or args.max_queue < 0 or args.prefill_tokens < 1 or args.kv_cache_mb < 1:
        p.error("--max-active, --prefill-tokens and --kv-cache-mb must be >= 1, --max-queue >= 0")

    device = resolve_device(args.device)
    if not os.path.isdir(args.checkpoint):
        log(f"checkpoint directory not found: {args.checkpoint}")
        return EXIT_BAD_CHECKPOINT
    t0 = time.monotonic()
    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        backend = load_backend(args.checkpoint, device, args.max_active, args.prefill_tokens, args.kv_cache_mb)
    except Exception as e:
        log(f"cannot load checkpoint {args.checkpoint}: {e!r}")
        return EXIT_BAD_CHECKPOINT
    info = {"device": device, "checkpoint": args.checkpoint, **backend.info}
    log(f"loaded {args.checkpoint} on {device} in {time.monotonic() - t0:.2f}s")

    sched = Scheduler(backend, args.max_active, args.max_queue, max(0.0, args.flush_ms) / 1000)
    threading.Thread(target=sched.run, name="scheduler", daemon=True).start()

    if os.path.exists(args.socket):
        os.unlink(args.socket)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # bind to a temporary name and rename: the socket path appearing means "ready", never "half-bound"
    tmp = f"{args.socket}.{os.getpid()}.tmp"
    srv.bind(tmp)
    os.chmod(tmp, 0o600)
    srv.listen(64)
    os.replace(tmp, args.socket)
    srv.settimeout(1.0)
    parent = os.getppid()

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    log(f"listening on {args.socket}")
    try:
        while True:
            try:
                s, _ = srv.accept()
            except socket.timeout:
                if os.getppid() != parent:  # the web process died: do not linger as an orphan
                    log("parent process is gone; exiting")
                    return 0
                continue
            # reads block (a client may wait long for its turn); a client that stops reading for 10 s is
            # dropped rather than stalling the scheduler thread, which does every send
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 10, 0))
            threading.Thread(target=handle_conn, args=(Conn(s), sched, info), daemon=True).start()
    finally:
        try:
            os.unlink(args.socket)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
