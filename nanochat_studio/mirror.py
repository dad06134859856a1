"""A running job in storage: the sidecar that copies its checkpoints and log there while the trainer
writes them, so neither the web nor the worker that resumes the job needs this machine's disk.

    python -m nanochat_studio.mirror     (the supervisor starts it; its orders come on stdin)

Under ``users/<u>/runs/<job>/`` storage holds ``checkpoints/step_N/`` (the newest finished checkpoint,
checkpoints.CheckpointMirror), ``log.txt`` (the job log's last LOG_TAIL_BYTES, across attempts and
machines: what the job page shows) and ``mirror.json`` (which attempt's sidecar writes, whether it is
still at work, and its heartbeat).

Why a process of its own: the checkpoint a trainer writes on SIGTERM after its supervisor died (kill -9,
the OOM killer) must still reach storage, or the worker that resumes the job on another machine starts
from an older one. The trainer never imports the appliance, and the supervisor is gone; this process is
spawned without the parent-death signal and outlives it. It reads ``finish all`` / ``finish log`` from a
pipe the supervisor holds once the trainer has exited; end-of-file without them means the supervisor
died: it then waits for the trainer (the run lock), SIGKILLs it after ``term_grace_seconds`` as the
supervisor would have, uploads what the trainer left and exits. The attempt that resumes the job waits
(:func:`wait_for_previous`) until that upload is done, or until the sidecar's heartbeat stops.

Cost, bounded: the log is read incrementally (only new bytes) and its tail object is at most
LOG_TAIL_BYTES, written at most every LOG_EVERY_S and only when the log grew; each checkpoint is uploaded
once; ``mirror.json`` is a small object rewritten every BEAT_S. The whole log stays in the worker's run
directory and, line by line with the job's id, in the worker's process log (logs.LineRelay).
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from . import runner
from .checkpoints import CheckpointMirror, finished_checkpoints, step_of
from .models import TrainingJob
from .settings import Settings
from .storage import KeyNotFound, Storage, StorageError, user_prefix

log = logging.getLogger(__name__)

LOG_TAIL_BYTES = 64 << 10  # what the job page shows of the log
LOG_EVERY_S = 2.0  # the job page polls every 3 s
SCAN_S = 0.5  # how often the run directory is looked at for new checkpoints and log lines
BEAT_S = 5.0
STALE_S = 20.0  # a sidecar whose heartbeat has not changed for this long is gone
MAX_WAIT_S = 1800.0  # a resuming attempt never waits longer than this for the previous upload
WRITER_FILE = ".mirror-writer"  # a run directory's identity in mirror.json


def run_prefix(user_id: int, job_id: int) -> str:
    return f"{user_prefix(user_id)}/runs/{int(job_id)}"


# --- what the web and a resuming worker read ----------------------------------------------------------


def read_state(store: Storage, prefix: str) -> dict | None:
    """The job's ``mirror.json``, or None when no sidecar ever wrote one."""
    try:
        with store.open(f"{prefix}/mirror.json") as f:
            state = json.loads(f.read(1 << 16))
    except (KeyNotFound, ValueError):
        return None
    return state if isinstance(state, dict) else None


def wait_for_previous(store: Storage, prefix: str, attempt: int, *, stale_s: float = STALE_S,
                      limit_s: float = MAX_WAIT_S, poll_s: float = 0.5) -> float:
    """Wait while an earlier attempt's sidecar is still at work (uploading what its trainer left);
    returns the seconds waited. A heartbeat that does not change for ``stale_s`` (timed on this
    machine's clock: machines' clocks differ) means it is gone, and nothing more will come."""
    t0 = time.monotonic()
    seen, seen_at = None, t0
    while time.monotonic() - t0 < limit_s:
        state = read_state(store, prefix)
        if not state or not state.get("active") or int(state.get("attempt", 0)) >= attempt:
            break
        now = time.monotonic()
        if state.get("beat") != seen:
            seen, seen_at = state.get("beat"), now
        elif now - seen_at >= stale_s:
            log.warning("the mirror of attempt %s stopped beating; resuming without waiting for it", state["attempt"])
            break
        time.sleep(poll_s)
    return time.monotonic() - t0


def log_tail(job: TrainingJob, settings: Settings) -> str:
    """The job log's last LOG_TAIL_BYTES as text: storage's copy when the job's sidecar wrote one
    (whichever machine ran it), else this machine's run directory (one machine, mirroring off)."""
    data = b""
    store = Storage.from_settings(settings)
    try:
        for attempt in range(3):
            try:
                with store.open(f"{run_prefix(job.user_id, job.id)}/log.txt") as f:
                    data = f.read(LOG_TAIL_BYTES)
                break
            except KeyNotFound:
                raise
            except OSError:  # the sidecar replaced the object between our open and read (s3fs: FileExpired)
                if attempt == 2:
                    raise
    except KeyNotFound:
        if job.log_path and os.path.exists(job.log_path):
            with open(job.log_path, "rb") as fh:
                fh.seek(max(0, os.path.getsize(job.log_path) - LOG_TAIL_BYTES))
                data = fh.read(LOG_TAIL_BYTES)
    text = data.decode("utf-8", errors="replace")
    return text.split("\n", 1)[-1] if len(data) >= LOG_TAIL_BYTES else text  # drop the cut first line


