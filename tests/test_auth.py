"""Local accounts, modes, sign-in rules, CSRF and next= redirects, against a real SQLite file per test."""

from __future__ import annotations

import re
import threading
from urllib.parse import urlsplit

import pytest
from flask import Blueprint, jsonify, request
from flask_login import current_user

from nanochat_studio import accounts, auth, bootstrap
from nanochat_studio.auth import admin_required, api_key_required, login_required
from nanochat_studio.models import AppState, User

PASSWORD = "correct horse battery"
REMOTE = {"REMOTE_ADDR": "10.0.0.5"}

# Routes standing in for the other blueprints, to see what the helpers let through.
probe = Blueprint("probe", __name__)


@probe.get("/api/probe/me")
@login_required
def probe_api_me():
    return jsonify(id=current_user.id, email=current_user.email, admin=current_user.is_admin)


@probe.post("/api/probe/echo")
@login_required
def probe_api_echo():
    return jsonify(id=current_user.id, form=request.form.to_dict())


@probe.get("/v1/probe/me")
@api_key_required
def probe_v1_me():
    return jsonify(id=current_user.id, email=current_user.email)


@probe.get("/probe/page")
@login_required
def probe_page():
    return f"page for {current_user.email or current_user.name}"


@probe.get("/probe/admin")
@admin_required
def probe_admin():
    return "admins only"


@pytest.fixture(name="account_app")
def account_app_fixture(make_app, request):
    """``account_app(mode, csrf=False, **settings)``: conftest's app (store per NCS_TEST_DB) plus the probe
    routes. CSRF is off so tests post bare forms; the CSRF tests turn it on, as production has it.
    Hosted apps send their mail to a real SMTP server on loopback (``hosted_mail``).
    (conftest hashes passwords with a cheap pbkdf2; the production scrypt has its own test below.)
    """

    def make(mode: str = "solo", csrf: bool = False, **overrides):
        if mode == "hosted" and "environ" not in overrides:
            overrides["environ"] = request.getfixturevalue("mailbox").env
        app = make_app(mode=mode, **overrides)
        app.config.update(WTF_CSRF_ENABLED=csrf)
        app.register_blueprint(probe)
        return app

    return make


def join(client, mailbox, email, password=PASSWORD, name="", **fields):
    """A hosted sign-up carried through: the form, then the link mailed to the address, then its password."""
    response = register(client, email, password, name, **fields)
    assert response.status_code == 200 and "Check your email" in page_text(response), page_text(response)
    address = email.strip().lower()
    link = mailbox.link(address, count=len(mailbox.to(address)))
    data = {"password": password}
    if "csrf_token" in fields:
        data["csrf_token"] = csrf_token_of(client.get(urlsplit(link).path))
    return client.post(urlsplit(link).path, data=data)


def register(client, email, password=PASSWORD, name="", environ_base=None, **fields):
    data = {"email": email, "password": password, "confirm": password, "name": name, **fields}
    return client.post("/account/register", data=data, environ_base=environ_base or {})


def login(client, email, password=PASSWORD, environ_base=None, **fields):
    data = {"email": email, "password": password, **fields}
    return client.post("/account/login", data=data, environ_base=environ_base or {})


def whoami(client, **kwargs):
    response = client.get("/api/probe/me", **kwargs)
    return response.json["email"] if response.status_code == 200 else None


def page_text(response) -> str:
    return response.get_data(as_text=True)


# ------------------------------------------------------------------------------ local accounts

def test_register_sign_in_and_sign_out_round_trip(account_app, mailbox):
    client = account_app("hosted").test_client()
    response = join(client, mailbox, "alice@example.com", name="Alice")
    assert response.status_code == 302
    assert whoami(client) == "alice@example.com"
    assert accounts.email_verified(User.get(User.email == "alice@example.com"))

    assert client.post("/account/logout").status_code == 302
    assert whoami(client) is None

    response = login(client, "alice@example.com")
    assert response.status_code == 302 and response.headers["Location"] == "/"
    assert whoami(client) == "alice@example.com"
    assert User.get(User.email == "alice@example.com").last_login_at is not None


