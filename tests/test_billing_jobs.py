"""Charging for training, honestly: the price in the estimate, the hold at submission (402 with the
numbers, never an overdraft under concurrent submissions), metering of captured progress by real trainer
processes (tests/fake_trainer.py), credit back after infrastructure failures, cancel, the pause when a run
is about to outspend its hold, and a settlement that survives a crash at each of its steps."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import pytest
from billing_helpers import hosted, ledger_checked, stripe_fake  # noqa: F401 - fixtures
from billing_helpers import RATE, available, calibrate, client_as, in_threads, post_json, verified

from nanochat_studio import billing, db, estimate, jobs, runner, supervisor
from nanochat_studio.billing import ledger, metering
from nanochat_studio.db import database
from nanochat_studio.models import JobBilling, JobEvent, LedgerTransaction, TrainingJob

CPU = runner.Slot("cpu0", "cpu", (), 1)
JOB = {"depth": 1, "dataset": "demo", "max_steps": 20}


def submit(client, **config):
    return post_json(client, "/api/jobs", {**JOB, **config})


def run_next(app, job_id: int) -> str | None:
    """Claim ``job_id`` and supervise one attempt of it here, with the real (fake) trainer."""
    settings = app.config["NCS_SETTINGS"]
    job = jobs.claim_next(jobs.owner_id("cpu0"), "cpu0", lease_seconds=settings.lease_seconds,
                          fits=lambda j: j.id == job_id)
    assert job is not None, f"job {job_id} was not ready"
    return supervisor.run_training(job, CPU, settings)


def lines(job_id: int) -> dict[str, int]:
    """key -> what the line moved into or out of the job's hold (usage negative, credit-back positive)."""
    out = {}
    for txn in LedgerTransaction.select().where(LedgerTransaction.job_id == job_id).order_by(LedgerTransaction.id):
        out[txn.key] = sum(p.amount for p in txn.postings if p.account.kind == ledger.HELD)
    return out


def times(job_id: int, attempt: int, kind: str) -> list[float]:
    return [e.data["time"] for e in JobEvent.select().where((JobEvent.job == job_id) & (JobEvent.attempt == attempt)
                                                             & (JobEvent.kind == kind)).order_by(JobEvent.seq)]


def cost(seconds: float) -> int:
    return ledger.cost_micro(seconds, RATE)


# --- estimate and hold -----------------------------------------------------------------------------------

def test_the_estimate_shows_the_cost_its_money_and_what_is_available(hosted, make_app):
    app = hosted()
    alice = verified("alice", credits=5)
    calibrate(100.0)
    e = client_as(app, alice).get("/api/estimate?depth=1&max_steps=20&dataset=demo").json
    assert e["time"]["seconds"] == pytest.approx(100.0)
    c = e["cost"]
    assert c["credits"] == pytest.approx(1.0) and c["hold"] == pytest.approx(1.25)  # 100 s at 0.01, +25 %
    assert c["credits_per_device_second"] == pytest.approx(0.01) and c["device"] == "cpu"
    assert c["available"] == 5.0 and c["enough"] is True and c["top_up"] == "/account"
    assert c["money"] == {"amount": 40, "currency": "usd", "display": "0.40 USD"}  # at the large pack's price
    solo = make_app(mode="solo")
    from billing_helpers import DEVICE
    from nanochat_studio import estimate

    solo.extensions["ncs_calibrator"] = estimate.Calibrator(probe=lambda: dict(DEVICE), run=lambda s, b: None)
    database.connect(reuse_if_open=True)
    assert client_as(solo, alice).get("/api/estimate?depth=1&max_steps=20").json["cost"] is None


