"""How a trainer's checkpoint becomes a Model: the one owner of where a run's checkpoints are, which of
them are finished, the Model a run leaves (finished or cancelled), a snapshot taken mid-run, and the
job's checkpoints mirrored in storage (uploaded by mirror.py's sidecar, restored by another worker).

A checkpoint directory is finished once the trainer has written its ``manifest.json`` (always last).
The checkpoint a run leaves is uploaded by :func:`publish_run_checkpoint` (verified against the
trainer's manifest) before the job becomes final, and its Model row points there from the start.
Every upload of a trainer's checkpoint goes through :func:`put_checkpoint`, which checks the bytes
stored against the trainer's manifest.json; storage.py stays the only fsspec user.

It also owns where a model's checkpoint is on this machine (:func:`local_checkpoint_dir`) and the
transformers download (:func:`hf_archive`).

Errors: :func:`snapshot_model` raises ``Conflict`` (409) while a job has no finished checkpoint;
:func:`publish_run_checkpoint` raises ``StorageError`` or ``OSError`` when the copy fails.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from . import datasets, runner
from .archive import archive_dirname, stream_dir
from .errors import AppError, Conflict, NotFound
from .models import Model, TrainingJob
from .settings import Settings
from .storage import (MARKER, IntegrityError, KeyNotFound, Storage, StorageError, check_key, model_prefix,
                      user_prefix)

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



def create_run_model(job: TrainingJob, checkpoint: Path, *, key: str | None, facts: dict[str, Any],
                     progress: dict[str, Any], cancelled: bool) -> Model:
    """The Model a finished (or cancelled) run leaves: at ``key`` in storage (:func:`publish_run_checkpoint`
    put it there), or at ``checkpoint`` in the run directory when that upload failed (usable on this
    machine only).

    ``facts`` are what the supervisor gathered from the trainer's events (``start``, ``done``, ``params``,
    ``samples``, ``data_sha256``); ``progress`` is the job's last progress. Call it in the transaction
    that ends the job.
    """
    done = facts.get("done") or {}
    start = facts.get("start") or {}
    step = done.get("step", progress.get("checkpoint_step") or progress.get("step") or 0)
    where = key or str(checkpoint)
    name = job.name or f"job {job.id}"
    return Model.create(
        user=job.user_id, job=job.id, name=name + (f" (cancelled at step {step})" if cancelled else ""),
        kind=checkpoint_kind(read_checkpoint_config(checkpoint), done),
        step=step or 0, checkpoint_key=where,
        tokenizer_key=f"{where}/tokenizer" if (checkpoint / "tokenizer").exists() else where,
        params=int(facts.get("params") or 0), config=start.get("config") or job.config,
        metrics={"final_loss": done.get("final_loss", progress.get("loss")),
                 "final_val_bpb": done.get("final_val_bpb", progress.get("val_bpb")),
                 "steps": step, "elapsed_s": done.get("elapsed_s")},
        samples=facts.get("samples") or [], data_source=datasets.describe_spec(job.config.get("dataset")),
        data_sha256=str(facts.get("data_sha256") or start.get("data_sha256") or ""),
        size_bytes=sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file()),
    )


# --- uploading a finished checkpoint -------------------------------------------------------------------------


def put_checkpoint(store: Storage, local_ckpt_dir: str | os.PathLike, key: str) -> str:
    """Upload a finished trainer checkpoint under ``key`` (store.put_dir), checked against the trainer's
    own manifest.json: StorageError when it has none (still being written), IntegrityError (and
    nothing stays published) when the bytes differ. Returns ``key``."""
    local = Path(local_ckpt_dir)
    trainer_manifest = local / MANIFEST
    if not trainer_manifest.is_file():
        raise StorageError(f"{local} is not a finished checkpoint (no manifest.json)")
    expected = trainer_sha256s(json.loads(trainer_manifest.read_text()))
    manifest = store.put_dir(local, key)
    bad = [rel for rel, sha in expected.items() if manifest["files"].get(rel, {}).get("sha256") != sha]
    if bad:
        store.delete(key)
        raise IntegrityError(f"checkpoint {local} does not match its manifest.json: {', '.join(bad)}")
    return key


def publish_checkpoint(store: Storage, user_id: int, model_id: int, local_ckpt_dir: str | os.PathLike) -> str:
    """Upload a finished trainer checkpoint (:func:`put_checkpoint`); return its key
    ``users/<u>/models/<m>/checkpoints/<dir>``."""
    local = Path(local_ckpt_dir)
    return put_checkpoint(store, local, f"{model_prefix(user_id, model_id)}/checkpoints/{check_key(local.name)}")


def trainer_sha256s(manifest: Any) -> dict[str, str]:
    """rel path -> sha256 from the trainer's manifest.json, which may list ``files`` as a mapping of
    path -> sha256 or path -> {"sha256": ...}, or as a list of {"path"|"name", "sha256"}."""
    files = manifest.get("files", manifest) if isinstance(manifest, dict) else manifest
    out: dict[str, str] = {}
    if isinstance(files, dict):
        for rel, v in files.items():
            sha = v.get("sha256") if isinstance(v, dict) else v
            if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha):
                out[rel] = sha
    elif isinstance(files, list):
        for item in files:
            if isinstance(item, dict) and isinstance(item.get("sha256"), str):
                out[item.get("path") or item.get("name")] = item["sha256"]
    return out


def run_model_key(job: TrainingJob, attempt: int, checkpoint: Path) -> str:
    """Where the Model a run leaves keeps its checkpoint, named by the job and the attempt (the row that
    points there is made only once the upload is done; an attempt fenced out meanwhile deletes its own)."""
    return f"{user_prefix(job.user_id)}/models/job-{int(job.id)}-a{int(attempt)}/checkpoints/{checkpoint.name}"


def publish_run_checkpoint(job: TrainingJob, attempt: int, checkpoint: Path, settings: Settings) -> str:
    """Upload the checkpoint a run left into storage, verified against the trainer's manifest, BEFORE
    the job becomes final: so its Model never points at this machine's disk, and no event of the job
    comes after its final state. Returns the key. Raises StorageError or OSError."""
    return put_checkpoint(Storage.from_settings(settings), checkpoint, run_model_key(job, attempt, checkpoint))


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

    The newest checkpoint mirrored into storage is copied there (whichever machine trains the job);
    without a mirror (one machine, local storage) the run directory's newest is uploaded, verified
    against the trainer's manifest. Either way the trainer pruning its own checkpoints later does not
    touch the copy. Raises Conflict when no checkpoint is ready yet.
    """
    store = Storage.from_settings(settings)
    mirrored = CheckpointMirror(store, job.user_id, job.id)
    for _ in range(3):  # the mirror may replace its newest while we copy it: take the next newest then
        key = mirrored.newest()
        if key is None:
            break
        config = _stored_json(store, f"{key}/config.json")
        model = _snapshot_row(job, step_of(key), config)
        target = f"{model_prefix(job.user_id, model.id)}/checkpoints/{key.rsplit('/', 1)[-1]}"
        try:
            manifest = store.copy_dir(key, target)
        except KeyNotFound:
            model.delete_instance()
            continue
        return _snapshot_done(model, target, manifest["total_bytes"])
    run_dir = Path(job.output_path) if job.output_path and os.path.isdir(job.output_path) else run_dir_for(job, settings)
    for ckpt in finished_checkpoints(run_dir):
        try:
            manifest = json.loads((ckpt / MANIFEST).read_text())
            step = int(manifest.get("step") or ckpt.name.split("_", 1)[1])
        except (OSError, ValueError):
            continue
        config = read_checkpoint_config(ckpt)
        model = _snapshot_row(job, step, config)
        try:
            key = publish_checkpoint(store, job.user_id, model.id, ckpt)
        except (StorageError, OSError):
            # pruned or replaced while we copied: try the next older one
            model.delete_instance()
            continue
        size = sum(info.get("size", 0) for info in manifest.get("files", {}).values())
        return _snapshot_done(model, key, size)
    raise Conflict("this job has no finished checkpoint yet; try again after its first checkpoint")


