"""``create_app(settings)``: wiring only. Blueprints, sign-in, the database per request, CSRF, host
guard, security headers and error handlers. No module-level app; the web process never imports torch.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, current_app, request
from flask_wtf.csrf import CSRFError, CSRFProtect, validate_csrf

from . import __version__, auth, billing, db, errors, estimate, formats, inputs, limits, logs, mail, runner, tasks
from .errors import BadRequest, Forbidden
from .settings import Settings
from .views import account, api, billing_admin, chat, confirm, jobs, openai, pages, workers
from .views import billing as billing_views
from .views import metrics as metrics_view

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
BLUEPRINTS = (pages.bp, account.bp, confirm.bp, jobs.bp, api.bp, chat.bp, openai.bp, billing_views.bp,
              billing_admin.bp, metrics_view.bp, workers.bp)
# Endpoints that take no CSRF token: Stripe signs its webhook instead. Nothing else belongs here.
CSRF_EXEMPT_ENDPOINTS = frozenset({"billing.stripe_webhook"})
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",  # no inline script anywhere: the pages load static/js files
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'self'",
    "frame-ancestors 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}

csrf = CSRFProtect()


def resource_dir(name: str) -> Path:
    """``templates`` or ``static``: inside the package when installed from a wheel, else at the top of
    the source checkout."""
    inside = PACKAGE_DIR / name
    return inside if inside.is_dir() else PACKAGE_DIR.parent / name


def create_app(settings: Settings) -> Flask:
    app = Flask("nanochat_studio", template_folder=str(resource_dir("templates")),
                static_folder=str(resource_dir("static")), static_url_path="/static")
    secure = settings.base_url.startswith("https://")
    app.config.update(
        SECRET_KEY=settings.secret_key,
        NCS_SETTINGS=settings,
        # Over https the name carries the __Host- prefix: browsers then take the cookie only if it is
        # Secure, for this exact host and path / (no sibling subdomain can set or shadow it).
        SESSION_COOKIE_NAME="__Host-ncs_session" if secure else "ncs_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=secure,
        REMEMBER_COOKIE_HTTPONLY=True,
        REMEMBER_COOKIE_SAMESITE="Lax",
        REMEMBER_COOKIE_SECURE=secure,
        MAX_CONTENT_LENGTH=settings.upload_max_bytes + (1 << 20),  # the file plus the form around it
        WTF_CSRF_CHECK_DEFAULT=False,  # _guard_request decides: forms need the token, JSON APIs their rules
        WTF_CSRF_TIME_LIMIT=None,  # tokens live as long as the session; a tab left open still works
        JSON_SORT_KEYS=False,
    )
    logs.configure(settings)

    db.open_database(settings.database_url)
    applied = db.migrate()
    if applied:
        log.info("applied migrations %s", applied)
    db.database.close()  # requests open their own connection

    # First: every later hook's log lines carry the request id, and a refused request is timed too.
    logs.init_app(app)
    metrics_view.init_app(app)
    if settings.mode == "hosted" and not mail.configured(settings):
        log.warning("hosted mode without smtp_url: sign-up confirmation links are only logged")
    inputs.init_app(app, settings)  # before the blueprints: their <int:...> routes take its id converter
    csrf.init_app(app)
    errors.init_app(app)
    formats.init_app(app)
    auth.init_app(app, settings)
    # The device this app's jobs train on, and the timing runs behind its estimates (on worker slots).
    app.extensions["ncs_calibrator"] = estimate.Calibrator(
        probe=lambda: runner.probe_device(settings),
        run=lambda shape, batch_size: tasks.calibrate_on_a_slot(settings, shape, batch_size),
        prepare=lambda key: tasks.enqueue_facts(key, settings))
    app.extensions["ncs_billing"] = billing.for_settings(settings)
    _install_request_hooks(app, settings)
    limits.init_app(app, settings)  # after the database hook: the API limits know the user
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    app.jinja_env.globals.update(settings=settings, app_version=__version__)
    return app


# ------------------------------------------------------------------------------------------ guards

def allowed_hosts(settings: Settings) -> set[str]:
    names = set(auth.LOOPBACK_NAMES)
    names.update(h.strip().lower() for h in settings.allowed_hosts.split(",") if h.strip())
    if settings.host not in ("0.0.0.0", "::", ""):
        names.add(settings.host.lower())
    if settings.base_url:
        names.add((urlsplit(settings.base_url).hostname or "").lower())
    return names


def host_is_allowed(host_header: str, allowed: set[str]) -> bool:
    """The Host header names this app (DNS-rebinding guard). An IP literal is always accepted: a page
    whose origin is an IP address cannot have been rebound."""
    if "*" in allowed:
        return True
    host = urlsplit("//" + host_header).hostname or ""
    if not host:
        return False
    if host in allowed:
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _same_origin(origin: str, settings: Settings) -> bool:
    if origin == "null":
        return False
    netloc = urlsplit(origin).netloc.lower()
    ours = {request.host.lower()}
    if settings.base_url:
        ours.add(urlsplit(settings.base_url).netloc.lower())
    return netloc in ours


def _guard_api_write(settings: Settings) -> None:
    """A write to /api/ or /v1/ must come from a script, not a cross-site form: JSON content type, our
    page's CSRF header (multipart uploads), or a bearer key. Cross-site Origins are refused outright."""
    origin = request.headers.get("Origin")
    if origin and not _same_origin(origin, settings):
        raise Forbidden(f"Requests from {origin} are not accepted.", code="cross_origin")
    if not current_app.config.get("WTF_CSRF_ENABLED", True):
        return
    if auth.bearer_token():
        return
    if request.mimetype == "application/json":
        return
    token = request.headers.get("X-CSRFToken") or request.headers.get("X-CSRF-Token")
    if token:
        try:
            validate_csrf(token)
            return
        except Exception:
            raise Forbidden("The CSRF token is missing or invalid. Reload the page and try again.",
                            code="csrf_failed") from None
    raise Forbidden("Send JSON with 'Content-Type: application/json', an X-CSRFToken header, or an API key.",
                    code="csrf_failed")


