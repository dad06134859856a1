"""The web frame: security headers, cookies, CSRF on forms, the JSON APIs' cross-site rules, the Host
guard, error pages in HTML or JSON, /healthz and the dashboard. CSRF is on, as in production."""

from __future__ import annotations

import re

import pytest
from conftest import REMOTE, client_as
from flask import Blueprint, jsonify

from nanochat_studio import db, errors
from nanochat_studio.models import TrainingJob

probe = Blueprint("probe", __name__)
RAISES = {"bad": errors.BadRequest, "unauth": errors.Unauthorized, "pay": errors.PaymentRequired,
          "forbidden": errors.Forbidden, "missing": errors.NotFound, "conflict": errors.Conflict,
          "big": errors.TooLarge, "slow": errors.TooManyRequests}


@probe.post("/api/probe/echo")
@probe.post("/v1/probe/echo")
def echo():
    return jsonify(ok=True)


@probe.get("/api/probe/raise/<kind>")
@probe.get("/v1/probe/raise/<kind>")
@probe.get("/probe/raise/<kind>")
def raise_(kind):
    if kind == "crash":
        raise RuntimeError("secret internals")
    raise RAISES[kind](f"{kind} happened", param="prompt" if kind == "bad" else None)


@pytest.fixture
def app(make_app):
    app = make_app()
    app.register_blueprint(probe)
    return app


def csrf_token_of(client, path="/"):
    html = client.get(path).get_data(as_text=True)
    return re.search(r'<meta name="csrf-token" content="([^"]+)"', html).group(1)


# ------------------------------------------------------------------------------------- headers, cookies

@pytest.mark.parametrize("path", ["/", "/healthz", "/nowhere", "/api/nowhere", "/static/css/app.css"])
def test_every_response_carries_the_security_headers(client, path):
    h = client.get(path).headers
    csp = h["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert h["X-Frame-Options"] == "DENY"
    assert h["X-Content-Type-Options"] == "nosniff"
    assert h["Referrer-Policy"] == "same-origin"


def test_the_session_cookie_is_httponly_and_samesite_lax(client):
    cookie = client.get("/").headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie


def test_the_session_cookie_is_secure_behind_https(make_app):
    app = make_app(base_url="https://studio.example.org")
    cookie = app.test_client().get("/", headers={"Host": "studio.example.org"}).headers["Set-Cookie"]
    assert "Secure" in cookie


def test_pages_have_no_inline_script_and_carry_the_csrf_meta(client):
    html = client.get("/").get_data(as_text=True)
    assert re.search(r'<meta name="csrf-token" content="[^"]+">', html)
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all('src="' in attrs and not body.strip() for attrs, body in scripts)
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers either


def test_static_files_are_served(client):
    assert client.get("/static/css/app.css").status_code == 200
    assert client.get("/static/js/util.js").status_code == 200


# ------------------------------------------------------------------------------------------------ CSRF

def test_a_form_post_without_the_token_is_rejected(client):
    response = client.post("/account/login", data={"email": "a@example.com", "password": "x" * 12})
    assert response.status_code == 400
    assert "text/html" in response.content_type and "expired" in response.get_data(as_text=True)


def test_a_form_post_with_the_token_goes_through(client):
    client.environ_base.update(REMOTE)  # a visitor from elsewhere, who sees the sign-in form
    token = csrf_token_of(client, "/account/login")
    response = client.post("/account/login", data={"csrf_token": token, "email": "a@example.com",
                                                   "password": "wrong password"})
    text = response.get_data(as_text=True)
    assert "Wrong email or password" in text and "expired" not in text  # the view ran: the token was good


@pytest.mark.parametrize("prefix", ["/api", "/v1"])
def test_api_writes_sent_as_forms_are_refused(client, prefix):
    for kwargs in ({"data": {"a": "1"}}, {"data": "a=1", "content_type": "text/plain"}):
        response = client.post(f"{prefix}/probe/echo", **kwargs)
        assert response.status_code == 403, kwargs
        body = response.json["error"]
        assert body["code"] == "csrf_failed"


@pytest.mark.parametrize("prefix", ["/api", "/v1"])
def test_api_writes_with_json_or_a_bearer_key_pass(client, prefix):
    assert client.post(f"{prefix}/probe/echo", json={"a": 1}).status_code == 200
    response = client.post(f"{prefix}/probe/echo", data={"a": "1"}, headers={"Authorization": "Bearer ncs_x"})
    assert response.status_code == 200  # the guard lets it by; the view decides what the key is worth


def test_multipart_uploads_from_our_pages_pass_with_the_csrf_header(client):
    token = csrf_token_of(client)
    ok = client.post("/api/probe/echo", data={"f": "x"}, headers={"X-CSRFToken": token})
    assert ok.status_code == 200
    forged = client.post("/api/probe/echo", data={"f": "x"}, headers={"X-CSRFToken": "forged"})
    assert forged.status_code == 403


def test_a_request_from_another_site_is_refused_even_as_json(client):
    response = client.post("/api/probe/echo", json={}, headers={"Origin": "https://evil.example"})
    assert response.status_code == 403 and response.json["error"]["code"] == "cross_origin"
    assert client.post("/api/probe/echo", json={}, headers={"Origin": "null"}).status_code == 403
    same = client.post("/api/probe/echo", json={}, headers={"Origin": "http://localhost"})
    assert same.status_code == 200


def test_reads_need_no_token(client):
    assert client.get("/api/nowhere").status_code == 404


# ---------------------------------------------------------------------------------------- Host guard

@pytest.mark.parametrize("host, status", [
    ("localhost", 200), ("localhost:8765", 200), ("127.0.0.1:5000", 200), ("[::1]:8765", 200),
    ("192.168.1.20:8765", 200),  # an IP literal cannot be a rebound name
    ("evil.example", 400), ("localhost.evil.example:8765", 400),
])
def test_the_host_header_must_name_this_app(client, host, status):
    response = client.get("/healthz", headers={"Host": host})
    assert response.status_code == status
    if status == 400:
        assert response.json is None and "Unknown host" in response.get_data(as_text=True)


def test_allowed_hosts_and_base_url_add_names(make_app):
    app = make_app(allowed_hosts="studio.lan, box.local", base_url="https://studio.example.org")
    client = app.test_client()
    for host in ("studio.lan", "box.local:8765", "studio.example.org"):
        assert client.get("/healthz", headers={"Host": host}).status_code == 200, host
    assert client.get("/healthz", headers={"Host": "other.example"}).status_code == 400
    assert make_app(allowed_hosts="*").test_client().get("/healthz", headers={"Host": "x.y"}).status_code == 200


# -------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kind, status", [("bad", 400), ("unauth", 401), ("pay", 402), ("forbidden", 403),
                                          ("missing", 404), ("conflict", 409), ("big", 413), ("slow", 429)])
