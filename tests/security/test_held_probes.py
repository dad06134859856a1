"""The probes that held when issue 10 was filed, kept so a regression fails CI: the IDOR matrix over every
route that takes an id, CSRF, open redirects, SSRF payloads and XSS, against the real ``serve`` (lab).

Personas: alice owns one of everything; bob is a peer in the same lab and charlie a stranger: neither
may see, change or learn the existence of anything of alice's (another user's id answers exactly like a
missing one: 404). The matrix lists every id route of the app; a new one fails
``test_the_matrix_covers_every_route_that_takes_an_id`` until it is added here.
"""

from __future__ import annotations

import socket
import tempfile
import threading
from typing import Any

import pytest
import requests

from harness import PASSWORD, Studio, open_store, persona
from nanochat_studio import auth
from nanochat_studio.models import ApiKey, ChatSession, Dataset, Model, TrainingJob, User

XSS = "<script>alert(1)</script>\"'><img src=x onerror=alert(2)>"


@pytest.fixture(scope="module")
def lab(tmp_path_factory, store_url):
    studio = Studio(tmp_path_factory.mktemp("held") / "home", store_url, mode="lab",
                    env={"NCS_API_RATE_LIMIT": "100000 per minute", "NCS_API_KEY_RATE_LIMIT": "100000 per minute",
                         "NCS_LOGIN_LIMIT_PER_ADDRESS": "1000 per minute"})
    yield studio
    studio.stop()
    studio.assert_no_tracebacks()


@pytest.fixture(scope="module")
def world(lab, store_url) -> dict[str, Any]:
    """alice's things, and bob's and charlie's keys and signed-in browsers."""
    open_store(store_url)
    people = {name: persona(name) for name in ("alice", "bob", "charlie")}
    alice = people["alice"]
    job = TrainingJob.create(user=alice, name=XSS, config={"depth": 1, "dataset": {"kind": "demo", "source": "demo"}})
    model = Model.create(user=alice, job=job, name=XSS, checkpoint_key="users/1/models/1", tokenizer_key="t",
                         config={"depth": 1}, samples=[{"prompt": XSS, "text": XSS}])
    session = ChatSession.create(user=alice, model=model, title=XSS)
    dataset = Dataset.create(user=alice, name="corpus.txt", storage_key="users/x/corpus.txt", size_bytes=3,
                             sha256="a" * 64)
    key_row, _ = auth.create_api_key(alice, XSS)
    keys = {name: {"Authorization": f"Bearer {auth.create_api_key(user, 'probe')[1]}"} for name, user in people.items()}
    browsers = {name: lab.session(f"{name}@example.com") for name in people}
    return {"people": people, "job": job, "model": model, "session": session, "dataset": dataset,
            "key": key_row, "keys": keys, "browsers": browsers}


# --- IDOR ---------------------------------------------------------------------------------------------------

def _unchanged(world: dict) -> None:
    job = TrainingJob.get_by_id(world["job"].id)
    assert job.status == "queued" and not job.cancel_requested
    assert ChatSession.get_by_id(world["session"].id).title == XSS
    assert Dataset.get_or_none(Dataset.id == world["dataset"].id) is not None
    assert ApiKey.get_by_id(world["key"].id).revoked_at is None
    alice = User.get_by_id(world["people"]["alice"].id)
    assert alice.is_approved and not alice.is_admin and alice.is_active
    assert Model.select().where(Model.user == alice.id).count() == 1  # no snapshot made for anyone
    assert TrainingJob.select().where(TrainingJob.config.contains('"init_from_model"')).count() == 0


