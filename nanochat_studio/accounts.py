"""The account rules: who may have an account, sign in, administer; the solo owner; invitations;
how a GitHub or Google identity maps to an account.

No Flask request in here (the CLI calls these too). Refusals are ``AccountError`` with a message meant
for the person: the views show it as is, the CLI turns it into a ``click.ClickException``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import threading
from dataclasses import dataclass
from typing import Any

import peewee as pw
from werkzeug.security import check_password_hash, generate_password_hash

from .db import database
from .models import AppState, User, utcnow

PASSWORD_MIN_LENGTH = 10
PASSWORD_MAX_LENGTH = 256  # hashing cost grows with length; nobody types more
PASSWORD_HASH_METHOD = "scrypt"  # werkzeug's default, ~0.1 s a hash here; tests lower it for speed
INVITE_TTL = dt.timedelta(days=7)
SOLO_OWNER_KEY = "solo_owner_id"
FIRST_ADMIN_KEY = "first_admin_id"
PROVIDER_LABELS = {"github": "GitHub", "google": "Google"}


class AccountError(Exception):
    """A refusal to show the person as is: email taken, weak password, awaiting approval, ..."""


class HashingBusy(AccountError):
    """Every password-hashing slot stayed taken for HASH_WAIT_S: the caller answers 429."""


# Each scrypt hash takes ~32 MiB and ~0.1 s: unbounded, a burst of sign-ins grows the process by
# hundreds of MiB. At most ``password_hash_concurrency`` run at once; the others wait a little, then
# are refused (limits.init_app sets the bound from the settings).
HASH_WAIT_S = 5.0
_hash_slots = threading.BoundedSemaphore(2)


def set_hash_concurrency(n: int) -> None:
    global _hash_slots
    _hash_slots = threading.BoundedSemaphore(max(1, int(n)))


def _hashing(fn, *args):
    slots = _hash_slots
    if not slots.acquire(timeout=HASH_WAIT_S):
        raise HashingBusy("Too many sign-ins at this moment. Try again in a few seconds.")
    try:
        return fn(*args)
    finally:
        slots.release()


def hash_password(password: str) -> str:
    return _hashing(generate_password_hash, password, PASSWORD_HASH_METHOD)


def password_matches(stored_hash: str, password: str) -> bool:
    return bool(_hashing(check_password_hash, stored_hash, password or ""))


@dataclass(frozen=True)
class Identity:
    """Who a provider says signed in. ``email_verified`` is the provider's word, nothing less."""

    provider: str
    provider_id: str
    email: str | None
    email_verified: bool
    name: str = ""


# ------------------------------------------------------------------------------------------ people

def normalize_email(email: str) -> str:
    """Lower-cased and trimmed; raises AccountError when it cannot be an address."""
    value = (email or "").strip().lower()
    local, at, domain = value.rpartition("@")
    labels = domain.split(".")
    if (
        not at or not local or len(value) > 320 or len(labels) < 2 or not all(labels)
        or value.count("@") != 1 or any(c.isspace() or ord(c) < 32 or c in '<>"(),;:[\\]' for c in value)
    ):
        raise AccountError("Enter a valid email address, like ada@example.com.")
    return value


def check_password_rules(password: str) -> None:
    if len(password or "") < PASSWORD_MIN_LENGTH:
        raise AccountError(f"Use a password of at least {PASSWORD_MIN_LENGTH} characters.")
    if len(password) > PASSWORD_MAX_LENGTH:
        raise AccountError(f"Use a password of at most {PASSWORD_MAX_LENGTH} characters.")


def may_sign_in(user: User) -> bool:
    return bool(user.is_active and user.is_approved)


def email_verified(user: User) -> bool:
    """Whether the person proved they read mail at the account's current email (a confirmation link, or
    a provider that vouched for it). Billing and provider linking rely on it."""
    return bool(user.email and user.email_verified_at is not None)


def end_sessions(user: User) -> int:
    """End every signed-in session of ``user`` (each carries the version it started with); returns the
    new version, which a session that should survive (a password change's own) takes on."""
    User.update(session_version=User.session_version + 1).where(User.id == user.id).execute()
    version = User.select(User.session_version).where(User.id == user.id).scalar() or 0
    user.session_version = version
    return version


def set_active(user: User, active: bool) -> None:
    """Disable (or enable again) an account; disabling ends its sessions, and its API keys stop working."""
    User.update(is_active_flag=bool(active)).where(User.id == user.id).execute()
    user.is_active_flag = bool(active)
    if not active:
        end_sessions(user)


def ensure_may_sign_in(user: User) -> None:
    if not user.is_active:
        raise AccountError("This account is disabled.")
    if not user.is_approved:
        raise AccountError("Your account is waiting for an administrator's approval.")