def test_a_submission_beyond_the_credits_is_402_with_the_numbers_and_leaves_no_job(hosted):
    app = hosted()
    alice = verified("alice", credits=1)
    calibrate(100.0)
    c = client_as(app, alice)
    r = submit(c)
    assert r.status_code == 402, r.json
    err = r.json["error"]
    assert err["code"] == "insufficient_credits" and (err["cost"], err["hold"], err["available"]) == (1.0, 1.25, 1.0)
    assert err["top_up"] == "/account" and "needs 1.25 held" in err["message"]
    assert TrainingJob.select().count() == 0 and JobBilling.select().count() == 0
    token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', c.get("/train").get_data(as_text=True)).group(1)
    page = c.post("/train", data={"csrf_token": token, "depth": "1", "max_steps": "20", "source": "demo"})
    assert page.status_code == 400 and "Not enough credits to start this job" in page.get_data(as_text=True)
    assert TrainingJob.select().count() == 0 and available(alice) == 1_000_000


def test_an_account_must_verify_its_email_before_it_trains(hosted):
    app = hosted()
    from conftest import make_user

    bob = make_user("bob")
    billing.grant(bob, 100, "plenty")
    r = submit(client_as(app, bob))
    assert r.status_code == 403 and r.json["error"]["code"] == "email_unverified"
    assert TrainingJob.select().count() == 0


def test_twenty_concurrent_submissions_never_overdraw(hosted):
    app = hosted()
    alice = verified("alice", credits=7 * 1.25)  # exactly seven holds
    calibrate(100.0)
    database.close()
    codes = in_threads(20, lambda i: submit(client_as(app, alice)).status_code)
    database.connect(reuse_if_open=True)
    assert sorted(codes) == [201] * 7 + [402] * 13
    assert ledger.balances(alice.id) == {"balance": 8_750_000, "held": 8_750_000, "available": 0}
    assert TrainingJob.select().count() == 7 == JobBilling.select().count()


def test_the_check_and_hold_is_atomic_on_its_own(hosted):
    """Beyond jobs.submit's own lock on the user row: twenty holds placed at once by billing alone."""
    app = hosted()
    alice = verified("alice", credits=5)
    policy = app.extensions["ncs_billing"]
    ids = [TrainingJob.create(user=alice, config=dict(JOB)).id for _ in range(20)]
    terms = {"device": "cpu", "rate": RATE, "gpus": 1, "estimate_s": 100.0, "device_seconds": 100.0,
             "cost": 1_000_000, "hold": 1_000_000}
    database.close()

    def hold(i: int) -> str:
        try:
            policy.place_hold(TrainingJob.get_by_id(ids[i]), alice, terms)
            return "held"
        except billing.InsufficientCredits:
            return "refused"

    outcomes = in_threads(20, hold)
    database.connect(reuse_if_open=True)
    assert outcomes.count("held") == 5 and outcomes.count("refused") == 15
    assert ledger.balances(alice.id) == {"balance": 5_000_000, "held": 5_000_000, "available": 0}
    for job_id in ids:  # the refused ones were never billed; end the held ones so the audit is happy
        jobs.request_cancel(job_id)
        billing.settle_job(job_id)
    assert available(alice) == 5_000_000


def test_a_job_shows_its_hold_and_later_its_charge(hosted):
    app = hosted()
    alice = verified("alice", credits=5)
    calibrate(100.0)
    c = client_as(app, alice)
    job = submit(c).json
    assert job["billing"] == {"hold": 1.25, "held_now": 1.25, "charged": 0.0, "settled": False,
                              "credits_per_device_second": 0.01, "device": "cpu", "out_of_credits": False}
    assert c.get("/api/account").json["held"] == 1.25
    c.post(f"/api/jobs/{job['id']}/cancel", json={})
    after = c.get(f"/api/jobs/{job['id']}").json["billing"]
    assert after["settled"] and after["charged"] == 0.0 and after["held_now"] == 0.0
    assert available(alice) == 5_000_000
    assert list(lines(job["id"])) == [f"hold:{job['id']}", f"settle:{job['id']}"]


# --- metering real runs ------------------------------------------------------------------------------------