def test_errors_answer_in_the_callers_language(client, kind, status):
    page = client.get(f"/probe/raise/{kind}")
    assert page.status_code == status and "text/html" in page.content_type
    assert f"{kind} happened" in page.get_data(as_text=True)
    api = client.get(f"/api/probe/raise/{kind}")
    assert api.status_code == status
    named = {"param": "prompt"} if kind == "bad" else {}  # the field at fault, when the error names one
    assert api.json == {"error": {"code": RAISES[kind].code, "message": f"{kind} happened", **named}}
    v1 = client.get(f"/v1/probe/raise/{kind}")
    assert v1.status_code == status
    assert v1.json == {"error": {"message": f"{kind} happened", "type": RAISES[kind].openai_type,
                                 "param": "prompt" if kind == "bad" else None, "code": RAISES[kind].code}}


def test_error_classes_carry_their_status():
    assert [c.status for c in RAISES.values()] == [400, 401, 402, 403, 404, 409, 413, 429]
    assert all(issubclass(c, errors.AppError) for c in RAISES.values())


def test_unknown_api_routes_and_methods_answer_json(client):
    missing = client.get("/api/no/such/thing")
    assert missing.status_code == 404 and missing.json["error"]["code"] == "not_found"
    wrong = client.get("/api/probe/echo")
    assert wrong.status_code == 405 and wrong.json["error"]["code"] == "method_not_allowed"
    assert "POST" in wrong.headers["Allow"]
    page = client.get("/no/such/page")
    assert page.status_code == 404 and "text/html" in page.content_type


def test_an_unexpected_error_is_a_500_without_internals(app):
    app.config.update(TESTING=False)
    client = app.test_client()
    page = client.get("/probe/raise/crash")
    assert page.status_code == 500 and "secret internals" not in page.get_data(as_text=True)
    api = client.get("/api/probe/raise/crash")
    assert api.status_code == 500 and api.json["error"]["code"] == "internal_error"


# ------------------------------------------------------------------------------ health, db, dashboard

def test_healthz_reports_the_database(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json == {"status": "ok", "db": "ok"}


def test_sqlite_connections_serve_their_threads_next_request_and_postgres_ones_go_back(client):
    client.get("/")
    if db.is_postgres():  # a server's connection: given back after every request
        assert db.database.is_closed()
        return
    assert not db.database.is_closed()  # this thread's, left open by the request
    conn = db.database.connection()
    client.get("/")
    assert db.database.connection() is conn  # reused, not opened again (a connect and four pragmas)


def test_the_dashboard_has_the_frame(client):
    html = client.get("/").get_data(as_text=True)
    for label in ("Dashboard", "Train", "Models"):
        assert f">{label}</a>" in html
    assert 'aria-current="page"' in html


def test_the_dashboard_shows_your_jobs_and_nobody_elses(app, alice, charlie):
    TrainingJob.create(user=alice, name="alice-tiny-stories")
    alice_page = client_as(app, alice).get("/").get_data(as_text=True)
    charlie_page = client_as(app, charlie).get("/").get_data(as_text=True)
    assert "alice-tiny-stories" in alice_page and "Alice" in alice_page
    assert "alice-tiny-stories" not in charlie_page


def test_flash_messages_are_shown_once(app, alice):
    client = client_as(app, alice)
    with client.session_transaction() as session:
        session["_flashes"] = [("success", "Saved <b>it</b>")]
    html = client.get("/").get_data(as_text=True)
    assert "Saved &lt;b&gt;it&lt;/b&gt;" in html  # escaped, never markup
    assert "Saved" not in client.get("/").get_data(as_text=True)


def test_a_stranger_in_lab_mode_is_offered_sign_in(make_app):
    app = make_app(mode="lab")
    html = app.test_client().get("/", environ_base=REMOTE).get_data(as_text=True)
    assert "Sign in" in html and "Recent training" not in html