def _write_transaction() -> Any:
    """A transaction that reads then writes. On SQLite it takes the write lock at BEGIN (IMMEDIATE):
    a deferred one that read first cannot wait for the lock later and fails with "database is locked"."""
    if isinstance(database.obj, pw.SqliteDatabase) and not database.in_transaction():
        return database.atomic(lock_type="IMMEDIATE")
    return database.atomic()


def _claim_first_admin(user: User) -> bool:
    """Make ``user`` the admin when it is the install's first account.

    Two first sign-ups at once can both see an empty table; only one can insert the AppState row
    (its key is the primary key), so only one becomes admin, on SQLite and PostgreSQL alike.
    """
    if User.select().where(User.id != user.id).exists():
        return False
    try:
        with database.atomic():  # a savepoint: losing the race leaves the outer transaction usable
            AppState.create(key=FIRST_ADMIN_KEY, value=user.id)
    except pw.IntegrityError:
        return False
    user.is_admin = True
    user.is_approved = True
    user.save(only=[User.is_admin, User.is_approved])
    return True


def create_user(email: str | None, password: str | None = None, name: str = "", is_admin: bool = False, *,
                first_becomes_admin: bool = True, password_hash: str | None = None,
                email_verified: bool = False) -> User:
    """Create an approved account (the CLI, admins, the solo owner). The install's first becomes admin
    unless ``first_becomes_admin`` is False (sign-ups from the web: the first admin comes from the CLI or
    the setup link, never from whoever reaches the page first).

    Raises AccountError for a bad or taken email or a password breaking the rules.
    """
    address = normalize_email(email) if email else None
    if password is not None:
        check_password_rules(password)
    with _write_transaction():
        if address and User.select().where(User.email == address).exists():
            raise AccountError("An account with this email already exists.")
        try:
            user = User.create(
                email=address,
                name=(name or "").strip()[:120],
                password_hash=hash_password(password) if password is not None else password_hash,
                is_admin=is_admin,
                is_approved=True,
                email_verified_at=utcnow() if email_verified and address else None,
            )
        except pw.IntegrityError as exc:  # a concurrent sign-up with the same email won
            raise AccountError("An account with this email already exists.") from exc
        if first_becomes_admin:
            _claim_first_admin(user)
    return user


def register_user(
    email: str | None, password: str | None, name: str = "", *, mode: str, invite: str | None = None,
    email_verified: bool = False, password_hash: str | None = None,
) -> User:
    """Self-registration under the mode's rules. Nobody becomes admin this way (see setup links).

    solo: closed (the owner is this machine's user). lab: open, but waits for approval unless it comes
    with a valid invite. hosted: open (a password sign-up arrives here only once its email is confirmed,
    see confirmations.py). Raises AccountError (closed, bad invite, taken email, weak password).
    """
    if mode == "solo":
        raise AccountError("Sign-up is closed: this studio runs in solo mode for its owner.")
    with _write_transaction():
        invited = _take_invite(invite) if invite else False
        user = create_user(email, password, name, first_becomes_admin=False, password_hash=password_hash,
                           email_verified=email_verified)
        if mode == "lab" and not invited:
            user.is_approved = False
            user.save(only=[User.is_approved])
    return user


_dummy_hash: str | None = None


def authenticate(email: str, password: str) -> User:
    """The account for this email and password. Raises AccountError (one message for both mistakes)."""
    global _dummy_hash
    try:
        user = User.get_or_none(User.email == normalize_email(email))
    except AccountError:
        user = None
    if user is None or not user.password_hash:
        # Spend the same time as a real check, so timing does not tell which emails have accounts.
        _dummy_hash = _dummy_hash or hash_password(secrets.token_hex(8))
        password_matches(_dummy_hash, password)
        raise AccountError("Wrong email or password.")
    if not password_matches(user.password_hash, password):
        raise AccountError("Wrong email or password.")
    ensure_may_sign_in(user)
    return user


def set_password(user: User, new_password: str, current_password: str | None = None) -> int:
    """Set or change the password; a password already set must be given. Ends every session of the
    account and returns the new session version (the caller's own session takes it on). Raises
    AccountError."""
    if user.password_hash and not password_matches(user.password_hash, current_password):
        raise AccountError("The current password is wrong.")
    check_password_rules(new_password)
    user.password_hash = hash_password(new_password)
    user.save(only=[User.password_hash])
    return end_sessions(user)


def check_email_free(address: str, user: User | None = None) -> str:
    """``address`` normalised, if no account but ``user`` holds it. Raises AccountError."""
    address = normalize_email(address)
    taken = User.select().where(User.email == address)
    if user is not None:
        taken = taken.where(User.id != user.id)
    if taken.exists():
        raise AccountError("An account with this email already exists.")
    return address