def test_passwords_are_stored_hashed_with_scrypt(account_app, mailbox, monkeypatch):
    client = account_app("hosted").test_client()
    monkeypatch.setattr(accounts, "PASSWORD_HASH_METHOD", "scrypt")  # the production setting
    join(client, mailbox, "alice@example.com")
    stored = User.get(User.email == "alice@example.com").password_hash
    assert PASSWORD not in stored and stored.startswith("scrypt:")
    client.post("/account/logout")
    login(client, "alice@example.com")
    assert whoami(client) == "alice@example.com"


def test_logout_is_not_a_get(account_app, mailbox):
    client = account_app("hosted").test_client()
    join(client, mailbox, "alice@example.com")
    assert client.get("/account/logout").status_code == 405
    assert whoami(client) == "alice@example.com"


def test_wrong_password_and_unknown_email_get_the_same_refusal(account_app, mailbox):
    client = account_app("hosted").test_client()
    join(client, mailbox, "alice@example.com")
    client.post("/account/logout")

    wrong = login(client, "alice@example.com", "not the password")
    unknown = login(client, "nobody@example.com", PASSWORD)
    for response in (wrong, unknown):
        assert response.status_code == 400
        assert "Wrong email or password." in page_text(response)
    assert whoami(client) is None


def test_email_is_normalised(account_app, mailbox):
    client = account_app("hosted").test_client()
    join(client, mailbox, "  Alice@Example.COM ")
    assert User.get().email == "alice@example.com"
    client.post("/account/logout")
    login(client, "ALICE@example.com")
    assert whoami(client) == "alice@example.com"


@pytest.mark.parametrize(
    "email, password, confirm, message",
    [
        ("alice@example.com", "short", "short", "Use 10 to 256 characters."),
        ("alice@example.com", PASSWORD, PASSWORD + "x", "The passwords differ."),
        ("not-an-email", PASSWORD, PASSWORD, "Enter a valid email address"),
        ("alice@localhost", PASSWORD, PASSWORD, "Enter a valid email address"),
    ],
)
def test_bad_sign_up_forms_show_a_clear_error(account_app, email, password, confirm, message):
    client = account_app("hosted").test_client()
    response = client.post("/account/register", data={"email": email, "password": password, "confirm": confirm})
    assert response.status_code == 400
    assert message in page_text(response)
    assert User.select().count() == 0


def test_a_taken_email_gets_a_note_by_mail_and_the_page_does_not_tell(account_app, mailbox):
    client = account_app("hosted").test_client()
    join(client, mailbox, "alice@example.com")
    client.post("/account/logout")
    response = register(client, "ALICE@example.com", password="another password 1")
    # The same page as for a new address: the form does not say who has an account here.
    assert response.status_code == 200 and "Check your email" in page_text(response)
    note = mailbox.wait("alice@example.com", count=2)
    assert "already has an account" in note.get_content() and "confirm-signup" not in note.get_content()
    assert User.select().count() == 1
    login(client, "alice@example.com", "another password 1")
    assert whoami(client) is None  # the second sign-up changed nothing


def test_a_lab_sign_up_with_a_taken_email_is_refused(account_app):
    client = account_app("lab").test_client()
    accounts.create_user("alice@example.com", PASSWORD)
    response = register(client, "ALICE@example.com")
    assert response.status_code == 400
    assert "An account with this email already exists." in page_text(response)
    assert User.select().count() == 1


# ----------------------------------------------------------------------------------------- modes

@pytest.mark.parametrize("mode", ["lab", "hosted"])
def test_the_first_web_sign_up_does_not_become_admin(account_app, mode, request):
    app = account_app(mode)
    if mode == "hosted":
        join(app.test_client(), request.getfixturevalue("mailbox"), "mallory@example.com")
    else:
        register(app.test_client(), "mallory@example.com")
    mallory = User.get(User.email == "mallory@example.com")
    assert not mallory.is_admin
    assert mallory.is_approved == (mode == "hosted")  # lab: waits for an administrator who does not exist yet
    assert not bootstrap.admin_exists()
    assert AppState.get_or_none(AppState.key == accounts.FIRST_ADMIN_KEY) is None


