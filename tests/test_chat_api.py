"""POST /api/chat (SSE), chat sessions and snapshots, against a live waitress server and real model servers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from chat_fixtures import (  # noqa: E402
    LiveServer, add_model, add_user, cached_tiny_checkpoint, login_session, make_chat_app, scripted_checkpoint,
    sse_events,
)

os.environ.setdefault("OMP_NUM_THREADS", "1")
HI = [{"role": "user", "content": "Once upon a time"}]


@pytest.fixture
def live(tmp_path):
    made = []

    def make(**pool_kw):
        app = make_chat_app(tmp_path / "home", **pool_kw)
        server = LiveServer(app)
        made.append((app, server))
        return app, server

    yield make
    for app, server in made:
        server.close()
        app.extensions["model_pool"].close()


@pytest.fixture
def world(live, tmp_path):
    """alice (with a real tiny model and a scripted one) and bob, signed in on a live server."""
    app, server = live()
    alice, bob = add_user("alice@example.com"), add_user("bob@example.com")
    tiny = add_model(alice, cached_tiny_checkpoint(tmp_path / "tiny"))
    words = add_model(alice, scripted_checkpoint(tmp_path / "words", "Grüße, 世界! 🙂 done."), name="words")
    return {"app": app, "url": server.url, "alice": login_session(server.url, "alice@example.com"),
            "bob": login_session(server.url, "bob@example.com"), "tiny": tiny, "words": words,
            "alice_user": alice}


def post_chat(session, url, **body):
    r = session.post(f"{url}/api/chat", json=body, stream=True, timeout=60)
    if r.headers.get("Content-Type", "").startswith("text/event-stream"):
        return r, sse_events(r.iter_lines(decode_unicode=True))
    return r, None


@pytest.mark.process
def test_it_streams_deltas_then_one_final_event_with_token_counts(world):
    r, events = post_chat(world["alice"], world["url"], model_id=world["tiny"].id, mode="complete",
                          prompt="Once upon a time", max_tokens=20, temperature=0, seed=1)
    assert r.status_code == 200 and r.headers["Cache-Control"].startswith("no-cache")
    kinds = [k for k, _ in events]
    assert kinds[0] == "session" and kinds[-1] == "done" and kinds.count("done") == 1
    assert set(kinds[1:-1]) == {"delta"}
    done = events[-1][1]
    assert done["finish_reason"] == "length" and done["completion_tokens"] == 20 and done["prompt_tokens"] > 1
    assert done["ttft_ms"] > 0 and done["tokens_per_sec"] > 0
    text = "".join(d["text"] for k, d in events if k == "delta")
    session = world["alice"].get(f"{world['url']}/api/chat/sessions/{events[0][1]['session_id']}").json()
    assert [m["role"] for m in session["messages"]] == ["user", "assistant"]
    assert session["messages"][1]["content"] == text and session["messages"][1]["stats"]["completion_tokens"] == 20
    assert session["mode"] == "complete" and session["title"] == "Once upon a time"


@pytest.mark.process
def test_chat_mode_with_a_real_model(world):
    r, events = post_chat(world["alice"], world["url"], model_id=world["tiny"].id, messages=HI, max_tokens=10,
                          save=False)
    assert [k for k, _ in events][-1] == "done" and events[0][0] == "delta"
    assert events[-1][1]["finish_reason"] in ("stop", "length") and events[-1][1]["message_id"] is None


def test_multibyte_text_arrives_whole_and_in_order(world):
    r, events = post_chat(world["alice"], world["url"], model_id=world["words"].id, messages=HI)
    deltas = [d["text"] for k, d in events if k == "delta"]
    assert "".join(deltas) == "Grüße, 世界! 🙂 done." and all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("body, reason", [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "x"}] * 201}, "too many messages"),
    ({"messages": [{"role": "user", "content": "x" * 40_000}]}, "characters long"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "role must be one of"),
    ({"messages": [{"role": "user", "content": 5}]}, "must be a string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "system message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "last message"),
    ({"messages": HI, "temperature": 5}, "temperature must be"),
    ({"messages": HI, "temperature": "hot"}, "temperature must be a number"),
    ({"messages": HI, "top_p": 0}, "top_p must be above 0"),
    ({"messages": HI, "top_k": 0}, "top_k must be"),
    ({"messages": HI, "max_tokens": 0}, "max_tokens must be"),
    ({"messages": HI, "max_tokens": 10**6}, "at most 4096"),
    ({"messages": HI, "seed": 1.5}, "seed must be an integer"),
    ({"mode": "poetry", "messages": HI}, "mode must be"),
    ({"mode": "complete", "prompt": None}, "prompt must be a string"),
])
def test_limits_answer_400_with_the_reason(world, body, reason):
    r = world["alice"].post(f"{world['url']}/api/chat", json={"model_id": world["words"].id, **body})
    assert r.status_code == 400, r.text
    assert reason in r.json()["error"]["message"]


def test_another_users_model_and_sessions_answer_404_everywhere(world):
    alice, bob, url = world["alice"], world["bob"], world["url"]
    _, events = post_chat(alice, url, model_id=world["words"].id, messages=HI)
    sid = events[0][1]["session_id"]
    mid = world["words"].id
    assert bob.post(f"{url}/api/chat", json={"model_id": mid, "messages": HI}).status_code == 404
    assert bob.get(f"{url}/chat/{mid}").status_code == 404
    assert bob.get(f"{url}/chat/compare?a={mid}").status_code == 404
    assert bob.get(f"{url}/api/chat/sessions/{sid}").status_code == 404
    assert bob.patch(f"{url}/api/chat/sessions/{sid}", json={"title": "mine"}).status_code == 404
    assert bob.delete(f"{url}/api/chat/sessions/{sid}").status_code == 404
    assert bob.get(f"{url}/api/chat/sessions?model_id={mid}").status_code == 404
    assert bob.post(f"{url}/api/chat/sessions", json={"model_id": mid}).status_code == 404
    assert bob.get(f"{url}/api/chat/sessions").json()["sessions"] == []
    # bob's own session cannot be pointed at alice's chat either
    r = bob.post(f"{url}/api/chat", json={"model_id": mid, "messages": HI, "session_id": sid})
    assert r.status_code == 404
    assert alice.get(f"{url}/api/chat/sessions/{sid}").status_code == 200  # untouched


@pytest.mark.process
def test_a_failure_is_an_error_event_then_the_final_event(world, tmp_path):
    (tmp_path / "broken").mkdir()
    broken = add_model(world["alice_user"], tmp_path / "broken", name="broken")
    r, events = post_chat(world["alice"], world["url"], model_id=broken.id, messages=HI)
    assert r.status_code == 200
    assert [k for k, _ in events] == ["session", "error", "done"]
    assert "could not be loaded" in events[1][1]["message"] and events[1][1]["permanent"] is True
    assert events[2][1]["finish_reason"] == "error"


@pytest.mark.process
def test_a_crash_mid_answer_is_reported_and_the_next_chat_works(world, tmp_path):
    slow = add_model(world["alice_user"], scripted_checkpoint(tmp_path / "slow", "s" * 300, delay_s=0.01), name="slow")
    pool = world["app"].extensions["model_pool"]
    r = world["alice"].post(f"{world['url']}/api/chat", json={"model_id": slow.id, "messages": HI, "save": False},
                            stream=True, timeout=30)
    lines = r.iter_lines(decode_unicode=True)
    seen = []
    for line in lines:
        seen.append(line)
        if line.startswith("data: {\"text\"") and len(seen) > 10:
            os.kill(pool.server_pid(slow), 9)
            break
    events = sse_events(list(seen) + list(lines))
    assert [k for k, _ in events][-2:] == ["error", "done"]
    assert "stopped unexpectedly" in events[-2][1]["message"]
    _, events = post_chat(world["alice"], world["url"], model_id=slow.id, messages=HI, max_tokens=3, save=False)
    assert "".join(d["text"] for k, d in events if k == "delta") == "sss"


def test_closing_the_connection_mid_stream_stops_generation(world, tmp_path):
    long = add_model(world["alice_user"], scripted_checkpoint(tmp_path / "long", "L" * 2000, delay_s=0.005), name="long")
    pool = world["app"].extensions["model_pool"]
    cookie = "; ".join(f"{c.name}={c.value}" for c in world["alice"].cookies)
    body = json.dumps({"model_id": long.id, "messages": HI, "max_tokens": 2000}).encode()
    sock = socket.create_connection(("127.0.0.1", int(world["url"].rsplit(":", 1)[1])), timeout=30)
    sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Cookie: {cookie}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while got.count(b"event: delta") < 5:
        got += sock.recv(4096)
    assert got.startswith(b"HTTP/1.1 200")
    sid = json.loads(got.split(b"event: session\ndata: ", 1)[1].split(b"\n", 1)[0])["session_id"]
    sock.close()  # the browser tab closed
    deadline = time.monotonic() + 10
    stats = {}
    while time.monotonic() < deadline:
        stats = pool.server_stats(long)
        if stats.get("cancelled") == 1 and stats.get("active") == 0:
            break
        time.sleep(0.05)
    assert stats.get("cancelled") == 1 and stats["active"] == 0, stats
    assert stats["completion_tokens"] < 2000  # it stopped early instead of finishing for nobody
    time.sleep(0.3)
    msgs = world["alice"].get(f"{world['url']}/api/chat/sessions/{sid}").json()["messages"]
    assert msgs[-1]["role"] == "assistant" and msgs[-1]["stats"]["finish_reason"] == "cancelled"
    assert 5 <= len(msgs[-1]["content"]) < 2000


def test_past_the_queue_bound_a_chat_gets_429(live, tmp_path):
    app, server = live(max_active=1, queue_limit=0)
    add_user("alice@example.com")
    from nanochat_studio.models import User

    slow = add_model(User.get(), scripted_checkpoint(tmp_path / "slow", "w" * 400, delay_s=0.01))
    alice = login_session(server.url, "alice@example.com")
    first = alice.post(f"{server.url}/api/chat", json={"model_id": slow.id, "messages": HI}, stream=True, timeout=30)
    next(first.iter_lines())
    r = alice.post(f"{server.url}/api/chat", json={"model_id": slow.id, "messages": HI})
    assert r.status_code == 429 and "try again" in r.json()["error"]["message"]
    assert r.headers["Retry-After"] == "2"
    first.close()


def test_sessions_regenerate_edit_rename_delete(world):
    alice, url, mid = world["alice"], world["url"], world["words"].id
    _, events = post_chat(alice, url, model_id=mid, messages=[{"role": "user", "content": "first question"}])
    sid = events[0][1]["session_id"]
    convo = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "an answer"},
             {"role": "user", "content": "second"}]
    post_chat(alice, url, model_id=mid, messages=convo, session_id=sid)
    assert len(alice.get(f"{url}/api/chat/sessions/{sid}").json()["messages"]) == 4
    # edit the first message and continue from there: the session holds exactly what was sent + the answer
    post_chat(alice, url, model_id=mid, messages=[{"role": "user", "content": "edited"}], session_id=sid)
    msgs = alice.get(f"{url}/api/chat/sessions/{sid}").json()["messages"]
    assert [(m["role"], m["content"]) for m in msgs] == [("user", "edited"), ("assistant", "Grüße, 世界! 🙂 done.")]
    listed = alice.get(f"{url}/api/chat/sessions?model_id={mid}").json()["sessions"]
    assert [s["id"] for s in listed] == [sid]
    assert alice.patch(f"{url}/api/chat/sessions/{sid}", json={"title": "Renamed"}).json()["title"] == "Renamed"
    assert alice.patch(f"{url}/api/chat/sessions/{sid}", json={"title": ""}).status_code == 400
    new = alice.post(f"{url}/api/chat/sessions", json={"model_id": mid}).json()
    assert new["messages"] == [] and new["mode"] == "complete"  # not chat-tuned: complete mode by default
    assert alice.delete(f"{url}/api/chat/sessions/{sid}").status_code == 204
    assert alice.get(f"{url}/api/chat/sessions/{sid}").status_code == 404


@pytest.mark.process
def test_a_running_jobs_newest_checkpoint_can_be_snapshotted_and_chatted_with(world, tmp_path):
    from nanochat_studio.models import Model, TrainingJob

    alice, url = world["alice"], world["url"]
    run = tmp_path / "run"
    job = TrainingJob.create(user=world["alice_user"], name="storyteller", status="running", output_path=str(run))
    assert alice.post(f"{url}/api/jobs/{job.id}/snapshot").status_code == 409  # nothing saved yet
    cached_tiny_checkpoint(run / "checkpoints" / "step_0000040")
    torn = run / "checkpoints" / "step_0000050"  # being written: no manifest yet
    shutil.copytree(run / "checkpoints" / "step_0000040", torn)
    (torn / "manifest.json").unlink()
    r = alice.post(f"{url}/api/jobs/{job.id}/snapshot")
    assert r.status_code == 201, r.text
    model = Model.get_by_id(r.json()["model_id"])
    assert model.is_snapshot and model.step == 40 and model.job_id == job.id
    assert r.json()["chat_url"] == f"/chat/{model.id}"
    shutil.rmtree(run)  # the trainer prunes its checkpoints: the snapshot is a copy and lives on
    _, events = post_chat(alice, url, model_id=model.id, mode="complete", prompt="The", max_tokens=5, temperature=0,
                          save=False)
    assert events[-1][1]["completion_tokens"] == 5
    assert world["bob"].post(f"{url}/api/jobs/{job.id}/snapshot").status_code == 404
    assert world["bob"].post(f"{url}/chat/snapshot/{job.id}", allow_redirects=False).status_code == 404


def test_the_job_page_form_snapshots_and_opens_the_chat(world, tmp_path):
    from nanochat_studio.models import TrainingJob

    run = tmp_path / "run2"
    job = TrainingJob.create(user=world["alice_user"], name="live", status="running", output_path=str(run))
    cached_tiny_checkpoint(run / "checkpoints" / "step_0000040")
    r = world["alice"].post(f"{world['url']}/chat/snapshot/{job.id}", allow_redirects=False)
    assert r.status_code == 303 and r.headers["Location"].startswith("/chat/")
    page = world["alice"].get(world["url"] + r.headers["Location"])
    assert page.status_code == 200 and "snapshot · step 40" in page.text


def test_the_chat_pages_render(world):
    alice, url = world["alice"], world["url"]
    page = alice.get(f"{url}/chat/{world['words'].id}")
    assert page.status_code == 200 and "chat.js" in page.text
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert "<script>" not in page.text  # no inline script
    assert alice.get(f"{url}/chat").status_code == 200
    assert alice.get(f"{url}/chat/compare?a={world['words'].id}&b={world['tiny'].id}").status_code == 200


@pytest.mark.process
def test_a_slow_model_load_sends_heartbeats_before_the_first_token(live, tmp_path):
    app, server = live(heartbeat_s=0.2)
    add_user("alice@example.com")
    from nanochat_studio.models import User

    slow = add_model(User.get(), scripted_checkpoint(tmp_path / "slow", "hi", load_delay_s=1.0))
    alice = login_session(server.url, "alice@example.com")
    r = alice.post(f"{server.url}/api/chat", json={"model_id": slow.id, "messages": HI, "save": False}, stream=True)
    lines = list(r.iter_lines(decode_unicode=True))
    first_data = next(i for i, ln in enumerate(lines) if ln.startswith("data:"))
    assert lines[:first_data].count(": keep-alive") >= 3  # headers went out at once, then comments
    events = sse_events(lines)
    assert events[-1][0] == "done" and "".join(d["text"] for k, d in events if k == "delta") == "hi"
