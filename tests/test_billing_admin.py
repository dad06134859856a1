"""Administrators and credits: the admin page (grant, revoke, any user's ledger, refund a job), the
account page, and lab mode's monthly device-hour allowances on the same ledger."""

from __future__ import annotations

import datetime as dt
import re

from billing_helpers import hosted, ledger_checked, stripe_fake  # noqa: F401 - fixtures
from billing_helpers import DEVICE, FAST, available, calibrate, client_as, post_json, verified
from click.testing import CliRunner

from nanochat_studio import billing, estimate, jobs
from nanochat_studio.billing import ledger
from nanochat_studio.cli import main
from nanochat_studio.db import database
from nanochat_studio.models import LedgerTransaction, TrainingJob

JOB = {"depth": 1, "dataset": "demo", "max_steps": 20}


def token_of(client, url: str) -> str:
    return re.search(r'name="csrf_token"[^>]*value="([^"]+)"', client.get(url).get_data(as_text=True)).group(1)


def test_an_admin_grants_revokes_reads_a_ledger_and_refunds_a_job(hosted):
    app = hosted()
    admin = verified("root", admin=True)
    alice = verified("alice", credits=5)
    calibrate(100.0)
    a = client_as(app, admin)
    assert "alice@example.com" in a.get("/account/admin/credits/").get_data(as_text=True)
    page = f"/account/admin/credits/{alice.id}"
    token = token_of(a, page)
    r = a.post(f"{page}/grant", data={"csrf_token": token, "credits": "2.5", "reason": "conference talk"})
    assert r.status_code == 302 and available(alice) == 7_500_000
    a.post(f"{page}/grant", data={"csrf_token": token, "credits": "2", "reason": ""})  # no reason: refused
    a.post(f"{page}/revoke", data={"csrf_token": token, "credits": "100", "reason": "oops"})  # beyond: refused
    a.post(f"{page}/revoke", data={"csrf_token": token, "credits": "0.5", "reason": "double grant"})
    assert available(alice) == 7_000_000
    text = a.get(page).get_data(as_text=True)
    assert "Granted by root@example.com: conference talk" in text and "Revoked by root@example.com: double grant" in text

    # A job that ran and was charged, refunded by the admin, once.
    c = client_as(app, alice)
    job_id = post_json(c, "/api/jobs", JOB).json["id"]
    job = jobs.claim_next(jobs.owner_id("cpu0"), "cpu0", fits=lambda j: j.id == job_id)
    jobs.transition(job_id, jobs.RUNNING, expect={jobs.PREPARING}, attempt=job.attempt)
    for kind, t in [("start", 10.0), ("step", 11.0), ("done", 30.0)]:
        jobs.record_event(job_id, kind, {"time": t}, attempt=job.attempt)
    jobs.finish(job_id, job.attempt, "completed")
    assert billing.settle_job(job_id)
    assert available(alice) == 7_000_000 - 200_000  # 20 device-seconds at 0.01
    r = a.post(f"/account/admin/credits/jobs/{job_id}/refund", data={"csrf_token": token, "reason": "our bug"})
    assert r.status_code == 302 and available(alice) == 7_000_000
    a.post(f"/account/admin/credits/jobs/{job_id}/refund", data={"csrf_token": token, "reason": "again"})
    assert available(alice) == 7_000_000  # once per job
    assert TrainingJob.get_by_id(job_id).cost == 200_000  # what it was charged stays on record
    assert LedgerTransaction.get(LedgerTransaction.kind == ledger.JOB_REFUND).description == \
        f"Job #{job_id} refunded by root@example.com: our bug"

    # Members see none of it.
    assert c.get("/account/admin/credits/").status_code == 403
    assert c.post(f"{page}/grant", data={"csrf_token": token_of(c, "/account"), "credits": "9",
                                         "reason": "me"}).status_code == 403
    mine = c.get("/account").get_data(as_text=True)
    assert "Job #%d refunded" % job_id in mine and "Granted by root@example.com: conference talk" in mine


def lab_app(make_app):
    app = make_app(mode="lab", **FAST)
    app.extensions["ncs_calibrator"] = estimate.Calibrator(probe=lambda: dict(DEVICE), run=lambda s, b: None)
    database.connect(reuse_if_open=True)
    return app