def test_an_install_first_account_made_by_the_operator_is_admin_and_sign_ups_after_it_are_not(account_app):
    app = account_app("lab")
    carol = accounts.create_user("carol@example.com", PASSWORD)  # the CLI's `users create`
    assert carol.is_admin and carol.is_approved
    # "First" means first: a stranger signing up afterwards gets neither admin nor approval.
    register(app.test_client(), "mallory@example.com")
    mallory = User.get(User.email == "mallory@example.com")
    assert not mallory.is_admin and not mallory.is_approved


def test_only_one_of_simultaneous_first_accounts_made_by_the_operator_becomes_admin(account_app):
    account_app("lab")  # opens the database
    barrier = threading.Barrier(6)
    failures = []

    def sign_up(i):
        barrier.wait()
        try:
            accounts.create_user(f"user{i}@example.com", PASSWORD)  # the CLI's `users create`
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=sign_up, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert User.select().count() == 6
    assert User.select().where(User.is_admin == True).count() == 1  # noqa: E712


def test_lab_sign_ups_wait_for_an_admin(account_app):
    app = account_app("lab")
    alice, bob, charlie = app.test_client(), app.test_client(), app.test_client()
    accounts.create_user("alice@example.com", PASSWORD, is_admin=True)
    login(alice, "alice@example.com")
    assert whoami(alice) == "alice@example.com"

    response = register(bob, "bob@example.com")
    assert response.status_code == 302 and response.headers["Location"] == "/account/login"
    assert whoami(bob) is None
    response = login(bob, "bob@example.com")
    assert response.status_code == 400
    assert "waiting for an administrator" in page_text(response)

    register(charlie, "charlie@example.com")
    assert charlie.get("/account/admin/users").status_code in (302, 401)  # not signed in
    listing = alice.get("/account/admin/users")
    assert "bob@example.com" in page_text(listing) and "waiting for approval" in page_text(listing)

    bob_id = User.get(User.email == "bob@example.com").id
    assert alice.post(f"/account/admin/users/{bob_id}/approve").status_code == 302
    login(bob, "bob@example.com")
    assert whoami(bob) == "bob@example.com"
    assert bob.get("/account/admin/users").status_code == 403
    assert bob.get("/probe/admin").status_code == 403


def test_lab_invitation_skips_approval_once(account_app):
    app = account_app("lab")
    alice = app.test_client()
    accounts.create_user("alice@example.com", PASSWORD, is_admin=True)
    login(alice, "alice@example.com")
    response = alice.post("/account/admin/invites")
    assert response.status_code == 201
    link = re.search(r'value="(http://localhost/account/register\?invite=[^"]+)"', page_text(response)).group(1)
    token = link.partition("invite=")[2]
    assert not AppState.select().where(AppState.value.contains(token)).exists()  # only its hash is kept

    bob = app.test_client()
    assert 'name="invite"' in page_text(bob.get(link))
    register(bob, "bob@example.com", invite=token)
    assert whoami(bob) == "bob@example.com"

    charlie = app.test_client()
    response = register(charlie, "charlie@example.com", invite=token)
    assert response.status_code == 400 and "not valid, or was already used" in page_text(response)
    assert not User.select().where(User.email == "charlie@example.com").exists()


def test_an_admin_can_promote(account_app, mailbox):
    app = account_app("hosted")
    alice, bob = app.test_client(), app.test_client()
    accounts.create_user("alice@example.com", PASSWORD, is_admin=True)
    login(alice, "alice@example.com")
    join(bob, mailbox, "bob@example.com")
    bob_id = User.get(User.email == "bob@example.com").id
    assert bob.post(f"/account/admin/users/{bob_id}/promote").status_code == 403
    alice.post(f"/account/admin/users/{bob_id}/promote")
    assert User.get_by_id(bob_id).is_admin
    assert bob.get("/probe/admin").status_code == 200


