"""The jobs and models JSON API, the plan and job pages, and the job event stream (no consumer here:
the queue and the trainer are exercised in test_tasks.py and test_end_to_end.py)."""

from __future__ import annotations

import json
import re
import threading

import pytest
from conftest import REMOTE, client_as

from nanochat_studio import estimate, jobs
from nanochat_studio.db import database
from nanochat_studio.models import JobEvent, Model, TrainingJob
from trainer import sizing

FAKE_DEVICE = {"device": "cpu", "device_name": "test cpu", "memory_bytes": 8 << 30}


def fake_calibrator(app, device=FAKE_DEVICE):
    """The app's device is ``device``, and its calibrations time nothing (no torch process starts)."""
    app.extensions["ncs_calibrator"] = estimate.Calibrator(probe=lambda: dict(device), run=lambda shape, batch: None)


@pytest.fixture(autouse=True)
def _no_background_calibration(app):
    """Estimates here must not start torch processes; test_runner.py runs a real calibration."""
    fake_calibrator(app)


def post_json(client, url, body):
    return client.post(url, data=json.dumps(body), content_type="application/json")


def test_estimate_uses_the_trainers_own_formulas(app, alice):
    c = client_as(app, alice)
    r = c.get("/api/estimate?depth=4&dataset=demo&max_steps=100")
    assert r.status_code == 200, r.get_json()
    e = r.get_json()
    vocab = sizing.DEMO_FACTS["vocab_size"]  # what the trainer's tokenizer makes of the demo
    shape = sizing.shape_for(4, vocab, 256)
    assert e["params"] == sizing.param_counts(shape)["total"]
    assert e["steps"] == 100 and e["tokens"] == 100 * 8 * 256
    assert e["memory"]["needed_bytes"] == sizing.memory_estimate(shape, 8)["total"]
    assert e["memory"]["verdict"] == "fits"
    assert e["time"]["seconds"] > 0 and e["time"]["source"] in ("rough", "extrapolated", "calibrated")


def test_estimate_prefers_a_cached_calibration(app, alice):
    c = client_as(app, alice)
    shape = sizing.shape_for(2, sizing.DEMO_FACTS["vocab_size"], 256)
    database.connect(reuse_if_open=True)
    estimate.store_calibration("test cpu", shape, 8, {"tokens_per_sec": 1000.0, "flops_per_sec": 1e10,
                                                     "flops_per_step": 1e9})
    e = c.get("/api/estimate?depth=2&dataset=demo&max_steps=10").get_json()
    assert e["time"]["source"] == "calibrated"
    assert e["time"]["breakdown"]["steps"] == pytest.approx(10 * 8 * 256 / 1000.0)
    assert e["time"]["seconds"] == pytest.approx(sum(e["time"]["breakdown"].values()), rel=1e-3)


def test_a_calibration_of_an_older_trainer_is_not_reused(app, alice, monkeypatch):
    c = client_as(app, alice)
    shape = sizing.shape_for(2, sizing.DEMO_FACTS["vocab_size"], 256)
    database.connect(reuse_if_open=True)
    with monkeypatch.context() as m:  # stored by the trainer before the last speed change
        m.setattr(sizing, "SPEED_REVISION", sizing.SPEED_REVISION - 1)
        estimate.store_calibration("test cpu", shape, 8, {"tokens_per_sec": 1000.0, "flops_per_sec": 1e10,
                                                         "flops_per_step": 1e9})
    e = c.get("/api/estimate?depth=2&dataset=demo&max_steps=10").get_json()
    assert e["time"]["source"] != "calibrated"
    assert e["time"]["breakdown"]["steps"] != pytest.approx(10 * 8 * 256 / 1000.0)


def test_estimate_warns_when_the_model_will_not_fit_or_the_data_is_too_small(app, alice, monkeypatch):
    fake_calibrator(app, {"device": "cpu", "device_name": "tiny", "memory_bytes": 1 << 30})
    c = client_as(app, alice)
    e = c.get("/api/estimate?depth=24&dataset=demo").get_json()
    assert e["memory"]["verdict"] == "wont_fit"
    assert any("GiB" in w for w in e["warnings"])
    assert any("data is small for this size" in w for w in e["warnings"])


