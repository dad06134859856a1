"""GitHub and Google sign-in end to end against a loopback provider built on authlib's server side.

The studio runs in Flask's test client; the provider is a real HTTP server on 127.0.0.1, so the
studio's token exchange, profile and email calls, discovery and JWKS fetches all cross a socket.
"""

from __future__ import annotations

import socket
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import pytest
import requests

from nanochat_studio import accounts
from nanochat_studio.models import User
from oauth_provider import (
    GITHUB_CLIENT_ID,
    GITHUB_CLIENT_SECRET,
    GOOGLE_CLIENT_ID,
    GOOGLE_CLIENT_SECRET,
    FakeAccount,
    FakeProvider,
    signing_key,
)
from test_auth import PASSWORD, join, login, register, whoami
from test_auth import account_app_fixture  # noqa: F401 - the account_app fixture

CALLBACKS = {name: [f"http://localhost/account/oauth/{name}/callback"] for name in ("github", "google")}


@pytest.fixture(scope="module")
def running_provider():
    with FakeProvider(CALLBACKS) as running:
        yield running


@pytest.fixture
def provider(running_provider, monkeypatch):
    monkeypatch.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")  # plain http, on loopback only
    running_provider.reset()
    yield running_provider
    running_provider.reset()


@pytest.fixture
def studio(account_app, provider):
    """Make an app with both providers pointed at the loopback provider."""

    def make(mode: str = "hosted", **overrides):
        settings = dict(
            github_client_id=GITHUB_CLIENT_ID,
            github_client_secret=GITHUB_CLIENT_SECRET,
            github_base_url=provider.github_base_url,
            github_api_url=provider.github_api_url,
            google_client_id=GOOGLE_CLIENT_ID,
            google_client_secret=GOOGLE_CLIENT_SECRET,
            google_discovery_url=provider.google_discovery_url,
        )
        settings.update(overrides)
        return account_app(mode, **settings)

    return make


def to_provider_and_back(client, provider, start_response):
    """Follow the studio's redirect to the provider, and the provider's answer back to the callback."""
    assert start_response.status_code == 302
    authorize_url = start_response.headers["Location"]
    assert authorize_url.startswith(provider.url + "/")
    answer = requests.get(authorize_url, allow_redirects=False, timeout=10)
    assert answer.status_code == 302, answer.text
    callback = urlsplit(answer.headers["Location"])
    assert (callback.scheme, callback.netloc) == ("http", "localhost")
    return f"{callback.path}?{callback.query}"


def sign_in_with(client, provider, name, next=None):
    start = client.get(f"/account/oauth/{name}/login" + (f"?next={quote(next, safe='')}" if next else ""))
    return client.get(to_provider_and_back(client, provider, start))


def flashed(client) -> str:
    return client.get("/account/login").get_data(as_text=True)


@pytest.mark.parametrize("name", ["github", "google"])
def test_sign_in_creates_an_account_keyed_by_provider_and_id(studio, provider, name):
    client = studio().test_client()
    provider.account = FakeAccount(id="4242", email="Octo@Example.com", email_verified=True, name="Octo", login="octo")

    response = sign_in_with(client, provider, name)
    assert response.status_code == 302 and response.headers["Location"] == "/"
    assert whoami(client) == "octo@example.com"
    user = User.get()
    assert (user.oauth_provider, user.oauth_id, user.name) == (name, "4242", "Octo")
    assert user.password_hash is None and not user.is_admin  # nobody becomes admin by signing in first
    assert accounts.email_verified(user)  # the provider vouched for the address

    # The authorization request used state and PKCE S256.
    query = provider.authorize_requests[-1]
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) >= 43
    assert query["state"] and query["client_id"] == (GITHUB_CLIENT_ID if name == "github" else GOOGLE_CLIENT_ID)
    if name == "google":
        assert query["nonce"] and "openid" in query["scope"].split()

    # Signing in again finds the same account, even when the provider's email changed.
    client.post("/account/logout")
    provider.account = FakeAccount(id="4242", email="new@example.com", email_verified=True, name="Octo")
    sign_in_with(client, provider, name)
    assert whoami(client) == "octo@example.com"
    assert User.select().count() == 1