def test_a_finished_run_pays_its_device_seconds_and_gets_the_rest_of_its_hold_back(hosted):
    app = hosted()
    alice = verified("alice", credits=5)
    calibrate(100.0, max_steps=8)
    job_id = submit(client_as(app, alice), max_steps=8, checkpoint_every=4).json["id"]
    assert run_next(app, job_id) == jobs.COMPLETED
    start, done = times(job_id, 1, "start")[0], times(job_id, 1, "done")[0]
    expected = cost(done - start)
    assert lines(job_id) == {f"hold:{job_id}": 1_250_000, f"usage:{job_id}:1": -expected,
                             f"settle:{job_id}": -(1_250_000 - expected)}
    job = TrainingJob.get_by_id(job_id)
    assert job.cost == expected and job.gpu_seconds == pytest.approx(done - start, abs=1e-3)
    assert available(alice) == 5_000_000 - expected and ledger.balances(alice.id)["held"] == 0
    assert expected > 0


def test_a_user_error_pays_only_the_progress_its_checkpoint_captured(hosted, monkeypatch):
    app = hosted()
    alice = verified("alice", credits=5)
    calibrate(100.0, max_steps=12)
    job_id = submit(client_as(app, alice), max_steps=12, checkpoint_every=5).json["id"]
    monkeypatch.setenv("FAKE_EXIT_AT", "9:66")  # diverged at step 9: the user's config, not ours
    assert run_next(app, job_id) == jobs.FAILED
    start, ckpt = times(job_id, 1, "start")[0], times(job_id, 1, "checkpoint")[-1]
    last = times(job_id, 1, "error")[0]
    assert last - ckpt > 0.1  # steps 6-8 ran after the checkpoint...
    usage = LedgerTransaction.get(LedgerTransaction.key == f"usage:{job_id}:1")
    assert lines(job_id)[usage.key] == -cost(ckpt - start)  # ...and are not charged
    assert "were not captured and are not charged" in usage.description
    assert TrainingJob.get_by_id(job_id).cost == cost(ckpt - start)


def test_an_infrastructure_failure_credits_back_lost_work_and_the_restart_overhead(hosted, monkeypatch):
    app = hosted()
    alice = verified("alice", credits=5)
    calibrate(100.0, max_steps=12)
    job_id = submit(client_as(app, alice), max_steps=12, checkpoint_every=5).json["id"]
    monkeypatch.setenv("FAKE_EXIT_AT", "9:1")  # the trainer crashes (exit 1): infrastructure
    assert run_next(app, job_id) == jobs.QUEUED  # retried at once (no back-off in these settings)
    monkeypatch.delenv("FAKE_EXIT_AT")
    assert run_next(app, job_id) == jobs.COMPLETED
    s1, c1, e1 = times(job_id, 1, "start")[0], times(job_id, 1, "checkpoint")[-1], times(job_id, 1, "error")[0]
    s2, first2, d2 = times(job_id, 2, "start")[0], times(job_id, 2, "step")[0], times(job_id, 2, "done")[0]
    got = lines(job_id)
    assert got[f"usage:{job_id}:1"] == -cost(e1 - s1)
    assert got[f"lost:{job_id}:1"] == cost((e1 - s1) - (c1 - s1)) > 0  # the work after the checkpoint, back
    assert got[f"overhead:{job_id}:2"] == cost(first2 - s2) > 0  # restarting is not the user's cost
    assert got[f"usage:{job_id}:2"] == -cost(d2 - s2)
    why = LedgerTransaction.get(LedgerTransaction.key == f"lost:{job_id}:1").description
    assert "interrupted (the trainer exited with code 1" in why and "credited back" in why
    charged = TrainingJob.get_by_id(job_id).cost
    assert charged == -sum(v for k, v in got.items() if not k.startswith(("hold:", "settle:")))
    assert available(alice) == 5_000_000 - charged


