"""How a lab or hosted install gets its first administrator: never whoever signs up first, but the
holder of a one-time setup token that `serve` prints at each start while there is none (or an operator
with the CLI: ``users create EMAIL --admin``).

Only the token's hash is stored (AppState ``setup_token``); a new one replaces the last.
"""

from __future__ import annotations

import hmac
import secrets

from .accounts import AccountError, _write_transaction, create_user, digest
from .models import AppState, User

SETUP_TOKEN_KEY = "setup_token"


def admin_exists() -> bool:
    return User.select().where(User.is_admin == True).exists()  # noqa: E712


def issue_setup_token() -> str | None:
    """A one-time token that lets whoever holds it create the first administrator (lab and hosted),
    or None when an administrator exists. A new one replaces the last: `serve` prints it at each start
    until it is used. Only its hash is stored."""
    if admin_exists():
        AppState.delete().where(AppState.key == SETUP_TOKEN_KEY).execute()
        return None
    token = secrets.token_urlsafe(24)
    (AppState.insert(key=SETUP_TOKEN_KEY, value={"digest": digest(token)})
     .on_conflict(conflict_target=[AppState.key], update={AppState.value: {"digest": digest(token)}})
     .execute())
    return token


def setup_token_valid(token: str | None) -> bool:
    row = AppState.get_or_none(AppState.key == SETUP_TOKEN_KEY)
    if not token or row is None or not isinstance(row.value, dict):
        return False
    return hmac.compare_digest(str(row.value.get("digest", "")), digest(token))


def create_first_admin(token: str | None, email: str, password: str, name: str = "") -> User:
    """The install's first administrator, for the holder of the setup token. Uses the token up (of two
    requests with it, one wins). Raises AccountError for a bad token, an existing admin, a bad email or
    password."""
    with _write_transaction():
        if not setup_token_valid(token):
            raise AccountError("This setup link is not valid (it was used, or the server printed a new one "
                               "at its last start).")
        if AppState.delete().where(AppState.key == SETUP_TOKEN_KEY).execute() != 1 or admin_exists():
            raise AccountError("An administrator exists already: sign in instead.")
        return create_user(email, password, name, is_admin=True, first_becomes_admin=False)
