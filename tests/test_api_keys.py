"""API keys: shown once, stored as a hash, sent as a bearer key, revoked for good."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from pathlib import Path

import peewee as pw

from nanochat_studio import accounts, auth, estimate
from nanochat_studio.db import database
from nanochat_studio.models import ALL_MODELS, ApiKey, User
from test_auth import PASSWORD, REMOTE, csrf_token_of, join, login
from test_auth import account_app_fixture  # noqa: F401 - the account_app fixture

KEY_RE = re.compile(r'value="(ncs_[A-Za-z0-9_-]{20,})"')


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def new_key_from_profile(client, name="laptop") -> str:
    response = client.post("/account/keys", data={"key-name": name})
    assert response.status_code == 201
    assert response.headers["Cache-Control"] == "no-store"
    return KEY_RE.search(response.get_data(as_text=True)).group(1)


def signed_up(app, email):
    """A member's account (as a sign-up makes it) and a client signed in to it."""
    client = app.test_client()
    accounts.create_user(email, PASSWORD, first_becomes_admin=False)
    login(client, email)
    return client, User.get(User.email == email)


def test_a_new_key_is_shown_once_and_only_its_hash_is_stored(account_app):
    app = account_app("hosted")
    alice, _ = signed_up(app, "alice@example.com")
    key = new_key_from_profile(alice)

    row = ApiKey.get()
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert row.prefix == key[:12] and row.name == "laptop"
    profile = alice.get("/account/profile").get_data(as_text=True)
    assert row.prefix in profile and key not in profile

    # Not in any row of any table...
    for model in ALL_MODELS:
        for stored in model.select().dicts():
            assert key not in repr(stored), model.__name__
    # ...nor anywhere in SQLite's files, the write-ahead log included.
    if isinstance(database.obj, pw.SqliteDatabase):
        path = Path(database.obj.database)
        files = [f for f in path.parent.glob(path.name + "*") if f.is_file()]
        assert path in files
        for file in files:
            assert key.encode() not in file.read_bytes(), file


def test_a_key_is_never_put_in_the_session_cookie(account_app):
    app = account_app("hosted")
    alice, _ = signed_up(app, "alice@example.com")
    response = alice.post("/account/keys", data={"key-name": ""})
    key = KEY_RE.search(response.get_data(as_text=True)).group(1)
    assert all(key not in header for header in response.headers.getlist("Set-Cookie"))


def test_a_bearer_key_authenticates_api_and_v1_from_anywhere(account_app):
    app = account_app("hosted")
    alice, user = signed_up(app, "alice@example.com")
    key = new_key_from_profile(alice)

    script = app.test_client()  # no cookies, another machine
    response = script.get("/api/probe/me", headers=bearer(key), environ_base=REMOTE)
    assert response.status_code == 200 and response.json["id"] == user.id
    assert script.get("/v1/probe/me", headers=bearer(key), environ_base=REMOTE).json["email"] == "alice@example.com"
    assert "Set-Cookie" not in response.headers  # a key opens no session


def test_v1_needs_a_key_even_for_the_solo_owner_at_the_machine(account_app):
    app = account_app("solo")
    client = app.test_client()
    assert client.get("/api/probe/me").status_code == 200  # the owner, by being local
    response = client.get("/v1/probe/me")
    assert response.status_code == 401 and response.is_json

    key = new_key_from_profile(client)
    response = client.get("/v1/probe/me", headers=bearer(key))
    assert response.status_code == 200 and response.json["id"] == auth.solo_owner().id


def test_revoked_and_unknown_keys_are_refused(account_app):
    app = account_app("hosted")
    alice, _ = signed_up(app, "alice@example.com")
    key = new_key_from_profile(alice)
    script = app.test_client()
    assert script.get("/v1/probe/me", headers=bearer(key)).status_code == 200

    key_id = ApiKey.get().id
    assert alice.post(f"/account/keys/{key_id}/revoke").status_code == 302
    assert ApiKey.get_by_id(key_id).revoked_at is not None
    assert script.get("/v1/probe/me", headers=bearer(key)).status_code == 401
    assert script.get("/api/probe/me", headers=bearer(key)).status_code == 401
    assert script.get("/v1/probe/me", headers=bearer(key[:-1] + "x")).status_code == 401
    assert script.get("/v1/probe/me", headers=bearer("not-a-key")).status_code == 401
    assert "revoked" in alice.get("/account/profile").get_data(as_text=True)


def test_the_cli_revokes_by_prefix_or_id_and_reports_misses(account_app):
    account_app("hosted")
    owner = auth.create_user("alice@example.com", "correct horse battery")
    first, first_secret = auth.create_api_key(owner, "ci")
    second, second_secret = auth.create_api_key(owner)
    assert first_secret.startswith("ncs_") and first_secret != second_secret

    assert auth.revoke_api_key(None, first.prefix) is True
    assert auth.revoke_api_key(None, first.prefix) is False  # already revoked
    assert auth.revoke_api_key(None, str(second.id)) is True
    assert auth.revoke_api_key(None, "ncs_nothere") is False
    assert auth.user_for_api_key(first_secret) is None and auth.user_for_api_key(second_secret) is None


def test_someone_cannot_revoke_another_persons_key(account_app):
    app = account_app("hosted")
    alice, _ = signed_up(app, "alice@example.com")
    charlie, _ = signed_up(app, "charlie@example.com")
    key = new_key_from_profile(alice)
    key_id = ApiKey.get().id

    assert charlie.post(f"/account/keys/{key_id}/revoke").status_code == 302
    assert ApiKey.get_by_id(key_id).revoked_at is None
    assert app.test_client().get("/v1/probe/me", headers=bearer(key)).status_code == 200
    assert key[:12] not in charlie.get("/account/profile").get_data(as_text=True)