def test_cancelling_a_running_job_pays_what_it_used_and_returns_the_rest(hosted, monkeypatch):
    app = hosted()
    alice = verified("alice", credits=5)
    calibrate(100.0, max_steps=400)
    c = client_as(app, alice)
    job_id = submit(c, max_steps=400, checkpoint_every=100).json["id"]
    monkeypatch.setenv("FAKE_STEP_S", "0.02")
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("status", run_next(app, job_id)))
    t.start()
    deadline = time.monotonic() + 30
    while (TrainingJob.get_by_id(job_id).progress or {}).get("step", 0) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.post(f"/api/jobs/{job_id}/cancel", json={}).json["cancel_requested"] is True
    t.join(60)
    assert box["status"] == jobs.CANCELLED
    start = times(job_id, 1, "start")[0]
    last = JobEvent.select().where((JobEvent.job == job_id) & (JobEvent.kind == "checkpoint")).order_by(
        JobEvent.seq.desc()).first().data["time"]
    got = lines(job_id)
    assert got[f"usage:{job_id}:1"] == -cost(last - start)
    assert got[f"settle:{job_id}"] == -(1_250_000 - cost(last - start))
    assert available(alice) == 5_000_000 - cost(last - start)


def test_a_run_about_to_outspend_its_hold_pauses_and_resumes_after_a_top_up(hosted, monkeypatch):
    from nanochat_studio.billing import policy

    monkeypatch.setattr(policy, "MIN_HOLD_DEVICE_S", 1.0)
    # An estimate under a second needs a run's fixed parts (start-up, the data, exit) near nothing too.
    for name, value in [("ROUGH_STARTUP_S", 0.01), ("ROUGH_EXIT_S", 0.01), ("COLD_PREPARE_BYTES_PER_S", 1e12)]:
        monkeypatch.setattr(estimate, name, value)
    app = hosted()
    alice = verified("alice", credits=0.012)  # 1.2 device-seconds
    calibrate(0.2, max_steps=40)  # the estimate is far too short: hold 1 s (the minimum)
    c = client_as(app, alice)
    job_id = submit(c, max_steps=40, checkpoint_every=40).json["id"]
    monkeypatch.setenv("FAKE_STEP_S", "0.05")
    assert run_next(app, job_id) == jobs.PAUSED
    job = TrainingJob.get_by_id(job_id)
    assert job.status_reason.startswith("out of credits") and job.progress["checkpoint_step"] < 40
    got = lines(job_id)
    assert got[f"usage:{job_id}:1"] < 0 and -got[f"usage:{job_id}:1"] <= 10_000  # never beyond the hold
    j = c.get(f"/api/jobs/{job_id}").json
    assert j["status"] == "paused" and j["billing"]["out_of_credits"] is True
    assert "paused: out of credits" in j["why_waiting"]

    refused = c.post(f"/api/jobs/{job_id}/resume", json={})
    assert refused.status_code == 402 and refused.json["error"]["code"] == "insufficient_credits"
    billing.grant(alice, 1, "top-up")
    resumed = c.post(f"/api/jobs/{job_id}/resume", json={})
    assert resumed.status_code == 200 and resumed.json["status"] == "queued", resumed.json
    assert c.post(f"/api/jobs/{job_id}/resume", json={}).status_code == 409  # not paused any more
    assert run_next(app, job_id) == jobs.COMPLETED
    begins = [e.data.get("resumed_from_step") for e in JobEvent.select().where(
        (JobEvent.job == job_id) & (JobEvent.kind == "start")).order_by(JobEvent.seq)]
    assert begins == [None, job.progress["checkpoint_step"]]  # it continued from its checkpoint
    kinds = [t.kind for t in LedgerTransaction.select().where(LedgerTransaction.job_id == job_id)]
    assert kinds.count(ledger.HOLD) == 1 and kinds.count(ledger.HOLD_EXTEND) == 1 and kinds.count(ledger.SETTLE) == 1
    assert "overhead:" not in " ".join(lines(job_id))  # a pause is not an interruption


