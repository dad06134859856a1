"""The training supervisor: one attempt of one job, from the claimed row to the trainer's exit.

:func:`run_training` holds RUN_DIR/trainer.lock (inherited by the trainer, so a second trainer for the
same run can never start while the first lives), prepares the data and the job's config, starts the
trainer through ``runner.spawn`` (runner.py stays the only code that spawns processes), tails the
trainer's JSON-lines event file into JobEvents and progress, renews the lease, honours cancel and
shutdown with SIGTERM (the trainer checkpoints and exits 75), maps the exit code to the job's outcome
with ``trainer.progress.outcome_of_exit``, and has the Model a finished run leaves created and published
(checkpoints.py owns how a checkpoint becomes a Model). With a mirror (remote storage), a sidecar
process (mirror.py) copies the run's checkpoints and log into storage, and outlives a supervisor that dies.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import peewee as pw

from trainer import progress

from . import billing, chattune, datasets, jobs, logs, metrics, quarantine
from .checkpoints import CheckpointMirror, create_run_model, final_checkpoint, publish_run_checkpoint, run_dir_for
from .db import database
from .mirror import Sidecar, run_prefix, wait_for_previous
from .models import TrainingJob
from .runner import Slot, acquire_run_lock, signal_group, spawn, trainer_argv, trainer_env
from .settings import Settings
from .storage import Storage

log = logging.getLogger(__name__)

EventCallback = Callable[[int, int, str, dict], None]  # job_id, seq, kind, data


# --- where a run lives -----------------------------------------------------------------------------------


def data_cache_dir(settings: Settings) -> Path:
    """Tokenized data shared by all runs on this machine: the trainer's cache is content-addressed and
    published by rename, so jobs on the same data skip tokenizing (the demo corpus: ~20 s on 2 cores)."""
    return Path(settings.home) / "cache" / "data"



# --- supervising one training attempt ------------------------------------------------------------------


class _Supervisor:
    def __init__(self, job: TrainingJob, slot: Slot, settings: Settings, on_event: EventCallback | None,
                 stop: threading.Event | None):
        self.job, self.slot, self.settings, self.on_event = job, slot, settings, on_event
        self.stop = stop or threading.Event()
        self.attempt = job.attempt
        self.owner = job.lease_owner or jobs.owner_id(slot.name)
        self.lease_s = settings.lease_seconds
        self.backoff = settings.retry_backoff_seconds
        self.run_dir = run_dir_for(job, settings)
        self.progress: dict[str, Any] = dict(job.progress or {})
        self.facts: dict[str, Any] = {}  # what the Model row needs: params, samples, sha, checkpoint
        self.error: dict[str, Any] | None = None
        self.fenced = False
        self.last_beat = time.monotonic()
        self.mirror = CheckpointMirror.for_job(settings, job)
        self.meter = billing.meter_for(job.id)  # a billed run pauses before it outspends its hold
        self.figures = metrics.JobRun(job.id, slot.device)  # ended by run()
        self.started = time.monotonic()  # Xids from here on count against this attempt's GPUs

    # -- the job row --
    def beat(self, force: bool = False) -> bool:
        if force or time.monotonic() - self.last_beat >= self.lease_s / 3:
            self.last_beat = time.monotonic()
            if not jobs.heartbeat(self.job.id, self.attempt, self.owner, lease_seconds=self.lease_s):
                if not self.fenced:
                    metrics.lease_lost()
                    log.warning("job %s attempt %s lost its lease", self.job.id, self.attempt)
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
            self.meter.started(data.get("time"))
            self.facts.update(params=data.get("params"), start=data)
            p.update(total_steps=data.get("total_steps"), device=data.get("device"),
                     resumed_from_step=data.get("resumed_from_step"))
        elif kind == "step":
            for key in ("step", "total_steps", "loss", "tokens_per_sec", "eta_s", "elapsed_s", "lr", "mfu"):
                p[key] = data.get(key)
            self.figures.step(data.get("tokens_per_sec"), data.get("mfu"))
            if data.get("stage"):
                p["stage"] = data["stage"]
        elif kind == "eval":
            if data.get("stage") == "chat":  # held-out conversations: its own curve, not pretraining's
                p["chat_val_loss"] = data.get("val_loss")
            else:
                p.update(val_bpb=data.get("val_bpb"), val_loss=data.get("val_loss"))
        elif kind == "stage":  # the chat stage begins after step data["step"]
            p.update(stage=data.get("stage"), stage_from_step=data.get("step"), stage_steps=data.get("steps"))
        elif kind == "sample":
            self.facts["samples"] = data.get("samples")
        elif kind == "checkpoint":
            p["checkpoint_step"] = data.get("step")
            self.facts["checkpoint"] = data.get("path")
        elif kind == "done":
            self.facts["done"] = data
            self.facts["checkpoint"] = data.get("checkpoint") or self.facts.get("checkpoint")
        elif kind == "error":
            self.error = data
        if kind in ("start", "step", "eval", "checkpoint", "done", "stage"):
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
        try:
            return self._run()
        finally:
            self.figures.end()

    def _run(self) -> str | None:
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
            status = self._run_locked(lock_fd, log_path)
        finally:
            os.close(lock_fd)
        if status in jobs.FINAL and self.mirror is not None:
            try:
                self.mirror.forget()  # nothing resumes a final job; a finished one's Model has its own copy
            except Exception:
                log.warning("job %s: deleting its mirrored checkpoints failed", self.job.id, exc_info=True)
        return status

    def _restore(self) -> str | None:
        """With a mirror: wait for an earlier attempt's sidecar to finish its upload (the checkpoint its
        trainer wrote on SIGTERM after its supervisor died), then copy the newest mirrored checkpoint
        here if it is newer than this run directory's own."""
        if self.mirror is None:
            return None
        waited = wait_for_previous(self.mirror.store, run_prefix(self.job.user_id, self.job.id), self.attempt)
        if waited > 1:
            log.info("job %s waited %.1f s for the previous attempt's mirror", self.job.id, waited)
        return self.mirror.restore(self.run_dir)

    def _run_locked(self, lock_fd: int, log_path: Path) -> str | None:
        job = self.job
        try:
            with self._heartbeats():  # a download can outlast the lease
                data, storage_options = (None, None) if job.config.get("dataset") is None else \
                    datasets.resolve_for_training(job, self.settings, self.run_dir)  # none: chat-tuning a model
                chat_fields, chat_options = chattune.prepare(job, self.settings, self.run_dir)
                storage_options = storage_options or chat_options
                restored = self._restore()
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
        config = chattune.trainer_config(config, chat_fields)  # --chat-data, --init-from, --chat-steps
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
            log_offset = stderr.tell()  # this attempt's lines start here
            self.relay = logs.LineRelay(log_path, job.id)  # its stderr reaches the process log too
            try:
                proc = spawn(argv, env=trainer_env(self.slot), cwd=self.run_dir, stdout=stdout,
                             stderr=stderr, pass_fds=(lock_fd,))
            except OSError as exc:
                self.relay.close()
                return jobs.finish(job.id, self.attempt, "infrastructure", reason=f"cannot start the trainer: {exc}",
                                   backoff_base=self.backoff)
            with open(self.run_dir / "trainers.txt", "a") as fh:
                fh.write(f"{job.id} attempt={self.attempt} pid={proc.pid} start={time.time():.3f}\n")
            sidecar = self._start_sidecar(log_path, log_offset, proc.pid)
            try:
                rc, term_reason = self._supervise(proc, tail)
                if sidecar is not None:
                    # Its last checkpoint matters only if the job may resume from it: not after a completed
                    # run (it is uploaded as the Model), a cancel or the user's error.
                    outcome = progress.outcome_of_exit(rc)
                    keep = outcome not in ("completed", "user_error") and term_reason != "cancel"
                    with self._heartbeats():
                        sidecar.finish(keep, timeout=self.settings.term_grace_seconds + 300)
            except BaseException:
                # Never leave a trainer running unsupervised: stop it (it checkpoints), then let the
                # reconciler requeue the job once our lease runs out.
                log.exception("supervising job %s failed; stopping its trainer", job.id)
                signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(self.settings.term_grace_seconds)
                except subprocess.TimeoutExpired:
                    signal_group(proc, signal.SIGKILL)
                    proc.wait()
                raise
            finally:
                if sidecar is not None:
                    sidecar.release()  # on an error: it outlives us, and uploads once the trainer is gone
                self.relay.pump(final=True)
                self.relay.close()
        return self._conclude(rc, term_reason)

    def _start_sidecar(self, log_path: Path, log_offset: int, trainer_pid: int) -> Sidecar | None:
        if self.mirror is None:
            return None
        try:
            return Sidecar.start(self.settings, self.job, self.attempt, self.run_dir, log_path, log_offset,
                                 trainer_pid)
        except OSError:  # training goes on; only another machine's resume would miss its checkpoints
            log.exception("job %s: cannot start its mirror", self.job.id)
            return None

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
        grace = self.settings.term_grace_seconds
        next_poll = 0.0
        db_errors = 0
        while True:
            exited = proc.poll() is not None
            try:
                self.relay.pump()
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
            elif self.meter.should_pause():
                term_reason = "out_of_credits"
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
            return self._end_with_model("cancelled", fields, reason="cancelled by its owner")
        if term_reason == "out_of_credits" and outcome == "preempted":  # it checkpointed and stopped
            return jobs.finish(job_id, attempt, "out_of_credits", reason=self.meter.pause_reason(), **fields)
        message = (self.error or {}).get("message", "")
        if outcome == "user_error":
            return jobs.finish(job_id, attempt, "user_error", reason=message or f"the trainer exited with {rc}",
                               **fields)
        if term_reason == "shutdown":
            return jobs.finish(job_id, attempt, "preempted", charged=False, reason="the server shut down",
                               backoff_base=self.backoff, **fields)
        if outcome == "infrastructure" and term_reason is None:
            verdict = self._judge_device()
            if verdict is not None and verdict.kind == "user":
                return jobs.finish(job_id, attempt, "user_error", reason=verdict.message, **fields)
            if verdict is not None:
                gpus_text = ", ".join(verdict.gpus)
                return jobs.finish(job_id, attempt, "infrastructure", backoff_base=self.backoff, **fields,
                                   reason=f"device error ({verdict.fault}) on GPU {gpus_text}, now quarantined; "
                                          f"retrying on another GPU: {verdict.message}")
        if rc < 0:
            why = f"the trainer was killed by {signal.Signals(-rc).name}"
        elif outcome == "preempted":
            why = "the trainer was stopped by SIGTERM"
        else:
            why = f"the trainer exited with code {rc}" + (f": {message}" if message else "")
        return jobs.finish(job_id, attempt, outcome, reason=why, backoff_base=self.backoff, **fields)

    def _judge_device(self) -> quarantine.Verdict | None:
        """Was this failure the GPU's? Quarantines it when so (quarantine.py decides), and says so in the
        job's events. Never raises: a failed judgement leaves a plain infrastructure failure."""
        try:
            verdict = quarantine.after_failure(self.job.id, self.job.config, self.slot, self.error, self.started,
                                               self.settings)
        except Exception:
            log.exception("job %s: judging the device failure failed", self.job.id)
            return None
        if verdict is not None:
            self.emit("device", {"verdict": verdict.kind, "fault": verdict.fault, "gpus": list(verdict.gpus),
                                 "message": verdict.message})
        return verdict

    def _complete(self, fields: dict) -> str | None:
        if self._checkpoint_dir() is None:
            return jobs.finish(self.job.id, self.attempt, "infrastructure", backoff_base=self.backoff,
                               reason="the trainer exited 0 without a final checkpoint", **fields)
        return self._end_with_model("completed", fields)

    def _checkpoint_dir(self) -> Path | None:
        return final_checkpoint(self.run_dir, self.facts.get("checkpoint"))

    def _end_with_model(self, outcome: str, fields: dict, reason: str = "") -> str | None:
        """End the job (completed, or cancelled) with the Model its last checkpoint makes, if any. The
        upload comes first, then one transaction: the final state, the Model row and the ``publish``
        event. So the row never points at this machine's disk (unless the upload failed), and a job's
        event stream never grows after its final state (SSE clients stop there)."""
        ckpt = self._checkpoint_dir()
        key, error = None, None
        if ckpt is not None:
            try:
                with self._heartbeats():  # a large upload can outlast the lease
                    key = publish_run_checkpoint(self.job, self.attempt, ckpt, self.settings)
            except Exception as exc:  # the model stays usable from the run directory on this machine
                log.exception("publishing the checkpoint of job %s failed", self.job.id)
                error = str(exc)
        with database.atomic():
            status = jobs.finish(self.job.id, self.attempt, outcome, reason=reason, **fields)
            if status and ckpt is not None:
                create_run_model(TrainingJob.get_by_id(self.job.id), ckpt, key=key, facts=self.facts,
                                 progress=self.progress, cancelled=outcome == "cancelled")
                self.emit("publish", {"ok": True, "key": key} if key else {"ok": False, "error": error})
        if not status and key:  # fenced out while uploading: the job went on without this attempt
            Storage.from_settings(self.settings).delete(key.rsplit("/", 2)[0])
        return status


def run_training(job: TrainingJob, slot: Slot, settings: Settings, on_event: EventCallback | None = None, *,
                 stop: threading.Event | None = None) -> str | None:
    """Supervise the claimed ``job`` (status preparing, attempt and lease set by ``jobs.claim_next``)
    on ``slot`` until its trainer exits. Call it from the thread that should own the trainer's life.

    Returns the job's new status, or None when this attempt was fenced out. ``stop`` set means the
    worker is shutting down: the trainer gets SIGTERM, checkpoints, and the job is requeued.
    """
    status = _Supervisor(job, slot, settings, on_event, stop).run()
    try:
        billing.settle_job(job.id)  # meter the attempt that just ended; settle a final job
    except Exception:  # the reconciler settles it on its next tick
        log.exception("billing job %s after its attempt failed", job.id)
    return status