def _install_request_hooks(app: Flask, settings: Settings) -> None:
    hosts = allowed_hosts(settings)

    @app.before_request
    def _guard_request() -> None:
        if not host_is_allowed(request.host, hosts):
            raise BadRequest(f"Unknown host {request.host!r}. Add it to NCS_ALLOWED_HOSTS to serve it.",
                             code="bad_host")
        if request.method not in UNSAFE_METHODS or request.endpoint in CSRF_EXEMPT_ENDPOINTS:
            return
        if request.path.startswith(errors.API_PREFIXES):
            _guard_api_write(settings)
        elif app.config.get("WTF_CSRF_ENABLED", True) and not auth.bearer_token():
            csrf.protect()  # every form carries the token; a key-authenticated script needs none

    @app.before_request
    def _open_db() -> None:
        db.database.connect(reuse_if_open=True)

    keep_open = not db.is_postgres()

    @app.teardown_request
    def _close_db(exc: BaseException | None) -> None:
        # SQLite: each waitress thread keeps its connection for its next request (opening one is a
        # file open and four pragmas, ~0.2 ms of every request's CPU). A failed request, or one that
        # left a transaction open, closes it; PostgreSQL connections are a server's resource and are
        # given back after every request.
        if db.database.is_closed():
            return
        if keep_open and exc is None and not db.database.in_transaction():
            return
        db.database.close()

    # (lowercased name, name, value) of the headers a response gets unless its view set them
    always = list(SECURITY_HEADERS.items())
    if settings.base_url.startswith("https://"):  # served over https: browsers must never come back over http
        always.append(("Strict-Transport-Security", "max-age=31536000"))
    static_defaults = [(name.lower(), name, value) for name, value in always]
    # Pages and API answers are someone's data: no shared or browser cache keeps them.
    other_defaults = [*static_defaults, ("cache-control", "Cache-Control", "no-store")]

    @app.after_request
    def _security_headers(response: Any) -> Any:
        # What headers.setdefault does for each, with one pass over the headers the view set: each
        # setdefault scanned them twice, raising and catching a KeyError when absent.
        present = {name.lower() for name, _ in response.headers}
        for lower, name, value in (static_defaults if request.path.startswith("/static/") else other_defaults):
            if lower not in present:
                response.headers.add(name, value)
        return response

    @app.errorhandler(CSRFError)
    def _csrf_error(exc: CSRFError) -> Any:
        return errors.render_error(BadRequest(
            "This form expired or was not sent from this site. Reload the page and try again.",
            code="csrf_failed"))
