"""The only code that spawns processes: the trainer (and, later, model servers).

Everything goes through :func:`spawn`: its own process group, and a parent-death signal so a child never
outlives the thread that supervises it. :func:`run_training` supervises one attempt of one job: it holds
RUN_DIR/trainer.lock (inherited by the trainer, so a second trainer for the same run can never start
while the first lives), turns the trainer's JSON lines into JobEvents and progress, renews the lease,
honours cancel and shutdown with SIGTERM (the trainer checkpoints and exits 75), and maps the exit code
to the job's outcome with ``trainer.progress.outcome_of_exit``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import peewee as pw

from trainer import progress

from . import datasets, jobs
from .db import database
from .models import Model, TrainingJob

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True) if sys.platform == "linux" else None

EventCallback = Callable[[int, int, str, dict], None]  # job_id, seq, kind, data


# --- slots -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Slot:
    """A place a job runs in this worker process: one GPU (or several, for torchrun), or a CPU share."""

    name: str
    kind: str  # "cpu" | "gpu"
    gpu_ids: tuple[str, ...] = ()
    threads: int = 1

    def env(self) -> dict[str, str]:
        if self.kind == "gpu":
            return {"CUDA_VISIBLE_DEVICES": ",".join(self.gpu_ids)}
        return {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(self.threads)}

    @property
    def device(self) -> str:
        return "cuda" if self.kind == "gpu" else "cpu"


def local_slots(settings: Any) -> list[Slot]:
    """This process's slots: one per GPU (``gpus`` = auto / none / "0,1"), else ``cpu_slots`` CPU shares."""
    gpus = str(getattr(settings, "gpus", "auto") or "auto").strip().lower()
    ids: list[str] = []
    if gpus == "auto":
        ids = detect_gpus()
    elif gpus != "none":
        ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if ids:
        return [Slot(f"gpu{i}", "gpu", (i,)) for i in ids]
    n = max(1, int(getattr(settings, "cpu_slots", 1)))
    threads = max(1, (os.cpu_count() or 1) // n)
    return [Slot(f"cpu{k}", "cpu", (), threads) for k in range(n)]


def detect_gpus() -> list[str]:
    """GPU ids visible here, without importing torch (the web process never does)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split(":", 1)[0].split()[1] for line in out.splitlines() if line.startswith("GPU ")]


# --- the spawn primitive -----------------------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:
        # Runs in the child between fork and exec. PR_SET_PDEATHSIG fires when the THREAD that forked
        # exits, so callers spawn from the thread that supervises the child for its whole life.
        if _libc is not None:
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def spawn(argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
          stdin: Any = subprocess.DEVNULL, stdout: Any = None, stderr: Any = None,
          pass_fds: Sequence[int] = (), die_with_parent: bool = True) -> subprocess.Popen:
    """Start ``argv`` in its own process group (signals reach its children too), dying with the
    calling thread when ``die_with_parent``. Raises OSError when the program cannot start."""
    return subprocess.Popen(
        list(argv), env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr, pass_fds=tuple(pass_fds),
        start_new_session=True, preexec_fn=_die_with_parent(os.getpid()) if die_with_parent else None,
    )


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


# --- short helper runs of the trainer package (device probe, calibration) -----------------------------


class SpawnError(RuntimeError):
    """A helper program could not start, failed, timed out or gave no answer."""


def run_helper(settings: Any, module: str, args: Sequence[str], *, event: str, timeout: float,
               slot: Slot | None = None) -> dict:
    """Run ``python -m module args`` on ``slot`` (default: this process's first slot) and return the
    fields of the first ``event`` line it prints. Call it from the thread that waits for the answer
    (the child dies with it). Raises SpawnError."""
    slot = slot or local_slots(settings)[0]
    python = getattr(settings, "trainer_python", None) or sys.executable
    try:
        proc = spawn([python, "-m", module, *args], env=trainer_env(slot), stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    except OSError as exc:
        raise SpawnError(f"cannot start {module}: {exc}") from exc
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_group(proc, signal.SIGKILL)
        proc.communicate()
        raise SpawnError(f"{module} took longer than {timeout:g} s") from None
    for line in out.splitlines():
        record = progress.parse_line(line)
        if record is None:
            continue
        if record["event"] == event:
            return {k: v for k, v in record.items() if k not in ("event", "v", "time")}
        if record["event"] == "error":
            raise SpawnError(record.get("message") or record.get("code") or f"{module} failed")
    tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
    raise SpawnError(f"{module} exited {proc.returncode} without a {event} event: {tail[0][:300]}")


def probe_device(settings: Any) -> dict:
    """{"device", "device_name", "memory_bytes"} of where this process's jobs train, asked of the
    trainer itself (the web process never imports torch). Raises SpawnError."""
    return run_helper(settings, "trainer.calibrate", ["--probe"], event="calibration", timeout=120)


def calibrate(settings: Any, shape: Any, batch_size: int, *, timeout: float = 600) -> dict:
    """Time a few real training steps at ``shape`` (trainer.sizing.ModelShape) on this machine's first
    slot: the calibration event's fields (tokens_per_sec, step_s, ...). Raises SpawnError."""
    args = ["--depth", str(shape.depth), "--vocab-size", str(shape.vocab_size), "--seq-len", str(shape.seq_len),
            "--batch-size", str(batch_size)]
    return run_helper(settings, "trainer.calibrate", args, event="calibration", timeout=timeout)


# --- the run directory's lock --------------------------------------------------------------------------


def acquire_run_lock(run_dir: Path, wait_s: float = 0.0) -> int | None:
    """flock RUN_DIR/trainer.lock; the fd (inherited by the trainer) holds it until every holder exits.
    None if another live process holds it after ``wait_s`` seconds."""
    fd = os.open(run_dir / "trainer.lock", os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.1)


# --- supervising one training attempt ------------------------------------------------------------------


def run_dir_for(job: TrainingJob, settings: Any) -> Path:
    return Path(getattr(settings, "runs_dir")) / f"job-{job.id}"


def data_cache_dir(settings: Any) -> Path:
    """Tokenized data shared by all runs on this machine: the trainer's cache is content-addressed and
    published by rename, so jobs on the same data skip tokenizing (the demo corpus: ~20 s on 2 cores)."""
    home = getattr(settings, "home", None)
    return Path(home) / "cache" / "data" if home else Path(getattr(settings, "runs_dir")) / "_data_cache"


def trainer_argv(settings: Any, slot: Slot, config_path: Path, run_dir: Path) -> list[str]:
    python = getattr(settings, "trainer_python", None) or sys.executable
    module = getattr(settings, "trainer_module", None) or "trainer.train"
    args = ["--config", str(config_path), "--out", str(run_dir), "--resume"]
    if slot.kind == "gpu" and len(slot.gpu_ids) > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(slot.gpu_ids)}",
                "-m", module, *args]
    return [python, "-m", module, *args]


