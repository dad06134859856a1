"""The job page sets the plan a job was submitted with beside the trainer's own, in real Chromium, as soon
as the trainer's start event arrives; a figure that differs is marked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_job_page import Server, wait_for  # noqa: E402
from test_jobs_api import fake_calibrator  # noqa: E402

from nanochat_studio import accounts, estimate, jobs  # noqa: E402
from nanochat_studio.db import database  # noqa: E402
from nanochat_studio.models import TrainingJob  # noqa: E402

pytestmark = pytest.mark.browser


def cells(page) -> dict[str, tuple[str, str, str]]:
    """{row key: (estimate text, trainer text, class)} of the plan-and-run table."""
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('#plan-vs-run tbody tr')].map(
        tr => [tr.dataset.key, [tr.querySelector('.est').textContent.trim(),
                                tr.querySelector('.act').textContent.trim(), tr.className]]))""")


def test_the_trainers_plan_appears_beside_the_estimate_when_it_starts(app, browser):
    fake_calibrator(app)
    database.connect(reuse_if_open=True)
    owner = accounts.solo_owner()
    job = jobs.submit(owner, {"depth": 2, "dataset": "demo"}, app.config["NCS_SETTINGS"])
    estimate.record_for_job(job, app.extensions["ncs_calibrator"])  # as POST /api/jobs keeps it
    plan = jobs.get(job.id).estimate
    assert plan["exact"] and plan["steps"] > 0
    database.close()

    server = Server(app)
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(f"http://127.0.0.1:{server.port}/jobs/{job.id}")
        before = cells(page)
        assert before["params"][0] == f"{plan['params']:,}" and before["steps"][0] == f"{plan['steps']:,}"
        assert before["params"][1] == "waiting for the trainer…"
        assert "Exact" in page.text_content("#plan-note")

        with database.connection_context():  # the trainer starts: same plan, but (say) another vocabulary
            jobs.record_event(job.id, "start", {
                "config": {}, "params": plan["params"], "flops_per_token": 1, "total_steps": plan["steps"],
                "total_tokens": plan["tokens"], "device": "cpu", "vocab_size": plan["vocab_size"] + 1,
                "n_train_tokens": plan["data"]["train_tokens"], "budget": plan["budget"]})
        wait_for(page, "document.querySelector('#plan-vs-run tr[data-key=params] .act').textContent.includes(',')")
        after = cells(page)
        for key in ("params", "steps", "tokens", "train_tokens", "budget"):
            assert after[key][1] == after[key][0] and "matches" in after[key][2], (key, after[key])
        assert after["vocab_size"][1] == f"{plan['vocab_size'] + 1:,}" and "differs" in after["vocab_size"][2]

        with database.connection_context():  # it ends: the wall time appears too
            started = TrainingJob.get_by_id(job.id).created_at
            TrainingJob.update(status="running", started_at=started).where(TrainingJob.id == job.id).execute()
            jobs.transition(job.id, jobs.COMPLETED, expect={jobs.RUNNING}, reason="done")
        wait_for(page, "/^\\d+s$/.test(document.querySelector('#plan-vs-run tr[data-key=seconds] .act').textContent)")
        assert cells(page)["seconds"][0].endswith("s")  # the estimate, in the same format
        assert errors == []
    finally:
        page.close()
        server.stop()


def test_the_plan_page_says_estimating_until_the_upload_is_prepared(app, browser):
    import io

    from nanochat_studio import datafacts, datasets
    from tests.test_estimate import corpus

    fake_calibrator(app)
    settings = app.config["NCS_SETTINGS"]
    database.connect(reuse_if_open=True)
    owner = accounts.solo_owner()
    ds = datasets.save_upload(owner, "prose.txt", io.BytesIO(corpus(30_000)), settings)
    database.close()

    server = Server(app)
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(f"http://127.0.0.1:{server.port}/train")
        page.check("input[name=source][value=upload]")
        page.select_option("#dataset-id", str(ds.id))
        wait_for(page, "document.getElementById('e-data-note').textContent.startsWith('Estimating')")
        with database.connection_context():  # the queue's task runs (here, in the test's thread)
            assert datafacts.compute(datafacts.key_for(f"ds:{ds.id}", owner.id, None), settings) == "ready"
        # the page keeps asking while it is estimating, and then shows the trainer's own numbers
        wait_for(page, "document.getElementById('e-data-note').textContent.startsWith('Exact')")
        assert errors == []
    finally:
        page.close()
        server.stop()
