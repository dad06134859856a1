"""Who is asking: flask-login sessions, API keys, GitHub and Google clients (authlib), view guards.

``init_app(app, settings)`` wires it into the app. Who is asking, in this order:

1. a request carrying ``Authorization: Bearer ncs_...`` is judged by that key alone (a session cookie
   sent beside it is ignored, so a script never acts as whoever last used the browser, and such a
   request needs no CSRF token: no other site can make a browser send that header);
2. otherwise the signed-in session;
3. otherwise, in ``solo`` mode, a request from this machine is the solo owner, no sign-in needed.

Views use ``login_required``, ``admin_required`` and ``api_key_required``; ``current_user`` is
flask-login's. The account rules themselves (passwords, approval, linking) live in ``accounts.py``;
the CLI's entry points are importable from here too.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

from authlib.integrations.flask_client import OAuth
from flask import Flask, current_app, g, redirect, request, session, url_for
from flask.sessions import SecureCookieSessionInterface
from flask_login import LoginManager, current_user, login_user, logout_user

from .accounts import (  # noqa: F401 - create_user and solo_owner are the CLI's entry points
    PROVIDER_LABELS,
    AccountError,
    Identity,
    create_user,
    digest,
    end_sessions,
    ensure_may_sign_in,
    may_sign_in,
    solo_owner,
)
from .errors import API_PREFIXES, Forbidden, Unauthorized
from .models import ApiKey, User, utcnow
from .settings import Settings

API_KEY_PREFIX = "ncs_"
API_KEY_DISPLAY_CHARS = 12  # "ncs_" + 8 random characters: enough to tell keys apart in a list
LAST_USED_RESOLUTION = dt.timedelta(minutes=1)  # one write per key per minute, not per request
# Host names that mean "this machine" (the solo owner's sign-in, and hosts the app always answers to).
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# Headers a proxy adds to say whom it forwards for. Any of them, whatever it names, means the request
# passed through a proxy, and a proxy on this machine connects from loopback for visitors from anywhere.
# (X-Forwarded-* of any suffix counts too.)
PROXY_HEADERS = ("Forwarded", "Via", "X-Real-Ip", "X-Client-Ip", "Client-Ip", "True-Client-Ip",
                 "Cf-Connecting-Ip", "Fastly-Client-Ip", "X-Cluster-Client-Ip", "X-Original-Forwarded-For",
                 "X-ProxyUser-Ip", "Forwarded-For", "X-Original-Host", "X-Host")
# What a signed-in session carries besides flask-login's user id.
SESSION_VERSION_KEY, SESSION_STARTED_KEY = "_sv", "_signed_in_at"


@dataclass
class _AuthState:
    settings: Settings
    oauth: OAuth
    providers: dict[str, str] = field(default_factory=dict)  # name -> label, only those configured
    solo_owner_id: int | None = None


def _state() -> _AuthState:
    return current_app.extensions["ncs_auth"]


# ---------------------------------------------------------------------------------------------- wiring

class _LoginManager(LoginManager):
    def _session_protection_failed(self) -> bool:
        # An empty session (an API key's request, the solo owner's script) has nothing to protect, and
        # flask-login answers False for it too, but only after hashing the client's address and
        # User-Agent (sha512) on every request.
        if not session:
            return False
        return super()._session_protection_failed()


class _SessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, with the signing serializer made once per set of keys: Flask makes
    a new one for every request, cookie or not (~5 us). It keeps nothing between calls."""

    _made: tuple[tuple, Any] | None = None

    def get_signing_serializer(self, app: Flask) -> Any:
        keys = (app.secret_key, tuple(app.config["SECRET_KEY_FALLBACKS"] or ()))
        made = self._made
        if made is None or made[0] != keys:
            made = self._made = (keys, super().get_signing_serializer(app))
        return made[1]


def init_app(app: Flask, settings: Settings) -> None:
    """Install flask-login, the session cookie's interface and the OAuth clients of the configured
    providers."""
    app.session_interface = _SessionInterface()
    manager = _LoginManager(app)
    manager.user_loader(_load_session_user)
    manager.request_loader(_load_request_user)
    manager.unauthorized_handler(_unauthorized)
    oauth = OAuth(app)
    state = _AuthState(settings=settings, oauth=oauth, providers=_register_providers(oauth, settings))
    app.extensions["ncs_auth"] = state
    app.jinja_env.globals.update(
        auth_mode=settings.mode, oauth_providers=state.providers, request_is_local=request_is_local
    )