# endpoint -> (method, id of whose thing, how the request is sent, statuses that mean "refused")
MATRIX: dict[str, tuple[str, str, str, tuple[int, ...]]] = {
    "api.get_job": ("GET", "job", "key", (404,)),
    "api.cancel_job": ("POST", "job", "key", (404,)),
    "api.job_log": ("GET", "job", "key", (404,)),
    "api.job_events": ("GET", "job", "key", (404,)),
    "api.get_model": ("GET", "model", "key", (404,)),
    "api.download_model": ("GET", "model", "key", (404,)),
    "api.delete_dataset": ("DELETE", "dataset", "key", (404,)),
    "chat.get_session": ("GET", "session", "key", (404,)),
    "chat.rename_session": ("PATCH", "session", "key", (404,)),
    "chat.delete_session": ("DELETE", "session", "key", (404,)),
    "chat.snapshot": ("POST", "job", "key", (404,)),
    "chat.snapshot_and_chat": ("POST", "job", "form", (404,)),
    "chat.page": ("GET", "model", "browser", (404,)),
    "jobs.show": ("GET", "job", "browser", (404,)),
    "jobs.model_page": ("GET", "model", "browser", (404,)),
    "jobs.chat_tune": ("POST", "model", "form", (404,)),  # chat-tuning starts from one's own model only
    # Keys are revoked among one's own only: the answer is the profile again, alice's key untouched.
    "account.revoke_key": ("POST", "key", "form", (302,)),
    "account.approve_user": ("POST", "alice", "form", (403,)),
    "account.promote_user": ("POST", "alice", "form", (403,)),
    "account.disable_user": ("POST", "alice", "form", (403,)),
    "account.enable_user": ("POST", "alice", "form", (403,)),
    # Billing: resuming a paused job is the owner's; the credit pages and GPU quarantine are admins'.
    "billing.api_resume": ("POST", "job", "key", (404,)),
    "billing.resume_form": ("POST", "job", "form", (404,)),
    "billing_admin.user_ledger": ("GET", "alice", "browser", (403,)),
    "billing_admin.grant": ("POST", "alice", "form", (403,)),
    "billing_admin.revoke": ("POST", "alice", "form", (403,)),
    "billing_admin.allowance": ("POST", "alice", "form", (403,)),
    "billing_admin.refund_job": ("POST", "job", "form", (403,)),
    "workers.clear_gpu": ("POST", "alice", "form", (403,)),
}


def _app_id_routes() -> dict[str, tuple[str, str]]:
    from nanochat_studio.app import create_app
    from nanochat_studio.settings import load_settings

    app = create_app(load_settings(environ={"NCS_HOME": tempfile.mkdtemp(prefix="ncs-routes-")}))
    return {rule.endpoint: (rule.rule, sorted(rule.methods - {"HEAD", "OPTIONS"})[0])
            for rule in app.url_map.iter_rules() if "<int:" in rule.rule}


ROUTES = _app_id_routes()


def test_the_matrix_covers_every_route_that_takes_an_id():
    assert set(ROUTES) == set(MATRIX), f"add these routes to MATRIX: {sorted(set(ROUTES) - set(MATRIX))}"


def _ident(world: dict, whose: str) -> int:
    return world["people"]["alice"].id if whose == "alice" else world[whose].id


@pytest.mark.parametrize("intruder", ["bob", "charlie"])
@pytest.mark.parametrize("endpoint", sorted(MATRIX))
def test_nobody_reaches_alices_things_by_id(lab, world, intruder, endpoint):
    method, whose, how, refused = MATRIX[endpoint]
    rule = ROUTES[endpoint][0]
    path = rule.replace(rule[rule.index("<"):rule.index(">") + 1], str(_ident(world, whose)))
    if how == "key":
        r = requests.request(method, lab.url + path, headers=world["keys"][intruder], json={}, timeout=30)
    elif how == "browser":
        r = world["browsers"][intruder].get(lab.url + path, allow_redirects=False, timeout=30)
    else:
        r = lab.form(world["browsers"][intruder], path, {}, page="/account/profile")
    assert r.status_code in refused, (endpoint, intruder, r.status_code, r.text[:300])
    assert XSS not in r.text and "corpus.txt" not in r.text
    _unchanged(world)


