"""The job lifecycle against a real SQLite file: validation, limits, compare-and-set races, leases."""

from __future__ import annotations

import dataclasses
import datetime as dt
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from nanochat_studio import db, jobconfig, jobs, runner, workers
from nanochat_studio.models import Dataset, TrainingJob, User, utcnow
from nanochat_studio.settings import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent


# Where the settings' defaults would make a test wait (back-off, reconcile, grace) or leave this machine.
TEST_SETTINGS = {
    "url_max_bytes": 10 << 20,
    "url_timeout_s": 30.0,
    "gpus": "none",
    "trainer_module": "tests.fake_trainer",
    "worker_threads": 2,
    "allow_server_paths": True,
    "retry_backoff_seconds": 0.2,
    "reconcile_seconds": 0.5,
    "term_grace_seconds": 20.0,
}


def make_settings(tmp_path: Path, **overrides) -> Settings:
    """Real settings with their home (store, queue, storage, runs) in ``tmp_path``."""
    return dataclasses.replace(load_settings(environ={"NCS_HOME": str(tmp_path)}), **{**TEST_SETTINGS, **overrides})


def open_store(url: str):
    """The store at ``url``, built by the migrations as the app builds it."""
    database = db.open_database(url)
    db.migrate(database)
    return database


@pytest.fixture
def store(tmp_path):
    database = open_store(f"sqlite:///{tmp_path}/studio.db")
    yield database
    database.close()


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path)


@pytest.fixture
def alice(store):
    return User.create(email="alice@example.com", name="alice")


@pytest.fixture
def bob(store):
    return User.create(email="bob@example.com", name="bob")


def _submit(user, settings, **config):
    return jobs.submit(user, {"depth": 1, "dataset": "demo", "max_steps": 10, **config}, settings)


# --- validation and limits ---------------------------------------------------------------------------

@pytest.mark.parametrize("config, message", [
    ({"depth": 2}, "'dataset' is required"),
    ({"depth": 0, "dataset": "demo"}, "'depth' must be between 1 and 32"),
    ({"depth": 33, "dataset": "demo"}, "'depth' must be between 1 and 32"),
    ({"depth": "2", "dataset": "demo"}, "'depth' must be an integer"),
    ({"depth": True, "dataset": "demo"}, "'depth' must be an integer"),
    ({"depth": 2, "dataset": "demo", "lr": 0.1}, "unknown config key(s): lr"),
    ({"depth": 2, "dataset": "demo", "max_steps": 5, "checkpoint_every": 10}, "cannot exceed"),
    ({"depth": 2, "dataset": "demo", "name": 5}, "'name' must be a string"),
    ([1, 2], "must be a JSON object"),
])
def test_submit_refuses_a_bad_config_with_a_clear_message(alice, settings, config, message):
    with pytest.raises(jobconfig.JobConfigError) as err:
        jobs.submit(alice, config, settings)
    assert message in str(err.value)
    assert err.value.status == 400
    assert TrainingJob.select().count() == 0


@pytest.mark.parametrize("dataset, status, message", [
    ("http://example.com/a.txt", 400, "only https:// URLs"),
    ("https://127.0.0.1/corpus.txt", 400, "loopback"),
    ("ftp://x", 400, "is not a dataset"),
    ("ds:999", 404, "no dataset 999"),
    ("/no/such/file.txt", 400, "does not exist"),
])
def test_submit_refuses_a_bad_dataset_with_the_dataset_rules(alice, settings, dataset, status, message):
    with pytest.raises(Exception) as err:
        jobs.submit(alice, {"depth": 2, "dataset": dataset}, settings)
    assert err.value.status == status and message in str(err.value)
    assert TrainingJob.select().count() == 0


