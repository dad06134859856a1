"""Sessions can be ended (issue 10, point 5): every session carries the account's session version, so
logout, a password change, "sign out everywhere" and an administrator disabling the account end them
all, including a cookie copied before. Probed through the real ``serve``.
"""

from __future__ import annotations

import time

import pytest
import requests

from harness import PASSWORD, Studio, open_store, persona
from nanochat_studio import auth
from nanochat_studio.models import User


@pytest.fixture(scope="module")
def lab(tmp_path_factory, store_url):
    studio = Studio(tmp_path_factory.mktemp("sessions") / "home", store_url, mode="lab")
    yield studio
    studio.stop()
    studio.assert_no_tracebacks()


@pytest.fixture
def store(store_url):
    open_store(store_url)


def copy_of(s: requests.Session) -> requests.Session:
    """Another client holding the same cookie (stolen, or simply a second tab's copy)."""
    other = requests.Session()
    other.cookies.update(s.cookies)
    return other


def signed_in(studio: Studio, s: requests.Session) -> bool:
    return s.get(studio.url + "/api/jobs", timeout=30).status_code == 200


def test_a_cookie_copied_before_logout_stops_working(lab, store):
    persona("alice")
    alice = lab.session("alice@example.com")
    stolen = copy_of(alice)
    assert signed_in(lab, stolen)
    assert lab.form(alice, "/account/logout", {}, page="/account/profile").status_code == 302
    assert not signed_in(lab, alice)
    assert not signed_in(lab, stolen)


def test_a_password_change_ends_every_other_session(lab, store):
    persona("bob")
    laptop, phone = lab.session("bob@example.com"), lab.session("bob@example.com")
    new = "a brand new password 7"
    r = lab.form(laptop, "/account/profile", {"email": "bob@example.com", "name": "Bob", "current_password": PASSWORD,
                                              "new_password": new, "confirm": new})
    assert r.status_code == 302
    assert signed_in(lab, laptop)  # the session that changed it goes on
    assert not signed_in(lab, phone)
    assert "Your nanochat studio password was changed" in lab.output  # the notice (logged: no SMTP here)
    lab.session("bob@example.com", password=new)  # and the new password works


def test_sign_out_everywhere_ends_every_session(lab, store):
    persona("carol")
    one, two = lab.session("carol@example.com"), lab.session("carol@example.com")
    assert lab.form(one, "/account/sessions/end", {}, page="/account/profile").status_code == 302
    assert not signed_in(lab, one) and not signed_in(lab, two)
    assert signed_in(lab, lab.session("carol@example.com"))  # signing in again works


def test_an_admin_disabling_a_user_ends_their_sessions_and_keys(lab, store):
    persona("root", admin=True)
    dave = persona("dave")
    browser = lab.session("dave@example.com")
    _, key = auth.create_api_key(dave, "script")
    script = {"Authorization": f"Bearer {key}"}
    assert requests.get(lab.url + "/api/jobs", headers=script, timeout=30).status_code == 200

    admin = lab.session("root@example.com")
    r = lab.form(admin, f"/account/admin/users/{dave.id}/disable", {}, page="/account/admin/users")
    assert r.status_code == 302
    assert not signed_in(lab, browser)
    assert requests.get(lab.url + "/api/jobs", headers=script, timeout=30).status_code == 401
    refused = lab.session()
    r = lab.form(refused, "/account/login", {"email": "dave@example.com", "password": PASSWORD})
    assert r.status_code == 400 and "disabled" in r.text

    lab.form(admin, f"/account/admin/users/{dave.id}/enable", {}, page="/account/admin/users")
    assert not signed_in(lab, browser)  # enabling again does not revive old sessions
    assert signed_in(lab, lab.session("dave@example.com"))


def test_a_member_cannot_disable_anyone(lab, store):
    persona("erin")
    target = persona("frank")
    erin = lab.session("erin@example.com")
    r = lab.form(erin, f"/account/admin/users/{target.id}/disable", {}, page="/account/profile")
    assert r.status_code == 403
    assert User.get_by_id(target.id).is_active


def test_a_sign_in_expires_after_session_max_age_hours(make_app):
    app = make_app(mode="lab", session_max_age_hours=12)
    app.config.update(WTF_CSRF_ENABLED=False)
    persona("alice")
    client = app.test_client()
    assert client.post("/account/login", data={"email": "alice@example.com", "password": PASSWORD}).status_code == 302
    assert client.get("/api/jobs").status_code == 200
    with client.session_transaction() as session:
        session[auth.SESSION_STARTED_KEY] = time.time() - 12 * 3600 - 60
    assert client.get("/api/jobs").status_code == 401


def test_over_https_the_session_cookie_is_host_only_secure_and_http_only(make_app):
    app = make_app(mode="lab", base_url="https://studio.example.org")
    app.config.update(WTF_CSRF_ENABLED=False)
    persona("alice")
    client = app.test_client()
    r = client.post("/account/login", base_url="https://studio.example.org",
                    data={"email": "alice@example.com", "password": PASSWORD})
    assert r.status_code == 302
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("__Host-ncs_session=") and "Domain=" not in cookie
    assert all(flag in cookie for flag in ("Secure", "HttpOnly", "Path=/", "SameSite=Lax"))
    assert r.headers["Strict-Transport-Security"].startswith("max-age=")
