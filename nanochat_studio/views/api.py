"""The JSON API for jobs, models, datasets and estimates (``/api/...``).

Session or API-key auth (in solo mode a request from this machine needs neither); every object is
scoped to its owner, and another user's id answers 404 exactly like a missing one.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any, Iterator

from flask import Blueprint, current_app, jsonify, request, stream_with_context, url_for
from flask_login import current_user

from .. import admission, billing, datasets, estimate, jobs, limits, sse, tasks
from ..archive import public_config, public_source
from ..auth import login_required
from ..checkpoints import hf_archive
from ..db import database
from ..errors import BadRequest, Conflict
from ..inputs import json_object
from ..mirror import log_tail
from ..models import Model, TrainingJob
from ..settings import Settings
from ..storage import Storage
from . import current_billing, current_calibrator, current_settings, own

bp = Blueprint("api", __name__, url_prefix="/api")

EVENT_PAGE = 1000  # events read per query when replaying a stream
MAX_LIST = 200
DOWNLOAD_FORMATS = ("checkpoint", "hf")  # ours (trainer.sample loads it), transformers' (export_hf)


# --- serializers (the pages use them too) ------------------------------------------------------------

def _iso(t) -> str | None:
    return t.isoformat() + "Z" if t else None


def job_json(job: TrainingJob, settings: Settings) -> dict[str, Any]:
    final = job.status in jobs.FINAL
    model = (Model.select().where((Model.job == job) & (Model.is_snapshot == False))  # noqa: E712
             .order_by(Model.id.desc()).first())
    waiting = "" if final or job.status == jobs.RUNNING else jobs.why_waiting(job, settings)
    return {
        "id": job.id,
        "name": job.name,
        "status": job.status,
        "status_reason": job.status_reason,
        "error_kind": job.error_kind,
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "cancel_requested": job.cancel_requested,
        "config": _public_config(job.config),
        "estimate": job.estimate,
        "progress": job.progress or {},
        "device": job.device,
        "queue_position": jobs.queue_position(job) if job.status == jobs.QUEUED else None,
        "why_waiting": waiting,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "model": model_json(model) if model else None,
        "billing": billing.job_summary(job),  # its hold and, once settled, its charge (None: not billed)
        "urls": {
            "self": url_for("api.get_job", job_id=job.id),
            "page": url_for("jobs.show", job_id=job.id),
            "events": url_for("api.job_events", job_id=job.id),
            "cancel": None if final else url_for("api.cancel_job", job_id=job.id),
            "download": url_for("api.download_model", model_id=model.id) if model else None,
            "chat": _chat_url(model) if model else None,
        },
    }


def _public_config(config: dict) -> dict:
    """The config without secrets: S3 credentials are stored for the trainer, never shown."""
    out = dict(config or {})
    for key in ("dataset", "chat_data"):  # chat_data: the conversations of a chat stage (chattune.py)
        if isinstance(out.get(key), dict):
            out[key] = datasets.describe_spec(out[key])
    return out


def model_json(model: Model) -> dict[str, Any]:
    return {
        "id": model.id,
        "name": model.name,
        "job_id": model.job_id,
        "step": model.step,
        "is_snapshot": model.is_snapshot,
        "kind": model.kind,  # "base" or "chat" (chat-tuned)
        "params": model.params,
        "config": public_config(model.config),
        "metrics": model.metrics,
        "samples": model.samples,
        "data_source": public_source(model.data_source or ""),
        "data_sha256": model.data_sha256,
        "size_bytes": model.size_bytes,
        "created_at": _iso(model.created_at),
        "urls": {
            "self": url_for("api.get_model", model_id=model.id),
            "download": url_for("api.download_model", model_id=model.id),
            "download_hf": url_for("api.download_model", model_id=model.id, format="hf"),
            "chat": _chat_url(model),
        },
    }


def _chat_url(model: Model) -> str:
    return url_for("chat.page", model_id=model.id)


def _json_body() -> dict:
    return json_object()


# --- estimate ------------------------------------------------------------------------------------------

@bp.get("/estimate", endpoint="estimate")
@login_required
def get_estimate():
    plan = estimate.estimate_for(request.args, current_user, current_calibrator())
    plan["cost"] = current_billing().quote(plan, current_user._get_current_object())  # None: not charged
    return jsonify(plan)


# --- jobs ------------------------------------------------------------------------------------------------

def submit_job(body: Any) -> TrainingJob:
    """Queue the signed-in user's job (jobs.submit validates it), keep the estimate it was planned with,
    and ring the queue's bell. Raises what jobs.submit raises."""
    settings = current_settings()
    user = current_user._get_current_object()
    # Billing's hold runs inside the transaction that creates the job: 402 leaves no job behind.
    hold = current_billing().submit_hook(user, current_calibrator())
    # admission: refuse what no live worker can run (GPU count, memory); warn when no worker is up yet
    job = jobs.submit(user, body, settings, on_create=hold, admit=lambda clean: admission.check(clean, user))
    estimate.record_for_job(job, current_calibrator())
    tasks.enqueue_job(job.id, settings)
    return jobs.get(job.id)


@bp.post("/jobs")
@login_required
def create_job():
    job = submit_job(_json_body())
    resp = jsonify(job_json(job, current_settings()))
    resp.status_code = 201
    resp.headers["Location"] = url_for("api.get_job", job_id=job.id)
    return resp