# --- settlement survives crashes -------------------------------------------------------------------------------

def _attempt(job_id: int, events: list[tuple[str, float]], outcome: str) -> None:
    """One attempt told by its events (the trainer's clock), ending in ``outcome``."""
    job = jobs.claim_next(jobs.owner_id("cpu0"), "cpu0", fits=lambda j: j.id == job_id)
    assert jobs.transition(job.id, jobs.RUNNING, expect={jobs.PREPARING}, attempt=job.attempt)
    for kind, t in events:
        jobs.record_event(job.id, kind, {"time": t}, attempt=job.attempt)
    jobs.finish(job.id, job.attempt, outcome, reason="the trainer was killed by SIGKILL", backoff_base=0.0)


def _story(job_id: int) -> None:
    """Attempt 1 dies 3 s after its checkpoint; attempt 2 takes 2 s to restart and finishes."""
    _attempt(job_id, [("start", 1000.0), ("step", 1001.0), ("checkpoint", 1005.0), ("step", 1008.0)],
             "infrastructure")
    _attempt(job_id, [("start", 2000.0), ("step", 2002.0), ("checkpoint", 2006.0), ("done", 2010.0)], "completed")


def _url() -> str:
    obj = database.obj
    if db.is_postgres():
        p = obj.connect_params
        return f"postgresql://{p.get('user', 'postgres')}@{p['host']}:{p['port']}/{obj.database}"
    return f"sqlite:///{obj.database}"


CRASHER = """
import os, sys
from nanochat_studio import billing, db
from nanochat_studio.billing import ledger
db.open_database(sys.argv[1]); db.database.connect()
job_id, k, where = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
seen = {"n": 0}
def after(event, **fields):  # the k-th line is committed: die before the next
    if event in ("posted", "settlement"):
        seen["n"] += 1
        if seen["n"] == k:
            os._exit(3)
real_post = ledger.post
def inside(*a, **kw):  # die inside the k-th line's transaction, before its commit
    with db.database.atomic():
        txn = real_post(*a, **kw)
        seen["n"] += 1
        if seen["n"] == k:
            os._exit(3)
    return txn
if where == "after":
    billing.subscribe(after)
else:
    ledger.post = inside
billing.settle_job(job_id)
"""


def test_a_crash_at_each_step_of_settlement_settles_exactly_once_after_restart(hosted):
    app = hosted()
    alice = verified("alice", credits=100)
    calibrate(100.0)
    c = client_as(app, alice)
    expected = {"usage:{}:1": -80_000, "lost:{}:1": 30_000, "usage:{}:2": -100_000, "overhead:{}:2": 20_000}
    cases = [(k, where) for where in ("after", "inside") for k in range(1, 6)]
    for k, where in cases:
        job_id = submit(c).json["id"]
        database.close()  # the subprocess writes; our connection must not hold SQLite's lock
        database.connect()
        _story(job_id)
        database.close()
        proc = subprocess.run([sys.executable, "-c", CRASHER, _url(), str(job_id), str(k), where],
                              capture_output=True, text=True, timeout=120, env={**os.environ})
        assert proc.returncode == 3, (k, where, proc.stderr[-2000:])
        database.connect()
        n_before = LedgerTransaction.select().where(LedgerTransaction.job_id == job_id).count()
        assert n_before == 1 + (k if where == "after" else k - 1), (k, where)  # the hold and what committed
        done_already = where == "after" and k == 5  # it died just after the settlement committed
        assert billing.reconcile() == ([] if done_already else [job_id])  # the restart settles what is pending
        assert billing.settle_job(job_id) is True  # ...and again changes nothing
        got = lines(job_id)
        want = {key.format(job_id): v for key, v in expected.items()}
        assert {k_: v for k_, v in got.items() if k_ in want} == want, (k, where)
        assert got[f"settle:{job_id}"] == -(1_250_000 - 130_000)
        assert len(got) == 6 and TrainingJob.get_by_id(job_id).cost == 130_000  # 13 device-seconds paid
    assert ledger.balances(alice.id)["held"] == 0
    assert available(alice) == 100_000_000 - len(cases) * 130_000