def test_submit_accepts_every_dataset_kind(alice, bob, settings, tmp_path_factory):
    corpus = tmp_path_factory.mktemp("outside-home") / "corpus.txt"  # server paths: not in the data directory
    corpus.write_text("hello world\n")
    ds = Dataset.create(user=alice, name="mine.txt", storage_key="users/1/datasets/1/mine.txt", sha256="a" * 64)
    for dataset, kind in (("demo", "demo"), ("s3://bucket/prefix", "s3"), (f"ds:{ds.id}", "upload"),
                          (str(corpus), "path")):
        job = jobs.submit(alice, {"depth": 2, "dataset": dataset, "name": " tiny "}, settings)
        assert job.status == "queued" and job.name == "tiny"
        assert job.config["dataset"]["kind"] == kind and job.config["dataset"]["source"] == dataset
        assert [e.data["to"] for e in jobs.events_since(job)] == ["queued"]
    with pytest.raises(Exception, match="no dataset"):  # bob cannot use alice's upload
        jobs.submit(bob, {"depth": 2, "dataset": f"ds:{ds.id}"}, settings)


def test_server_paths_need_the_setting_or_an_admin(alice, settings, tmp_path_factory):
    corpus = tmp_path_factory.mktemp("outside-home") / "corpus.txt"
    corpus.write_text("x")
    locked = dataclasses.replace(settings, allow_server_paths=False)
    with pytest.raises(Exception, match="allowed only in solo mode or for admins"):
        jobs.submit(alice, {"depth": 1, "dataset": str(corpus)}, locked)
    alice.is_admin = True
    alice.save()
    assert jobs.submit(alice, {"depth": 1, "dataset": str(corpus)}, locked).status == "queued"


def test_per_user_queue_limit_gives_a_clear_429(alice, bob, settings):
    small = dataclasses.replace(settings, max_queued_jobs=2)
    _submit(alice, small)
    _submit(alice, small)
    with pytest.raises(jobs.JobLimitError) as err:
        _submit(alice, small)
    assert err.value.status == 429
    assert "you already have 2 jobs waiting to run (the limit is 2)" in str(err.value)
    assert _submit(bob, small).status == "queued"  # the cap is per user


# --- compare-and-set ---------------------------------------------------------------------------------

def test_illegal_transitions_are_refused(alice, settings):
    job = _submit(alice, settings)
    with pytest.raises(ValueError, match="cannot go from queued to completed"):
        jobs.transition(job.id, "completed", expect={"queued"})


