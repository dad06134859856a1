"""Malformed requests are answered 4xx with the reason, never 500 (issue 10, point 8): ids above 2^63, a
huge Last-Event-ID, JSON that is a list or a string where an object belongs, JSON nested thousands deep,
bodies past the JSON limit, long stop strings; and waitress's body limit agrees with the advertised
upload limit. Through the real ``serve``; its console must show no traceback afterwards.
"""

from __future__ import annotations

import re
import socket
import tempfile

import pytest
import requests

from harness import Studio, open_store, persona
from nanochat_studio import auth
from nanochat_studio.models import ChatSession, Model, TrainingJob

HUGE_IDS = [str(2**63), str(2**64 + 5), "9" * 30, "9" * 5000]
UPLOAD_MAX = 2_000_000
JSON_MAX = 64 << 10


@pytest.fixture(scope="module")
def lab(tmp_path_factory, store_url):
    studio = Studio(tmp_path_factory.mktemp("malformed") / "home", store_url, mode="lab",
                    env={"NCS_UPLOAD_MAX_BYTES": str(UPLOAD_MAX), "NCS_JSON_MAX_BYTES": str(JSON_MAX),
                         "NCS_API_RATE_LIMIT": "100000 per minute", "NCS_API_KEY_RATE_LIMIT": "100000 per minute"})
    yield studio
    studio.stop()
    studio.assert_no_tracebacks()


@pytest.fixture
def alice(lab, store_url):
    open_store(store_url)
    user = persona("alice", admin=True)  # an admin reaches the admin routes too
    _, key = auth.create_api_key(user, "probe")
    return user, {"Authorization": f"Bearer {key}"}


def id_routes() -> list[tuple[str, str]]:
    """(method, rule) of every route of the app that takes an integer id, read from the app itself."""
    from nanochat_studio.app import create_app
    from nanochat_studio.settings import load_settings

    app = create_app(load_settings(environ={"NCS_HOME": tempfile.mkdtemp(prefix="ncs-routes-")}))
    return [(method, rule.rule) for rule in app.url_map.iter_rules() if "<int:" in rule.rule
            for method in sorted(rule.methods - {"HEAD", "OPTIONS"})]


@pytest.mark.parametrize("method, rule", id_routes())
def test_ids_beyond_64_bits_are_not_found(lab, alice, method, rule):
    _, key = alice
    for ident in HUGE_IDS:
        path = re.sub(r"<int:\w+>", ident, rule)
        r = requests.request(method, lab.url + path, headers=key, json={}, timeout=30)
        # 404 (no such id); 405 where werkzeug's matcher reports the method first; never a 500
        assert r.status_code in (404, 405), (method, path[:80], r.status_code, r.text[:200])
        if path.startswith(("/api/", "/v1/")):
            assert r.headers["Content-Type"].startswith("application/json")


def test_ids_in_bodies_and_queries_beyond_64_bits_are_not_found(lab, alice):
    _, key = alice
    for ident in HUGE_IDS[:3]:
        probes = [
            ("POST", "/api/chat", {"model_id": int(ident), "messages": [{"role": "user", "content": "x"}]}),
            ("POST", "/api/chat/sessions", {"model_id": ident}),
            ("POST", "/api/jobs", {"depth": 1, "dataset": f"ds:{ident}"}),
            ("POST", "/v1/chat/completions", {"model": ident, "messages": [{"role": "user", "content": "x"}]}),
            ("GET", f"/v1/models/{ident}", None),
            ("GET", f"/api/estimate?depth=2&dataset=ds:{ident}", None),
            ("GET", f"/api/chat/sessions?model_id={ident}", None),
            ("GET", f"/chat/compare?a={ident}", None),
        ]
        for method, path, body in probes:
            r = requests.request(method, lab.url + path, headers=key, json=body, timeout=30)
            assert r.status_code == 404, (method, path, r.status_code, r.text[:300])


@pytest.mark.parametrize("value", ["9" * 30, str(2**63), "-1", "1e3", "x", "9" * 5000])
def test_a_bad_last_event_id_is_a_400_with_the_reason(lab, alice, value):
    user, key = alice
    job = TrainingJob.create(user=user, config={"depth": 1, "dataset": {"kind": "demo", "source": "demo"}},
                             status="cancelled")
    for how in ({"headers": {**key, "Last-Event-ID": value}}, {"headers": key, "params": {"since": value}}):
        r = requests.get(f"{lab.url}/api/jobs/{job.id}/events", timeout=30, **how)
        assert r.status_code == 400 and "Last-Event-ID" in r.json()["error"]["message"], r.text[:300]


NOT_OBJECTS = [("[1, 2]", "an array"), ('"text"', "a string"), ("42", "a number"), ("null", "null"),
               ("true", "a boolean"), ("[" * 20_000 + "]" * 20_000, "not valid JSON"),
               ('{"a": ' * 4000 + "1" + "}" * 4000, "not valid JSON"), ("{not json", "not valid JSON")]



