"""One blueprint per noun (pages, account, jobs, api, chat, openai); ``create_app`` registers them.

A view reads the app's settings with :func:`current_settings`, its device and calibrations with
:func:`current_calibrator`, its billing policy with :func:`current_billing`, and the signed-in user's rows
with :func:`own`.
"""

from __future__ import annotations

from typing import Any, TypeVar

from flask import current_app
from flask_login import current_user

from ..billing import Billing
from ..errors import NotFound
from ..estimate import Calibrator
from ..models import ChatSession, Model, TrainingJob
from ..settings import Settings

T = TypeVar("T")


def current_settings() -> Settings:
    """The settings this app was created with."""
    return current_app.config["NCS_SETTINGS"]


def current_calibrator() -> Calibrator:
    """The app's device probe and calibrator (create_app makes it)."""
    return current_app.extensions["ncs_calibrator"]


def current_billing() -> Billing:
    """The app's billing policy (hosted credits, lab quotas, or the null one; create_app makes it)."""
    return current_app.extensions["ncs_billing"]


# What a row is called in a 404 (another user's id answers exactly like a missing one).
_NOUNS = {TrainingJob: "job", Model: "model", ChatSession: "chat session"}


def own(table: type[T], ident: Any) -> T:
    """The signed-in user's row ``ident`` of ``table`` (TrainingJob, Model or ChatSession); NotFound
    for anyone else's, a missing one and a malformed id alike."""
    row = table.get_owned(ident, current_user.id)
    if row is None:
        try:
            int(ident)
            shown = str(ident)
        except (TypeError, ValueError):
            shown = repr(ident)
        raise NotFound(f"no {_NOUNS[table]} {shown}")
    return row
