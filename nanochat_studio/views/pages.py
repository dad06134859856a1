"""The dashboard (``/``) and the liveness probe (``/healthz``)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, render_template
from flask_login import current_user

from .. import db, jobs
from ..models import Model, TrainingJob
from . import current_settings

bp = Blueprint("pages", __name__)

RECENT = 5


@bp.get("/")
def index() -> Any:
    recent_jobs: list[TrainingJob] = []
    recent_models: list[Model] = []
    counts = {"jobs": 0, "running": 0, "models": 0}
    if current_user.is_authenticated:
        mine = TrainingJob.owned_by(current_user)
        recent_jobs = list(mine.order_by(TrainingJob.created_at.desc()).limit(RECENT))
        counts["jobs"] = mine.count()
        counts["running"] = mine.where(TrainingJob.status.in_(sorted(jobs.ACTIVE))).count()
        models = Model.owned_by(current_user).where(Model.is_snapshot == False)  # noqa: E712
        counts["models"] = models.count()
        recent_models = list(models.order_by(Model.created_at.desc()).limit(RECENT))
    return render_template("index.html", recent_jobs=recent_jobs, recent_models=recent_models, counts=counts,
                           show_credits=current_settings().mode == "hosted")


@bp.get("/healthz")
def healthz() -> Any:
    ok = db.check()
    body = {"status": "ok" if ok else "degraded", "db": "ok" if ok else "unavailable"}
    return jsonify(body), 200 if ok else 503
