"""The model server: one checkpoint behind a Unix socket, speaking JSON lines.

    python -m trainer.serve --socket /tmp/ncs-m1.sock --checkpoint runs/r1/checkpoints/step_000200 --device cpu

CPU recipe: OMP_NUM_THREADS=1 (tiny models run faster on one thread than two on a 2-core machine).

The web app never imports torch: ``nanochat_studio/inference.py`` starts one of these per loaded model
(through ``runner.py``) and talks to it over the socket. This module never imports nanochat_studio.

Protocol: one JSON object per line, both ways. A client may open any number of connections and send
several requests on one; replies carry the request ``id``.

  -> {"id": "r1", "mode": "chat", "messages": [{"role": "user", "content": "hi"}], "sampling": {...}}
  -> {"id": "r2", "mode": "complete", "prompt": "Once upon a time", "sampling": {...}}
  <- {"id": "r1", "delta": "Hel"}                      whole UTF-8 characters, in order
  <- {"id": "r1", "done": true, "finish_reason": "stop" | "length" | "cancelled",
      "prompt_tokens": 9, "completion_tokens": 12}    always the last line for an id
  <- {"id": "r1", "error": "what went wrong", "permanent": true}   instead of "done"
  -> {"cancel": "r1"}                                  stops generating at the next token
  -> {"op": "ping"}   <- {"op": "pong", "device": "cpu", "checkpoint": "...", ...}
  -> {"op": "stats"}  <- {"op": "stats", "active": 1, "queued": 0, "served": 7, "cancelled": 1, ...}

Closing a connection cancels every request it sent. ``sampling`` holds temperature, top_k, top_p,
max_tokens, seed and stop (a list of strings; the text before the first match is kept).

Fairness: up to --max-active requests are decoded round-robin, one text delta each per turn, so a long
answer never holds the others back; more wait in a FIFO bounded by --max-queue (past it: an error with
"permanent": false). The web client keeps its own, tighter bound and answers 429 before this one bites.

A scripted stand-in: a checkpoint directory holding ``fake_model.json`` ({"text": ..., "delay_s": ...,
"tokens_per_delta": 1, "load_delay_s": 0}) is served without torch by replaying that text. Tests use it to exercise the
plumbing (crashes, queues, hostile output) independently of the network weights.
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
from typing import Any, Iterator

from trainer.progress import EXIT_BAD_CHECKPOINT


def log(msg: str) -> None:
    print(f"[serve {os.getpid()}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Backends: something that turns a request into an iterator of text deltas with token counts


class ScriptedGeneration:
    """Replays fixed text as deltas, honouring max_tokens; the stand-in for a network in plumbing tests."""

    def __init__(self, text: str, delay_s: float, tokens_per_delta: int, max_tokens: int, prompt_tokens: int):
        self.text, self.delay_s, self.step = text, delay_s, max(1, tokens_per_delta)
        self.max_tokens = max_tokens
        self.prompt_tokens, self.completion_tokens, self.finish_reason = prompt_tokens, 0, None

    def __iter__(self) -> Iterator[str]:
        chars = list(self.text)  # whole characters by construction
        i = 0
        while i < len(chars):
            if self.completion_tokens >= self.max_tokens:
                self.finish_reason = "length"
                return
            if self.delay_s:
                time.sleep(self.delay_s)
            piece = "".join(chars[i : i + self.step])
            i += self.step
            self.completion_tokens += 1
            yield piece
        self.finish_reason = "stop"


class ScriptedBackend:
    def __init__(self, spec: dict):
        self.text = str(spec.get("text", "Hello from the scripted model."))
        self.delay_s = float(spec.get("delay_s", 0.0))
        self.tokens_per_delta = int(spec.get("tokens_per_delta", 1))
        self.info = {"backend": "scripted", "chat": True}
        time.sleep(float(spec.get("load_delay_s", 0.0)))  # stands in for loading big weights

    def start(self, mode: str, payload: Any, sampling: dict) -> ScriptedGeneration:
        text = self.text
        if "{prompt}" in text:  # lets a test see what reached the model
            text = text.replace("{prompt}", payload if mode == "complete" else payload[-1]["content"])
        prompt = payload if mode == "complete" else " ".join(m["content"] for m in payload)
        return ScriptedGeneration(text, self.delay_s, self.tokens_per_delta,
                                  int(sampling.get("max_tokens") or 256), len(prompt.split()))


class TorchBackend:
    """The real thing: trainer.sample's generator over a checkpoint loaded once."""

    SAMPLING_KEYS = ("temperature", "top_k", "top_p", "max_tokens", "seed")

    def __init__(self, checkpoint: str, device: str):
        import torch  # noqa: F401  (imported here so the scripted backend needs no torch)

        from trainer import sample

        self.sample = sample
        self.model, self.tokenizer, meta = sample.load_for_inference(checkpoint, device)
        self.info = {"backend": "torch", **({k: v for k, v in (meta or {}).items() if _jsonable(v)})}

    def start(self, mode: str, payload: Any, sampling: dict):
        kwargs = {k: sampling[k] for k in self.SAMPLING_KEYS if sampling.get(k) is not None}
        if mode == "chat":
            return self.sample.chat(self.model, self.tokenizer, payload, **kwargs)
        return self.sample.complete(self.model, self.tokenizer, payload, **kwargs)


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def load_backend(checkpoint: str, device: str):
    fake = os.path.join(checkpoint, "fake_model.json")
    if os.path.isfile(fake):
        with open(fake, encoding="utf-8") as f:
            return ScriptedBackend(json.load(f))
    return TorchBackend(checkpoint, device)


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
# Stop strings: hold back text that may be the start of a stop string until it is known not to be


