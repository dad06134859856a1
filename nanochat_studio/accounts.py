"""The account rules: who may have an account, sign in, administer; the solo owner; invitations;
how a GitHub or Google identity maps to an account.

No Flask request in here (the CLI calls these too). Refusals are ``AccountError`` with a message meant
for the person: the views show it as is, the CLI turns it into a ``click.ClickException``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
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


def email_verified(user: User) -> bool:
    """Whether the person proved they own the account's email (hosted mode asks it before buying or
    training). The interface shared with the security branch (issue 10), which builds the verification."""
    return user.email_verified_at is not None


def may_sign_in(user: User) -> bool:
    return bool(user.is_active and user.is_approved)


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


def create_user(email: str | None, password: str | None = None, name: str = "", is_admin: bool = False) -> User:
    """Create an approved account (the CLI, admins, the solo owner). The install's first becomes admin.

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
                password_hash=generate_password_hash(password, PASSWORD_HASH_METHOD) if password is not None else None,
                is_admin=is_admin,
                is_approved=True,
            )
        except pw.IntegrityError as exc:  # a concurrent sign-up with the same email won
            raise AccountError("An account with this email already exists.") from exc
        _claim_first_admin(user)
    return user


def register_user(
    email: str | None, password: str | None, name: str = "", *, mode: str, invite: str | None = None
) -> User:
    """Self-registration under the mode's rules.

    solo: closed (the owner is this machine's user). lab: open, but waits for approval unless it is
    the first account or comes with a valid invite. hosted: open.
    Raises AccountError (closed, bad invite, taken email, weak password).
    """
    if mode == "solo":
        raise AccountError("Sign-up is closed: this studio runs in solo mode for its owner.")
    with _write_transaction():
        invited = _take_invite(invite) if invite else False
        user = create_user(email, password, name)
        if mode == "lab" and not user.is_admin and not invited:
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
        _dummy_hash = _dummy_hash or generate_password_hash(secrets.token_hex(8), PASSWORD_HASH_METHOD)
        check_password_hash(_dummy_hash, password or "")
        raise AccountError("Wrong email or password.")
    if not check_password_hash(user.password_hash, password or ""):
        raise AccountError("Wrong email or password.")
    ensure_may_sign_in(user)
    return user


def set_password(user: User, new_password: str, current_password: str | None = None) -> None:
    """Set or change the password; a password already set must be given. Raises AccountError."""
    if user.password_hash and not check_password_hash(user.password_hash, current_password or ""):
        raise AccountError("The current password is wrong.")
    check_password_rules(new_password)
    user.password_hash = generate_password_hash(new_password, PASSWORD_HASH_METHOD)
    user.save(only=[User.password_hash])


def set_email(user: User, email: str) -> None:
    address = normalize_email(email)
    if User.select().where((User.email == address) & (User.id != user.id)).exists():
        raise AccountError("An account with this email already exists.")
    user.email = address
    user.save(only=[User.email])


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
        if not identity.email_verified:
            raise AccountError(
                f"An account with {email} already exists, and {label} has not confirmed that this email "
                f"is yours. Sign in with your password, then link {label} from your profile."
            )
        if existing.oauth_provider:
            other = PROVIDER_LABELS.get(existing.oauth_provider, existing.oauth_provider)
            raise AccountError(f"The account for {email} signs in with {other}. Use {other} instead.")
        _link(existing, identity)
        ensure_may_sign_in(existing)
        return existing
    user = register_user(email if identity.email_verified else None, None, identity.name, mode=mode, invite=invite)
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