@pytest.mark.parametrize("text, depth", [
    ("", 0), ("1", 0), ("[]", 1), ('{"a": [1, {"b": []}]}', 4), ("]]][", 0), ("[[]][[[]]]", 3),
    ('"[[[["', 0), ('["[[[", {"k": "}}}"}]', 2), (r'["\"[[", []]', 2), (r'["\\", []]', 2),
    ('"no end [[[', 0), ('"ends in a backslash\\', 0), ("[" * 64, 64), ("[" * 65, 65), ("[" * 9000, 65),
    ("[]" * 5000 + "[" * 70, 65), (b'[\xff"[[", [[]]]', 3),
])
def test_json_depth_counts_the_brackets_outside_strings_and_stops_past_the_limit(text, depth):
    from nanochat_studio.inputs import json_depth

    assert json_depth(text) == depth

def json_endpoints(user) -> list[tuple[str, str]]:
    model = Model.create(user=user, name="m", checkpoint_key="nowhere", tokenizer_key="nowhere")
    session = ChatSession.create(user=user, model=model, title="t")
    return [("POST", "/api/jobs"), ("POST", "/api/chat"), ("POST", "/api/chat/sessions"),
            ("PATCH", f"/api/chat/sessions/{session.id}"), ("POST", "/v1/chat/completions"),
            ("POST", "/v1/completions")]


@pytest.mark.parametrize("body, reason", NOT_OBJECTS, ids=lambda v: v[:12] if isinstance(v, str) else v)
def test_json_that_is_not_an_object_is_a_400_with_the_reason(lab, alice, body, reason):
    user, key = alice
    for method, path in json_endpoints(user):
        r = requests.request(method, lab.url + path, data=body, timeout=30,
                             headers={**key, "Content-Type": "application/json"})
        assert r.status_code == 400, (method, path, r.status_code, r.text[:300])
        assert reason in r.json()["error"]["message"], (path, r.json())


@pytest.mark.parametrize("body", [
    {"model_id": {"x": 1}, "messages": "hi"}, {"model_id": [1]}, {"title": ["a"]}, {"title": {"a": 1}},
    {"depth": "3", "dataset": "demo"}, {"depth": 2, "dataset": ["demo"]}, {"depth": 2, "dataset": {"source": 5}},
    {"depth": 2 ** 70, "dataset": "demo"}, {"model": ["1"], "messages": [1, 2]},
    {"messages": [{"role": "user", "content": {"x": 1}}]}, {"messages": [{"role": ["user"], "content": "x"}]},
    {"stop": {"a": 1}}, {"stream_options": "yes"}, {"temperature": "hot"}, {"max_tokens": 2 ** 70},
], ids=lambda b: ",".join(b))
def test_wrong_shapes_inside_an_object_are_4xx_never_500(lab, alice, body):
    user, key = alice
    model = Model.create(user=user, name="m", checkpoint_key="nowhere", tokenizer_key="nowhere")
    for method, path in json_endpoints(user):
        payload = dict(body)
        if "model_id" not in payload and path == "/api/chat":
            payload["model_id"] = model.id
        if "model" not in payload and path.startswith("/v1"):
            payload["model"] = str(model.id)
        r = requests.request(method, lab.url + path, json=payload, headers=key, timeout=30)
        assert 400 <= r.status_code < 500, (method, path, payload, r.status_code, r.text[:300])


def test_stop_strings_are_bounded(lab, alice):
    user, key = alice
    model = Model.create(user=user, name="m", checkpoint_key="nowhere", tokenizer_key="nowhere")
    r = requests.post(lab.url + "/v1/chat/completions", headers=key, timeout=30, json={
        "model": str(model.id), "messages": [{"role": "user", "content": "hi"}], "stop": ["x" * 5000]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    assert "256 characters" in r.json()["error"]["message"]


def test_a_json_body_past_json_max_bytes_is_a_413(lab, alice):
    _, key = alice
    big = '{"depth": 2, "dataset": "demo", "name": "' + "x" * (JSON_MAX + 10) + '"}'
    r = requests.post(lab.url + "/api/jobs", data=big, headers={**key, "Content-Type": "application/json"},
                      timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def test_waitress_takes_what_the_upload_limit_advertises_and_the_app_refuses_past_it(lab, alice):
    _, key = alice
    ok = requests.post(lab.url + "/api/datasets", headers=key, timeout=60,
                       files={"file": ("ok.txt", b"words and more words\n" * (1_500_000 // 21))})
    assert ok.status_code == 201, ok.text[:300]
    # Past upload_max_bytes but within waitress's limit: the app's JSON answer, naming the setting.
    over = requests.post(lab.url + "/api/datasets", headers=key, timeout=60,
                         files={"file": ("big.txt", b"x" * (UPLOAD_MAX + 500_000))})
    assert over.status_code == 413 and "upload_max_bytes" in over.json()["error"]["message"]
    # Far past it: waitress itself answers from the headers, before reading a byte of body.
    port = int(lab.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /api/datasets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                     b"boundary=x\r\nContent-Length: %d\r\nAuthorization: %s\r\n\r\n"
                     % (UPLOAD_MAX * 4, key["Authorization"].encode()))
        head = sock.recv(200)
    assert head.startswith(b"HTTP/1.1 413"), head


def test_serve_gives_waitress_a_body_limit_no_lower_than_the_advertised_upload_limit(tmp_path):
    """The issue: waitress's 1 GiB default was below the advertised 2 GiB upload limit."""
    from nanochat_studio.cli import waitress_options
    from nanochat_studio.settings import load_settings

    settings = load_settings(environ={"NCS_HOME": str(tmp_path)})
    assert settings.upload_max_bytes == 2 << 30
    assert waitress_options(settings)["max_request_body_size"] >= settings.upload_max_bytes