@bp.get("/jobs")
@login_required
def list_jobs():
    rows = TrainingJob.owned_by(current_user).order_by(TrainingJob.id.desc()).limit(MAX_LIST)
    status = request.args.get("status")
    if status:
        rows = rows.where(TrainingJob.status == status)
    return jsonify({"jobs": [job_json(j, current_settings()) for j in rows]})


@bp.get("/jobs/<int:job_id>")
@login_required
def get_job(job_id: int):
    return jsonify(job_json(own(TrainingJob, job_id), current_settings()))


@bp.post("/jobs/<int:job_id>/cancel")
@login_required
def cancel_job(job_id: int):
    job = own(TrainingJob, job_id)
    if job.status in jobs.FINAL:
        raise Conflict(f"job {job_id} already {job.status}")
    if jobs.request_cancel(job) == jobs.CANCELLED:
        billing.settle_job(job_id)  # it never ran (or was paused): its hold returns now
    return jsonify(job_json(jobs.get(job_id), current_settings()))


@bp.get("/jobs/<int:job_id>/log")
@login_required
def job_log(job_id: int):
    """The job log's tail, from storage (the worker's sidecar mirrors it), whichever machine trains it."""
    return jsonify({"text": log_tail(own(TrainingJob, job_id), current_settings())})


@bp.get("/jobs/<int:job_id>/events")
@login_required
@limits.streaming
def job_events(job_id: int):
    """The job's events as SSE, replayed from Last-Event-ID, then live until the job ends."""
    job = own(TrainingJob, job_id)
    settings = current_settings()
    after = sse.last_event_id()
    state = {"after": after, "ended": False}

    def drain() -> list[str]:
        """Frames for every event after the last one sent (read in pages: a long job has thousands)."""
        out = []
        while True:
            page = jobs.events_since(job_id, state["after"], limit=EVENT_PAGE)
            for ev in page:
                data = dict(ev.data or {})
                data.setdefault("time", ev.created_at.replace(tzinfo=dt.timezone.utc).timestamp())
                if ev.kind == "state":
                    data["job"] = job_json(jobs.get(job_id), settings)
                out.append(sse.format_event(data, event=ev.kind, id=ev.seq))
                state["after"] = ev.seq
            if len(page) < EVENT_PAGE:
                return out

    def first():
        with database.connection_context():
            return [*drain(), sse.format_event(job_json(jobs.get(job_id), settings), event="job")]

    def poll():
        if state["ended"]:
            return None
        with database.connection_context():
            # The status first: a job's final state is written with its last state event, so once it
            # reads final, the events drained next are all there will be.
            status = jobs.get(job_id).status
            frames = drain()
            if status in jobs.FINAL:
                state["ended"] = True
                frames.append(sse.format_event({"status": status}, event="end"))
        return frames

    del job  # the generator below must not hold request-bound objects
    return sse.response(stream_with_context(sse.with_heartbeats(first, poll)))


# --- models ----------------------------------------------------------------------------------------------

@bp.get("/models")
@login_required
def list_models():
    rows = Model.owned_by(current_user).order_by(Model.id.desc()).limit(MAX_LIST)
    return jsonify({"models": [model_json(m) for m in rows]})


@bp.get("/models/<int:model_id>")
@login_required
def get_model(model_id: int):
    return jsonify(model_json(own(Model, model_id)))


@bp.get("/models/<int:model_id>/download")
@login_required
@limits.streaming
def download_model(model_id: int):
    """The model as a ``.tar.gz``: our checkpoint layout, or with ``?format=hf`` a directory that
    transformers loads (``AutoModelForCausalLM.from_pretrained``, no remote code)."""
    model = own(Model, model_id)
    fmt = request.args.get("format", "checkpoint")
    if fmt not in DOWNLOAD_FORMATS:
        raise BadRequest("format must be " + " or ".join(f"'{f}'" for f in DOWNLOAD_FORMATS))
    if fmt == "hf":
        name, stream = hf_archive(model, current_settings())
        return _archive_response(name, stream)
    storage = Storage.from_settings(current_settings())
    from ..archive import archive_dirname

    name = archive_dirname(model) + ".tar.gz"
    return _archive_response(name, storage.stream_model_archive(model))


def _archive_response(name: str, stream: Iterator[bytes]):
    resp = current_app.response_class(stream_with_context(stream), mimetype="application/gzip")
    resp.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    resp.headers["Cache-Control"] = "no-store"
    return resp


# --- datasets --------------------------------------------------------------------------------------------

def dataset_json(ds) -> dict[str, Any]:
    return {"id": ds.id, "name": ds.name, "size_bytes": ds.size_bytes, "sha256": ds.sha256,
            "created_at": _iso(ds.created_at), "spec": f"ds:{ds.id}"}


@bp.post("/datasets")
@login_required
def upload_dataset():
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        raise BadRequest("send the file as multipart/form-data in a field named 'file'")
    ds = datasets.save_upload(current_user, upload.filename, upload.stream, current_settings(),
                              size_hint=request.content_length)
    resp = jsonify(dataset_json(ds))
    resp.status_code = 201
    return resp


@bp.get("/datasets")
@login_required
def list_datasets():
    return jsonify({"datasets": [dataset_json(d) for d in datasets.list_datasets(current_user)]})


@bp.delete("/datasets/<int:dataset_id>")
@login_required
def delete_dataset(dataset_id: int):
    datasets.delete_dataset(current_user, dataset_id, current_settings())
    return ("", 204)


__all__ = ["bp", "job_json", "model_json", "submit_job"]
