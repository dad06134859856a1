"""Scaled out with no shared disk: one web process and two workers, each in its own network namespace
with its own hostname and data directory (tests/netlab.py), sharing only PostgreSQL, Redis and an S3
server. The tests run in order on one cluster: 20 jobs drain with none run twice; the web restarts while
a browser and SSE clients watch, and none misses an event; a worker is killed with SIGKILL mid-run and
the other resumes its job from the checkpoint its trainer wrote on SIGTERM, read from S3."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.cluster import PASSWORD, Cluster, SseClient
from tests.conftest import TEST_DB
from tests.netlab import Lab

pytestmark = [
    pytest.mark.process,
    pytest.mark.slow,  # 1.5-2 minutes: three processes, forty-odd trainers and their mirrors on 2 cores
    pytest.mark.skipif(TEST_DB == "postgres", reason="it runs its own PostgreSQL in both passes; once is enough"),
    pytest.mark.skipif(not Path("/usr/lib/postgresql/15/bin/initdb").exists(), reason="no PostgreSQL server"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scaleout")
    with Lab(tmp) as lab:
        c = Cluster(lab, tmp, workers=2, env={"FAKE_STEP_S": "0.05"})
        c.key = c.api_key("alice")
        try:
            yield c
        finally:
            c.stop()


def wait_until(predicate, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out waiting")


def fake_log(cluster: Cluster, worker: str, job_id: int) -> list[dict]:
    path = cluster.home(worker) / "runs" / f"job-{job_id}" / "fake_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def db_events(cluster: Cluster, job_id: int) -> list[tuple[int, str, dict]]:
    from nanochat_studio import db
    from nanochat_studio.models import JobEvent

    db.open_database(cluster.database_url)
    try:
        return [(e.seq, e.kind, e.data) for e in JobEvent.select().where(JobEvent.job == job_id).order_by(JobEvent.seq)]
    finally:
        db.database.close()


def test_the_cluster_is_separate_machines(cluster):
    web, workers = cluster.web_machine, [m for m, _ in cluster.workers]
    if not cluster.lab.isolated:
        pytest.skip("ip netns is not available here: the processes share loopback (separate directories only)")
    assert len({web.ip, *(m.ip for m in workers)}) == 3 and cluster.lab.host_ip not in (web.ip,)
    for machine, proc in cluster.workers:  # the pid we hold is the worker itself, on its own hostname
        assert b"nanochat_studio" in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert proc.pid in machine.pids()


def test_twenty_jobs_drain_across_two_workers_and_none_runs_twice(cluster):
    ids = [cluster.api(cluster.key, "/api/jobs", {"depth": 1, "dataset": "demo", "max_steps": 3,
                                                  "checkpoint_every": 3, "name": f"drain {i}"})["id"]
           for i in range(20)]

    def all_done():
        cluster.check_alive()
        jobs = cluster.api(cluster.key, "/api/jobs")["jobs"]
        mine = [j for j in jobs if j["id"] in ids]
        return all(j["status"] in ("completed", "failed", "cancelled") for j in mine) and mine

    final = wait_until(all_done, timeout=120, interval=0.5)
    assert {j["status"] for j in final} == {"completed"}, [(j["id"], j["status"], j["status_reason"]) for j in final]
    assert all(j["attempt"] == 1 for j in final)
    ran_on = {}
    for job_id in ids:
        runs = {w: fake_log(cluster, w, job_id) for w in ("w1", "w2")}
        begins = [(w, r) for w, log in runs.items() for r in log if r["kind"] == "begin"]
        assert len(begins) == 1, (job_id, begins)  # one trainer, on one machine, once
        worker = begins[0][0]
        assert [r["step"] for r in runs[worker] if r["kind"] == "step"] == [1, 2, 3]
        ran_on[job_id] = worker
        kinds = [kind for _, kind, data in db_events(cluster, job_id)]
        assert kinds.count("start") == 1 and kinds.count("done") == 1
    assert set(ran_on.values()) == {"w1", "w2"}  # both machines took work
    model = cluster.api(cluster.key, f"/api/jobs/{ids[0]}")["model"]
    assert model and model["step"] == 3  # published to S3 by the worker, read back through the web


@pytest.mark.browser
def test_sse_clients_and_a_browser_miss_no_event_across_a_web_restart(cluster, browser):
    # 30 s of training at 0.05 s a step: long enough that the job still runs after the web is back, even
    # when a loaded machine takes ten seconds or more to sign the browser in and restart the web.
    total = 600
    job_id = cluster.api(cluster.key, "/api/jobs", {"depth": 1, "dataset": "demo", "max_steps": total,
                                                    "checkpoint_every": 100, "name": "watched"})["id"]
    wait_until(lambda: (cluster.api(cluster.key, f"/api/jobs/{job_id}")["progress"] or {}).get("step"), timeout=30)
    clients = [SseClient(cluster.web_machine.ip, cluster.web_port, f"/api/jobs/{job_id}/events", cluster.key)
               for _ in range(8)]
    for c in clients:
        c.start()
    page = browser.new_page()
    try:
        page.goto(f"{cluster.url}/account/login?next=/jobs/{job_id}")
        page.fill("#email", "alice@example.com")
        page.fill("#password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(f"{cluster.url}/jobs/{job_id}")
        wait_until(lambda: page.evaluate("window.__jobPage && window.__jobPage.loss.step.length > 0"), timeout=20)
        wait_until(lambda: all(c.connects == 1 and c.ids for c in clients), timeout=20)
        step_before = page.evaluate("window.__jobPage.loss.step.length")
        took = cluster.stop_web()  # SIGTERM, as a rolling update or systemd does
        seen_at_stop = max(c.ids[-1] for c in clients)
        cluster.start_web()
        recorded_while_down = db_events(cluster, job_id)[-1][0]
        wait_until(lambda: all(c.ended for c in clients), timeout=90)
        wait_until(lambda: page.text_content("#status") == "completed", timeout=30)
        steps = page.evaluate("window.__jobPage.loss.step")
    finally:
        page.close()
    seqs = [seq for seq, _, _ in db_events(cluster, job_id)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert seen_at_stop < recorded_while_down < seqs[-1]  # events came while no web was up, and after
    for c in clients:
        assert c.connects >= 2  # it was cut off by the restart and came back
        assert c.ids == seqs  # every event once, in order: nothing missed, nothing repeated
    assert 0 < step_before < total and steps == list(range(1, total + 1))  # the browser's chart: every step once
    print(f"web stopped in {took:.1f} s; the browser and {len(clients)} SSE clients reconnected")


def test_a_worker_killed_mid_run_is_resumed_by_the_other_from_its_sigterm_checkpoint_in_s3(cluster):
    # checkpoint_every 100: nothing periodic before the kill, so the step resumed from is the one the
    # trainer wrote on SIGTERM after its worker died, uploaded by that worker's surviving mirror sidecar.
    job_id = cluster.api(cluster.key, "/api/jobs", {"depth": 1, "dataset": "demo", "max_steps": 120,
                                                    "checkpoint_every": 100, "name": "killed"})["id"]
    first = wait_until(lambda: next((w for w in ("w1", "w2") if fake_log(cluster, w, job_id)), None), timeout=30)
    other = "w2" if first == "w1" else "w1"
    wait_until(lambda: sum(r["kind"] == "step" for r in fake_log(cluster, first, job_id)) >= 10, timeout=30)
    machine, proc = cluster.worker(first)
    proc.killed_on_purpose = True
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    final = wait_until(lambda: (j := cluster.api(cluster.key, f"/api/jobs/{job_id}"))["status"] in
                       ("completed", "failed") and j, timeout=90, interval=0.5)
    assert final["status"] == "completed", final["status_reason"]
    a, b = fake_log(cluster, first, job_id), fake_log(cluster, other, job_id)
    a_end = [r for r in a if r["kind"] == "end"]
    assert a_end and a_end[0]["rc"] == 75  # its trainer got SIGTERM when the worker died, and checkpointed
    resumed = b[0]["resumed_from"]
    assert resumed == a_end[0]["step"] >= 10
    assert [r["step"] for r in b if r["kind"] == "step"] == list(range(resumed + 1, 121))
    assert max(r["t"] for r in a) < b[0]["t"]  # one trainer at a time
    events = db_events(cluster, job_id)
    restores = [data for _, kind, data in events if kind == "restore"]
    assert len(restores) == 1 and restores[0]["key"].endswith(f"/step_{resumed:07d}")
    assert final["attempt"] == 2
    assert not (cluster.home(other) / "runs" / f"job-{job_id}" / "events-1.jsonl").exists()  # no shared disk
    mirror_log = (cluster.home(first) / "runs" / f"job-{job_id}" / "mirror.log").read_text()
    assert "the supervisor is gone" in mirror_log
    log = cluster.api(cluster.key, f"/api/jobs/{job_id}/log")["text"]
    assert log.count("fake trainer starting") == 2  # both attempts' lines, from S3, through the web