@pytest.mark.parametrize("intruder", ["bob", "charlie"])
def test_nobody_reaches_alices_things_through_bodies_and_queries(lab, world, intruder):
    key, browser = world["keys"][intruder], world["browsers"][intruder]
    model, session, job, dataset = world["model"], world["session"], world["job"], world["dataset"]
    own_model = Model.create(user=world["people"][intruder], name="mine", checkpoint_key="x", tokenizer_key="x")
    probes: list[tuple[str, str, Any]] = [
        ("POST", "/api/chat", {"model_id": model.id, "messages": [{"role": "user", "content": "hi"}]}),
        ("POST", "/api/chat", {"model_id": own_model.id, "session_id": session.id,
                               "messages": [{"role": "user", "content": "hi"}]}),
        ("POST", "/api/chat/sessions", {"model_id": model.id}),
        ("GET", f"/api/chat/sessions?model_id={model.id}", None),
        ("POST", "/api/jobs", {"depth": 1, "dataset": f"ds:{dataset.id}"}),
        ("GET", f"/api/estimate?depth=1&dataset=ds:{dataset.id}", None),
        ("GET", f"/v1/models/{model.id}", None),
        ("POST", "/v1/chat/completions", {"model": str(model.id), "messages": [{"role": "user", "content": "x"}]}),
        ("POST", "/v1/completions", {"model": str(model.id), "prompt": "x"}),
    ]
    for method, path, body in probes:
        r = requests.request(method, lab.url + path, headers=key, json=body, timeout=30)
        assert r.status_code == 404, (method, path, r.status_code, r.text[:300])
    for path in (f"/chat/{own_model.id}?session={session.id}", f"/chat/compare?a={model.id}"):
        assert browser.get(lab.url + path, timeout=30).status_code == 404, path
    listed = requests.get(lab.url + "/api/jobs", headers=key, timeout=30).json()["jobs"]
    assert job.id not in [j["id"] for j in listed]
    assert model.id not in [m["id"] for m in requests.get(lab.url + "/api/models", headers=key, timeout=30).json()["models"]]
    assert str(model.id) not in [m["id"] for m in requests.get(lab.url + "/v1/models", headers=key, timeout=30).json()["data"]]
    own_model.delete_instance()
    _unchanged(world)


# --- CSRF ---------------------------------------------------------------------------------------------------

def test_forms_need_their_token_and_scripts_a_key_or_json(lab, world):
    alice = world["browsers"]["alice"]
    before = User.get_by_id(world["people"]["alice"].id).name
    # A cross-site form: the cookie rides along, the token cannot.
    for path, data in (("/account/profile", {"name": "pwned"}), ("/account/keys", {"key-name": "pwned"}),
                       ("/account/logout", {}), ("/account/sessions/end", {}), ("/train", {"depth": "1"}),
                       (f"/chat/snapshot/{world['job'].id}", {})):
        r = alice.post(lab.url + path, data=data, headers={"Origin": "https://evil.example"}, allow_redirects=False,
                       timeout=30)
        assert r.status_code == 400, (path, r.status_code)
    assert User.get_by_id(world["people"]["alice"].id).name == before
    assert alice.get(lab.url + "/api/jobs", timeout=30).status_code == 200  # still signed in: logout was refused
    # The JSON API: a form-encoded or text/plain body (what a cross-site form can send) is refused...
    for headers, data in (({}, {"depth": "1", "dataset": "demo"}), ({"Content-Type": "text/plain"}, '{"depth": 1}')):
        r = alice.post(lab.url + "/api/jobs", headers=headers, data=data, timeout=30)
        assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed"
    # ...and so is any request whose Origin is another site, JSON or not.
    r = alice.post(lab.url + "/api/jobs", json={"depth": 1, "dataset": "demo"},
                   headers={"Origin": "https://evil.example"}, timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin"
    assert TrainingJob.select().where(TrainingJob.user == world["people"]["alice"].id).count() == 1
    # Signing in needs the form's token too (login CSRF).
    fresh = requests.Session()
    r = fresh.post(lab.url + "/account/login", data={"email": "bob@example.com", "password": PASSWORD},
                   allow_redirects=False, timeout=30)
    assert r.status_code == 400 and fresh.get(lab.url + "/api/jobs", timeout=30).status_code == 401


# --- open redirects -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["//evil.example", "/\\evil.example", "https://evil.example/", "http:/evil.example",
                                    "javascript:alert(1)", "/\t/evil.example", "//%2fevil.example", "evil.example",
                                    "/\r\nSet-Cookie: x=1", "\\\\evil.example"])