def test_the_reconciler_meters_an_attempt_whose_worker_died(hosted):
    app = hosted()
    alice = verified("alice", credits=5)
    calibrate(100.0)
    job_id = submit(client_as(app, alice)).json["id"]
    job = jobs.claim_next(jobs.owner_id("cpu0"), "cpu0", lease_seconds=0.01, fits=lambda j: j.id == job_id)
    jobs.transition(job_id, jobs.RUNNING, expect={jobs.PREPARING}, attempt=job.attempt)
    for kind, t in [("start", 50.0), ("step", 51.0), ("checkpoint", 54.0), ("step", 56.0)]:
        jobs.record_event(job_id, kind, {"time": t}, attempt=job.attempt)
    time.sleep(0.05)
    assert job_id in jobs.reconcile(backoff_base=0.0)  # its lease ran out: interrupted, requeued
    billing.reconcile()
    got = lines(job_id)
    assert got[f"usage:{job_id}:1"] == -cost(6.0) and got[f"lost:{job_id}:1"] == cost(2.0)
    assert f"settle:{job_id}" not in got  # still queued for its next attempt
    assert metering.attempts(job_id)[0].ended == jobs.INTERRUPTED


def test_observers_hear_holds_settlements_refusals_and_audit_failures(hosted, caplog):
    app = hosted()
    alice = verified("alice", credits=1.3)
    calibrate(100.0)
    heard: list[tuple[str, dict]] = []
    fn = billing.subscribe(lambda event, **fields: heard.append((event, fields)))
    try:
        c = client_as(app, alice)
        job_id = submit(c).json["id"]
        assert submit(c).status_code == 402
        c.post(f"/api/jobs/{job_id}/cancel", json={})
        database.execute_sql("UPDATE ledger_account SET balance = balance + 1 WHERE kind = 'available'")
        assert billing.run_audit() != []
        database.execute_sql("UPDATE ledger_account SET balance = balance - 1 WHERE kind = 'available'")
    finally:
        billing.unsubscribe(fn)
    events = [e for e, _ in heard]
    assert events == ["hold", "refused", "settlement", "audit_failure"], events
    assert heard[0][1] == {"job_id": job_id, "user_id": alice.id, "amount": 1_250_000}
    assert heard[1][1]["reason"] == "insufficient" and heard[2][1]["returned"] == 1_250_000
    assert "billing audit found 2 problem(s)" in caplog.text


def test_the_workers_tick_settles_what_a_crash_left_behind(hosted):
    from nanochat_studio import tasks

    app = hosted()
    alice = verified("alice", credits=5)
    calibrate(100.0)
    job_id = submit(client_as(app, alice)).json["id"]
    # The job ended but whoever ended it died before billing heard of it.
    assert jobs.transition(job_id, jobs.CANCELLED, expect={jobs.QUEUED}, reason="cancelled")
    assert not JobBilling.get_by_id(job_id).settled_at
    tasks.reconcile_and_ring(app.config["NCS_SETTINGS"])
    assert JobBilling.get_by_id(job_id).settled_at and available(alice) == 5_000_000


def test_billing_events_reach_the_credits_metrics(hosted):
    from nanochat_studio import metrics

    def count(kind: str) -> float:
        return metrics.REGISTRY.get_sample_value(metrics.CREDIT_KINDS[kind][0]) or 0.0

    app = hosted()
    before = {k: count(k) for k in ("hold", "refused")}
    poor = verified("poor", credits=1)
    calibrate(100.0)
    assert submit(client_as(app, poor)).status_code == 402  # refused for funds: counted
    rich = verified("rich", credits=1000)
    assert submit(client_as(app, rich)).status_code == 201
    assert count("refused") - before["refused"] == 1 and count("hold") - before["hold"] == 1
