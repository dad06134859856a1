"""The job page of a run with a chat stage, in real Chromium: one loss chart over both stages with the
boundary marked, the chat stage's validation loss as its own curve, the ``stage`` event live over SSE."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_job_page import Server, wait_for  # noqa: E402
from test_jobs_api import FAKE_DEVICE  # noqa: E402

from nanochat_studio import accounts, chatplan, estimate, jobs  # noqa: E402
from nanochat_studio.db import database  # noqa: E402

pytestmark = pytest.mark.browser


def step(job_id: int, n: int, stage: str, total: int = 6) -> None:
    jobs.record_event(job_id, "step", {"step": n, "total_steps": total, "loss": 6.0 - n * 0.5, "lr": 0.02,
                                       "tokens_per_sec": 1000.0, "elapsed_s": n, "eta_s": total - n, "stage": stage})


def test_both_stages_share_one_chart_with_the_boundary_and_separate_validation_curves(app, browser):
    app.extensions["ncs_calibrator"] = estimate.Calibrator(probe=lambda: dict(FAKE_DEVICE),
                                                           run=lambda shape, batch: None)
    database.connect(reuse_if_open=True)
    owner = accounts.solo_owner()
    job = jobs.submit(owner, {"depth": 1, "dataset": "demo", "max_steps": 4, "chat": True, "chat_steps": 2},
                      app.config["NCS_SETTINGS"])
    jobs.record_event(job.id, "start", {"config": {}, "params": 1234, "flops_per_token": 1, "total_steps": 6,
                                        "total_tokens": 6 * 64, "device": "cpu",
                                        "stages": [{"stage": "pretrain", "steps": 4}, {"stage": "chat", "steps": 2}]})
    for n in (1, 2, 3, 4):
        step(job.id, n, "pretrain")
    jobs.record_event(job.id, "eval", {"step": 4, "val_loss": 3.5, "val_bpb": 1.25, "stage": "pretrain"})
    database.close()

    server = Server(app)
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    try:
        page.goto(f"http://127.0.0.1:{server.port}/jobs/{job.id}")
        wait_for(page, "window.__jobPage && window.__jobPage.loss.step.length === 4")
        assert page.text_content("#chat-data") == "demo"  # the header says what it chat-tunes on
        # the boundary is known from the start event's stages before the chat stage begins
        assert page.evaluate("window.__jobPage.loss.boundary") == 4
        legend = page.locator("#loss-chart .u-legend .u-series").all_text_contents()
        assert any("chat val loss" in s for s in legend) and any("val loss" in s for s in legend)

        with database.connection_context():  # the chat stage begins while the page is open (live SSE)
            jobs.record_event(job.id, "stage", {"stage": "chat", "step": 4, "steps": 2, "n_conversations": 950,
                                                "n_val_conversations": 50})
            step(job.id, 5, "chat")
            step(job.id, 6, "chat")
            jobs.record_event(job.id, "eval", {"step": 6, "val_loss": 1.75, "val_bpb": 0.5, "stage": "chat"})
        wait_for(page, "window.__jobPage.loss.chatStep.length === 1")
        assert page.evaluate("window.__jobPage.loss.step") == [1, 2, 3, 4, 5, 6]  # one chart, both stages
        assert page.evaluate("window.__jobPage.loss.valStep") == [4]  # pretraining's curve...
        assert page.evaluate("window.__jobPage.loss.chatVal") == [1.75]  # ...and the chat stage's own
        assert page.text_content("#bpb") == "1.250"  # bits per byte stay pretraining's
        assert page.text_content("#chat-val") == "1.750" and page.is_visible("#chat-val-stat")
        assert page.text_content("#stage") == "chat-tuning"
        assert "chat-tuning from step 5" in page.text_content("#stage-note")
        assert "chat-tuning began after step 4: 2 steps on 950 conversations (50 held out)" in page.text_content("#history")
        # the dashed boundary is drawn: the pixel column at step 4 is the stage colour for much of its height
        column = page.evaluate("""() => {
            const u = window.__jobPage.lossChart();
            const x = Math.round(u.valToPos(4, 'x', true));
            const data = u.ctx.getImageData(x, u.bbox.top, 1, u.bbox.height).data;
            let purple = 0;
            for (let i = 0; i < data.length; i += 4) if (data[i] > 120 && data[i + 1] < 120 && data[i + 2] > 200) purple++;
            return purple / u.bbox.height;
        }""")
        assert column > 0.3, column
        assert errors == []
    finally:
        page.close()
        server.stop()


def test_the_plan_page_estimates_the_chat_stage_and_chat_tunes_the_demo_by_default(app, browser):
    import io

    from nanochat_studio import datasets
    from test_jobs_api import fake_calibrator

    fake_calibrator(app)
    database.connect(reuse_if_open=True)
    ds = datasets.save_upload(accounts.solo_owner(), "prose.txt", io.BytesIO(b"Once upon a time. " * 2000),
                              app.config["NCS_SETTINGS"])
    database.close()
    server = Server(app)
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(f"http://127.0.0.1:{server.port}/train")
        assert page.is_checked("#chat")
        wait_for(page, "!document.getElementById('e-chat-row').hidden")
        assert " steps · " in page.text_content("#e-chat")
        note = page.text_content("#e-chat-note")
        passes = f"assumes {chatplan.CHAT_EPOCHS:g} passes over the built-in conversations"  # the trainer's default
        assert note.startswith("Pretraining ") and "then chat-tuning" in note and passes in note
        # other data: chat-tuning is a choice, off until made; the plan then has one stage
        page.check("input[name=source][value=upload]")
        page.select_option("#dataset-id", str(ds.id))
        assert not page.is_checked("#chat")
        wait_for(page, "document.getElementById('e-chat-row').hidden")
        page.check("#chat")
        wait_for(page, "!document.getElementById('e-chat-row').hidden")
        page.check("input[name=source][value=demo]")  # a choice made stays made
        assert page.is_checked("#chat")
        page.click("button:has-text('Start training')")
        page.wait_for_url(f"http://127.0.0.1:{server.port}/jobs/*")
        with database.connection_context():
            from nanochat_studio.models import TrainingJob

            job = TrainingJob.select().order_by(TrainingJob.id.desc()).get()
            assert job.config["chat_data"] == {"kind": "demo", "source": "demo"}
            assert [s["stage"] for s in job.estimate["stages"]] == ["pretrain", "chat"]
        assert errors == []
    finally:
        page.close()
        server.stop()
