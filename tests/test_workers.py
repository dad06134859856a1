"""The worker registry (who consumes the queue, on what devices, alive or not) and what the submit path
does with it (issue 10, point 6): work no live worker can run is refused with the numbers; with no
worker up yet a job is accepted with a warning."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from conftest import client_as, make_user

from nanochat_studio import tasks, workers
from nanochat_studio.db import database
from nanochat_studio.models import JobEvent, TrainingJob, WorkerProcess, utcnow
from tests.test_jobs_api import fake_calibrator

GiB = 1 << 30


@pytest.fixture(autouse=True)
def _no_background_calibration(app):
    fake_calibrator(app)  # submit records an estimate: no torch process here


def register(name: str, devices: list[dict], *, seen: dt.datetime | None = None, beat: float = 5.0) -> None:
    """A worker row as another machine's consumer would write it."""
    database.connect(reuse_if_open=True)
    now = seen or utcnow()
    WorkerProcess.create(id=name, host=name, pid=1, role="worker", devices=devices, started_at=now,
                         last_seen_at=now, beat_seconds=beat, gpu_count=sum(len(d["gpus"]) for d in devices))


def gpu(index: int, memory: int, name: str = "NVIDIA L4") -> dict:
    return {"slot": f"gpu{index}", "device": "cuda", "device_name": name, "memory_bytes": memory,
            "gpus": [{"gpu": str(index), "uuid": f"GPU-{index}"}]}


CPU = {"slot": "cpu0", "device": "cpu", "device_name": "a CPU", "memory_bytes": 16 * GiB, "gpus": []}
HUGE = {"depth": 32, "seq_len": 65536, "batch_size": 65536, "dataset": "demo"}


def post(client, body):
    return client.post("/api/jobs", data=json.dumps(body), content_type="application/json")


# --- the registry ---------------------------------------------------------------------------------------

def test_a_consumer_registers_its_slots_and_leaves_when_stopped(settings):
    import dataclasses

    s = dataclasses.replace(settings, gpus="none", cpu_slots=2, reconcile_seconds=0.2)
    handle = tasks.start_consumer(s)
    try:
        database.connect(reuse_if_open=True)
        (row,) = [w for w in workers.live() if w.id == handle.local.worker_id]
        assert row.role == "serve" and row.gpu_count == 0 and [d["slot"] for d in row.devices] == ["cpu0", "cpu1"]
        assert all(d["device"] == "cpu" and d["memory_bytes"] > GiB for d in row.devices)
        first_seen = row.last_seen_at
        database.close()
        from tests.test_runner import wait_for

        def renewed() -> bool:
            with database.connection_context():
                return WorkerProcess.get_by_id(row.id).last_seen_at > first_seen

        wait_for(renewed, timeout=5)  # the reconciler's tick is its heartbeat
    finally:
        tasks.stop_consumer(handle, timeout=10)
    database.connect(reuse_if_open=True)
    assert handle.local.worker_id not in [w.id for w in workers.all_rows()]


def test_a_worker_that_stopped_beating_is_not_live_and_is_forgotten_later(app):
    now = utcnow()
    register("fresh", [CPU], seen=now - dt.timedelta(seconds=20), beat=5.0)   # 3 x 5 s + 10 s slack: live
    register("silent", [CPU], seen=now - dt.timedelta(seconds=30), beat=5.0)  # beyond: gone
    register("ancient", [CPU], seen=now - dt.timedelta(hours=2))
    assert [w.id for w in workers.live(now)] == ["fresh"]
    assert workers.heartbeat("fresh")
    assert {w.id for w in workers.all_rows()} == {"fresh", "silent"}  # the long-gone one was deleted
    assert not workers.heartbeat("nobody")  # the caller registers again


# --- admission ---------------------------------------------------------------------------------------------

def test_with_no_worker_up_a_job_is_accepted_with_a_warning(app):
    c = client_as(app, make_user("alice"))
    r = post(c, {"depth": 2, "dataset": "demo", "gpus": 2})
    assert r.status_code == 201, r.get_json()
    job = r.get_json()
    assert job["why_waiting"].startswith("waiting for a worker: none is running")
    submitted = JobEvent.get((JobEvent.job == job["id"]) & (JobEvent.seq == 1)).data
    assert "No worker is running right now" in submitted["warning"]


