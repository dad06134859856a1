"""Pages for training: the plan page (/train), a job's live page, the list of jobs, and models."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask_login import current_user

from trainer import sizing

from .. import chattune, datasets, formats, jobs
from ..auth import login_required
from ..errors import AppError
from ..models import Model, TrainingJob
from . import current_calibrator, current_settings, own
from .api import job_json, model_json, submit_job

bp = Blueprint("jobs", __name__)

FORM_INTS = ("depth", "max_steps", "seq_len", "batch_size", "vocab_size", "checkpoint_every", "seed")
FORM_FLOATS = ("matrix_lr", "embedding_lr", "unembedding_lr")
ADVANCED = FORM_INTS[1:] + FORM_FLOATS
# Where the slider starts: a first run that finishes in minutes on the device at hand.
START_DEPTH = {"cpu": 2, "mps": 4, "cuda": 12}


def _allow_server_paths() -> bool:
    return current_settings().allow_server_paths or current_user.is_admin


def config_from_form(form) -> tuple[dict[str, Any], list[str]]:
    """The job config a plan form describes, and what is wrong with it (each message names the field)."""
    errors: list[str] = []
    config: dict[str, Any] = {}
    for key in FORM_INTS:
        raw = (form.get(key) or "").strip()
        if not raw:
            continue
        try:
            config[key] = int(raw)
        except ValueError:
            errors.append(f"{key.replace('_', ' ').capitalize()} must be a whole number, not {raw!r}.")
    for key in FORM_FLOATS:
        raw = (form.get(key) or "").strip()
        if not raw:
            continue
        try:
            config[key] = float(raw)
        except ValueError:
            errors.append(f"{key.replace('_', ' ').capitalize()} must be a number, not {raw!r}.")
    name = (form.get("name") or "").strip()
    if name:
        config["name"] = name
    source = form.get("source") or "demo"
    if source == "demo":
        config["dataset"] = "demo"
    elif source == "upload":
        ds = (form.get("dataset_id") or "").strip()
        if not ds.isdigit():
            errors.append("Choose an uploaded file, or upload one first.")
        else:
            config["dataset"] = f"ds:{ds}"
    elif source in ("url", "s3", "path"):
        value = (form.get(source) or "").strip()
        if not value:
            errors.append({"url": "Enter the https address of the data.", "s3": "Enter the s3:// prefix.",
                           "path": "Enter a path on this server."}[source])
        config["dataset"] = value
    else:
        errors.append("Choose where the data comes from.")
    chat_errors = chat_from_form(form, config)
    return config, errors + chat_errors


def chat_from_form(form, config: dict[str, Any]) -> list[str]:
    """The chat stage a form asks for (the plan page's "Chat-tune after pretraining", a model page's
    "Chat-tune this model"): ``chat`` (the demo conversations) or ``chat_data`` (an upload of the user's),
    added to ``config``; what is wrong with it."""
    if form.get("chat") not in ("on", "1", "true"):
        return []
    conversations = (form.get("chat_data") or "demo").strip()
    if conversations == "demo":
        config["chat"] = True
    elif conversations.isdigit():
        config["chat_data"] = f"ds:{conversations}"
    else:
        return ["Choose the conversations to chat-tune on: the demo set or a .jsonl file you uploaded."]
    return []


def conversation_datasets(user) -> list:
    """The user's uploads that can be conversations (JSONL); chattune.py checks their lines on use."""
    return [d for d in datasets.list_datasets(user) if d.name.lower().endswith(chattune.CHAT_EXTENSIONS)]


def _submitted(config: dict[str, Any], errors: list[str], what: str = "") -> Any:
    """Submit ``config`` from a form: the redirect to the new job's page, or None with the reason the
    job was refused added to ``errors`` (the form is shown again)."""
    try:
        job = submit_job(config)
    except (AppError, ValueError) as exc:
        errors.append(str(getattr(exc, "message", None) or exc))
        return None
    # No state in the message: the page it lands on shows the job's state, live, and a job that
    # finishes while that page is open must not still be "queued" there.
    flash(f"Submitted job #{job.id}{what}.", "success")
    return redirect(url_for("jobs.show", job_id=job.id))


@bp.route("/train", methods=["GET", "POST"])
@login_required
def plan():
    dev = current_calibrator().device()
    form: dict[str, Any] = {"depth": request.args.get("depth") or START_DEPTH.get(dev["device"], 4),
                            "source": "demo", "chat": "on"}  # the demo job pretrains, then chat-tunes
    errors: list[str] = []
    if request.method == "POST":
        form = request.form.to_dict()
        form["advanced"] = any(form.get(k) for k in ADVANCED)
        form["sent"] = True  # the page shows the choices as sent (plan.js then leaves the chat box alone)
        config, errors = config_from_form(request.form)
        if not errors and (landed := _submitted(config, errors)) is not None:
            return landed
    defaults = sizing.device_defaults(dev["device"])
    status = 400 if errors else 200
    return render_template("jobs/plan.html", form=form, errors=errors, device=dev, defaults=defaults,
                           datasets=datasets.list_datasets(current_user),
                           conversations=conversation_datasets(current_user),
                           allow_server_paths=_allow_server_paths()), status


@bp.get("/jobs")
@login_required
def index():
    rows = TrainingJob.owned_by(current_user).order_by(TrainingJob.id.desc()).limit(100)
    return render_template("jobs/index.html", jobs=[job_json(j, current_settings()) for j in rows])


@bp.get("/jobs/<int:job_id>")
@login_required
def show(job_id: int):
    job = own(TrainingJob, job_id)
    info = job_json(job, current_settings())
    info["final"] = job.status in jobs.FINAL
    shape = sizing.shape_for(job.config.get("depth") or 1, job.config.get("vocab_size") or 8192,
                             job.config.get("seq_len") or 256)
    info["params_human"] = formats.count((job.estimate or {}).get("params") or sizing.param_counts(shape)["total"])
    return render_template("jobs/show.html", job=job, info=info, final_states=sorted(jobs.FINAL))


@bp.get("/models")
@login_required
def models():
    rows = Model.owned_by(current_user).order_by(Model.id.desc()).limit(200)
    return render_template("models/index.html", models=[model_json(m) for m in rows])


@bp.get("/models/<int:model_id>")
@login_required
def model_page(model_id: int):
    model = own(Model, model_id)
    return render_template("models/show.html", model=model_json(model),
                           conversations=conversation_datasets(current_user), errors=[]), 200


@bp.post("/models/<int:model_id>/chat-tune")
@login_required
def chat_tune(model_id: int):
    """"Chat-tune this model": a job that starts from the model's checkpoint and trains the chat stage
    alone, on the demo conversations or the user's own (chattune.py checks them)."""
    model = own(Model, model_id)
    config: dict[str, Any] = {"init_from_model": model.id,
                              "name": (request.form.get("name") or "").strip() or f"{model.name} (chat)"[:120]}
    errors = chat_from_form({**request.form.to_dict(), "chat": "on"}, config)
    if not errors and (landed := _submitted(config, errors, f": chat-tuning {model.name}")) is not None:
        return landed
    return render_template("models/show.html", model=model_json(model),
                           conversations=conversation_datasets(current_user), errors=errors), 400