def test_google_identity_comes_from_the_signed_id_token(studio, provider):
    client = studio().test_client()
    provider.account = FakeAccount(id="google-sub-7", email="ada@example.com", email_verified=True, name="Ada")
    sign_in_with(client, provider, "google")
    assert whoami(client) == "ada@example.com"

    # Publish another public key under the same kid: the id_token's signature no longer verifies,
    # and nobody is signed in (a clean refusal, not an error page).
    from joserfc.jwk import RSAKey

    other = RSAKey.generate_key(2048, parameters={"use": "sig", "alg": "RS256"})
    forged = {**other.as_dict(private=False), "kid": signing_key().kid}
    provider.published_keys = [forged]
    fresh = studio().test_client()  # a fresh app: its authlib client has not cached the real JWKS
    response = sign_in_with(fresh, provider, "google")
    assert response.status_code == 302 and response.headers["Location"] == "/account/login"
    assert whoami(fresh) is None
    assert "Google sign-in failed: its answer could not be verified." in flashed(fresh)


@pytest.mark.parametrize("name", ["github", "google"])
def test_a_verified_email_links_the_existing_local_account(studio, provider, mailbox, name):
    app = studio()
    alice = app.test_client()
    join(alice, mailbox, "alice@example.com")  # the address was confirmed here, by a link mailed to it
    alice_id = User.get().id

    client = app.test_client()
    provider.account = FakeAccount(id="77", email="ALICE@example.com", email_verified=True, name="Alice")
    sign_in_with(client, provider, name)
    assert whoami(client) == "alice@example.com"
    user = User.get_by_id(alice_id)
    assert (user.oauth_provider, user.oauth_id) == (name, "77")
    assert User.select().count() == 1
    # The password still works too.
    other = app.test_client()
    login(other, "alice@example.com")
    assert whoami(other) == "alice@example.com"


@pytest.mark.parametrize("name", ["github", "google"])
def test_an_unverified_email_never_links_an_existing_account(studio, provider, mailbox, name):
    app = studio()
    join(app.test_client(), mailbox, "alice@example.com")

    mallory = app.test_client()
    provider.account = FakeAccount(id="666", email="alice@example.com", email_verified=False, name="Mallory")
    response = sign_in_with(mallory, provider, name)
    assert response.status_code == 302 and response.headers["Location"] == "/account/login"
    assert whoami(mallory) is None
    assert "Sign in to that account first" in flashed(mallory)
    assert User.select().count() == 1 and User.get().oauth_provider is None


@pytest.mark.parametrize("name", ["github", "google"])
def test_an_account_whose_email_was_never_confirmed_here_is_not_joined_by_it(studio, provider, name):
    # The takeover the issue found: someone holds an address they never proved (a lab sign-up, an
    # account from before confirmations); the address's real owner signs in with a provider that did
    # verify it. Joining them would land the owner in the squatter's account: refused, with a way on.
    app = studio("lab")
    squatter = accounts.create_user("victim@example.com", PASSWORD)
    assert not accounts.email_verified(squatter)
    victim = app.test_client()
    provider.account = FakeAccount(id="1001", email="victim@example.com", email_verified=True, name="Victim")
    response = sign_in_with(victim, provider, name)
    assert response.headers["Location"] == "/account/login"
    assert whoami(victim) is None
    assert "Sign in to that account first" in flashed(victim)
    assert User.get_by_id(squatter.id).oauth_provider is None


def test_github_trusts_only_the_primary_verified_email(studio, provider, mailbox):
    app = studio()
    join(app.test_client(), mailbox, "alice@example.com")
    # alice@ verified but not primary; the primary is unverified: no link.
    provider.extra_github_emails = [{"email": "alice@example.com", "primary": False, "verified": True}]
    provider.account = FakeAccount(id="9", email="mallory@example.com", email_verified=False, name="Mallory")
    client = app.test_client()
    sign_in_with(client, provider, "github")
    mallory = User.get(User.oauth_id == "9")
    assert mallory.email is None  # an unverified address is not stored, so nobody can squat it
    assert User.get(User.email == "alice@example.com").oauth_provider is None


def test_linking_from_the_profile_needs_no_verified_email(studio, provider, mailbox):
    app = studio()
    alice = app.test_client()
    join(alice, mailbox, "alice@example.com")
    provider.account = FakeAccount(id="31", email="old-address@example.com", email_verified=False, name="Alice")

    start = alice.post("/account/oauth/github/link")
    response = alice.get(to_provider_and_back(alice, provider, start))
    assert response.headers["Location"] == "/account/profile"
    assert User.get().oauth_id == "31"
    assert "GitHub is now linked" in alice.get("/account/profile").get_data(as_text=True)

    # Now the GitHub identity alone signs alice in.
    fresh = app.test_client()
    sign_in_with(fresh, provider, "github")
    assert whoami(fresh) == "alice@example.com"