def _register_providers(oauth: OAuth, settings: Settings) -> dict[str, str]:
    """Register only providers with a client id; the others do not exist (no button, 404)."""
    providers: dict[str, str] = {}
    if settings.github_client_id:
        base = settings.github_base_url.rstrip("/")
        oauth.register(
            "github",
            client_id=settings.github_client_id,
            client_secret=settings.github_client_secret,
            authorize_url=f"{base}/login/oauth/authorize",
            access_token_url=f"{base}/login/oauth/access_token",
            api_base_url=settings.github_api_url.rstrip("/") + "/",
            client_kwargs={
                "scope": "read:user user:email",
                "code_challenge_method": "S256",
                "token_endpoint_auth_method": "client_secret_post",
                "default_timeout": 15,
            },
        )
        providers["github"] = PROVIDER_LABELS["github"]
    if settings.google_client_id:
        oauth.register(
            "google",
            client_id=settings.google_client_id,
            client_secret=settings.google_client_secret,
            server_metadata_url=settings.google_discovery_url,
            client_kwargs={"scope": "openid email profile", "code_challenge_method": "S256", "default_timeout": 15},
        )
        providers["google"] = PROVIDER_LABELS["google"]
    return providers


def enabled_providers() -> dict[str, str]:
    return dict(_state().providers)


def bearer_token() -> str | None:
    """The key of an ``Authorization: Bearer`` header, if the request has one (the frame skips CSRF then)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _load_session_user(user_id: str) -> User | None:
    if bearer_token() is not None:
        return None  # the key decides (see the module docstring); flask-login then asks the request loader
    try:
        user = User.first_by(id=int(user_id))
    except (ValueError, OverflowError):
        return None
    if user is None or not may_sign_in(user) or not _session_current(user):
        return None
    return user


def _session_current(user: User) -> bool:
    """The session was started with the account's current session version, and not too long ago: a
    logout, password change, "sign out everywhere" or disabling bumps the version and ends it."""
    started = session.get(SESSION_STARTED_KEY)
    max_age = _state().settings.session_max_age_hours * 3600
    return (session.get(SESSION_VERSION_KEY) == user.session_version
            and isinstance(started, (int, float)) and 0 <= time.time() - started <= max_age)


def _load_request_user(req: Any) -> User | None:
    token = bearer_token()
    if token is not None:
        return user_for_api_key(token)
    state = _state()
    if state.settings.mode == "solo" and request_is_local():
        owner = User.first_by(id=state.solo_owner_id) if state.solo_owner_id else None
        if owner is None:
            owner = solo_owner()
            state.solo_owner_id = owner.id
        return owner
    return None


def _wants_json() -> bool:
    return request.path.startswith(API_PREFIXES)  # answered with JSON errors, never a redirect to a page


def _unauthorized() -> Any:
    if _wants_json():
        raise Unauthorized("Sign in, or send an API key as 'Authorization: Bearer ncs_...'.")
    path = request.full_path if request.query_string else request.path
    return redirect(url_for("account.login", next=path))


# ------------------------------------------------------------------------------------ view decorators

def login_required(view: Callable) -> Callable:
    """Pages: redirect to sign-in with ``next``; ``/api/`` and ``/v1/``: 401 JSON."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not current_user.is_authenticated:
            return _unauthorized()
        return view(*args, **kwargs)

    return wrapped


def admin_required(view: Callable) -> Callable:
    """Like ``login_required``, then 403 for anyone who is not an administrator."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not current_user.is_authenticated:
            return _unauthorized()
        if not current_user.is_admin:
            raise Forbidden("Only administrators can do that.")
        return view(*args, **kwargs)

    return wrapped


def api_key_required(view: Callable) -> Callable:
    """For ``/v1/``: a valid bearer key and nothing else, in every mode (solo included)."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not current_user.is_authenticated or g.get("api_key") is None:
            raise Unauthorized("Send a valid API key as 'Authorization: Bearer ncs_...'.")
        return view(*args, **kwargs)

    return wrapped


# -------------------------------------------------------------------------------------- where from

