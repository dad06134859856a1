"""The hosted studio's promise, in real Chromium: buy credits (the fake Stripe's Checkout page sends the
buyer back), train a real (tiny) model with them, chat with it, and find the charge on the account page.
The app is served by waitress with its queue consumer, the real trainer and a real model server; only
Stripe is a fake on loopback."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest
from billing_helpers import hosted, ledger_checked, stripe_fake  # noqa: F401 - fixtures
from billing_helpers import available, verified
from conftest import PASSWORD

sys.path.insert(0, str(Path(__file__).parent))
from chat_fixtures import LiveServer  # noqa: E402

from nanochat_studio import datasets, tasks  # noqa: E402
from nanochat_studio.billing import ledger  # noqa: E402
from nanochat_studio.db import database  # noqa: E402
from nanochat_studio.models import TrainingJob  # noqa: E402
from trainer import demo  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.process]  # real Chromium, a real trainer and model server
os.environ.setdefault("OMP_NUM_THREADS", "1")


def test_buy_credits_then_train_then_chat(hosted, stripe_fake, browser):
    app = hosted(trainer_module="trainer.train", term_grace_seconds=30.0)
    settings = app.config["NCS_SETTINGS"]
    alice = verified("alice")
    text = "\n".join(demo.generate_stories(seed=1, n=400)).encode()
    ds = datasets.save_upload(alice, "stories.txt", io.BytesIO(text), settings, size_hint=len(text))
    database.close()
    server = LiveServer(app)
    stripe_fake.webhook_url = f"{server.url}/stripe/webhook"
    consumer = tasks.start_consumer(settings)
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    try:
        page.goto(f"{server.url}/account/login?next=/account")
        page.fill("#email", "alice@example.com")
        page.fill("#password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(f"{server.url}/account")
        assert page.text_content("#available").strip() == "0.00"

        # Buy: our button, Stripe's (fake) page, Pay, and back to the account page with the credits.
        page.click('button[data-pack="small"]')
        page.wait_for_url(f"{stripe_fake.url}/pay/*")
        page.click("#pay")
        page.wait_for_url(f"{server.url}/account")
        assert "10 credits are in your account" in page.text_content(".flashes")
        assert page.text_content("#available").strip() == "10.00"

        # Train: the plan shows the price; the job holds credits, runs, and settles.
        page.goto(f"{server.url}/train")
        page.check('input[name="source"][value="upload"]')
        page.select_option("#dataset-id", str(ds.id))
        page.click("summary")
        page.fill('input[name="max_steps"]', "12")
        page.fill('input[name="checkpoint_every"]', "6")
        page.fill('input[name="batch_size"]', "2")
        page.fill('input[name="seq_len"]', "64")
        page.fill("#depth", "1")
        page.wait_for_function("() => !document.getElementById('e-cost-row').hidden "
                               "&& document.getElementById('e-cost').textContent.includes('credits')")
        assert "you have 10.00 available" in page.text_content("#e-cost-note")
        page.click("button:has-text('Start training')")
        page.wait_for_url(f"{server.url}/jobs/*")
        page.wait_for_function("() => document.getElementById('status').textContent === 'completed'",
                               timeout=180_000)

        # Chat with what it learned.
        page.click("#chat")
        page.wait_for_url(f"{server.url}/chat/*")
        page.fill("#prompt", "Once upon a time")
        page.click("#send")
        page.wait_for_selector(".msg-assistant .msg-stats:not(:empty)", timeout=120_000)
        assert len(page.text_content(".msg-assistant .msg-body")) > 0

        # The account page tells what it cost.
        page.goto(f"{server.url}/account")
        rows = page.text_content("#transactions")
        assert "hold for an estimated" in rows and "device-seconds on cpu" in rows and "returned" in rows
        assert errors == []
    finally:
        context.close()
        tasks.stop_consumer(consumer, timeout=60)
        server.close()
        pool = app.extensions.get("model_pool")
        if pool is not None:
            pool.close()
    database.connect(reuse_if_open=True)
    job = TrainingJob.get()
    assert job.status == "completed" and job.cost > 0
    assert available(alice) == 10_000_000 - job.cost and ledger.balances(alice.id)["held"] == 0
    assert stripe_fake.deliveries == [200]
