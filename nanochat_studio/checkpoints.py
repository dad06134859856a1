"""How a trainer's checkpoint becomes a Model: the one owner of where a run's checkpoints are, which of
them are finished, the Model a run leaves (finished or cancelled), a snapshot taken mid-run, and the
mirror that copies a running trainer's checkpoints into storage for another worker.

A checkpoint directory is finished once the trainer has written its ``manifest.json`` (always last).
A Model row first points at its checkpoint in the run directory; :func:`publish_model` then copies it
into storage (verified against the trainer's manifest) and points the row there. storage.py stays the
only fsspec user.

It also owns where a model's checkpoint is on this machine (:func:`local_checkpoint_dir`) and the
transformers download (:func:`hf_archive`).

Errors: :func:`snapshot_model` raises ``Conflict`` (409) while a job has no finished checkpoint;
:func:`publish_model` raises ``StorageError`` or ``OSError`` when the copy fails.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from . import datasets, runner
from .archive import archive_dirname, stream_dir
from .errors import AppError, Conflict, NotFound
from .models import Model, TrainingJob
from .settings import Settings
from .storage import MARKER, Storage, StorageError, user_prefix

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"  # the trainer writes it last: its presence means the checkpoint is whole


# --- where a run's checkpoints are ------------------------------------------------------------------------


def run_dir_for(job: TrainingJob, settings: Settings) -> Path:
    """The run directory of ``job`` on this machine (its trainer's ``--out``)."""
    return Path(settings.runs_dir) / f"job-{job.id}"


def finished_checkpoints(run_dir: Path) -> list[Path]:
    """The run's finished checkpoint directories, newest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def final_checkpoint(run_dir: Path, reported: str | None = None) -> Path | None:
    """The checkpoint a trainer left: the one its last event named (``reported``, relative to the run
    directory or absolute) when finished, else the newest finished one."""
    if reported:
        path = Path(reported) if os.path.isabs(reported) else run_dir / reported
        if (path / MANIFEST).exists():
            return path
    found = finished_checkpoints(run_dir)
    return found[0] if found else None


# --- the Model a run leaves ------------------------------------------------------------------------------

KINDS = ("base", "chat")


def checkpoint_kind(config: dict[str, Any] | None, done: dict[str, Any] | None = None) -> str:
    """A checkpoint's kind from its run config (config.json's top-level ``kind``: "chat" once a chat-stage
    step was taken; absent in checkpoints of trainers before the chat stage: "base"). A ``done`` event
    saying ``chat_tuned`` counts too, for a checkpoint whose config could not be read."""
    kind = (config or {}).get("kind")
    if kind in KINDS:
        return kind
    return "chat" if (done or {}).get("chat_tuned") else "base"


def read_checkpoint_config(checkpoint: Path) -> dict[str, Any]:
    """The run config a trainer saved with ``checkpoint`` ({} when it is missing or unreadable)."""
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}



def create_run_model(job: TrainingJob, checkpoint: Path, *, facts: dict[str, Any], progress: dict[str, Any],
                     cancelled: bool) -> Model:
    """The Model a finished (or cancelled) run leaves, pointing at ``checkpoint`` in the run directory.

    ``facts`` are what the supervisor gathered from the trainer's events (``start``, ``done``, ``params``,
    ``samples``, ``data_sha256``); ``progress`` is the job's last progress. Call it in the transaction
    that ends the job, and :func:`publish_model` after it (the upload may be slow).
    """
    done = facts.get("done") or {}
    start = facts.get("start") or {}
    step = done.get("step", progress.get("checkpoint_step") or progress.get("step") or 0)
    tokenizer = checkpoint / "tokenizer"
    name = job.name or f"job {job.id}"
    return Model.create(
        user=job.user_id, job=job.id, name=name + (f" (cancelled at step {step})" if cancelled else ""),
        kind=checkpoint_kind(read_checkpoint_config(checkpoint), done),
        step=step or 0, checkpoint_key=str(checkpoint),
        tokenizer_key=str(tokenizer if tokenizer.exists() else checkpoint),
        params=int(facts.get("params") or 0), config=start.get("config") or job.config,
        metrics={"final_loss": done.get("final_loss", progress.get("loss")),
                 "final_val_bpb": done.get("final_val_bpb", progress.get("val_bpb")),
                 "steps": step, "elapsed_s": done.get("elapsed_s")},
        samples=facts.get("samples") or [], data_source=datasets.describe_spec(job.config.get("dataset")),
        data_sha256=str(facts.get("data_sha256") or start.get("data_sha256") or ""),
        size_bytes=sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file()),
    )


def publish_model(model: Model, settings: Settings) -> str:
    """Copy the model's checkpoint from the run directory into storage and point the row there;
    returns the storage key. Raises StorageError or OSError (the row then still points at the run
    directory, usable on this machine)."""
    key = Storage.from_settings(settings).publish_checkpoint(model.user_id, model.id, model.checkpoint_key)
    tokenizer = f"{key}/tokenizer" if model.tokenizer_key.endswith("/tokenizer") else key
    Model.update(checkpoint_key=key, tokenizer_key=tokenizer).where(Model.id == model.id).execute()
    return key


def local_checkpoint_dir(model: Any, settings: Settings) -> str:
    """A local directory holding the model's checkpoint: its run directory until the upload to storage
    is done, else storage's local copy (downloaded once from remote storage). Raises StorageError."""
    key = model.checkpoint_key
    if os.path.isabs(key) and os.path.isdir(key):
        return key
    return Storage.from_settings(settings).local_path(key)