def _is_loopback(addr: str | None) -> bool:
    try:
        ip = ipaddress.ip_address((addr or "").strip().strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _names_this_machine(host: str) -> bool:
    host = host.lower()
    hostname = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0] or host
    return hostname in LOOPBACK_NAMES or _is_loopback(hostname)


# PROXY_HEADERS as the WSGI environ names them ("Forwarded" arrives as HTTP_FORWARDED).
_PROXY_ENVIRON_KEYS = frozenset("HTTP_" + name.upper().replace("-", "_") for name in PROXY_HEADERS)
_NOT_HEADERS = frozenset({"HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"})  # werkzeug's headers skip these two


def _came_through_a_proxy() -> bool:
    # One pass over the environ's keys, naming each header as werkzeug's request.headers does; asking
    # request.headers for each of PROXY_HEADERS raised and caught a KeyError per absent header (~20 us
    # of every request, and the solo owner's requests all come here).
    for key in request.environ:
        if key in _PROXY_ENVIRON_KEYS:
            return True
        if (key.startswith("HTTP_") and key not in _NOT_HEADERS
                and key[5:].replace("_", "-").lower().startswith("x-forwarded-")):
            return True
    return False


def request_is_local() -> bool:
    """True only for a browser on this machine talking to us directly: the peer is loopback, the Host
    names this machine, no proxy header of any kind is present (a proxy on this machine connects from
    loopback for visitors from anywhere), and the page the browser is on, when it says (Origin, or the
    Referer of a same-origin request), is on a loopback name too.

    Under ``serve`` waitress hands the app every proxy header unread (``serve`` turns off its clearing
    of "untrusted" ones, which would hide them), so this check sees what the proxy sent. A proxy that
    adds nothing and rewrites Host to 127.0.0.1 still looks local to its first request: solo mode must
    not run behind a proxy at all (settings refuse ``trusted_proxy`` in solo; the README says use lab).
    """
    if not _is_loopback(request.remote_addr):
        return False
    if not _names_this_machine(request.host or ""):
        return False
    if _came_through_a_proxy():
        return False
    origin = request.headers.get("Origin")
    if origin is not None and not _names_this_machine(urlsplit(origin).netloc):
        return False  # "null" or another site: not the owner's own page on this machine
    referer = request.headers.get("Referer")
    if referer and request.headers.get("Sec-Fetch-Site") == "same-origin":
        # The browser says the page it came from has this request's origin: that origin is the address
        # the person typed, so a public name there means they reached us through something else.
        if not _names_this_machine(urlsplit(referer).netloc):
            return False
    return True


def safe_next(target: str | None) -> str | None:
    """``target`` if it is a path on this site, else None.

    Only a relative path starting with exactly one "/" passes: "//evil" and "/\\evil" are read by
    browsers as other hosts, and control characters (tabs, newlines) are dropped by browsers, which
    turns "/\\t/evil" into "//evil".
    """
    if not target or not isinstance(target, str) or len(target) > 2048:
        return None
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return None
    if any(ord(c) < 32 or ord(c) == 127 for c in target):
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return None
    return target


# ---------------------------------------------------------------------------------------- sessions

def sign_in(user: User) -> None:
    """Start a session for ``user`` (already checked by authenticate or sign_in_identity)."""
    ensure_may_sign_in(user)
    session.clear()  # nothing from before sign-in carries over (a fixed session's state, a half-done flow)
    login_user(user)
    stamp_session(user)
    User.update(last_login_at=utcnow()).where(User.id == user.id).execute()


def stamp_session(user: User) -> None:
    """Mark this session as started at ``user``'s current session version (after a sign-in, or after
    this session's own password change bumped the version)."""
    session[SESSION_VERSION_KEY] = user.session_version
    session[SESSION_STARTED_KEY] = time.time()


def sign_out_everywhere(user: User) -> None:
    """End every session of ``user``, this one included (a copied cookie stops working too)."""
    end_sessions(user)
    logout_user()
    session.clear()


# ---------------------------------------------------------------------------------------- API keys

def create_api_key(user: User, name: str = "") -> tuple[ApiKey, str]:
    """A new key for ``user``: the row and the key itself, which is never stored and never shown again."""
    secret = API_KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey.create(
        user=user, name=(name or "").strip()[:120], prefix=secret[:API_KEY_DISPLAY_CHARS], key_hash=digest(secret)
    )
    return key, secret


