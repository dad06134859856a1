"""Proving an email address: signed, expiring links, and hosted sign-ups that exist only once proved.

Two kinds of link, both valid ``email_link_hours``:

- **an address for an existing account** (a new address typed on the profile, or the current one never
  confirmed): a link signed with the secret key naming the account, the address and the account's
  email at the time. Opening it while signed in to that account makes the address the account's,
  confirmed. A later change of the account's email voids every older link. The address only becomes the
  account's when the link is opened, so nobody can hold someone else's address by typing it.
- **a hosted sign-up**: nothing is created until the link is opened. The pending sign-up (address, name,
  password hash) waits in AppState under the hash of a random token; opening the link and entering the
  same password creates the account, confirmed, and signs in. Whoever merely receives a link someone else
  started cannot finish it (they lack its password), and a sign-up never blocks an address for its owner.

No Flask request in here: views call these and turn ``AccountError`` into form errors.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from typing import Callable

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from . import accounts, mail
from .accounts import AccountError
from .models import AppState, User, utcnow
from .settings import Settings

log = logging.getLogger(__name__)

EMAIL_SALT = "ncs-email-confirmation-v1"
LinkMaker = Callable[..., str]  # (endpoint, **values) -> an absolute URL: the views' _external
SIGNUP_PREFIX = "signup:"


def _signer(settings: Settings) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(settings.secret_key, salt=EMAIL_SALT)


def _hours(settings: Settings) -> str:
    hours = settings.email_link_hours
    return f"{hours:g} hour{'s' if hours != 1 else ''}"


# ----------------------------------------------------------------------------- an existing account

def email_token(settings: Settings, user: User, address: str) -> str:
    return _signer(settings).dumps({"u": user.id, "e": address, "was": user.email or ""})


def read_email_token(settings: Settings, token: str, user: User) -> str:
    """The address a link proves for ``user``. Raises AccountError: expired, forged, for another
    account, or overtaken by a later change of the account's email."""
    try:
        data = _signer(settings).loads(token, max_age=settings.email_link_hours * 3600)
    except SignatureExpired:
        raise AccountError("This confirmation link has expired. Ask for a new one on your profile.") from None
    except BadSignature:
        raise AccountError("This confirmation link is not valid.") from None
    if not isinstance(data, dict) or data.get("u") != user.id:
        raise AccountError("This confirmation link is for another account: sign in to that one to use it.")
    if data.get("was") != (user.email or "") or not isinstance(data.get("e"), str):
        raise AccountError("This confirmation link was overtaken by a later change of your email.")
    return data["e"]


def send_email_confirmation(settings: Settings, user: User, address: str, link_for: LinkMaker) -> bool:
    """Mail a link that confirms ``address`` for ``user`` (True: sent; False: logged, no mail server).
    Raises AccountError for an address another account holds, MailError when sending fails."""
    address = accounts.check_email_free(address, user)
    link = link_for("confirm.email", token=email_token(settings, user, address))
    body = (f"To use this address for your nanochat studio account, open this link within "
            f"{_hours(settings)}, signed in to the account:\n\n{link}\n\n"
            "If you did not ask for this, ignore this mail: nothing changes.\n")
    return mail.send(settings, address, "Confirm your email for nanochat studio", body)


def confirm_email(settings: Settings, token: str, user: User) -> str:
    """Open a link: the address becomes ``user``'s, confirmed; the old confirmed address is told.
    Raises AccountError."""
    address = read_email_token(settings, token, user)
    old = user.email if accounts.email_verified(user) else None
    accounts.set_verified_email(user, address)
    if old and old != address:
        notify(settings, old, "Your nanochat studio email was changed",
               f"The email of your nanochat studio account is now {address}. If you did not do this, sign "
               "in and change your password, or ask the studio's administrator for help.\n")
    return address


def notify(settings: Settings, address: str, subject: str, body: str) -> None:
    """A notice about the account (a changed password or email) to its confirmed address; a failure to
    send is logged, never raised: the change itself is done."""
    try:
        mail.send(settings, address, subject, body)
    except mail.MailError as exc:
        log.error("notice to %s failed: %s", address, exc)


def notify_password_changed(settings: Settings, user: User) -> None:
    if accounts.email_verified(user):
        notify(settings, user.email, "Your nanochat studio password was changed",
               "The password of your nanochat studio account was just changed, and every browser signed in "
               "to it was signed out. If you did not do this, ask the studio's administrator for help.\n")


# ------------------------------------------------------------------------------------ hosted sign-up

def start_signup(settings: Settings, email: str, password: str, name: str, invite: str | None,
                 link_for: LinkMaker) -> bool:
    """Record a pending sign-up and mail its link. An address that has an account gets a note saying so
    instead (the page answers the same either way, so the form does not tell who has an account).
    Returns what mail.send returns. Raises AccountError (bad address or password), MailError."""
    address = accounts.normalize_email(email)
    accounts.check_password_rules(password)
    _forget_expired()
    if User.select().where(User.email == address).exists():
        body = ("Someone asked to sign up for nanochat studio with this address, which already has an "
                f"account. To use it, sign in: {link_for('account.login')}\n\n"
                "If it was not you, ignore this mail.\n")
        return mail.send(settings, address, "You already have a nanochat studio account", body)
    token = secrets.token_urlsafe(24)
    expires = utcnow() + dt.timedelta(hours=settings.email_link_hours)
    AppState.create(key=SIGNUP_PREFIX + accounts.digest(token), value={
        "email": address, "name": (name or "").strip()[:120], "hash": accounts.hash_password(password),
        "invite": (invite or "")[:100], "expires_at": expires.isoformat()})
    link = link_for("confirm.signup", token=token)
    body = (f"Someone (we hope you) signed up for nanochat studio with this address. To finish, open this "
            f"link within {_hours(settings)} and enter the password you chose:\n\n{link}\n\n"
            "If it was not you, ignore this mail: no account is made.\n")
    return mail.send(settings, address, "Finish signing up for nanochat studio", body)


def pending_signup(token: str) -> dict | None:
    """The pending sign-up of ``token`` if it exists and has not expired."""
    row = AppState.get_or_none(AppState.key == SIGNUP_PREFIX + accounts.digest(token or ""))
    if row is None or not isinstance(row.value, dict):
        return None
    if dt.datetime.fromisoformat(row.value["expires_at"]) < utcnow():
        return None
    return row.value


def finish_signup(token: str, password: str, *, mode: str) -> User:
    """Create the account of a pending sign-up whose password is given. Raises AccountError."""
    pending = pending_signup(token)
    if pending is None:
        raise AccountError("This sign-up link has expired or was already used. Sign up again.")
    if not accounts.password_matches(pending["hash"], password):
        raise AccountError("That is not the password this sign-up was started with.")
    key = SIGNUP_PREFIX + accounts.digest(token)
    # Deleting is the compare-and-set: of two requests with one link, only one creates the account.
    if AppState.delete().where(AppState.key == key).execute() != 1:
        raise AccountError("This sign-up link was already used.")
    return accounts.register_user(pending["email"], None, pending["name"], mode=mode,
                                  invite=pending["invite"] or None, email_verified=True,
                                  password_hash=pending["hash"])


def _forget_expired() -> None:
    now = utcnow()
    for row in AppState.select().where(AppState.key.startswith(SIGNUP_PREFIX)):
        value = row.value if isinstance(row.value, dict) else {}
        try:
            expired = dt.datetime.fromisoformat(value.get("expires_at", "")) < now
        except ValueError:
            expired = True
        if expired:
            AppState.delete().where(AppState.key == row.key).execute()