class StopFilter:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def feed(self, delta: str) -> str:
        if not self.stops:
            return delta
        self.pending += delta
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out, self.pending = self.pending[:cut], ""
            return out
        # keep the longest tail that is a proper prefix of some stop string
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# ---------------------------------------------------------------------------------------------------------
# Connections and the round-robin scheduler


class Conn:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lock = threading.Lock()
        self.alive = True

    def send(self, obj: dict) -> bool:
        data = (json.dumps(obj) + "\n").encode()
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
    cancelled: bool = False
    gen: Any = None
    it: Iterator[str] | None = None
    stop: StopFilter | None = None
    sent_chars: int = 0
    enqueued_at: float = field(default_factory=time.monotonic)


class Scheduler:
    def __init__(self, backend, max_active: int, max_queue: int):
        self.backend = backend
        self.max_active, self.max_queue = max_active, max_queue
        self.cv = threading.Condition()
        self.queue: collections.deque[Request] = collections.deque()
        self.active: list[Request] = []
        self.by_key: dict[tuple[int, str], Request] = {}
        self.counters = collections.Counter()

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

    # the one thread that touches the model ---------------------------------------------------------------
    def run(self) -> None:
        while True:
            with self.cv:
                while not self.queue and not self.active:
                    self.cv.wait()
                while self.queue and len(self.active) < self.max_active:
                    self.active.append(self.queue.popleft())
                # queued requests cancelled before they started end here, without touching the model
                for req in [r for r in self.queue if r.cancelled]:
                    self.queue.remove(req)
                    self._finish(req, "cancelled")
                turn = list(self.active)
            for req in turn:
                self._step(req)

    def _finish(self, req: Request, reason: str | None, error: str | None = None, permanent: bool = True) -> None:
        with self.cv:
            self.by_key.pop((id(req.conn), req.id), None)
            if req in self.active:
                self.active.remove(req)
        if error is not None:
            self.counters["errors"] += 1
            req.conn.send({"id": req.id, "error": error, "permanent": permanent})
            return
        if reason == "cancelled":
            self.counters["cancelled"] += 1
        else:
            self.counters["served"] += 1
        gen = req.gen
        done = {
            "id": req.id,
            "done": True,
            "finish_reason": reason,
            "prompt_tokens": int(getattr(gen, "prompt_tokens", 0) or 0),
            "completion_tokens": int(getattr(gen, "completion_tokens", 0) or 0),
        }
        self.counters["completion_tokens"] += done["completion_tokens"]
        req.conn.send(done)

    def _step(self, req: Request) -> None:
        if req.cancelled or not req.conn.alive:
            self._finish(req, "cancelled")
            return
        try:
            if req.it is None:
                req.gen = self.backend.start(req.mode, req.payload, req.sampling)
                req.it = iter(req.gen)
                req.stop = StopFilter(list(req.sampling.get("stop") or []))
            delta = next(req.it)
        except StopIteration:
            tail = req.stop.flush() if req.stop else ""
            if tail:
                req.conn.send({"id": req.id, "delta": tail})
            self._finish(req, getattr(req.gen, "finish_reason", None) or "stop")
            return
        except Exception as e:  # a bad request (too long a prompt...) must not take the server down
            log(f"request {req.id} failed: {e!r}")
            self._finish(req, None, error=f"generation failed: {e}", permanent=True)
            return
        out = req.stop.feed(delta)
        if out:
            req.conn.send({"id": req.id, "delta": out})
        if req.stop.hit:
            self._finish(req, "stop")


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
    rid = msg.get("id")
    if not isinstance(rid, str) or not rid:
        return "request needs a string id"
    mode = msg.get("mode")
    sampling = msg.get("sampling") or {}
    if not isinstance(sampling, dict):
        return "sampling must be an object"
    if mode == "chat":
        messages = msg.get("messages")
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant")
            for m in messages
        ):
            return "chat needs messages: a non-empty list of {role, content}"
        return Request(rid, conn, mode, messages, sampling)
    if mode == "complete":
        prompt = msg.get("prompt")
        if not isinstance(prompt, str):
            return "complete needs a prompt string"
        return Request(rid, conn, mode, prompt, sampling)
    return "mode must be 'chat' or 'complete'"


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # where
    p.add_argument("--socket", required=True, help="Unix socket path to listen on")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (trainer.checkpoint layout)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto")
    # how much at once
    p.add_argument("--max-active", type=int, default=16, help="requests decoded round-robin at once")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond those")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as OMP_NUM_THREADS says)")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    if not os.path.isdir(args.checkpoint):
        log(f"checkpoint directory not found: {args.checkpoint}")
        return EXIT_BAD_CHECKPOINT
    t0 = time.monotonic()
    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        backend = load_backend(args.checkpoint, device)
    except Exception as e:
        log(f"cannot load checkpoint {args.checkpoint}: {e!r}")
        return EXIT_BAD_CHECKPOINT
    info = {"device": device, "checkpoint": args.checkpoint, **backend.info}
    log(f"loaded {args.checkpoint} on {device} in {time.monotonic() - t0:.2f}s")

    sched = Scheduler(backend, max(1, args.max_active), max(0, args.max_queue))
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