def trainer_env(slot: Slot) -> dict[str, str]:
    env = dict(os.environ)
    env.update(slot.env())
    env["PYTHONUNBUFFERED"] = "1"
    # Make `trainer` importable whether it is installed or this is a checkout, without touching cwd.
    spec = importlib.util.find_spec("trainer")
    if spec and spec.submodule_search_locations:
        root = str(Path(list(spec.submodule_search_locations)[0]).parent)
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _storage(settings: Any):
    """The artifact store when settings describe one (storage.py is the only fsspec user), else None."""
    if not getattr(settings, "storage_url", None) and not getattr(settings, "home", None):
        return None
    from .storage import Storage

    return Storage.from_settings(settings)


class CheckpointMirror:
    """Copies the checkpoints a trainer writes into storage (newest wins, one upload at a time), so a
    worker on another machine can resume the job; restores the newest into a run directory with none.
    On by default with remote storage (``mirror_checkpoints`` forces it either way)."""

    def __init__(self, store: Any, user_id: int, job_id: int):
        from .storage import user_prefix

        self.store = store
        self.prefix = f"{user_prefix(user_id)}/runs/{job_id}/checkpoints"
        self._pending: Path | None = None
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False

    @classmethod
    def for_job(cls, settings: Any, job: TrainingJob) -> "CheckpointMirror | None":
        wanted = getattr(settings, "mirror_checkpoints", None)
        if wanted is False:
            return None
        store = _storage(settings)
        if store is None or (wanted is None and store.is_local):
            return None
        return cls(store, job.user_id, job.id)

    def push(self, checkpoint_dir: Path) -> None:
        with self._cv:
            self._pending = checkpoint_dir
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=f"mirror-{self.prefix}", daemon=True)
                self._thread.start()
            self._cv.notify()

    def _work(self) -> None:
        while True:
            with self._cv:
                while self._pending is None and not self._closing:
                    self._cv.wait()
                path, self._pending = self._pending, None
                if path is None:
                    return
            try:
                key = f"{self.prefix}/{path.name}"
                self.store.put_dir(path, key)
                for older in self.store.list_committed(self.prefix):
                    if older != key:
                        self.store.delete(older)
            except Exception:  # the trainer may have rotated it away meanwhile; the next one will do
                log.warning("mirroring checkpoint %s failed", path, exc_info=True)

    def close(self) -> None:
        """Finish the pending upload (the checkpoint a stopping trainer just wrote)."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()

    def restore(self, run_dir: Path) -> str | None:
        """Copy the newest mirrored checkpoint into ``run_dir`` if it has no finished checkpoint."""
        if any(run_dir.glob("checkpoints/step_*/manifest.json")):
            return None
        keys = self.store.list_committed(self.prefix)
        if not keys:
            return None
        src = Path(self.store.local_path(keys[-1]))
        dst = run_dir / "checkpoints" / keys[-1].rsplit("/", 1)[-1]
        tmp = dst.with_name(f".restore-{dst.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("_COMMITTED.json"))
        os.replace(tmp, dst)
        return keys[-1]

    def forget(self) -> None:
        for key in self.store.list_committed(self.prefix):
            self.store.delete(key)


class _Supervisor:
    def __init__(self, job: TrainingJob, slot: Slot, settings: Any, on_event: EventCallback | None,
                 stop: threading.Event | None):
        self.job, self.slot, self.settings, self.on_event = job, slot, settings, on_event
        self.stop = stop or threading.Event()
        self.attempt = job.attempt
        self.owner = job.lease_owner or jobs.owner_id(slot.name)
        self.lease_s = float(getattr(settings, "lease_seconds", 30))
        self.backoff = float(getattr(settings, "retry_backoff_seconds", jobs.DEFAULT_BACKOFF_S))
        self.run_dir = run_dir_for(job, settings)
        self.progress: dict[str, Any] = dict(job.progress or {})
        self.facts: dict[str, Any] = {}  # what the Model row needs: params, samples, sha, checkpoint
        self.error: dict[str, Any] | None = None
        self.fenced = False
        self.last_beat = time.monotonic()
        self.mirror = CheckpointMirror.for_job(settings, job)

    # -- the job row --
    def beat(self, force: bool = False) -> bool:
        if force or time.monotonic() - self.last_beat >= self.lease_s / 3:
            self.last_beat = time.monotonic()
            if not jobs.heartbeat(self.job.id, self.attempt, self.owner, lease_seconds=self.lease_s):
                self.fenced = True
        return not self.fenced

    def cancel_requested(self) -> bool:
        return bool(TrainingJob.select(TrainingJob.cancel_requested)
                    .where(TrainingJob.id == self.job.id).scalar())

    def emit(self, kind: str, data: dict) -> None:
        seq = jobs.record_event(self.job.id, kind, data, attempt=self.attempt)
        if self.on_event:
            self.on_event(self.job.id, seq, kind, data)

    def handle(self, record: dict) -> None:
        kind = record["event"]
        data = {k: v for k, v in record.items() if k not in ("event", "v")}
        self.emit(kind, data)
        p = self.progress
        if kind == "start":
            self.facts.update(params=data.get("params"), start=data)
            p.update(total_steps=data.get("total_steps"), device=data.get("device"),
                     resumed_from_step=data.get("resumed_from_step"))
        elif kind == "step":
            for key in ("step", "total_steps", "loss", "tokens_per_sec", "eta_s", "elapsed_s", "lr", "mfu"):
                p[key] = data.get(key)
        elif kind == "eval":
            p.update(val_bpb=data.get("val_bpb"), val_loss=data.get("val_loss"))
        elif kind == "sample":
            self.facts["samples"] = data.get("samples")
        elif kind == "checkpoint":
            p["checkpoint_step"] = data.get("step")
            self.facts["checkpoint"] = data.get("path")
            if self.mirror is not None and self._checkpoint_dir() is not None:
                self.mirror.push(self._checkpoint_dir())
        elif kind == "done":
            self.facts["done"] = data
            self.facts["checkpoint"] = data.get("checkpoint") or self.facts.get("checkpoint")
        elif kind == "error":
            self.error = data
        if kind in ("start", "step", "eval", "checkpoint", "done"):
            jobs.update_progress(self.job.id, self.attempt, p)

    @contextlib.contextmanager
    def _heartbeats(self) -> Iterator[None]:
        """Renew the lease from a helper thread while this one is busy (preparing the data)."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.lease_s / 3):
                try:
                    self.beat(force=True)
                except pw.DatabaseError:
                    log.warning("job %s: heartbeat failed while preparing", self.job.id, exc_info=True)
                finally:
                    database.close()  # this helper thread's own connection

        thread = threading.Thread(target=beat, name=f"prepare-heartbeat-{self.job.id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    # -- the attempt --
    def run(self) -> str | None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.run_dir / "train.log"
        with self._heartbeats():  # waiting for an earlier trainer to let go may outlast the lease
            lock_fd = acquire_run_lock(self.run_dir, wait_s=min(self.lease_s, 60.0))
        if lock_fd is None:
            # A trainer from an earlier attempt is still alive (checkpointing after its supervisor died).
            return jobs.finish(self.job.id, self.attempt, "infrastructure", charged=False,
                               reason="a trainer from an earlier attempt still holds the run directory",
                               backoff_base=self.backoff)
        try:
            return self._run_locked(lock_fd, log_path)
        finally:
            os.close(lock_fd)

    def _run_locked(self, lock_fd: int, log_path: Path) -> str | None:
        job = self.job
        try:
            with self._heartbeats():  # a download can outlast the lease
                data, storage_options = datasets.resolve_for_training(job, self.settings, self.run_dir)
                restored = self.mirror.restore(self.run_dir) if self.mirror is not None else None
        except Exception as exc:  # fetch's errors carry an HTTP status: 4xx is the user's to fix
            status = getattr(exc, "status", None)
            outcome = "user_error" if isinstance(status, int) and 400 <= status < 500 else "infrastructure"
            return jobs.finish(job.id, self.attempt, outcome, reason=f"preparing the data failed: {exc}",
                               backoff_base=self.backoff)
        if self.fenced:  # the job moved on while we prepared (our lease was lost): leave it alone
            return None
        if restored:
            self.emit("restore", {"key": restored, "reason": "resuming from the checkpoint another worker mirrored"})
        self.facts["data_sha256"] = (datasets.recorded_source(self.run_dir) or {}).get("sha256", "")
        config = {k: v for k, v in job.config.items() if k not in ("dataset", "gpus")}
        config.update(data=data, device=self.slot.device, job_id=job.id, name=job.name,
                      cache_dir=str(data_cache_dir(self.settings)))
        if storage_options:
            config["storage_options"] = storage_options  # may hold the user's S3 secret: a 0600 file
        config_path = self.run_dir / "job.json"
        tmp = config_path.with_suffix(".json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(config, fh, indent=2)
        os.replace(tmp, config_path)
        if self.cancel_requested():
            return jobs.finish(job.id, self.attempt, "cancelled", reason="cancelled while preparing")
        if not jobs.transition(job.id, jobs.RUNNING, expect={jobs.PREPARING}, attempt=self.attempt,
                               reason=f"trainer starting on {self.slot.name}", log_path=str(log_path),
                               output_path=str(self.run_dir)):
            return None
        argv = trainer_argv(self.settings, self.slot, config_path, self.run_dir)
        # stdout goes to a file we tail, not a pipe: when a supervisor dies (kill -9), a pipe would break
        # and the trainer's next line would kill it with EPIPE before it could checkpoint.
        events_path = self.run_dir / f"events-{self.attempt}.jsonl"
        with open(log_path, "ab") as stderr, open(events_path, "ab") as stdout, open(events_path, "rb") as tail:
            tail.seek(0, os.SEEK_END)
            try:
                proc = spawn(argv, env=trainer_env(self.slot), cwd=self.run_dir, stdout=stdout,
                             stderr=stderr, pass_fds=(lock_fd,))
            except OSError as exc:
                return jobs.finish(job.id, self.attempt, "infrastructure", reason=f"cannot start the trainer: {exc}",
                                   backoff_base=self.backoff)
            with open(self.run_dir / "trainers.txt", "a") as fh:
                fh.write(f"{job.id} attempt={self.attempt} pid={proc.pid} start={time.time():.3f}\n")
            try:
                rc, term_reason = self._supervise(proc, tail)
                if self.mirror is not None:
                    with self._heartbeats():
                        self.mirror.close()
            except BaseException:
                # Never leave a trainer running unsupervised: stop it (it checkpoints), then let the
                # reconciler requeue the job once our lease runs out.
                log.exception("supervising job %s failed; stopping its trainer", job.id)
                signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(float(getattr(self.settings, "term_grace_seconds", 120)))
                except subprocess.TimeoutExpired:
                    signal_group(proc, signal.SIGKILL)
                    proc.wait()
                raise
        return self._conclude(rc, term_reason)

    def _read_lines(self, tail: Any) -> bool:
        """Handle every complete line written since the last call; whether there were any."""
        got = False
        while True:
            pos = tail.tell()
            raw = tail.readline()
            if not raw.endswith(b"\n"):
                tail.seek(pos)  # a partial line: the trainer is still writing it
                return got
            record = progress.parse_line(raw)
            if record is not None:
                try:
                    self.handle(record)
                except BaseException:
                    tail.seek(pos)  # handle this line again once the database answers
                    raise
            got = True

    def _supervise(self, proc: subprocess.Popen, tail: Any) -> tuple[int, str | None]:
        term_reason: str | None = None
        term_at = 0.0
        grace = float(getattr(self.settings, "term_grace_seconds", 120))
        next_poll = 0.0
        db_errors = 0
        while True:
            exited = proc.poll() is not None
            try:
                if not self._read_lines(tail) and not exited:
                    self.stop.wait(0.1) if term_reason is None else time.sleep(0.1)
                if exited:
                    self._read_lines(tail)  # whatever it wrote last
                    break
                term_reason, term_at, next_poll = self._check(proc, term_reason, term_at, next_poll, grace)
                db_errors = 0
            except pw.DatabaseError as exc:
                # A database restart or a network blip: the trainer keeps training; we retry. If it lasts
                # past our lease, another worker takes the job and our next heartbeat fences us out.
                db_errors += 1
                log.warning("job %s: database error while supervising (%s); retrying", self.job.id, exc)
                try:
                    database.close()  # a dead connection stays dead: reconnect on the next query
                except Exception:
                    pass
                time.sleep(min(5.0, 0.2 * db_errors))
        rc = proc.wait()
        with open(self.run_dir / "trainers.txt", "a") as fh:
            fh.write(f"{self.job.id} attempt={self.attempt} pid={proc.pid} end={time.time():.3f} rc={rc}\n")
        return rc, term_reason

    def _check(self, proc: subprocess.Popen, term_reason: str | None, term_at: float, next_poll: float,
               grace: float) -> tuple[str | None, float, float]:
        """Heartbeat, cancel, shutdown and the SIGKILL deadline; returns the updated loop state."""
        now = time.monotonic()
        if term_reason is None:
            if not self.beat():
                term_reason = "fenced"
            elif self.stop.is_set():
                term_reason = "shutdown"
            elif now >= next_poll:
                next_poll = now + 0.5
                if self.cancel_requested():
                    term_reason = "cancel"
            if term_reason is not None:
                term_at = now
                signal_group(proc, signal.SIGTERM)
        elif now - term_at > grace:
            signal_group(proc, signal.SIGKILL)
        elif term_reason != "fenced":
            self.beat()  # keep the lease while the trainer checkpoints
        return term_reason, term_at, next_poll

    def _conclude(self, rc: int, term_reason: str | None) -> str | None:
        job_id, attempt = self.job.id, self.attempt
        if self.fenced or term_reason == "fenced":
            log.warning("job %s attempt %s was fenced out; leaving its row alone", job_id, attempt)
            return None
        outcome = progress.outcome_of_exit(rc)
        fields = {"progress": self.progress}
        if outcome == "completed":
            return self._complete(fields)
        if term_reason == "cancel":
            with database.atomic():
                status = jobs.finish(job_id, attempt, "cancelled", reason="cancelled by its owner", **fields)
                model = self._create_model(cancelled=True) if status and self._checkpoint_dir() else None
            if model is not None:
                self._publish(model)
            return status
        message = (self.error or {}).get("message", "")
        if outcome == "user_error":
            return jobs.finish(job_id, attempt, "user_error", reason=message or f"the trainer exited with {rc}",
                               **fields)
        if term_reason == "shutdown":
            return jobs.finish(job_id, attempt, "preempted", charged=False, reason="the server shut down",
                               backoff_base=self.backoff, **fields)
        if rc < 0:
            why = f"the trainer was killed by {signal.Signals(-rc).name}"
        elif outcome == "preempted":
            why = "the trainer was stopped by SIGTERM"
        else:
            why = f"the trainer exited with code {rc}" + (f": {message}" if message else "")
        return jobs.finish(job_id, attempt, outcome, reason=why, backoff_base=self.backoff, **fields)

    def _complete(self, fields: dict) -> str | None:
        if self._checkpoint_dir() is None:
            return jobs.finish(self.job.id, self.attempt, "infrastructure", backoff_base=self.backoff,
                               reason="the trainer exited 0 without a final checkpoint", **fields)
        with database.atomic():
            status = jobs.finish(self.job.id, self.attempt, "completed", **fields)
            model = self._create_model(cancelled=False) if status else None
        if model is not None:
            self._publish(model)
            if self.mirror is not None:
                self.mirror.forget()  # the model has its own published copy now
        return status

    def _checkpoint_dir(self) -> Path | None:
        path = self.facts.get("checkpoint")
        if path:
            p = Path(path) if os.path.isabs(path) else self.run_dir / path
            if (p / "manifest.json").exists():
                return p
        found = sorted(self.run_dir.glob("checkpoints/step_*/manifest.json"))
        return found[-1].parent if found else None

    def _create_model(self, cancelled: bool) -> Model:
        # The row first points at the run directory; _publish moves it to storage once uploaded, so
        # the (possibly slow) upload happens outside the transaction that ends the job.
        job = TrainingJob.get_by_id(self.job.id)
        ckpt = self._checkpoint_dir()
        assert ckpt is not None
        done = self.facts.get("done") or {}
        start = self.facts.get("start") or {}
        step = done.get("step", self.progress.get("checkpoint_step") or self.progress.get("step") or 0)
        tok = ckpt / "tokenizer"
        name = job.name or f"job {job.id}"
        return Model.create(
            user=job.user_id, job=job.id, name=name + (f" (cancelled at step {step})" if cancelled else ""),
            step=step or 0, checkpoint_key=str(ckpt), tokenizer_key=str(tok if tok.exists() else ckpt),
            params=int(self.facts.get("params") or 0), config=start.get("config") or job.config,
            metrics={"final_loss": done.get("final_loss", self.progress.get("loss")),
                     "final_val_bpb": done.get("final_val_bpb", self.progress.get("val_bpb")),
                     "steps": step, "elapsed_s": done.get("elapsed_s")},
            samples=self.facts.get("samples") or [], data_source=datasets.describe_spec(job.config.get("dataset")),
            data_sha256=str(self.facts.get("data_sha256") or start.get("data_sha256") or ""),
            size_bytes=sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()),
        )

    def _publish(self, model: Model) -> None:
        store = _storage(self.settings)
        if store is None:
            return
        try:
            key = store.publish_checkpoint(model.user_id, model.id, model.checkpoint_key)
        except Exception as exc:  # the model stays usable from the run directory on this machine
            log.exception("publishing the checkpoint of job %s failed", self.job.id)
            self.emit("publish", {"ok": False, "error": str(exc)})
            return
        tokenizer = f"{key}/tokenizer" if model.tokenizer_key.endswith("/tokenizer") else key
        Model.update(checkpoint_key=key, tokenizer_key=tokenizer).where(Model.id == model.id).execute()
        self.emit("publish", {"ok": True, "key": key})


def run_training(job: TrainingJob, slot: Slot, settings: Any, on_event: EventCallback | None = None, *,
                 stop: threading.Event | None = None) -> str | None:
    """Supervise the claimed ``job`` (status preparing, attempt and lease set by ``jobs.claim_next``)
    on ``slot`` until its trainer exits. Call it from the thread that should own the trainer's life.

    Returns the job's new status, or None when this attempt was fenced out. ``stop`` set means the
    worker is shutting down: the trainer gets SIGTERM, checkpoints, and the job is requeued.
    """
    return _Supervisor(job, slot, settings, on_event, stop).run()


# --- model servers (owned by the chat engineer; inference.py is their only client) ----------------------


def start_model_server(checkpoint_dir: str, socket_path: str, device: str, settings: Any, *,
                       stderr: Any = None, max_active: int = 16) -> subprocess.Popen:
    """Start ``python -m trainer.serve`` for one checkpoint, listening on ``socket_path``; returns the Popen
    (inference.ModelPool waits for the socket, stops and restarts it). Raises OSError."""
    python = getattr(settings, "trainer_python", None) or sys.executable
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # tiny models decode fastest on few threads; an explicit OMP_NUM_THREADS is left alone
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    spec = importlib.util.find_spec("trainer")
    if spec and spec.submodule_search_locations:
        root = str(Path(list(spec.submodule_search_locations)[0]).parent)
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    argv = [python, "-m", "trainer.serve", "--socket", socket_path, "--checkpoint", checkpoint_dir,
            "--device", device or "auto", "--max-active", str(max_active)]
    # Not die_with_parent: that follows the spawning THREAD, and a request thread may end before the
    # server should; trainer.serve watches its parent process instead and exits when it is gone.
    return spawn(argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr, die_with_parent=False)