def test_lab_quotas_are_off_by_default_and_an_allowance_bounds_device_hours(make_app, home, db_url):
    app = lab_app(make_app)
    alice, bob = verified("alice"), verified("bob")
    calibrate(100.0)
    # No allowance: nothing is metered.
    b = client_as(app, bob)
    assert b.get("/api/estimate?depth=1&max_steps=20").json["cost"] is None
    r = post_json(b, "/api/jobs", JOB)
    assert r.status_code == 201 and r.json["billing"] is None

    env = {"NCS_HOME": str(home), "NCS_DATABASE_URL": db_url}
    out = CliRunner().invoke(main, ["credits", "allowance", "alice@example.com", "0.05"], env=env)  # 180 s
    assert out.exit_code == 0 and "0.05 device-hours a month" in out.output
    database.connect(reuse_if_open=True)
    a = client_as(app, alice)
    cost = a.get("/api/estimate?depth=1&max_steps=20").json["cost"]
    assert cost["unit"] == "device-hours" and cost["credits"] == round(100 / 3600, 6) and cost["available"] == 0.05
    assert post_json(a, "/api/jobs", JOB).status_code == 201  # holds 125 s of the 180
    r = post_json(a, "/api/jobs", JOB)
    assert r.status_code == 402 and r.json["error"]["unit"] == "device-hours"
    assert "Ask an administrator" in r.json["error"]["message"]
    hold = ledger.cost_micro(125.0, ledger.MICRO / 3600)  # rounded up to the micro-credit
    assert r.json["error"]["available"] == ledger.to_credits(50_000 - hold)

    # Next month the allowance is whole again (what was left lapses; the running hold stays held).
    held = ledger.balances(alice.id)["held"]
    billing.refill_allowance(alice.id, now=dt.datetime.now() + dt.timedelta(days=32))
    assert ledger.balances(alice.id) == {"available": 180_000_000 // 3600, "held": held,
                                         "balance": 180_000_000 // 3600 + held}
    # An admin raising it within the month adds the difference now.
    billing.set_allowance(alice, 0.1)
    assert available(alice) == 50_000 + 50_000
    acct = a.get("/api/account").json
    assert acct["mode"] == "lab" and acct["allowance_hours"] == 0.1
    for job in TrainingJob.select():
        jobs.request_cancel(job.id)
        billing.settle_job(job.id)
    assert ledger.balances(alice.id)["held"] == 0


def test_the_account_page_in_each_mode(hosted, make_app):
    app = hosted()
    alice = verified("alice", credits=3)
    page = client_as(app, alice).get("/account").get_data(as_text=True)
    assert 'id="available">3.00' in page and 'data-pack="small"' in page and "Granted: test credits" in page
    from conftest import make_user

    bob = make_user("bob")  # not verified
    assert "Verify your email address first" in client_as(app, bob).get("/account").get_data(as_text=True)
    solo = make_app(mode="solo")
    database.connect(reuse_if_open=True)
    assert "Training here is not metered" in client_as(solo, alice).get("/account").get_data(as_text=True)


def test_a_job_paused_out_of_credits_resumes_from_its_page(hosted):
    app = hosted()
    alice = verified("alice", credits=1.25)
    calibrate(100.0)
    c = client_as(app, alice)
    job_id = post_json(c, "/api/jobs", JOB).json["id"]
    job = jobs.claim_next(jobs.owner_id("cpu0"), "cpu0", fits=lambda j: j.id == job_id)
    jobs.transition(job_id, jobs.RUNNING, expect={jobs.PREPARING}, attempt=job.attempt)
    for kind, t in [("start", 0.0), ("step", 1.0), ("checkpoint", 130.0)]:
        jobs.record_event(job_id, kind, {"time": t}, attempt=job.attempt)
    TrainingJob.update(progress={"checkpoint_step": 10, "total_steps": 20}).where(TrainingJob.id == job_id).execute()
    assert jobs.finish(job_id, job.attempt, "out_of_credits", reason="out of credits: the hold is used up") == "paused"
    billing.settle_job(job_id)
    assert ledger.job_held(job_id) == 0  # 130 s metered, capped at the 125 s held

    page = c.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert 'id="resume"' in page and "Buy credits" in page
    token = token_of(c, f"/jobs/{job_id}")
    r = c.post(f"/jobs/{job_id}/resume", data={"csrf_token": token})
    assert r.status_code == 302 and TrainingJob.get_by_id(job_id).status == "paused"  # no credits: still paused
    billing.grant(alice, 2, "top-up")
    c.post(f"/jobs/{job_id}/resume", data={"csrf_token": token})
    assert TrainingJob.get_by_id(job_id).status == "queued"
    # The rest of the run at its own pace: 130 device-seconds for 10 of 20 steps -> 130 s more, plus 25 %.
    assert ledger.job_held(job_id) == ledger.cost_micro(130 * 1.25, 10_000)
    assert c.post(f"/api/jobs/{job_id}/cancel", json={}).json["status"] == "cancelled"
    assert ledger.job_held(job_id) == 0 and available(alice) == 2_000_000