def test_the_default_length_follows_the_trainers_data_limited_rule(app, alice):
    e = client_as(app, alice).get("/api/estimate?depth=4&dataset=demo").get_json()
    train_tokens = sizing.DEMO_FACTS["n_train_tokens"]
    assert e["scaling_params"] == e["params"] - e["param_counts"]["embedding"]
    wanted, budget = sizing.planned_tokens(e["scaling_params"], data_tokens=train_tokens)
    assert budget == e["budget"] == "data"  # 20 tokens/param would read the demo's 16 MB ~20 times
    assert e["steps"] == -(-wanted // e["tokens_per_step"])
    assert e["data"]["epochs"] == pytest.approx(sizing.DEFAULT_MAX_EPOCHS, rel=0.01)
    small = client_as(app, alice).get("/api/estimate?depth=4&dataset=demo&max_steps=50").get_json()
    assert small["budget"] == "max_steps" and small["steps"] == 50


@pytest.mark.parametrize("query, message", [
    ("", "'depth' is required"),
    ("depth=0", "must be positive"),
    ("depth=40", "between 1 and 32"),
    ("depth=abc", "must be an integer"),
    ("depth=2&batch_size=-1", "must be positive"),
])
def test_estimate_rejects_bad_input_with_the_reason(app, alice, query, message):
    r = client_as(app, alice).get("/api/estimate?" + query)
    assert r.status_code == 400
    assert message in r.get_json()["error"]["message"]


def test_submit_list_get_and_cancel_a_job(app, alice):
    c = client_as(app, alice)
    r = post_json(c, "/api/jobs", {"depth": 2, "dataset": "demo", "max_steps": 20, "name": "first"})
    assert r.status_code == 201, r.get_json()
    job = r.get_json()
    assert job["status"] == "queued" and job["name"] == "first"
    assert r.headers["Location"] == f"/api/jobs/{job['id']}"
    assert job["estimate"]["steps"] == 20
    listed = c.get("/api/jobs").get_json()["jobs"]
    assert [j["id"] for j in listed] == [job["id"]]
    got = c.get(f"/api/jobs/{job['id']}").get_json()
    assert got["config"] == {"depth": 2, "dataset": "demo", "max_steps": 20}
    assert got["queue_position"] is not None and got["why_waiting"]
    r = post_json(c, f"/api/jobs/{job['id']}/cancel", {})
    assert r.status_code == 200 and r.get_json()["status"] == "cancelled"
    r = post_json(c, f"/api/jobs/{job['id']}/cancel", {})
    assert r.status_code == 409


@pytest.mark.parametrize("body, status, message", [
    ({"dataset": "demo"}, 400, "'depth' is required"),
    ({"depth": 99, "dataset": "demo"}, 400, "between 1 and 32"),
    ({"depth": 2, "dataset": "demo", "bogus": 1}, 400, "unknown config key"),
    ({"depth": "2", "dataset": "demo"}, 400, "must be an integer"),
    ({"depth": 2, "dataset": "http://127.0.0.1/x.txt"}, 400, ""),
    ({"depth": 2, "dataset": "ds:999"}, 404, ""),
])
def test_bad_job_configs_answer_with_the_reason(app, alice, body, status, message):
    r = post_json(client_as(app, alice), "/api/jobs", body)
    assert r.status_code == status, r.get_json()
    assert message in r.get_json()["error"]["message"]
    assert TrainingJob.select().count() == 0


def test_a_job_api_write_needs_json_or_a_token(app, alice):
    c = client_as(app, alice)
    r = c.post("/api/jobs", data={"depth": "2", "dataset": "demo"})  # a cross-site form could send this
    assert r.status_code == 403


def test_another_users_job_and_model_answer_404_everywhere(app, alice, charlie):
    a = client_as(app, alice)
    job_id = post_json(a, "/api/jobs", {"depth": 1, "dataset": "demo", "max_steps": 5}).get_json()["id"]
    model = Model.create(user=alice, job=job_id, name="m", checkpoint_key="users/1/models/1/x", tokenizer_key="t")
    c = client_as(app, charlie)
    for method, url in [("get", f"/api/jobs/{job_id}"), ("post", f"/api/jobs/{job_id}/cancel"),
                        ("get", f"/api/jobs/{job_id}/events"), ("get", f"/api/jobs/{job_id}/log"),
                        ("get", f"/jobs/{job_id}"), ("get", f"/api/models/{model.id}"),
                        ("get", f"/api/models/{model.id}/download"), ("get", f"/models/{model.id}")]:
        r = post_json(c, url, {}) if method == "post" else c.get(url)
        assert r.status_code == 404, (url, r.status_code)
    assert c.get("/api/jobs").get_json()["jobs"] == []
    assert c.get("/api/models").get_json()["models"] == []
    assert TrainingJob.get_by_id(job_id).status == "queued"  # charlie's cancel did nothing


def test_the_api_needs_a_sign_in_from_another_machine(app):
    c = app.test_client()
    c.environ_base.update(REMOTE)
    assert c.get("/api/jobs").status_code == 401
    assert c.get("/api/estimate?depth=2").status_code == 401


def test_solo_mode_needs_no_sign_in_from_this_machine(app):
    r = post_json(app.test_client(), "/api/jobs", {"depth": 1, "dataset": "demo", "max_steps": 3})
    assert r.status_code == 201


def test_an_api_key_works_from_anywhere(app, alice):
    from nanochat_studio import auth

    _, key = auth.create_api_key(alice, "script")
    c = app.test_client()
    c.environ_base.update(REMOTE)
    r = c.post("/api/jobs", json={"depth": 1, "dataset": "demo"}, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 201
    assert TrainingJob.get_by_id(r.get_json()["id"]).user_id == alice.id


def _sse_events(raw: str) -> list[dict]:
    events = []
    for block in raw.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "data" in fields:
            events.append({"id": fields.get("id"), "event": fields.get("event"), "data": json.loads(fields["data"])})
    return events


def test_the_event_stream_replays_from_last_event_id_and_ends_with_the_job(app, alice):
    c = client_as(app, alice)
    job_id = post_json(c, "/api/jobs", {"depth": 1, "dataset": "demo", "max_steps": 3}).get_json()["id"]
    for step in (1, 2, 3):
        jobs.record_event(job_id, "step", {"step": step, "total_steps": 3, "loss": 5.0 - step})
    jobs.request_cancel(job_id)  # queued -> cancelled: the stream has an end

    events = _sse_events(c.get(f"/api/jobs/{job_id}/events").get_data(as_text=True))
    steps = [e for e in events if e["event"] == "step"]
    assert [e["data"]["step"] for e in steps] == [1, 2, 3]
    assert events[-1]["event"] == "end" and events[-1]["data"]["status"] == "cancelled"
    ids = [int(e["id"]) for e in events if e["id"]]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    state = [e for e in events if e["event"] == "state"]
    assert state and state[-1]["data"]["job"]["status"] == "cancelled"

    # A browser that reconnects after the second step gets the rest and nothing twice.
    second = next(int(e["id"]) for e in steps if e["data"]["step"] == 2)
    again = _sse_events(c.get(f"/api/jobs/{job_id}/events", headers={"Last-Event-ID": str(second)})
                        .get_data(as_text=True))
    assert [e["data"]["step"] for e in again if e["event"] == "step"] == [3]
    assert all(int(e["id"]) > second for e in again if e["id"])


def test_the_event_stream_delivers_events_that_arrive_while_it_is_open(app, alice):
    c = client_as(app, alice)
    job_id = post_json(c, "/api/jobs", {"depth": 1, "dataset": "demo", "max_steps": 3}).get_json()["id"]

    def later():
        import time

        time.sleep(0.6)
        with database.connection_context():
            jobs.record_event(job_id, "step", {"step": 1, "total_steps": 3, "loss": 4.0})
            jobs.request_cancel(job_id)

    t = threading.Thread(target=later)
    t.start()
    events = _sse_events(c.get(f"/api/jobs/{job_id}/events").get_data(as_text=True))
    t.join()
    assert [e["data"]["step"] for e in events if e["event"] == "step"] == [1]
    assert events[-1]["event"] == "end"


def test_plan_page_form_submits_a_job_and_shows_errors(app, alice):
    c = client_as(app, alice)
    page = c.get("/train")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert 'type="range"' in html and 'max="32"' in html and "Advanced settings" in html
    token = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
    r = c.post("/train", data={"csrf_token": token, "depth": "2", "source": "demo", "max_steps": "abc"})
    assert r.status_code == 400 and "must be a whole number" in r.get_data(as_text=True)
    r = c.post("/train", data={"csrf_token": token, "depth": "2", "source": "demo", "max_steps": "7",
                               "name": "<b>mine</b>"})
    assert r.status_code == 302
    job = TrainingJob.get()
    assert r.headers["Location"].endswith(f"/jobs/{job.id}")
    assert job.config["max_steps"] == 7
    show = c.get(f"/jobs/{job.id}").get_data(as_text=True)
    assert "&lt;b&gt;mine&lt;/b&gt;" in show and "<b>mine</b>" not in show
    assert c.post("/train", data={"depth": "2", "source": "demo"}).status_code == 400  # no CSRF token


def test_a_finished_jobs_page_does_not_say_it_is_queued(app, alice):
    c = client_as(app, alice)
    token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/train").get_data(as_text=True)).group(1)
    r = c.post("/train", data={"csrf_token": token, "depth": "1", "source": "demo", "max_steps": "5"})
    job = TrainingJob.get()
    claimed = jobs.claim_next("test", "cpu0")  # the job runs and finishes before its page is read
    assert claimed.id == job.id
    assert jobs.transition(job.id, "running", expect={"preparing"}, attempt=claimed.attempt)
    assert jobs.finish(job.id, claimed.attempt, "completed") == "completed"
    show = c.get(r.headers["Location"]).get_data(as_text=True)  # with the submit's message
    assert f"Submitted job #{job.id}." in show
    assert "queued" not in show and 'class="badge status-completed">completed<' in show


def test_uploading_a_dataset_then_training_on_it(app, alice):
    import io

    c = client_as(app, alice)
    page = c.get("/train").get_data(as_text=True)
    token = re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)
    text = ("The cat sat on the mat. " * 400).encode()
    r = c.post("/api/datasets", data={"file": (io.BytesIO(text), "cats.txt")}, headers={"X-CSRFToken": token},
               content_type="multipart/form-data")
    assert r.status_code == 201, r.get_json()
    ds = r.get_json()
    assert ds["size_bytes"] == len(text) and ds["spec"] == f"ds:{ds['id']}"
    e = c.get(f"/api/estimate?depth=1&dataset=ds:{ds['id']}").get_json()
    assert e["data"]["bytes"] == len(text)
    r = post_json(c, "/api/jobs", {"depth": 1, "dataset": ds["spec"], "max_steps": 5})
    assert r.status_code == 201
    assert r.get_json()["config"]["dataset"] == ds["spec"]
    assert client_as(app, alice).get("/api/datasets").get_json()["datasets"][0]["id"] == ds["id"]


def test_advanced_settings_reach_the_job_config_and_bad_ones_are_refused(app, alice):
    c = client_as(app, alice)
    body = {"depth": 2, "dataset": "demo", "matrix_lr": 0.01, "embedding_lr": 0.1, "unembedding_lr": 0.002,
            "vocab_size": 1024, "seed": 7, "seq_len": 128, "batch_size": 4}
    r = post_json(c, "/api/jobs", body)
    assert r.status_code == 201, r.get_json()
    assert {k: v for k, v in r.get_json()["config"].items() if k != "dataset"} == {k: v for k, v in body.items()
                                                                                   if k != "dataset"}
    for bad, message in [({"matrix_lr": -1}, "must be above 0"), ({"matrix_lr": "fast"}, "must be a number"),
                         ({"embedding_lr": 50}, "at most 10"), ({"vocab_size": 100}, "between")]:
        r = post_json(c, "/api/jobs", {"depth": 2, "dataset": "demo", **bad})
        assert r.status_code == 400 and message in r.get_json()["error"]["message"], (bad, r.get_json())


def test_a_long_job_replays_every_event_even_past_one_page(app, alice, monkeypatch):
    from nanochat_studio.views import api

    monkeypatch.setattr(api, "EVENT_PAGE", 3)  # pages of 3 events: 7 steps take three reads
    c = client_as(app, alice)
    job_id = post_json(c, "/api/jobs", {"depth": 1, "dataset": "demo", "max_steps": 7}).get_json()["id"]
    for step in range(1, 8):
        jobs.record_event(job_id, "step", {"step": step, "total_steps": 7, "loss": 1.0})
    jobs.request_cancel(job_id)
    events = _sse_events(c.get(f"/api/jobs/{job_id}/events").get_data(as_text=True))
    assert [e["data"]["step"] for e in events if e["event"] == "step"] == list(range(1, 8))
    assert events[-1]["event"] == "end"