def test_next_never_leaves_the_site(lab, world, target):
    s = requests.Session()
    r = lab.form(s, "/account/login", {"email": "charlie@example.com", "password": PASSWORD, "next": target})
    assert r.status_code == 302 and r.headers["Location"] == "/", (target, r.headers["Location"])
    assert "x" not in s.cookies
    page = requests.get(lab.url + "/jobs", allow_redirects=False, timeout=30)
    assert page.headers["Location"].startswith("/account/login")


# --- SSRF ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def canary():
    """A listener on loopback that records every connection: no probe may reach it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    hits: list[Any] = []

    def accept() -> None:
        while True:
            try:
                conn, addr = sock.accept()
            except OSError:
                return
            hits.append(addr)
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    yield sock.getsockname()[1], hits
    sock.close()


def ssrf_payloads(port: int) -> list[Any]:
    return [f"https://127.0.0.1:{port}/x.txt", f"http://127.0.0.1:{port}/x.txt", f"https://localhost:{port}/x.txt",
            f"https://[::1]:{port}/x.txt", f"https://2130706433:{port}/x.txt", f"https://0x7f.0.0.1:{port}/x.txt",
            f"https://[::ffff:127.0.0.1]:{port}/x.txt", "https://169.254.169.254/latest/meta-data/",
            "https://[fd00::1]/x.txt", "https://10.0.0.1/x.txt", "https://192.168.1.1/x.txt", "https://0.0.0.0/",
            f"https://user:pass@127.0.0.1:{port}/x", "file:///etc/passwd", "gopher://127.0.0.1:70/_x",
            "ftp://127.0.0.1/x", "dict://127.0.0.1:11211/",
            {"source": "s3://bucket/data", "credentials": {"key": "a", "secret": "b",
                                                          "endpoint_url": f"http://127.0.0.1:{port}"}},
            {"source": "s3://bucket/data", "credentials": {"key": "a", "secret": "b",
                                                          "endpoint_url": "http://169.254.169.254"}}]


def test_dataset_urls_never_reach_private_addresses(lab, world, canary):
    port, hits = canary
    key = world["keys"]["charlie"]
    for payload in ssrf_payloads(port):
        r = requests.post(lab.url + "/api/jobs", json={"depth": 1, "dataset": payload}, headers=key, timeout=30)
        assert r.status_code == 400, (payload, r.status_code, r.text[:300])
    assert hits == []


# --- XSS ----------------------------------------------------------------------------------------------------

def test_names_and_model_text_are_inert_in_every_page(lab, world):
    alice = world["browsers"]["alice"]
    persona("root", admin=True)
    admin = lab.session("root@example.com")
    User.update(name=XSS).where(User.id == world["people"]["charlie"].id).execute()
    pages: list[tuple[requests.Session, str]] = [
        (alice, "/"), (alice, "/jobs"), (alice, f"/jobs/{world['job'].id}"), (alice, "/models"),
        (alice, f"/models/{world['model'].id}"), (alice, "/chat"), (alice, f"/chat/{world['model'].id}"),
        (alice, f"/chat/{world['model'].id}?session={world['session'].id}"),
        (alice, f"/chat/compare?a={world['model'].id}"), (alice, "/account/profile"), (admin, "/account/admin/users"),
    ]
    for s, path in pages:
        r = s.get(lab.url + path, timeout=30)
        assert r.status_code == 200, path
        assert "<script>alert" not in r.text and "<img src=x" not in r.text, path
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "object-src 'none'" in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["X-Frame-Options"] == "DENY"
    job_page = alice.get(f"{lab.url}/jobs/{world['job'].id}", timeout=30).text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in job_page  # shown, as text
    # JSON answers are JSON (never sniffed as HTML) and carry the text as data.
    r = requests.get(f"{lab.url}/api/models/{world['model'].id}", headers=world["keys"]["alice"], timeout=30)
    assert r.headers["Content-Type"].startswith("application/json") and r.json()["name"] == XSS
