"""One blueprint per noun (pages, account, jobs, api, chat, openai); ``create_app`` registers them.

A view reads the app's settings with :func:`current_settings`.
"""

from __future__ import annotations

from flask import current_app

from ..settings import Settings


def current_settings() -> Settings:
    """The settings this app was created with."""
    return current_app.config["NCS_SETTINGS"]
