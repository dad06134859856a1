"""A small OAuth 2 / OpenID Connect provider on loopback, for tests; built on authlib's server side.

One server plays both outside providers the studio signs in with, so nothing calls GitHub or Google:

- GitHub-like: ``/login/oauth/authorize``, ``/login/oauth/access_token``, and the API under ``/api``
  (``/api/user``, ``/api/user/emails`` with ``primary`` and ``verified`` flags);
- Google-like (OpenID Connect): ``/.well-known/openid-configuration``, ``/o/authorize``, ``/o/token``
  (its answer carries an RS256-signed ``id_token``), ``/o/userinfo``, ``/o/jwks``.

Both require PKCE S256 (authlib's ``CodeChallenge(required=True)``), and Google-like requests a nonce.
A test chooses who "signs in" at the provider by setting ``provider.account``, or refuses consent with
``provider.deny = True``. Authorization runs without a page: the authorize endpoint grants at once.

The caller must set ``AUTHLIB_INSECURE_TRANSPORT=1`` (plain http on loopback).
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import AuthorizationCodeMixin, ClientMixin, grants
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oidc.core import UserInfo
from authlib.oidc.core.grants import OpenIDCode
from flask import Flask, abort, jsonify, request
from joserfc.jwk import RSAKey
from werkzeug.serving import WSGIRequestHandler, make_server

GITHUB_CLIENT_ID, GITHUB_CLIENT_SECRET = "gh-test-client", "gh-test-secret"
GOOGLE_CLIENT_ID, GOOGLE_CLIENT_SECRET = "google-test-client", "google-test-secret"

_signing_key: RSAKey | None = None


def signing_key() -> RSAKey:
    """One RSA key per test session: generating it takes a noticeable fraction of a second."""
    global _signing_key
    if _signing_key is None:
        _signing_key = RSAKey.generate_key(2048, parameters={"use": "sig", "alg": "RS256"}, auto_kid=True)
    return _signing_key


@dataclass
class FakeAccount:
    """A person at the provider. ``id`` is GitHub's numeric id or Google's ``sub``."""

    id: str
    email: str | None
    email_verified: bool
    name: str = ""
    login: str = ""


@dataclass
class _Client(ClientMixin):
    client_id: str
    client_secret: str
    redirect_uris: list[str]

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return self.redirect_uris[0]

    def get_allowed_scope(self, scope: str) -> str:
        return scope

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return secrets.compare_digest(client_secret, self.client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "authorization_code"


@dataclass
class _Code(AuthorizationCodeMixin):
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    account: FakeAccount
    nonce: str | None
    code_challenge: str | None
    code_challenge_method: str | None
    auth_time: int = field(default_factory=lambda: int(time.time()))

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.auth_time

    def get_acr(self) -> None:
        return None

    def get_amr(self) -> None:
        return None


class _CodeGrant(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

    def save_authorization_code(self, code: str, request: Any) -> None:
        data = request.payload.data
        self.server.fake.codes[code] = _Code(
            code=code,
            client_id=request.client.client_id,
            redirect_uri=request.payload.redirect_uri,
            scope=request.scope,
            account=request.user,
            nonce=data.get("nonce"),
            code_challenge=data.get("code_challenge"),
            code_challenge_method=data.get("code_challenge_method"),
        )

    def query_authorization_code(self, code: str, client: _Client) -> _Code | None:
        item = self.server.fake.codes.get(code)
        return item if item is not None and item.client_id == client.client_id else None

    def delete_authorization_code(self, authorization_code: _Code) -> None:
        self.server.fake.codes.pop(authorization_code.code, None)

    def authenticate_user(self, authorization_code: _Code) -> FakeAccount:
        return authorization_code.account


def _user_info(account: FakeAccount, scope: str) -> UserInfo:
    info = UserInfo(sub=account.id, name=account.name)
    if "email" in scope.split():
        info["email"] = account.email
        info["email_verified"] = account.email_verified
    return info


class _OpenID(OpenIDCode):
    def __init__(self, fake: "FakeProvider") -> None:
        super().__init__(require_nonce=True)
        self.fake = fake

    def exists_nonce(self, nonce: str, request: Any) -> bool:
        return nonce in self.fake.seen_nonces

    def resolve_client_private_key(self, client: _Client) -> RSAKey:
        return signing_key()

    def get_client_algorithm(self, client: _Client) -> str:
        return "RS256"

    def get_encode_header(self, client: _Client) -> dict:
        return {"alg": "RS256", "kid": signing_key().kid}

    def get_client_claims(self, client: _Client) -> dict:
        return {"iss": self.fake.url, "aud": [client.client_id]}

    def generate_user_info(self, user: FakeAccount, scope: str) -> UserInfo:
        return _user_info(user, scope)


class _QuietHandler(WSGIRequestHandler):
    def log(self, type: str, message: str, *args: Any) -> None:  # noqa: A002 - werkzeug's signature
        pass  # one line per request would bury the test output


class FakeProvider:
    """Start with ``start()`` (or use as a context manager); ``url`` is its base address."""

    def __init__(self, redirect_uris: dict[str, list[str]]) -> None:
        """``redirect_uris``: {"github": [...], "google": [...]} the studio's callback URLs."""
        self.reset()
        self.clients = {
            GITHUB_CLIENT_ID: _Client(GITHUB_CLIENT_ID, GITHUB_CLIENT_SECRET, redirect_uris.get("github", [])),
            GOOGLE_CLIENT_ID: _Client(GOOGLE_CLIENT_ID, GOOGLE_CLIENT_SECRET, redirect_uris.get("google", [])),
        }
        self.url = ""
        self.app = self._build_app()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def reset(self) -> None:
        """Forget everything a test set or caused (one running provider serves many tests)."""
        self.account: FakeAccount | None = None
        self.deny = False
        self.extra_github_emails: list[dict] = []  # e.g. a secondary verified address
        self.published_keys: list[dict] | None = None  # JWKS to publish instead of the signing key's
        self.codes: dict[str, _Code] = {}
        self.tokens: dict[str, tuple[FakeAccount, str]] = {}
        self.seen_nonces: set[str] = set()
        self.authorize_requests: list[dict] = []  # the query of every authorize call, for assertions

    # -- the Flask app of the provider
    def _build_app(self) -> Flask:
        app = Flask("fake_oauth_provider")
        app.config.update(SECRET_KEY=secrets.token_hex(16), SESSION_COOKIE_NAME="fake_provider_session")
        server = AuthorizationServer(app, query_client=self.clients.get, save_token=self._save_token)
        server.fake = self
        server.register_grant(_CodeGrant, [CodeChallenge(required=True), _OpenID(self)])

        def authorize() -> Any:
            self.authorize_requests.append(dict(request.args))
            try:
                grant = server.get_consent_grant(end_user=self.account)
            except OAuth2Error as error:
                return jsonify(error=error.error, error_description=error.description), 400
            response = server.create_authorization_response(grant=grant, grant_user=None if self.deny else self.account)
            if "nonce" in request.args:  # after: validation runs again inside create_authorization_response
                self.seen_nonces.add(request.args["nonce"])
            return response

        app.add_url_rule("/login/oauth/authorize", "gh_authorize", authorize)
        app.add_url_rule("/o/authorize", "google_authorize", authorize)
        app.add_url_rule("/login/oauth/access_token", "gh_token", server.create_token_response, methods=["POST"])
        app.add_url_rule("/o/token", "google_token", server.create_token_response, methods=["POST"])

        @app.get("/api/user")
        def gh_user() -> Any:
            account, _ = self._bearer()
            numeric = int(account.id) if account.id.isdigit() else abs(hash(account.id))
            # The public email may be anything; the studio must not trust it.
            return jsonify(id=numeric, login=account.login or account.name, name=account.name, email=account.email)

        @app.get("/api/user/emails")
        def gh_emails() -> Any:
            account, scope = self._bearer()
            if "user:email" not in scope.split():
                abort(404)  # what GitHub answers without the scope
            emails = [{"email": account.email, "primary": True, "verified": account.email_verified,
                       "visibility": "private"}] if account.email else []
            return jsonify(emails + self.extra_github_emails)

        @app.get("/o/userinfo")
        def google_userinfo() -> Any:
            account, scope = self._bearer()
            return jsonify(dict(_user_info(account, scope)))

        @app.get("/o/jwks")
        def google_jwks() -> Any:
            return jsonify(keys=self.published_keys or [signing_key().as_dict(private=False)])

        @app.get("/.well-known/openid-configuration")
        def discovery() -> Any:
            return jsonify(
                issuer=self.url,
                authorization_endpoint=f"{self.url}/o/authorize",
                token_endpoint=f"{self.url}/o/token",
                userinfo_endpoint=f"{self.url}/o/userinfo",
                jwks_uri=f"{self.url}/o/jwks",
                response_types_supported=["code"],
                subject_types_supported=["public"],
                id_token_signing_alg_values_supported=["RS256"],
                scopes_supported=["openid", "email", "profile"],
                token_endpoint_auth_methods_supported=["client_secret_basic", "client_secret_post"],
                code_challenge_methods_supported=["S256"],
            )

        return app

    def _save_token(self, token: dict, request: Any) -> None:
        self.tokens[token["access_token"]] = (request.user, token.get("scope", ""))

    def _bearer(self) -> tuple[FakeAccount, str]:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        entry = self.tokens.get(value) if scheme.lower() == "bearer" else None
        if entry is None:
            abort(401)
        return entry

    # -- where the studio should look
    @property
    def github_base_url(self) -> str:
        return self.url

    @property
    def github_api_url(self) -> str:
        return f"{self.url}/api"

    @property
    def google_discovery_url(self) -> str:
        return f"{self.url}/.well-known/openid-configuration"

    # -- lifecycle
    def start(self) -> "FakeProvider":
        self._server = make_server("127.0.0.1", 0, self.app, threaded=True, request_handler=_QuietHandler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        # A short poll interval: shutdown() waits for the loop to notice (0.5 s by default).
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-oauth", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeProvider":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
