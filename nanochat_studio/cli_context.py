"""What every ``nanochat-studio`` command runs with: the settings its flags name, one-line messages for
the errors a user can cause, the database opened and migrated for the command's duration, and an
account looked up by email.

cli.py (the ``main`` group and the serving, account and key commands) and cli_billing.py (credits and
the ledger) build on these. Every failure leaves as ``click.ClickException``: one line, no traceback.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import click
import peewee as pw

from . import db
from .settings import Settings, SettingsError, load_settings


class Context:
    def __init__(self, config: str | None, home: str | None) -> None:
        self.config = config
        self.home = home

    def settings(self, **overrides: Any) -> Settings:
        try:
            return load_settings(toml_path=self.config, home=self.home, **overrides)
        except SettingsError as exc:
            raise click.ClickException(str(exc)) from None


pass_ctx = click.make_pass_decorator(Context)


def _first_line(exc: BaseException) -> str:
    """A driver's error, whose text may run over many lines (or be empty), as one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def clean_errors(fn: Callable) -> Callable:
    """Turn the errors a user can cause (bad settings, an unreachable database, account rules) into
    one-line messages."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .accounts import AccountError

        try:
            return fn(*args, **kwargs)
        except SettingsError as exc:
            raise click.ClickException(str(exc)) from None
        except AccountError as exc:
            raise click.ClickException(str(exc)) from None
        except (pw.OperationalError, pw.InterfaceError) as exc:
            raise click.ClickException(f"database: {_first_line(exc)}") from None

    return wrapper


@contextlib.contextmanager
def opened_store(settings: Settings) -> Iterator[pw.Database]:
    """The database from ``settings``, migrated, for a command's duration (in a private data directory:
    a command run before the first `serve` must not leave a world-readable studio.db behind)."""
    from . import secretbox

    secretbox.make_private(settings)
    database = db.open_database(settings.database_url)
    try:
        database.connect(reuse_if_open=True)
    except Exception as exc:  # a refused socket or a bad password, for whichever driver
        raise click.ClickException(f"NCS_DATABASE_URL: cannot connect: {_first_line(exc)}") from None
    try:
        db.migrate(database)
        yield database
    finally:
        database.close()


def user_by_email(email: str) -> Any:
    """The account with ``email`` (normalised as sign-in does); a ClickException when there is none."""
    from .accounts import normalize_email
    from .models import User

    user = User.get_or_none(User.email == normalize_email(email))
    if user is None:
        raise click.ClickException(f"no user with email {email}")
    return user
