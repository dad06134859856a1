"""Open streams are capped per user and in all, and waitress always keeps threads for everything else
(issue 10, point 3: 24 job event streams made /healthz time out). Through the real ``serve``, with
``max_streams = 4`` and ``max_streams_per_user = 2`` (so 12 threads).
"""

from __future__ import annotations

import concurrent.futures
import time

import pytest
import requests

from harness import Studio, open_store, persona, wait_for
from nanochat_studio import jobs, limits
from nanochat_studio.models import Model, TrainingJob


@pytest.fixture(scope="module")
def lab(tmp_path_factory, store_url):
    studio = Studio(tmp_path_factory.mktemp("streams") / "home", store_url, mode="lab",
                    env={"NCS_MAX_STREAMS": "4", "NCS_MAX_STREAMS_PER_USER": "2"})
    yield studio
    studio.stop()
    studio.assert_no_tracebacks()


@pytest.fixture
def store(store_url):
    open_store(store_url)


def queued_job(user) -> TrainingJob:
    """A job that waits forever (no worker runs here): its event stream stays open."""
    job = TrainingJob.create(user=user, name="waits", config={"depth": 1, "dataset": {"kind": "demo", "source": "demo"}})
    jobs.record_event(job, "state", {"to": "queued"})
    return job


def open_stream(s: requests.Session, studio: Studio, job: TrainingJob) -> requests.Response:
    r = s.get(f"{studio.url}/api/jobs/{job.id}/events", stream=True, timeout=30)
    if r.status_code == 200:
        next(r.iter_content(64))  # the stream really started (its slot is taken before the first byte)
    return r


def test_streams_are_capped_per_user_and_overall_with_threads_to_spare(lab, store):
    users = {name: persona(name) for name in ("alice", "bob", "charlie")}
    sessions = {name: lab.session(f"{name}@example.com") for name in users}
    job = {name: queued_job(user) for name, user in users.items()}
    held = []

    a1, a2 = open_stream(sessions["alice"], lab, job["alice"]), open_stream(sessions["alice"], lab, job["alice"])
    held += [a1, a2]
    assert (a1.status_code, a2.status_code) == (200, 200)
    third = open_stream(sessions["alice"], lab, job["alice"])
    assert third.status_code == 429 and third.json()["error"]["code"] == "too_many_streams"
    assert int(third.headers["Retry-After"]) > 0

    held += [open_stream(sessions["bob"], lab, job["bob"]) for _ in range(2)]
    assert all(r.status_code == 200 for r in held)
    full = open_stream(sessions["charlie"], lab, job["charlie"])
    assert full.status_code == 429 and full.json()["error"]["code"] == "server_busy"

    # Every stream slot is taken; pages, the API and /healthz still answer at once, many at a time.
    def ask(path: str) -> tuple[int, float]:
        t0 = time.monotonic()
        r = sessions["charlie"].get(lab.url + path, timeout=30) if path != "/healthz" else \
            requests.get(lab.url + path, timeout=30)
        return r.status_code, time.monotonic() - t0

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, ["/healthz", "/api/jobs", "/jobs", "/healthz"] * 2))
    assert all(code == 200 for code, _ in answers), answers
    assert max(seconds for _, seconds in answers) < 10, answers

    # A job that ends closes its streams and gives their slots back.
    jobs.transition(job["bob"].id, jobs.CANCELLED, expect={jobs.QUEUED}, reason="test")
    got_in = wait_for(lambda: (r := open_stream(sessions["charlie"], lab, job["charlie"])).status_code == 200 and r,
                      timeout=20, interval=0.3)
    held.append(got_in)
    for name in ("alice", "charlie"):  # end the rest: their streams close now, not at the next heartbeat
        jobs.transition(job[name].id, jobs.CANCELLED, expect={jobs.QUEUED}, reason="test")
    for r in held:
        for _ in r.iter_content(None):  # read each to its end: the server closed it
            pass


def test_a_client_that_went_away_gives_its_slot_back(lab, store):
    dana = persona("dana")
    s = lab.session("dana@example.com")
    job = queued_job(dana)
    # (streams the last test ended give their slots back a moment after their clients saw the end)
    first = wait_for(lambda: (r := open_stream(s, lab, job)).status_code == 200 and r, timeout=10, interval=0.2)
    second = wait_for(lambda: (r := open_stream(s, lab, job)).status_code == 200 and r, timeout=10, interval=0.2)
    assert open_stream(s, lab, job).status_code == 429
    first.close()
    second.close()
    # waitress notices at the next write: the heartbeat, at most sse.HEARTBEAT_S later.
    again = wait_for(lambda: (r := open_stream(s, lab, job)).status_code == 200 and r, timeout=45, interval=1)
    again.close()


def test_chat_and_openai_streams_count_against_the_same_cap(make_app, tmp_path):
    """In-process: the gate is shared, so a user whose slots are taken gets 429 from /api/chat and
    /v1/chat/completions before any model is started."""
    from nanochat_studio import auth

    app = make_app(mode="lab", max_streams_per_user=2)
    app.config.update(WTF_CSRF_ENABLED=False)
    erin = persona("erin")
    model = Model.create(user=erin, name="m", checkpoint_key=str(tmp_path), tokenizer_key=str(tmp_path))
    _, key = auth.create_api_key(erin)
    with app.app_context():
        gate = limits.current().streams
    held = [gate.acquire(erin.id), gate.acquire(erin.id)]
    bearer = {"Authorization": f"Bearer {key}"}
    client = app.test_client()
    chat = client.post("/api/chat", json={"model_id": model.id, "messages": [{"role": "user", "content": "hi"}]},
                       headers=bearer)
    assert chat.status_code == 429 and chat.json["error"]["code"] == "too_many_streams"
    v1 = client.post("/v1/chat/completions", headers=bearer, json={
        "model": str(model.id), "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert v1.status_code == 429 and v1.json["error"]["type"] == "rate_limit_error"
    download = client.get(f"/api/models/{model.id}/download", headers=bearer)
    assert download.status_code == 429
    for release in held:
        release()
    assert gate.open == 0
