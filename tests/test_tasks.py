"""The real queue: a huey consumer in threads (as inside serve) or in its own process, real trainers."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nanochat_studio import jobs, tasks
from nanochat_studio.models import TrainingJob
from tests.test_jobs import REPO, alice, bob, open_store, settings, store  # noqa: F401
from tests.test_runner import fake_log, states, wait_for


@pytest.fixture
def consumer(settings):
    handles = []

    def start(s=None):
        handle = tasks.start_consumer(s or settings)
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        tasks.stop_consumer(handle, timeout=30)


def test_a_consumer_stopped_while_it_is_still_starting_stops_cleanly(store, settings, monkeypatch):
    """`serve` told to stop as it came up (CI caught it: SIGTERM right after "Serving on"): huey's
    graceful stop joined worker threads the consumer thread had not started yet and raised
    "cannot join thread before it is started". The stop now waits for the start to finish."""
    real_start = tasks._ThreadConsumer.start

    def slow_start(self):
        time.sleep(0.3)  # the consumer thread is still on its way to starting the workers
        real_start(self)

    monkeypatch.setattr(tasks._ThreadConsumer, "start", slow_start)
    handle = tasks.start_consumer(settings)
    assert not handle.consumer.started.is_set()
    tasks.stop_consumer(handle, timeout=30)
    assert handle.consumer.started.is_set()
    assert not handle.thread.is_alive()
    assert not any(t.is_alive() for _, t in handle.consumer.worker_threads)


def status_of(job) -> str:
    return TrainingJob.get_by_id(job.id).status


def submit(user, settings, **config):
    job = jobs.submit(user, {"depth": 1, "dataset": "demo", "max_steps": 6, "checkpoint_every": 3, **config},
                      settings)
    tasks.enqueue_job(job.id, settings)
    return job


def test_make_huey_picks_the_storage_from_the_queue_url(settings):
    from huey import RedisHuey, SqliteHuey

    assert isinstance(tasks.make_huey(settings), SqliteHuey)
    assert tasks.make_huey(settings) is tasks.make_huey(settings)
    redis = dataclasses.replace(settings, queue_url="redis://127.0.0.1:1/0")
    assert isinstance(tasks.make_huey(redis), RedisHuey)
    with pytest.raises(ValueError, match="queue_url"):
        tasks.make_huey(dataclasses.replace(settings, queue_url="amqp://x"))


def test_a_submitted_job_starts_within_two_seconds_and_completes(alice, settings, consumer):
    consumer()
    time.sleep(1.0)  # let the idle consumer back off to its longest poll
    t0 = time.monotonic()
    job = submit(alice, settings)
    wait_for(lambda: fake_log(settings, job))
    started = time.monotonic() - t0
    wait_for(lambda: status_of(job) == "completed")
    assert started < 2.0, f"submit to trainer start took {started:.2f} s"
    assert states(job) == ["queued", "preparing", "running", "completed"]


def test_jobs_wait_for_the_one_cpu_slot_and_run_one_at_a_time(alice, bob, settings, consumer):
    consumer()
    subs = [submit(alice, settings), submit(bob, settings), submit(alice, settings)]
    for job in subs:
        wait_for(lambda: status_of(job) == "completed", timeout=40)
    spans = sorted((min(r["t"] for r in fake_log(settings, j)), max(r["t"] for r in fake_log(settings, j)))
                   for j in subs)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # never two trainers at once
    assert [TrainingJob.get_by_id(j.id).attempt for j in subs] == [1, 1, 1]


@pytest.mark.process
def test_stopping_the_consumer_checkpoints_and_requeues_without_using_an_attempt(alice, settings, consumer,
                                                                                 monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.1")
    handle = consumer()
    job = submit(alice, settings, max_steps=60, checkpoint_every=50)
    wait_for(lambda: (TrainingJob.get_by_id(job.id).progress or {}).get("step", 0) >= 3)
    tasks.stop_consumer(handle, timeout=30)
    job = TrainingJob.get_by_id(job.id)
    assert job.status == "queued" and job.not_before is None and jobs.charged_failures(job.id) == 0
    assert "the server shut down" in job.status_reason
    first = fake_log(settings, job)
    assert first[-1]["kind"] == "end" and first[-1]["rc"] == 75
    monkeypatch.setenv("FAKE_STEP_S", "0.01")
    consumer()  # the next start picks the job up again: reconcile at start rings
    wait_for(lambda: status_of(job) == "completed", timeout=30)
    begins = [r for r in fake_log(settings, job) if r["kind"] == "begin"]
    assert begins[1]["resumed_from"] == first[-1]["step"]


@pytest.mark.process
def test_a_killed_trainer_is_retried_after_its_back_off_by_the_consumer(alice, settings, consumer, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.1")
    consumer()
    job = submit(alice, settings, max_steps=12, checkpoint_every=4)
    wait_for(lambda: (TrainingJob.get_by_id(job.id).progress or {}).get("step", 0) >= 5)
    os.kill(fake_log(settings, job)[0]["pid"], signal.SIGKILL)
    wait_for(lambda: status_of(job) == "completed", timeout=30)
    job = TrainingJob.get_by_id(job.id)
    assert job.attempt == 2 and jobs.charged_failures(job.id) == 1
    assert [r["resumed_from"] for r in fake_log(settings, job) if r["kind"] == "begin"] == [None, 4]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server is not installed")
def test_the_queue_can_live_in_redis(alice, settings, consumer, tmp_path):
    port = _free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL, cwd=tmp_path)
    try:
        redis_settings = dataclasses.replace(settings, queue_url=f"redis://127.0.0.1:{port}/0")
        wait_for(lambda: _answers(port), timeout=10)
        consumer(redis_settings)
        job = submit(alice, redis_settings)
        wait_for(lambda: status_of(job) == "completed", timeout=30)
    finally:
        server.terminate()
        server.wait()


# --- the serve process killed with kill -9 ---------------------------------------------------------------

SERVE_LIKE = """
import json, os, sys
from tests.test_jobs import open_store
from nanochat_studio import tasks
from nanochat_studio.settings import Settings
settings = Settings(**json.loads(os.environ["NCS_TEST_SETTINGS"]))
open_store(settings.database_url)
print("consumer running", flush=True)
tasks.run_worker(settings)
"""


def start_serve_like(settings, log: Path) -> subprocess.Popen:
    env = dict(os.environ, NCS_TEST_SETTINGS=json.dumps(dataclasses.asdict(settings)), PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", SERVE_LIKE], cwd=REPO, env=env, stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT)


@pytest.mark.process
@pytest.mark.sqlite_only  # the child process opens the SQLite URL itself (conftest redirects only ours)
def test_it_resumes_after_the_serve_process_is_killed(alice, settings, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_STEP_S", "0.1")
    # A long lease on purpose: recovery must not wait for it (the dead holder's pid is noticed).
    s = dataclasses.replace(settings, lease_seconds=60, retry_backoff_seconds=0.2)
    first = start_serve_like(s, tmp_path / "serve1.log")
    try:
        job = submit(alice, s, max_steps=40, checkpoint_every=5)
        wait_for(lambda: (TrainingJob.get_by_id(job.id).progress or {}).get("step", 0) >= 12, timeout=30)
        first.send_signal(signal.SIGKILL)
        first.wait()
        t_killed = time.time()
        second = start_serve_like(s, tmp_path / "serve2.log")
        try:
            wait_for(lambda: status_of(job) == "completed", timeout=60)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    job = TrainingJob.get_by_id(job.id)
    log = fake_log(s, job)
    begins = [r for r in log if r["kind"] == "begin"]
    assert len(begins) == 2 and all(b["lock_held"] for b in begins)
    old, new = begins[0]["pid"], begins[1]["pid"]
    old_end = [r for r in log if r["kind"] == "end" and r["pid"] == old]
    assert old_end and old_end[0]["rc"] == 75  # it got SIGTERM when its supervisor died, and checkpointed
    ckpt = begins[1]["resumed_from"]
    assert ckpt == old_end[0]["step"] and ckpt >= 12
    assert [r["step"] for r in log if r["kind"] == "step" and r["pid"] == new] == list(range(ckpt + 1, 41))
    assert max(r["t"] for r in log if r["pid"] == old) < begins[1]["t"]  # one trainer at a time
    assert begins[1]["t"] - t_killed < 15  # no waiting out the 60 s lease
    assert job.attempt == 2 and "its worker process died" in " ".join(
        e.data.get("reason", "") for e in jobs.events_since(job) if e.kind == "state")
    trainers = (Path(s.runs_dir) / f"job-{job.id}" / "trainers.txt").read_text()
    assert "attempt=1" in trainers and "attempt=2" in trainers


@pytest.fixture
def restartable_postgres(postgres_server):
    """A fresh database whose teardown reconnects (conftest's ``postgres`` keeps one admin connection,
    which a server restart breaks)."""
    import uuid

    import psycopg2

    def admin():
        conn = psycopg2.connect(host="127.0.0.1", port=postgres_server["port"], user="postgres", dbname="postgres")
        conn.autocommit = True
        return conn

    name = "t_" + uuid.uuid4().hex[:16]
    conn = admin()
    conn.cursor().execute(f"CREATE DATABASE {name}")
    conn.close()
    yield f"postgresql://postgres@127.0.0.1:{postgres_server['port']}/{name}"
    from nanochat_studio.db import database

    database.close()
    conn = admin()
    conn.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    conn.close()


def restart_postgres(server) -> None:
    # With -l the restarted server does not inherit our stdout; a captured pipe would never close.
    data = f"{server['base']}/data"
    subprocess.run(["runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/pg_ctl", "-D", data,
                    "-l", f"{server['base']}/log", "-m", "fast", "-w", "restart"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.process
@pytest.mark.postgres
def test_store_and_queue_in_postgresql_survive_a_database_restart_mid_run(restartable_postgres, postgres_server,
                                                                           settings, consumer, monkeypatch):
    from nanochat_studio.models import User

    postgres = restartable_postgres
    open_store(postgres)
    monkeypatch.setenv("FAKE_STEP_S", "0.1")
    pg = dataclasses.replace(settings, database_url=postgres, queue_url=postgres, lease_seconds=30)
    alice = User.create(email="alice@example.com", name="alice")
    consumer(pg)
    job = submit(alice, pg, max_steps=30, checkpoint_every=5)
    wait_for(lambda: (TrainingJob.get_by_id(job.id).progress or {}).get("step", 0) >= 5, timeout=30)
    restart_postgres(postgres_server)
    from nanochat_studio.db import database

    database.close()  # this test thread's own connection died with the server too
    wait_for(lambda: status_of(job) == "completed", timeout=60)
    job = TrainingJob.get_by_id(job.id)
    assert job.attempt == 1 and job.progress["step"] == 30  # the trainer was never disturbed
    second = submit(alice, pg)  # the queue still rings after the restart
    wait_for(lambda: status_of(second) == "completed", timeout=30)


# --- the real `nanochat-studio serve`, killed with kill -9 ---------------------------------------------

def start_serve(env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "nanochat_studio", "serve", "--port", "0"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=open(log, "ab"), text=True)
    for line in proc.stdout:
        if line.startswith("Serving on "):
            return proc, line.split()[-1].rstrip("/")
    raise AssertionError(f"serve did not start: {log.read_text()[-2000:]}")


def api(url: str, path: str, body: dict | None = None) -> dict:
    import urllib.request

    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.process
def test_it_resumes_after_the_real_serve_is_killed_with_sigkill(tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NCS_")}
    env.update(NCS_HOME=str(home), NCS_MODE="solo", NCS_TRAINER_MODULE="tests.fake_trainer", NCS_LEASE_SECONDS="60",
               NCS_RETRY_BACKOFF_SECONDS="0.2", PYTHONPATH=str(REPO), FAKE_STEP_S="0.1")
    first, url = start_serve(env, tmp_path / "serve1.log")
    second = None
    try:
        job = api(url, "/api/jobs", {"depth": 1, "dataset": "demo", "max_steps": 40, "checkpoint_every": 5})
        job_id = job["id"]
        wait_for(lambda: ((api(url, f"/api/jobs/{job_id}").get("progress") or {}).get("step") or 0) >= 12,
                 timeout=30)
        first.send_signal(signal.SIGKILL)
        first.wait()
        second, url = start_serve(env, tmp_path / "serve2.log")
        final = wait_for(lambda: (j := api(url, f"/api/jobs/{job_id}"))["status"] in ("completed", "failed") and j,
                         timeout=60)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    assert final["status"] == "completed", final
    log = [json.loads(line) for line in (home / "runs" / f"job-{job_id}" / "fake_log.jsonl").read_text().splitlines()]
    begins = [r for r in log if r["kind"] == "begin"]
    assert len(begins) == 2 and all(b["lock_held"] for b in begins)
    old_end = [r for r in log if r["kind"] == "end" and r["pid"] == begins[0]["pid"]]
    assert old_end and old_end[0]["rc"] == 75  # SIGTERM from the parent-death signal: it checkpointed
    ckpt = begins[1]["resumed_from"]
    assert ckpt == old_end[0]["step"]
    new_steps = [r["step"] for r in log if r["kind"] == "step" and r["pid"] == begins[1]["pid"]]
    assert new_steps == list(range(ckpt + 1, 41))  # nothing after the checkpoint was trained twice
    assert max(r["t"] for r in log if r["pid"] == begins[0]["pid"]) < begins[1]["t"]  # one trainer at a time


# --- timing runs for estimates -----------------------------------------------------------------------------

def test_a_calibration_takes_a_free_worker_slot_and_never_runs_beside_a_job(alice, settings, consumer, monkeypatch):
    # runner.calibrate is replaced by a stand-in that holds its slot until released: this checks the slot
    # accounting only (test_runner.py times a real shape).
    from nanochat_studio import runner
    from trainer import sizing

    shape = sizing.shape_for(1, 512, 32)
    assert tasks.calibrate_on_a_slot(settings, shape, 2) is None  # no consumer in this process: no slot
    timing, release, seen = threading.Event(), threading.Event(), {}

    def fake_calibrate(settings, shape, batch_size, *, slot=None, timeout=600):
        seen["slot"] = slot
        timing.set()
        release.wait(30)
        return {"tokens_per_sec": 1000.0}

    monkeypatch.setattr(runner, "calibrate", fake_calibrate)
    consumer()
    box = {}
    thread = threading.Thread(target=lambda: box.update(result=tasks.calibrate_on_a_slot(settings, shape, 2)))
    thread.start()
    assert timing.wait(10) and seen["slot"].name == "cpu0"
    job = submit(alice, settings)  # the one CPU slot is timing a shape: the job waits for it
    time.sleep(0.5)
    assert status_of(job) == "queued" and not fake_log(settings, job)
    release.set()
    thread.join(10)
    assert box["result"] == {"tokens_per_sec": 1000.0}
    wait_for(lambda: status_of(job) == "completed")  # the slot came back and the bell rang
    hold = threading.Event()
    monkeypatch.setattr(tasks.supervisor, "run_training", lambda job, slot, settings, stop=None: hold.wait(30))
    busy = submit(alice, settings)
    wait_for(lambda: status_of(busy) == "preparing")
    try:
        assert tasks.calibrate_on_a_slot(settings, shape, 2) is None  # a job holds the slot: no timing run
    finally:
        hold.set()


# --- GPU slots -----------------------------------------------------------------------------------------

def test_each_gpu_is_a_slot_with_its_own_cuda_visible_devices(alice, bob, settings, consumer, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.1")
    two = dataclasses.replace(settings, gpus="0,1", worker_threads=3)
    consumer(two)
    a, b = submit(alice, two, max_steps=10), submit(bob, two, max_steps=10)
    for job in (a, b):
        wait_for(lambda: status_of(job) == "completed", timeout=30)
    begin_a, begin_b = fake_log(two, a)[0], fake_log(two, b)[0]
    assert {begin_a["env_cuda"], begin_b["env_cuda"]} == {"0", "1"}
    end_a = max(r["t"] for r in fake_log(two, a))
    assert begin_b["t"] < end_a  # they trained side by side
    assert {TrainingJob.get_by_id(j.id).device for j in (a, b)} == {"gpu0", "gpu1"}


def test_a_job_asking_for_two_gpus_waits_for_both_and_gets_one_torchrun_slot(alice, bob, settings, consumer,
                                                                              monkeypatch):
    # The supervisor is replaced by a stand-in holding its slot until released: this checks the slot
    # accounting only (torchrun itself needs GPUs; runner.trainer_argv's torchrun command is tested apart).
    from nanochat_studio import supervisor

    release = {}
    seen = {}

    def hold(job, slot, settings, stop=None):
        seen[job.id] = slot
        event = release.setdefault(job.id, threading.Event())
        event.wait(30)
        jobs.transition(job.id, "running", expect={"preparing"}, attempt=job.attempt)
        return jobs.finish(job.id, job.attempt, "completed")

    monkeypatch.setattr(supervisor, "run_training", hold)
    two = dataclasses.replace(settings, gpus="0,1", worker_threads=4)
    consumer(two)
    single = submit(alice, two)
    wait_for(lambda: single.id in seen)
    double = submit(bob, two, gpus=2)
    time.sleep(0.5)
    assert double.id not in seen  # one GPU is busy
    assert jobs.why_waiting(TrainingJob.get_by_id(double.id), two).startswith(
        "waiting for a free set of 2 GPUs on one worker")
    release.setdefault(single.id, threading.Event()).set()
    wait_for(lambda: double.id in seen, timeout=10)
    assert seen[single.id].gpu_ids in (("0",), ("1",))
    assert seen[double.id].gpu_ids == ("0", "1") or seen[double.id].gpu_ids == ("1", "0")
    assert seen[double.id].name in ("gpu0+gpu1", "gpu1+gpu0")
    release.setdefault(double.id, threading.Event()).set()
    wait_for(lambda: status_of(double) == "completed")


@pytest.mark.process
@pytest.mark.slow  # two real trainer starts on 2 cores: ~60 s
def test_the_real_trainer_resumes_exactly_after_the_real_serve_is_killed(tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NCS_")}
    env.update(NCS_HOME=str(home), NCS_MODE="solo", NCS_LEASE_SECONDS="60", NCS_RETRY_BACKOFF_SECONDS="0.2",
               PYTHONPATH=str(REPO))
    first, url = start_serve(env, tmp_path / "serve1.log")
    second = None
    try:
        job_id = api(url, "/api/jobs", {"depth": 1, "dataset": "demo", "max_steps": 80, "checkpoint_every": 20,
                                        "batch_size": 2, "seq_len": 64})["id"]
        wait_for(lambda: ((api(url, f"/api/jobs/{job_id}").get("progress") or {}).get("step") or 0) >= 25,
                 timeout=180, interval=0.2)
        first.send_signal(signal.SIGKILL)
        first.wait()
        second, url = start_serve(env, tmp_path / "serve2.log")
        final = wait_for(lambda: (j := api(url, f"/api/jobs/{job_id}"))["status"] in ("completed", "failed") and j,
                         timeout=240, interval=0.5)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    run_dir = home / "runs" / f"job-{job_id}"
    assert final["status"] == "completed", (final, (run_dir / "train.log").read_text()[-3000:])

    def events(attempt: int) -> list[dict]:
        return [json.loads(line) for line in (run_dir / f"events-{attempt}.jsonl").read_text().splitlines()
                if line.startswith("{")]

    one, two = events(1), events(2)
    last_ckpt = [e["step"] for e in one if e["event"] == "checkpoint"][-1]
    assert last_ckpt >= 25  # the SIGTERM from the parent-death signal checkpointed past the periodic one
    start = next(e for e in two if e["event"] == "start")
    assert start["resumed_from_step"] == last_ckpt
    steps = [e["step"] for e in two if e["event"] == "step"]
    assert steps == list(range(last_ckpt + 1, 81))  # no step after the checkpoint trained twice
    assert max(e["time"] for e in one) <= start["time"]  # one trainer at a time