def test_a_callback_from_another_browser_is_refused(studio, provider):
    app = studio()
    provider.account = FakeAccount(id="1", email="victim@example.com", email_verified=True)
    attacker = app.test_client()
    callback = to_provider_and_back(attacker, provider, attacker.get("/account/oauth/github/login"))

    victim = app.test_client()  # never started a sign-in: its session holds no state
    response = victim.get(callback)
    assert response.status_code == 302 and response.headers["Location"] == "/account/login"
    assert whoami(victim) is None
    assert "sign-in expired or was started elsewhere" in flashed(victim)
    assert User.select().count() == 0


def test_a_tampered_state_is_refused(studio, provider):
    client = studio().test_client()
    provider.account = FakeAccount(id="1", email="a@example.com", email_verified=True)
    callback = urlsplit(to_provider_and_back(client, provider, client.get("/account/oauth/google/login")))
    query = {k: v[0] for k, v in parse_qs(callback.query).items()}
    query["state"] = "forged-" + query["state"]
    response = client.get(f"{callback.path}?{urlencode(query)}")
    assert response.headers["Location"] == "/account/login"
    assert whoami(client) is None


def test_a_refusal_at_the_provider_is_shown_cleanly(studio, provider):
    client = studio().test_client()
    provider.account = FakeAccount(id="1", email="a@example.com", email_verified=True)
    provider.deny = True
    callback = to_provider_and_back(client, provider, client.get("/account/oauth/github/login"))
    assert "error=access_denied" in callback
    response = client.get(callback)
    assert response.status_code == 302 and response.headers["Location"] == "/account/login"
    assert "GitHub sign-in was cancelled." in flashed(client)


def test_a_provider_error_with_a_description_is_shown(studio, provider):
    client = studio().test_client()
    client.get("/account/oauth/github/login")
    state = parse_qs(urlsplit(client.get("/account/oauth/github/login").headers["Location"]).query)["state"][0]
    query = urlencode({"error": "server_error", "error_description": "Try later", "state": state})
    response = client.get(f"/account/oauth/github/callback?{query}")
    assert response.headers["Location"] == "/account/login"
    assert "GitHub sign-in failed: Try later" in flashed(client)


def test_next_survives_the_round_trip_but_only_on_this_site(studio, provider):
    app = studio()
    provider.account = FakeAccount(id="5", email="a@example.com", email_verified=True)
    client = app.test_client()
    assert sign_in_with(client, provider, "github", next="/jobs/3?tab=loss").headers["Location"] == "/jobs/3?tab=loss"
    client = app.test_client()
    assert sign_in_with(client, provider, "github", next="//evil.example/x").headers["Location"] == "/"


def test_lab_sign_ups_through_a_provider_wait_for_approval(studio, provider):
    app = studio("lab")
    register(app.test_client(), "alice@example.com")
    client = app.test_client()
    provider.account = FakeAccount(id="8", email="bob@example.com", email_verified=True, name="Bob")
    sign_in_with(client, provider, "google")
    assert whoami(client) is None
    assert "waiting for an administrator" in flashed(client)
    bob = User.get(User.oauth_id == "8")
    assert not bob.is_approved and bob.email == "bob@example.com"


def test_solo_mode_lets_no_stranger_in_through_a_provider(studio, provider):
    client = studio("solo").test_client()
    provider.account = FakeAccount(id="8", email="stranger@example.com", email_verified=True)
    remote = {"REMOTE_ADDR": "10.0.0.5"}
    start = client.get("/account/oauth/github/login", environ_base=remote)
    client.get(to_provider_and_back(client, provider, start), environ_base=remote)
    assert client.get("/api/probe/me", environ_base=remote).status_code == 401
    assert not User.select().where(User.email == "stranger@example.com").exists()


def test_providers_without_a_client_id_are_off(account_app):
    client = account_app("hosted", github_client_id="").test_client()
    assert client.get("/account/oauth/github/login").status_code == 404
    assert client.get("/account/oauth/google/callback?code=x&state=y").status_code == 404
    assert "Continue with" not in client.get("/account/login").get_data(as_text=True)


def test_configured_providers_are_offered(studio):
    page = studio().test_client().get("/account/login").get_data(as_text=True)
    assert "Continue with GitHub" in page and "Continue with Google" in page


def test_an_unreachable_provider_is_a_clean_message(account_app, monkeypatch):
    monkeypatch.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    app = account_app("hosted", google_client_id=GOOGLE_CLIENT_ID, google_client_secret=GOOGLE_CLIENT_SECRET,
                   google_discovery_url=f"http://127.0.0.1:{port}/.well-known/openid-configuration")
    client = app.test_client()
    response = client.get("/account/oauth/google/login")
    assert response.status_code == 302 and response.headers["Location"] == "/account/login"
    assert "Google sign-in is unavailable right now." in flashed(client)