# --- the supervisor's side ----------------------------------------------------------------------------


class Sidecar:
    """The supervisor's handle on the job's mirror process."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    @classmethod
    def start(cls, settings: Settings, job: TrainingJob, attempt: int, run_dir: Path, log_path: Path,
              log_offset: int, trainer_pid: int) -> "Sidecar":
        """Start the sidecar for the trainer ``trainer_pid`` just spawned. Raises OSError."""
        orders = {"storage_url": settings.storage_url, "storage_options": settings.storage_options or {},
                  "user_id": job.user_id, "job_id": job.id, "attempt": attempt, "run_dir": str(run_dir),
                  "log_path": str(log_path), "log_offset": log_offset, "trainer_pid": trainer_pid,
                  "grace_s": settings.term_grace_seconds}
        with open(run_dir / "mirror.log", "ab") as err:
            # No parent-death signal: outliving a dead supervisor is the point.
            proc = runner.spawn([sys.executable, "-m", "nanochat_studio.mirror"], env=runner.trainer_env(),
                                cwd=run_dir, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
                                die_with_parent=False)
        sidecar = cls(proc)
        sidecar._send(json.dumps(orders) + "\n")  # storage secrets travel by pipe, never argv or disk
        return sidecar

    def _send(self, text: str) -> None:
        try:
            self.proc.stdin.write(text.encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            log.warning("the mirror sidecar (pid %s) is gone", self.proc.pid)

    def finish(self, keep_checkpoints: bool, timeout: float) -> bool:
        """Tell it the trainer has exited: upload the last checkpoint too when the job may resume from
        it (``keep_checkpoints``), and the rest of the log. Whether it was done within ``timeout``."""
        self._send(f"finish {'all' if keep_checkpoints else 'log'}\n")
        self.release()
        try:
            return self.proc.wait(timeout) == 0
        except subprocess.TimeoutExpired:
            log.warning("the mirror sidecar (pid %s) is still uploading; it finishes on its own", self.proc.pid)
            return False

    def release(self) -> None:
        """Close our end of the pipe (end-of-file: it outlives us, waiting for the trainer to exit)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass


# --- the sidecar itself -------------------------------------------------------------------------------


class RunMirror:
    """Copies one attempt's checkpoints and log into storage (the sidecar's work)."""

    def __init__(self, store: Storage, user_id: int, job_id: int, attempt: int, run_dir: Path, log_path: Path,
                 log_offset: int):
        self.store, self.attempt, self.run_dir = store, attempt, run_dir
        self.prefix = run_prefix(user_id, job_id)
        self.checkpoints = CheckpointMirror(store, user_id, job_id)
        newest = self.checkpoints.newest()
        self.uploaded_step = step_of(newest) if newest else -1
        self.writer = _writer_id(run_dir)
        self.lock = threading.Lock()  # the heartbeat thread writes mirror.json too
        self.log = open(log_path, "rb") if log_path.exists() else open(os.devnull, "rb")
        self.tail = bytearray(self._seed(log_path, log_offset))
        self.log.seek(log_offset)
        self.uploaded_offset = log_offset
        self.log_due = 0.0
        self.active = True

    def _seed(self, log_path: Path, offset: int) -> bytes:
        """The stored tail, plus what an earlier attempt here wrote after its last upload (it died
        before mirroring its last lines: they are still in this run directory, and nothing came after
        them elsewhere, since mirror.json says this directory wrote last)."""
        try:
            with self.store.open(f"{self.prefix}/log.txt") as f:
                seed = f.read(LOG_TAIL_BYTES)
        except KeyNotFound:
            seed = b""
        state = read_state(self.store, self.prefix) or {}
        done = state.get("log_offset")
        if state.get("writer") == self.writer and isinstance(done, int) and 0 <= done < offset:
            self.log.seek(max(done, offset - LOG_TAIL_BYTES))
            seed += self.log.read(offset - self.log.tell())
        return seed[-LOG_TAIL_BYTES:]

    def write_state(self) -> None:
        with self.lock:  # built under the lock too: a beat must never write back an older "active"
            state = {"attempt": self.attempt, "active": self.active, "writer": self.writer,
                     "host": socket.gethostname(), "pid": os.getpid(), "log_offset": self.uploaded_offset,
                     "beat": time.time()}
            self.store.put_stream(io.BytesIO(json.dumps(state).encode()), f"{self.prefix}/mirror.json")

    def sweep(self, checkpoints: bool = True, force_log: bool = False) -> None:
        """Upload a newer finished checkpoint, and the log tail when it grew (at most every LOG_EVERY_S
        unless ``force_log``). Storage faults are logged and retried on the next sweep."""
        if checkpoints:
            local = finished_checkpoints(self.run_dir)
            if local and step_of(local[0].name) > self.uploaded_step:
                try:
                    self.checkpoints.upload(local[0])
                    self.uploaded_step = step_of(local[0].name)
                    log.info("mirrored %s", local[0].name)
                except (StorageError, OSError):  # pruned while we copied, or storage is away: next sweep
                    log.warning("mirroring %s failed", local[0], exc_info=True)
        while chunk := self.log.read(1 << 20):
            self.tail += chunk
            del self.tail[:-LOG_TAIL_BYTES]
        offset = self.log.tell()
        if offset != self.uploaded_offset and (force_log or time.monotonic() >= self.log_due):
            try:
                self.store.put_stream(io.BytesIO(bytes(self.tail)), f"{self.prefix}/log.txt")
                self.uploaded_offset = offset
                self.log_due = time.monotonic() + LOG_EVERY_S
                self.write_state()
            except (StorageError, OSError):
                log.warning("mirroring the log failed", exc_info=True)

    def beat_until(self, done: threading.Event) -> None:
        while not done.wait(BEAT_S):
            try:
                self.write_state()
            except Exception:  # storage away for a moment: a resuming attempt sees the beat pause
                log.warning("mirror heartbeat failed", exc_info=True)

    def finish(self, checkpoints: bool) -> None:
        """The last sweep, then ``active: false`` (a resuming attempt stops waiting). Retries storage
        faults for a while: this is the upload a resuming attempt waits for."""
        deadline = time.monotonic() + 300
        while True:
            try:
                self.sweep(checkpoints=checkpoints, force_log=True)
                local = finished_checkpoints(self.run_dir) if checkpoints else []
                if local and step_of(local[0].name) > self.uploaded_step:
                    raise StorageError(f"{local[0].name} is not mirrored yet")
                self.active = False
                self.write_state()
                return
            except (StorageError, OSError):
                if time.monotonic() > deadline:
                    log.error("giving up the final upload", exc_info=True)
                    return
                time.sleep(2.0)


