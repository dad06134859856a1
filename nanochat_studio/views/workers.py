"""The admin's view of the machines: live and recently gone workers (the registry, workers.py) with the
devices they train on, and quarantined GPUs with a button to return one to service (quarantine.py)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, flash, redirect, render_template, url_for

from .. import quarantine, workers
from ..auth import admin_required
from ..errors import NotFound
from ..models import utcnow

bp = Blueprint("workers", __name__)


@bp.get("/admin/workers")
@admin_required
def admin_workers() -> Any:
    now = utcnow()
    rows = [{"row": r, "live": workers.is_live(r, now), "seen_s": int((now - r.last_seen_at).total_seconds())}
            for r in workers.all_rows()]
    return render_template("workers/admin.html", workers=rows, quarantined=quarantine.rows())


@bp.post("/admin/gpus/<int:quarantine_id>/clear")
@admin_required
def clear_gpu(quarantine_id: int) -> Any:
    row = quarantine.clear(quarantine_id)
    if row is None:
        raise NotFound("No such quarantined GPU.")
    flash(f"GPU {row.gpu} on {row.host} is back in service.", "info")
    return redirect(url_for("workers.admin_workers"))