def revoke_api_key(user: User | None, key_prefix_or_id: str) -> bool:
    """Revoke one active key by id, displayed prefix or the whole key; ``user`` None: anyone's (CLI).

    Returns False when no active key matches (or a prefix is ambiguous, which never happens in practice).
    """
    ident = str(key_prefix_or_id).strip()
    query = ApiKey.select().where(ApiKey.revoked_at.is_null())
    if user is not None:
        query = query.where(ApiKey.user == user)
    if ident.isdigit():
        query = query.where(ApiKey.id == int(ident))
    elif len(ident) > API_KEY_DISPLAY_CHARS:
        query = query.where(ApiKey.key_hash == digest(ident))
    else:
        query = query.where(ApiKey.prefix == ident)
    matches = list(query.limit(2))
    if len(matches) != 1:
        return False
    revoked = (
        ApiKey.update(revoked_at=utcnow())
        .where((ApiKey.id == matches[0].id) & ApiKey.revoked_at.is_null())
        .execute()
    )
    return revoked == 1


def user_for_api_key(secret: str) -> User | None:
    """The owner of an active key (and ``g.api_key`` set to it), or None."""
    if not secret.startswith(API_KEY_PREFIX):
        return None
    key = (
        ApiKey.select(ApiKey, User)
        .join(User)
        .where((ApiKey.key_hash == digest(secret)) & ApiKey.revoked_at.is_null())
        .first()
    )
    if key is None or not may_sign_in(key.user):
        return None
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_RESOLUTION:
        ApiKey.update(last_used_at=now).where(ApiKey.id == key.id).execute()
    g.api_key = key
    return key.user


# ------------------------------------------------------------------------------- GitHub and Google

def oauth_client(provider: str) -> Any | None:
    """The authlib client of a configured provider, or None (the view answers 404)."""
    state = _state()
    return state.oauth.create_client(provider) if provider in state.providers else None


def fetch_identity(provider: str, client: Any) -> Identity:
    """Finish the provider's redirect (authlib checks state and PKCE) and ask who signed in.

    Raises AccountError when the provider reports an error or the exchange fails.
    """
    from authlib.integrations.base_client import OAuthError
    from requests import RequestException

    try:
        from joserfc.errors import JoseError  # authlib >= 1.6 verifies id_tokens with joserfc
    except ImportError:  # pragma: no cover - older authlib
        from authlib.jose.errors import JoseError

    label = PROVIDER_LABELS[provider]
    try:
        token = client.authorize_access_token()
        if provider == "github":
            profile = client.get("user", token=token)
            profile.raise_for_status()
            emails = client.get("user/emails", token=token)
            emails.raise_for_status()
            return _github_identity(profile.json(), emails.json())
        claims = token.get("userinfo") or client.userinfo(token=token)
        verified = claims.get("email_verified") in (True, "true")
        return Identity("google", str(claims["sub"]), claims.get("email"), verified, claims.get("name") or "")
    except OAuthError as exc:
        if exc.error == "access_denied":
            raise AccountError(f"{label} sign-in was cancelled.") from exc
        if exc.error == "mismatching_state":
            raise AccountError(f"{label} sign-in expired or was started elsewhere. Please try again.") from exc
        detail = exc.description or exc.error
        raise AccountError(f"{label} sign-in failed: {detail}") from exc
    except JoseError as exc:  # an id_token that does not verify: forged, or keys rotated
        current_app.logger.warning("%s sign-in refused: id_token did not verify: %r", provider, exc)
        raise AccountError(f"{label} sign-in failed: its answer could not be verified.") from exc
    except (RequestException, KeyError, ValueError) as exc:
        current_app.logger.warning("%s sign-in failed: %r", provider, exc)
        raise AccountError(f"{label} sign-in failed: could not read your {label} profile.") from exc


def _github_identity(profile: dict, emails: list) -> Identity:
    # /user's "email" is the public one and says nothing of verification; /user/emails does.
    primary = next((e for e in emails if isinstance(e, dict) and e.get("primary")), None)
    email = primary.get("email") if primary else None
    verified = bool(primary and primary.get("verified") is True)
    name = profile.get("name") or profile.get("login") or ""
    return Identity("github", str(profile["id"]), email, verified, name)