def test_a_key_speaks_for_its_owner_even_beside_another_session(account_app):
    app = account_app("hosted")
    alice, alice_user = signed_up(app, "alice@example.com")
    bob, _ = signed_up(app, "bob@example.com")
    key = new_key_from_profile(alice)

    assert bob.get("/api/probe/me", headers=bearer(key)).json["id"] == alice_user.id
    # A bad key is refused even though bob's session cookie rides along.
    assert bob.get("/api/probe/me", headers=bearer("ncs_wrong")).status_code == 401


def test_keys_of_disabled_or_unapproved_accounts_stop_working(account_app):
    app = account_app("lab")
    alice, alice_user = signed_up(app, "alice@example.com")
    key = new_key_from_profile(alice)
    User.update(is_approved=False).where(User.id == alice_user.id).execute()
    assert app.test_client().get("/v1/probe/me", headers=bearer(key)).status_code == 401
    User.update(is_approved=True, is_active_flag=False).where(User.id == alice_user.id).execute()
    assert app.test_client().get("/v1/probe/me", headers=bearer(key)).status_code == 401


def test_last_used_is_recorded_about_once_a_minute(account_app):
    app = account_app("hosted")
    alice, _ = signed_up(app, "alice@example.com")
    key = new_key_from_profile(alice)
    script = app.test_client()
    assert ApiKey.get().last_used_at is None

    script.get("/v1/probe/me", headers=bearer(key))
    first = ApiKey.get().last_used_at
    assert first is not None
    script.get("/v1/probe/me", headers=bearer(key))
    assert ApiKey.get().last_used_at == first  # no write for every request

    earlier = first - dt.timedelta(minutes=2)
    ApiKey.update(last_used_at=earlier).execute()
    script.get("/v1/probe/me", headers=bearer(key))
    assert ApiKey.get().last_used_at > first


def test_creating_and_revoking_keys_need_the_csrf_token(account_app, mailbox):
    app = account_app("hosted", csrf=True)
    alice = app.test_client()
    join(alice, mailbox, "alice@example.com", csrf_token=csrf_token_of(alice.get("/account/register")))
    assert alice.post("/account/keys", data={"key-name": "x"}).status_code == 400
    assert ApiKey.select().count() == 0

    token = csrf_token_of(alice.get("/account/profile"))
    assert alice.post("/account/keys", data={"key-name": "x", "key-csrf_token": token}).status_code == 201
    key_id = ApiKey.get().id
    assert alice.post(f"/account/keys/{key_id}/revoke").status_code == 400
    assert ApiKey.get_by_id(key_id).revoked_at is None


def test_a_key_writes_to_the_api_without_a_csrf_token_but_a_cookie_cannot(account_app, mailbox):
    app = account_app("hosted", csrf=True)
    alice = app.test_client()
    join(alice, mailbox, "alice@example.com", csrf_token=csrf_token_of(alice.get("/account/register")))
    token = csrf_token_of(alice.get("/account/profile"))
    key = KEY_RE.search(alice.post("/account/keys", data={"key-csrf_token": token}).get_data(as_text=True)).group(1)

    # A form post riding on the session cookie (what another site could make a browser send) is refused...
    assert alice.post("/api/probe/echo", data={"x": "1"}).status_code == 403
    # ...while a script with the key needs no token: no other site can make a browser send that header.
    script = app.test_client()
    response = script.post("/api/probe/echo", data={"x": "1"}, headers=bearer(key), environ_base=REMOTE)
    assert response.status_code == 200 and response.json["form"] == {"x": "1"}


def test_a_script_uploads_a_dataset_with_a_key_even_in_solo_mode_at_the_machine(account_app):
    """The README's curl lines: a multipart upload is what a cross-site form could send to a studio on
    localhost, so even the solo owner's script, on the machine itself, sends a key."""
    import io

    app = account_app("solo", csrf=True)
    app.extensions["ncs_calibrator"] = estimate.Calibrator(  # no trainer process asked about the device
        probe=lambda: {"device": "cpu", "device_name": "test cpu", "memory_bytes": 8 << 30}, run=lambda s, b: None)
    script = app.test_client()  # from loopback: the solo owner, as far as sign-in goes
    corpus = b"Once upon a time there was a tiny model.\n" * 50
    refused = script.post("/api/datasets", data={"file": (io.BytesIO(corpus), "corpus.txt")},
                          content_type="multipart/form-data")
    assert refused.status_code == 403 and "API key" in refused.json["error"]["message"]

    database.connect(reuse_if_open=True)
    _, key = auth.create_api_key(auth.solo_owner(), name="uploads")  # `nanochat-studio keys create`
    uploaded = script.post("/api/datasets", data={"file": (io.BytesIO(corpus), "corpus.txt")},
                           content_type="multipart/form-data", headers=bearer(key))
    assert uploaded.status_code == 201, uploaded.json
    assert uploaded.json["spec"] == f"ds:{uploaded.json['id']}" and uploaded.json["size_bytes"] == len(corpus)
    job = script.post("/api/jobs", json={"depth": 1, "dataset": uploaded.json["spec"], "max_steps": 5},
                      headers=bearer(key))
    assert job.status_code == 201 and job.json["config"]["dataset"] == uploaded.json["spec"]