def _writer_id(run_dir: Path) -> str:
    path = run_dir / WRITER_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        path.write_text(uuid.uuid4().hex)
        return path.read_text().strip()


def _orders(fd: int, buffered: bytearray, timeout: float) -> str | None:
    """The next order line ('' at end-of-file) if one arrives within ``timeout``, else None."""
    deadline = time.monotonic() + timeout
    while b"\n" not in buffered:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return ""
        buffered += chunk
    line, _, rest = bytes(buffered).partition(b"\n")
    buffered[:] = rest
    return line.decode().strip() or None


def _trainer_gone(run_dir: Path) -> bool:
    """Whether nobody holds the run lock any more (the trainer and its children have exited)."""
    fd = os.open(run_dir / "trainer.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    finally:
        os.close(fd)  # releases it at once if we got it: a next attempt here may take it
    return True


def _outlive_supervisor(mirror: RunMirror, trainer_pid: int, grace_s: float) -> None:
    """Keep mirroring until the trainer exits; SIGKILL its group after ``grace_s`` like its supervisor
    would have (a held run lock means the group still lives, so its id is still the trainer's)."""
    log.warning("the supervisor is gone; mirroring until the trainer (pid %s) exits", trainer_pid)
    killed_at = None
    started = time.monotonic()
    while not _trainer_gone(mirror.run_dir):
        mirror.sweep()
        if killed_at is None and time.monotonic() - started > grace_s:
            log.warning("the trainer did not stop within %g s; killing it", grace_s)
            try:
                os.killpg(trainer_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            killed_at = time.monotonic()
        elif killed_at is not None and time.monotonic() - killed_at > 30:
            log.error("the run lock is still held 30 s after SIGKILL; uploading what is there")
            return
        time.sleep(SCAN_S)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s mirror[%(process)d]: %(message)s")
    fd, buffered = sys.stdin.fileno(), bytearray()
    first = None
    while first is None:
        first = _orders(fd, buffered, 60.0)
    if not first:
        return 2
    o: dict[str, Any] = json.loads(first)
    store = Storage(o["storage_url"], o["storage_options"])
    mirror = RunMirror(store, o["user_id"], o["job_id"], o["attempt"], Path(o["run_dir"]), Path(o["log_path"]),
                       int(o["log_offset"]))
    mirror.write_state()
    done = threading.Event()
    threading.Thread(target=mirror.beat_until, args=(done,), name="mirror-beat", daemon=True).start()
    keep = True
    while True:
        order = _orders(fd, buffered, SCAN_S)
        if order is None:
            mirror.sweep()
            continue
        if order.startswith("finish"):
            keep = order.split()[-1] == "all"
        else:  # end-of-file: our supervisor died
            _outlive_supervisor(mirror, int(o["trainer_pid"]), float(o["grace_s"]))
        break
    mirror.finish(checkpoints=keep)
    done.set()
    log.info("done (attempt %s, checkpoint step %s)", mirror.attempt, mirror.uploaded_step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