def test_exactly_one_of_two_concurrent_transitions_wins(alice, settings):
    roomy = dataclasses.replace(settings, max_queued_jobs=100)
    ids = [_submit(alice, roomy).id for _ in range(30)]
    barrier = threading.Barrier(2)
    wins: dict[str, list[int]] = {"a": [], "b": []}
    conns: dict[str, int] = {}

    def actor(name: str, to: str) -> None:
        conns[name] = id(db.database.connection())  # each thread has its own connection
        for job_id in ids:
            barrier.wait()
            if jobs.transition(job_id, to, expect={"queued"}, reason=name):
                wins[name].append(job_id)

    threads = [threading.Thread(target=actor, args=("a", "preparing")),
               threading.Thread(target=actor, args=("b", "cancelled"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert conns["a"] != conns["b"]
    assert sorted(wins["a"] + wins["b"]) == ids  # every job moved exactly once
    for job_id in ids:
        states = [e.data["to"] for e in jobs.events_since(job_id) if e.kind == "state"]
        assert states == ["queued", TrainingJob.get_by_id(job_id).status]


def test_concurrent_claims_never_take_the_same_job(alice, bob, settings):
    ids = {_submit(u, settings).id for u in (alice, bob) for _ in range(6)}
    got: list[int] = []
    barrier = threading.Barrier(3)

    def claimer(k: int) -> None:
        barrier.wait()
        while (job := jobs.claim_next(f"owner{k}", f"cpu{k}")) is not None:
            got.append(job.id)

    threads = [threading.Thread(target=claimer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(ids)
    assert all(j.attempt == 1 and j.status == "preparing" for j in TrainingJob.select())


def test_event_seqs_are_unique_and_increasing_across_writers(alice, settings):
    job = _submit(alice, settings)

    def writer(k: int) -> None:
        for i in range(40):
            jobs.record_event(job, "step", {"writer": k, "i": i})

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seqs = [e.seq for e in jobs.events_since(job, 0)]
    assert seqs == list(range(1, 82))
    assert [e.seq for e in jobs.events_since(job, 75)] == [76, 77, 78, 79, 80, 81]
    assert TrainingJob.get_by_id(job.id).last_event_seq == 81


# --- scheduling ----------------------------------------------------------------------------------------

def test_claim_prefers_users_with_fewer_running_jobs(alice, bob, settings):
    a1, a2 = _submit(alice, settings), _submit(alice, settings)
    b1 = _submit(bob, settings)
    assert jobs.claim_next("w", "cpu0").id == a1.id  # oldest first
    assert jobs.claim_next("w", "cpu1").id == b1.id  # bob has none running: he goes before alice's 2nd
    assert jobs.claim_next("w", "cpu2").id == a2.id


def test_claim_honours_back_off_and_the_running_cap(alice, bob, settings):
    a1, a2 = _submit(alice, settings), _submit(alice, settings)
    TrainingJob.update(not_before=utcnow() + dt.timedelta(seconds=60)).where(TrainingJob.id == a1.id).execute()
    assert jobs.claim_next("w", "cpu0", max_running_jobs=1).id == a2.id
    assert jobs.claim_next("w", "cpu1", max_running_jobs=1) is None  # a1 backs off, and alice is at her cap
    job = TrainingJob.get_by_id(a1.id)
    assert jobs.why_waiting(job, settings).startswith("retrying in ")


def test_queue_position_and_why_waiting(alice, bob, settings):
    a1, b1 = _submit(alice, settings), _submit(bob, settings)
    assert jobs.queue_position(a1) == 0 and jobs.queue_position(b1) == 1
    assert jobs.why_waiting(b1, settings).startswith("waiting for a worker: none is running")
    workers.register("w1", "worker", [runner.Slot("cpu0", "cpu")], settings)
    assert jobs.why_waiting(b1, settings) == "waiting for a free CPU slot: 1 job ahead"
    jobs.claim_next("w", "cpu0")
    b1 = TrainingJob.get_by_id(b1.id)
    assert jobs.why_waiting(b1, settings) == "waiting for a free CPU slot: 0 jobs ahead"
    capped = dataclasses.replace(settings, max_running_jobs=1)
    a2 = _submit(alice, settings)
    assert jobs.why_waiting(a2, capped) == "waiting: you already have 1 job running (the limit is 1)"


# --- leases, reconcile, cancel -------------------------------------------------------------------------

def test_heartbeat_is_fenced_once_the_job_moved_on(alice, settings):
    job = _submit(alice, settings)
    claimed = jobs.claim_next("w1", "cpu0", lease_seconds=30)
    assert jobs.heartbeat(job.id, claimed.attempt, "w1")
    assert not jobs.heartbeat(job.id, claimed.attempt, "w2")  # not the holder
    TrainingJob.update(lease_expires_at=utcnow() - dt.timedelta(seconds=1)).where(TrainingJob.id == job.id).execute()
    assert jobs.reconcile(backoff_base=0) == [job.id]
    again = jobs.claim_next("w2", "cpu1")
    assert again.attempt == 2
    assert not jobs.heartbeat(job.id, 1, "w1")  # the old supervisor is fenced out
    assert jobs.finish(job.id, 1, "completed") is None  # and cannot finish the job
    assert jobs.heartbeat(job.id, 2, "w2")


def test_reconcile_requeues_an_expired_lease_with_back_off(alice, settings):
    job = _submit(alice, settings)
    jobs.claim_next("w1", "cpu0", lease_seconds=30)
    assert jobs.reconcile(backoff_base=20) == []  # lease still valid
    later = utcnow() + dt.timedelta(seconds=31)
    assert jobs.reconcile(later, backoff_base=20) == [job.id]
    job = TrainingJob.get_by_id(job.id)
    assert job.status == "queued" and job.lease_owner is None
    assert 19 <= (job.not_before - utcnow()).total_seconds() <= 20.5
    assert jobs.why_waiting(job, settings) in (
        "retrying in 20 s after its worker stopped renewing the lease (attempt 2 of 3)",
        "retrying in 19 s after its worker stopped renewing the lease (attempt 2 of 3)")
    states = [e.data["to"] for e in jobs.events_since(job) if e.kind == "state"]
    assert states == ["queued", "preparing", "interrupted", "queued"]


def test_reconcile_gives_up_when_attempts_are_exhausted(alice, settings):
    job = _submit(alice, dataclasses.replace(settings, max_attempts=2))
    for attempt in (1, 2):
        claimed = jobs.claim_next("w", "cpu0", lease_seconds=30)
        assert claimed.attempt == attempt
        jobs.reconcile(utcnow() + dt.timedelta(seconds=60), backoff_base=0)
    job = TrainingJob.get_by_id(job.id)
    assert job.status == "failed" and job.error_kind == "infrastructure"
    assert "gave up after 2 failed attempts" in job.status_reason


def test_reconcile_does_not_wait_for_the_lease_of_a_dead_local_process(alice, settings):
    job = _submit(alice, settings)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = jobs.owner_id("cpu0").split(":")
    owner[2] = str(dead.pid)
    jobs.claim_next(":".join(owner), "cpu0", lease_seconds=300)
    assert jobs.reconcile(backoff_base=0) == [job.id]
    assert TrainingJob.get_by_id(job.id).status == "queued"
    live = jobs.claim_next(jobs.owner_id("cpu0"), "cpu0", lease_seconds=300)  # our own pid is alive
    assert jobs.reconcile(backoff_base=0) == [] and live.status == "preparing"


def test_cancel_ends_a_waiting_job_at_once_and_flags_a_running_one(alice, settings):
    waiting, running = _submit(alice, settings), _submit(alice, settings)
    TrainingJob.update(queued_at=utcnow() - dt.timedelta(seconds=5)).where(TrainingJob.id == running.id).execute()
    jobs.claim_next("w", "cpu0")
    assert jobs.request_cancel(waiting) == "cancelled"
    assert jobs.request_cancel(running) == "cancelling"
    assert TrainingJob.get_by_id(running.id).cancel_requested
    assert jobs.request_cancel(waiting) == "cancelled"  # idempotent
    assert TrainingJob.get_by_id(waiting.id).finished_at is not None


def test_user_errors_are_not_retried(alice, settings):
    job = _submit(alice, settings)
    claimed = jobs.claim_next("w", "cpu0")
    assert jobs.finish(job.id, claimed.attempt, "user_error", reason="the dataset is empty") == "failed"
    job = TrainingJob.get_by_id(job.id)
    assert (job.status, job.error_kind, job.status_reason) == ("failed", "user", "the dataset is empty")
    assert jobs.reconcile() == []


def test_a_graceful_shutdown_does_not_use_up_an_attempt(alice, settings):
    job = _submit(alice, dataclasses.replace(settings, max_attempts=1))
    for _ in range(3):
        claimed = jobs.claim_next("w", "cpu0")
        assert jobs.finish(job.id, claimed.attempt, "preempted", charged=False, reason="the server shut down") == "queued"
    assert jobs.charged_failures(job.id) == 0
    assert TrainingJob.get_by_id(job.id).not_before is None


# --- the same guarantees on PostgreSQL ---------------------------------------------------------------------

@pytest.mark.postgres
def test_compare_and_set_and_claims_hold_on_postgresql(postgres, settings):
    open_store(postgres)  # conftest's fresh PostgreSQL database, whatever NCS_TEST_DB says
    users = [User.create(email=f"{n}@example.com", name=n) for n in ("alice", "bob")]
    ids = [_submit(u, settings).id for u in users for _ in range(5)]
    got: list[int] = []
    barrier = threading.Barrier(3)

    def claimer(k: int) -> None:
        barrier.wait()
        while (job := jobs.claim_next(f"owner{k}", f"cpu{k}")) is not None:
            got.append(job.id)
            jobs.record_event(job, "step", {"k": k})

    threads = [threading.Thread(target=claimer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(ids)
    for job_id in ids:
        assert [e.seq for e in jobs.events_since(job_id)] == [1, 2, 3]
        assert not jobs.transition(job_id, "preparing", expect={"queued"})