def hf_archive(model: Model, settings: Settings) -> tuple[str, Iterator[bytes]]:
    """The model as a transformers directory (trainer/export_hf.py, run as a child process: the web
    process never imports torch), packed as a ``.tar.gz``: its file name and its bytes, streamed. The
    conversion runs before the first byte, in a temporary directory under ``home`` that the stream
    deletes when it ends. Raises NotFound (no checkpoint) or AppError (the conversion failed)."""
    try:
        ckpt = local_checkpoint_dir(model, settings)
    except (StorageError, OSError, ValueError) as e:  # ValueError: a run directory that is gone
        log.warning("checkpoint of model %s not available: %s", model.id, e)  # paths stay in the log
        raise NotFound("The checkpoint of this model is not available on this server.") from None
    work = Path(settings.home) / "tmp"
    work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="hf-export-", dir=work))
    try:
        runner.export_hf(settings, ckpt, tmp / "hf")
    except runner.SpawnError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("transformers export of model %s failed: %s", model.id, e)
        raise AppError(f"The model could not be converted for transformers: {e}") from None
    top = archive_dirname(model) + "-hf"

    def stream() -> Iterator[bytes]:
        try:
            yield from stream_dir(tmp / "hf", top)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return top + ".tar.gz", stream()


def snapshot_model(job: TrainingJob, settings: Settings) -> Model:
    """A read-only copy of ``job``'s newest finished checkpoint as a new Model (is_snapshot=True).

    The copy goes into storage (verified against the trainer's manifest), so the trainer pruning its
    own checkpoints afterwards does not touch it. Raises Conflict when no checkpoint is ready yet.
    """
    run_dir = Path(job.output_path) if job.output_path and os.path.isdir(job.output_path) else run_dir_for(job, settings)
    store = Storage.from_settings(settings)
    for ckpt in finished_checkpoints(run_dir):
        try:
            manifest = json.loads((ckpt / MANIFEST).read_text())
            step = int(manifest.get("step") or ckpt.name.split("_", 1)[1])
        except (OSError, ValueError):
            continue
        config = read_checkpoint_config(ckpt)
        model = Model.create(user=job.user_id, job=job.id, name=f"{job.name or f'job {job.id}'} @ step {step}",
                             step=step, is_snapshot=True, kind=checkpoint_kind(config), checkpoint_key="", tokenizer_key="",
                             config=config.get("train") or job.config, metrics={"snapshot_of_step": step})
        try:
            key = store.publish_checkpoint(job.user_id, model.id, ckpt)
        except (StorageError, OSError):
            # pruned or replaced while we copied: try the next older one
            model.delete_instance()
            continue
        size = sum(info.get("size", 0) for info in manifest.get("files", {}).values())
        Model.update(checkpoint_key=key, tokenizer_key=f"{key}/tokenizer", size_bytes=size).where(
            Model.id == model.id).execute()
        return Model.get_by_id(model.id)
    raise Conflict("this job has no finished checkpoint yet; try again after its first checkpoint")


# --- mirroring a running trainer's checkpoints -------------------------------------------------------------


class CheckpointMirror:
    """Copies the checkpoints a trainer writes into storage (newest wins, one upload at a time), so a
    worker on another machine can resume the job; restores the newest into a run directory with none.
    On by default with remote storage (the ``mirror_checkpoints`` setting forces it either way)."""

    def __init__(self, store: Storage, user_id: int, job_id: int):
        self.store = store
        self.prefix = f"{user_prefix(user_id)}/runs/{job_id}/checkpoints"
        self._pending: Path | None = None
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False

    @classmethod
    def for_job(cls, settings: Settings, job: TrainingJob) -> "CheckpointMirror | None":
        wanted = settings.mirror_checkpoints
        if wanted is False:
            return None
        store = Storage.from_settings(settings)
        if wanted is None and store.is_local:
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
        if finished_checkpoints(run_dir):
            return None
        keys = self.store.list_committed(self.prefix)
        if not keys:
            return None
        src = Path(self.store.local_path(keys[-1]))
        dst = run_dir / "checkpoints" / keys[-1].rsplit("/", 1)[-1]
        tmp = dst.with_name(f".restore-{dst.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(MARKER))
        os.replace(tmp, dst)
        return keys[-1]

    def forget(self) -> None:
        for key in self.store.list_committed(self.prefix):
            self.store.delete(key)