def test_gpus_no_live_worker_has_are_refused_with_what_there_is(app):
    c = client_as(app, make_user("alice"))
    register("cpu-box", [CPU])
    r = post(c, {"depth": 2, "dataset": "demo", "gpus": 2})
    assert r.status_code == 400
    msg = r.get_json()["error"]["message"]
    assert "'gpus' asks for 2" in msg and "no GPU (CPU only)" in msg and "cpu-box" in msg
    register("gpu-a", [gpu(0, 24 * GiB)])
    msg = post(c, {"depth": 2, "dataset": "demo", "gpus": 2}).get_json()["error"]["message"]
    assert "at most 1 GPU" in msg and "gpu-a (pid 1): 1 GPU" in msg
    assert TrainingJob.select().count() == 0  # nothing was queued
    register("gpu-b", [gpu(0, 24 * GiB), gpu(1, 24 * GiB)])
    assert post(c, {"depth": 2, "dataset": "demo", "gpus": 2}).status_code == 201
    assert post(c, {"depth": 2, "dataset": "demo"}).status_code == 201


def test_a_shape_that_fits_no_device_is_refused_with_the_numbers(app):
    c = client_as(app, make_user("alice"))
    register("gpu-a", [gpu(0, 24 * GiB)])
    register("cpu-box", [CPU])
    r = post(c, HUGE)
    assert r.status_code == 400
    msg = r.get_json()["error"]["message"]
    assert "needs about" in msg and "won't fit" in msg and "depth 32" in msg and "seq_len 65536" in msg
    assert "the largest device of the running workers is NVIDIA L4 with 24.0 GiB" in msg
    assert post(c, {"depth": 4, "dataset": "demo", "seq_len": 256, "batch_size": 8}).status_code == 201


def test_memory_is_judged_per_gpu_with_the_batch_split_and_unknown_memory_is_accepted(app):
    c = client_as(app, make_user("alice"))
    register("gpu-pair", [gpu(0, 40 * GiB), gpu(1, 40 * GiB)])
    big = {"depth": 12, "dataset": "demo", "seq_len": 2048, "batch_size": 64}  # ~68 GiB; ~34 GiB per GPU of 2
    one = post(c, big)
    two = post(c, {**big, "gpus": 2})
    assert one.status_code == 400 and two.status_code == 201, (one.get_json(), two.get_json())
    database.connect(reuse_if_open=True)
    WorkerProcess.delete().execute()
    register("no-nvml", [gpu(0, 0)])  # a GPU whose memory could not be read: nothing to judge by
    assert post(c, HUGE).status_code == 201


def test_the_plan_page_shows_the_refusal(app):
    c = client_as(app, make_user("alice"))
    register("cpu-box", [CPU])
    r = c.get("/train")
    token = r.get_data(as_text=True).split('name="csrf_token" value="')[1].split('"')[0]
    r = c.post("/train", data={"csrf_token": token, "depth": "32", "seq_len": "65536", "batch_size": "65536",
                               "source": "demo"})
    assert r.status_code == 400 and "won&#39;t fit" in r.get_data(as_text=True)


def test_the_admin_page_lists_workers_and_quarantined_gpus_and_returns_one_to_service(app, settings):
    from nanochat_studio import quarantine

    admin = make_user("admin", admin=True)
    register("gpu-a", [gpu(0, 24 * GiB)])
    register("gone", [CPU], seen=utcnow() - dt.timedelta(minutes=5))
    row = quarantine.quarantine("3", fault="cuda", reason="CUDA error: <b>bad</b>", job_id=None,
                                settings=app.config["NCS_SETTINGS"])
    c = client_as(app, admin)
    page = c.get("/admin/workers").get_data(as_text=True)
    assert "gpu-a" in page and "NVIDIA L4 (24.0 GiB)" in page and "gone" in page
    assert "CUDA error: &lt;b&gt;bad&lt;/b&gt;" in page  # untrusted text stays text
    assert client_as(app, make_user("bob")).get("/admin/workers").status_code == 403
    token = page.split('name="csrf_token" value="')[1].split('"')[0]
    r = c.post(f"/admin/gpus/{row.id}/clear", data={"csrf_token": token})
    assert r.status_code == 302
    assert quarantine.rows() == []
    assert c.post(f"/admin/gpus/{row.id}/clear", data={"csrf_token": token}).status_code == 404
    assert c.post(f"/admin/gpus/{row.id}/clear").status_code == 400  # no CSRF token, no change