def test_solo_mode_makes_the_local_machine_the_owner_without_sign_in(account_app):
    client = account_app("solo").test_client()
    response = client.get("/api/probe/me")
    assert response.status_code == 200 and response.json["admin"] is True
    owner_id = AppState.get_by_id(accounts.SOLO_OWNER_KEY).value
    assert response.json["id"] == owner_id
    assert client.get("/api/probe/me").json["id"] == owner_id  # the same owner, not a new one
    assert accounts.solo_owner().id == owner_id
    assert User.select().count() == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"environ_base": REMOTE},
        {"headers": {"X-Forwarded-For": "203.0.113.9"}},
        {"headers": {"X-Forwarded-For": "127.0.0.1, 203.0.113.9"}},
        {"headers": {"Forwarded": 'for="[2001:db8::7]:4711"'}},
        {"headers": {"X-Real-IP": "192.168.1.20"}},
        {"headers": {"Host": "studio.example.com"}},
    ],
    ids=["remote-addr", "xff", "xff-chain", "forwarded", "x-real-ip", "proxied-host"],
)
def test_solo_mode_asks_anyone_elsewhere_to_sign_in(account_app, kwargs):
    # A proxy on this machine passing the public name (allowed, so the host guard lets it through).
    client = account_app("solo", allowed_hosts="studio.example.com").test_client()
    assert client.get("/api/probe/me", **kwargs).status_code == 401
    response = client.get("/probe/page?tab=2", **kwargs)
    assert response.status_code == 302
    assert response.headers["Location"] == "/account/login?next=/probe/page?tab%3D2"


@pytest.mark.parametrize("headers", [
    {"X-Forwarded-For": "127.0.0.1, ::1"}, {"X-Forwarded-For": "127.0.0.1"}, {"Forwarded": "for=127.0.0.1"},
    {"Via": "1.1 localhost"}, {"X-Forwarded-Proto": "https"}, {"X-Forwarded-Host": "localhost"},
    {"X-Forwarded-Anything": "1"}, {"True-Client-IP": "127.0.0.1"}, {"Origin": "https://studio.example.com"},
    {"Origin": "null"}, {"Referer": "https://studio.example.com/jobs", "Sec-Fetch-Site": "same-origin"},
], ids=lambda h: ",".join(h))
def test_solo_mode_trusts_no_proxy_header_of_any_kind(account_app, headers):
    # Even one naming loopback: a proxy on this machine says that too, for visitors from anywhere.
    client = account_app("solo").test_client()
    assert client.get("/api/probe/me", headers={"Host": "localhost:8765"}).status_code == 200
    assert client.get("/api/probe/me", headers={"Host": "localhost:8765", **headers}).status_code == 401


def test_solo_mode_keeps_the_owner_on_their_own_pages(account_app):
    client = account_app("solo").test_client()
    own_page = {"Host": "localhost:8765", "Origin": "http://localhost:8765",
                "Referer": "http://127.0.0.1:8765/jobs", "Sec-Fetch-Site": "same-origin"}
    assert client.get("/api/probe/me", headers=own_page).status_code == 200
    # A link from another site is not a proxy: its Referer names that site, but the browser says so.
    link = {"Host": "localhost:8765", "Referer": "http://news.example.com/", "Sec-Fetch-Site": "cross-site"}
    assert client.get("/api/probe/me", headers=link).status_code == 200


def test_solo_owner_sets_a_password_to_sign_in_from_elsewhere(account_app, mailbox):
    app = account_app("solo", environ=mailbox.env)
    local, remote = app.test_client(), app.test_client()
    form = {"email": "owner@example.com", "name": "Owner", "new_password": PASSWORD, "confirm": PASSWORD}
    assert local.post("/account/profile", data=form).status_code == 302
    assert accounts.solo_owner().email is None  # the address counts once the link mailed to it is opened
    link = urlsplit(mailbox.link("owner@example.com")).path
    assert local.post(link).status_code == 302
    assert accounts.solo_owner().email == "owner@example.com"

    login(remote, "owner@example.com", environ_base=REMOTE)
    assert remote.get("/api/probe/me", environ_base=REMOTE).json["id"] == accounts.solo_owner().id

    # Changing it later needs the current one.
    change = {"new_password": "another password!", "confirm": "another password!"}
    response = local.post("/account/profile", data=change)
    assert response.status_code == 400 and "The current password is wrong." in page_text(response)