def _snapshot_row(job: TrainingJob, step: int, config: dict) -> Model:
    return Model.create(user=job.user_id, job=job.id, name=f"{job.name or f'job {job.id}'} @ step {step}",
                        step=step, is_snapshot=True, kind=checkpoint_kind(config), checkpoint_key="", tokenizer_key="",
                        config=config.get("train") or job.config, metrics={"snapshot_of_step": step})


def _snapshot_done(model: Model, key: str, size: int) -> Model:
    Model.update(checkpoint_key=key, tokenizer_key=f"{key}/tokenizer", size_bytes=size).where(
        Model.id == model.id).execute()
    return Model.get_by_id(model.id)


def _stored_json(store: Storage, key: str) -> dict:
    try:
        with store.open(key) as f:
            value = json.loads(f.read(1 << 20))
    except (KeyNotFound, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# --- mirroring a running trainer's checkpoints -------------------------------------------------------------


def mirror_enabled(settings: Settings) -> bool:
    """Whether running jobs mirror their checkpoints and log into storage (mirror.py's sidecar does it):
    the ``mirror_checkpoints`` setting, or by default whenever storage is remote."""
    if settings.mirror_checkpoints is not None:
        return bool(settings.mirror_checkpoints)
    return not Storage.from_settings(settings).is_local


def step_of(name: str) -> int:
    """The step of a checkpoint directory named ``step_NNNNNNN`` (-1 for any other name)."""
    head, _, digits = name.rpartition("/")[2].partition("_")
    return int(digits) if head == "step" and digits.isdigit() else -1


class CheckpointMirror:
    """The job's checkpoints in storage (``users/<u>/runs/<job>/checkpoints/step_N``): uploaded by the
    job's mirror sidecar (mirror.py) as the trainer writes them, newest kept; restored into the run
    directory of the worker that resumes the job; forgotten once the job is final."""

    def __init__(self, store: Storage, user_id: int, job_id: int):
        self.store = store
        self.prefix = f"{user_prefix(user_id)}/runs/{job_id}/checkpoints"

    @classmethod
    def for_job(cls, settings: Settings, job: TrainingJob) -> "CheckpointMirror | None":
        if not mirror_enabled(settings):
            return None
        return cls(Storage.from_settings(settings), job.user_id, job.id)

    def newest(self) -> str | None:
        """The key of the newest committed checkpoint, or None."""
        keys = [k for k in self.store.list_committed(self.prefix) if step_of(k) >= 0]
        return max(keys, key=step_of) if keys else None

    def upload(self, checkpoint_dir: Path) -> str:
        """Upload one finished checkpoint (verified against its manifest.json), then drop the older ones
        and any upload that died half-way. Returns its key. Raises StorageError or OSError (the trainer
        may have pruned it meanwhile)."""
        key = put_checkpoint(self.store, checkpoint_dir, f"{self.prefix}/{checkpoint_dir.name}")
        for other in self.store.list_keys(self.prefix):
            if 0 <= step_of(other) < step_of(key):  # never a newer one: another attempt's, still wanted
                self.store.delete(other)
        return key

    def restore(self, run_dir: Path) -> str | None:
        """Copy the newest mirrored checkpoint into ``run_dir`` when it is newer than every finished
        checkpoint there (this worker ran an earlier attempt, and another went further since); its key."""
        key = self.newest()
        local = finished_checkpoints(run_dir)
        if key is None or (local and step_of(local[0].name) >= step_of(key)):
            return None
        src = Path(self.store.local_path(key))
        dst = run_dir / "checkpoints" / key.rsplit("/", 1)[-1]
        tmp = dst.with_name(f".restore-{dst.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(MARKER))
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
        return key

    def forget(self) -> None:
        """Delete every mirrored checkpoint of the job (it is final: its Model has its own copy)."""
        self.store.delete(self.prefix)