def set_verified_email(user: User, address: str) -> None:
    """Make ``address`` the account's email, confirmed now (the person opened the link sent there).
    Raises AccountError when another account took the address meanwhile."""
    address = check_email_free(address, user)
    try:
        User.update(email=address, email_verified_at=utcnow()).where(User.id == user.id).execute()
    except pw.IntegrityError as exc:
        raise AccountError("An account with this email already exists.") from exc
    user.email, user.email_verified_at = address, utcnow()


def solo_owner() -> User:
    """The one person of a solo install: created on first call, its id kept in AppState."""
    row = AppState.get_or_none(AppState.key == SOLO_OWNER_KEY)
    owner = User.get_or_none(User.id == row.value) if row is not None else None
    if owner is not None:
        return owner
    try:
        with _write_transaction():
            owner = create_user(None, name="Owner", is_admin=True)
            (
                AppState.insert(key=SOLO_OWNER_KEY, value=owner.id)
                .on_conflict(conflict_target=[AppState.key], update={AppState.value: owner.id})
                if row is not None  # the recorded owner was deleted: record the new one
                else AppState.insert(key=SOLO_OWNER_KEY, value=owner.id)
            ).execute()
    except pw.IntegrityError:  # another process created the owner first; ours is rolled back
        return User.get_by_id(AppState.get_by_id(SOLO_OWNER_KEY).value)
    return owner


# ------------------------------------------------------------------------------------------ invites

def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_invite(admin: User) -> str:
    """A single-use invitation token (lab mode: skips approval). Only its hash is stored."""
    token = secrets.token_urlsafe(24)
    expires_at = (utcnow() + INVITE_TTL).isoformat()
    AppState.create(key="invite:" + digest(token), value={"by": admin.id, "expires_at": expires_at})
    return token


def _take_invite(token: str) -> bool:
    """Use up an invite; raises AccountError when it is unknown, used or expired."""
    key = "invite:" + digest(token)
    row = AppState.get_or_none(AppState.key == key)
    # Deleting is the compare-and-set: of two sign-ups with one link, only one deletes the row.
    if row is None or AppState.delete().where(AppState.key == key).execute() != 1:
        raise AccountError("This invitation link is not valid, or was already used.")
    if dt.datetime.fromisoformat(row.value["expires_at"]) < utcnow():
        raise AccountError("This invitation link has expired. Ask for a new one.")
    return True


# ------------------------------------------------------------------------------- provider identities

def sign_in_identity(identity: Identity, *, mode: str, linking: User | None = None, invite: str | None = None) -> User:
    """The account for a provider identity; links or creates one when needed. Raises AccountError.

    Keyed by (provider, provider id). An existing account is joined by email only when the provider
    vouches for the email; otherwise the email is not trusted at all (not even stored), so nobody can
    claim someone else's address through a provider that does not check it.
    """
    label = PROVIDER_LABELS[identity.provider]
    key = (User.oauth_provider == identity.provider) & (User.oauth_id == identity.provider_id)
    user = User.get_or_none(key)
    if linking is not None:
        if user is not None and user.id != linking.id:
            raise AccountError(f"That {label} account is already linked to another account here.")
        if user is None and linking.oauth_provider:
            other = PROVIDER_LABELS.get(linking.oauth_provider, linking.oauth_provider)
            raise AccountError(f"This account is already linked to {other}.")
        _link(linking, identity)
        return linking
    if user is not None:
        ensure_may_sign_in(user)
        return user
    try:
        email = normalize_email(identity.email) if identity.email else None
    except AccountError:
        email = None
    existing = User.get_or_none(User.email == email) if email else None
    if existing is not None:
        # Both sides must have proved the address: the provider, and the account here (a link sent to it
        # was opened). Anyone can type any address into a profile or a sign-up form.
        if not identity.email_verified or not email_verified(existing):
            raise AccountError(
                f"An account with {email} already exists here, and its email is not confirmed "
                f"{'by ' + label if not identity.email_verified else 'yet'}. Sign in to that account first "
                f"(with its password), then link {label} from your profile."
            )
        if existing.oauth_provider:
            other = PROVIDER_LABELS.get(existing.oauth_provider, existing.oauth_provider)
            raise AccountError(f"The account for {email} signs in with {other}. Use {other} instead.")
        _link(existing, identity)
        ensure_may_sign_in(existing)
        return existing
    verified = identity.email_verified and email is not None
    user = register_user(email if verified else None, None, identity.name, mode=mode, invite=invite,
                         email_verified=verified)
    _link(user, identity)
    ensure_may_sign_in(user)
    return user


def _link(user: User, identity: Identity) -> None:
    user.oauth_provider = identity.provider
    user.oauth_id = identity.provider_id
    try:
        user.save(only=[User.oauth_provider, User.oauth_id])
    except pw.IntegrityError as exc:  # linked to another account by a concurrent sign-in
        raise AccountError(f"That {PROVIDER_LABELS[identity.provider]} account is already linked.") from exc