def test_solo_mode_has_no_sign_up(account_app):
    client = account_app("solo").test_client()
    response = register(client, "mallory@example.com", environ_base=REMOTE)
    assert response.status_code == 302
    assert User.select().where(User.email == "mallory@example.com").count() == 0


def test_a_disabled_account_loses_its_session(account_app, mailbox):
    client = account_app("hosted").test_client()
    join(client, mailbox, "alice@example.com")
    User.update(is_active_flag=False).where(User.email == "alice@example.com").execute()
    assert whoami(client) is None


# ------------------------------------------------------------------------------ helpers, redirects

def test_pages_redirect_to_sign_in_and_api_answers_401_json(account_app):
    client = account_app("hosted").test_client()
    response = client.get("/probe/page")
    assert response.status_code == 302 and response.headers["Location"] == "/account/login?next=/probe/page"
    response = client.get("/api/probe/me")
    assert response.status_code == 401 and response.is_json


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example", "/\\evil.example", "\\\\evil.example", "https://evil.example/", "http:/evil.example",
        "javascript:alert(1)", "/\t/evil.example", "/\n/evil.example", "//%2fevil.example", "evil.example",
        "", "/%0d%0aSet-Cookie:x" + "\r\n",
    ],
)
def test_next_refuses_anything_but_a_path_on_this_site(account_app, target):
    assert auth.safe_next(target) is None
    client = account_app("lab").test_client()
    accounts.create_user("alice@example.com", PASSWORD)
    response = login(client, "alice@example.com", next=target)
    assert response.status_code == 302 and response.headers["Location"] == "/"


def test_next_keeps_a_path_on_this_site(account_app):
    assert auth.safe_next("/jobs/3?tab=loss") == "/jobs/3?tab=loss"
    client = account_app("lab").test_client()
    accounts.create_user("alice@example.com", PASSWORD)
    page = client.get("/account/login?next=/jobs/3%3Ftab%3Dloss")
    assert 'value="/jobs/3?tab=loss"' in page_text(page)
    response = login(client, "alice@example.com", next="/jobs/3?tab=loss")
    assert response.headers["Location"] == "/jobs/3?tab=loss"


# ------------------------------------------------------------------------------------------- CSRF

def csrf_token_of(page) -> str:
    return re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page_text(page)).group(1)


def test_sign_in_and_sign_out_forms_need_the_csrf_token(account_app, mailbox):
    app = account_app("hosted", csrf=True)
    client = app.test_client()
    token = csrf_token_of(client.get("/account/register"))
    join(client, mailbox, "alice@example.com", csrf_token=token)
    assert whoami(client) == "alice@example.com"

    assert client.post("/account/logout").status_code == 400
    assert whoami(client) == "alice@example.com"
    token = csrf_token_of(client.get("/account/profile"))
    assert client.post("/account/logout", data={"csrf_token": token}).status_code == 302
    assert whoami(client) is None

    assert login(client, "alice@example.com").status_code == 400
    assert whoami(client) is None
    token = csrf_token_of(client.get("/account/login"))
    assert login(client, "alice@example.com", csrf_token=token).status_code == 302
    assert whoami(client) == "alice@example.com"


def test_a_session_cookie_is_read_under_the_current_secret_key_or_a_fallback_only(account_app):
    """The app keeps its cookie signer between requests; a changed key or fallback list still applies."""
    from conftest import client_as

    app = account_app("lab")
    client = client_as(app, auth.create_user("alice@example.com", password=PASSWORD, name="Alice"))
    assert whoami(client) == "alice@example.com"
    signed_with = app.secret_key
    app.secret_key = "another key, long enough for the test"
    assert whoami(client) is None  # signed with the old key: no session
    app.config["SECRET_KEY_FALLBACKS"] = [signed_with]
    assert whoami(client) == "alice@example.com"
    app.config["SECRET_KEY_FALLBACKS"] = []
    assert whoami(client) is None
