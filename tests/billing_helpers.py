"""What the billing tests share: a hosted app over the test's store talking to the fake Stripe, verified
personas with credits, and the ledger audit after every billing test.

``from billing_helpers import *`` brings the fixtures into a module; ``ledger_checked`` is autouse there,
so every test of the module ends with ``ledger.audit()`` finding nothing wrong.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import client_as, make_user  # noqa: E402
from fake_stripe import SECRET_KEY, WEBHOOK_SECRET, FakeStripe  # noqa: E402

from nanochat_studio import billing, estimate  # noqa: E402
from nanochat_studio.billing import ledger  # noqa: E402
from nanochat_studio.db import database  # noqa: E402
from nanochat_studio.models import User, utcnow  # noqa: E402
from trainer import sizing  # noqa: E402

DEVICE = {"device": "cpu", "device_name": "test cpu", "memory_bytes": 8 << 30}
PACKS = [{"id": "small", "credits": 10, "amount": 500, "currency": "usd"},
         {"id": "large", "credits": 100, "amount": 4000, "currency": "usd"}]
PRICE_CPU = 0.01  # credits per device-second: 10,000 micro-credits
RATE = PRICE_CPU * ledger.MICRO
# Trainer settings for jobs run here: the fake trainer, no waiting on back-offs.
FAST = {"gpus": "none", "trainer_module": "tests.fake_trainer", "worker_threads": 2, "retry_backoff_seconds": 0.0,
        "reconcile_seconds": 0.5, "term_grace_seconds": 20.0, "max_queued_jobs": 100}


@pytest.fixture
def stripe_fake():
    fake = FakeStripe()
    yield fake
    fake.close()


@pytest.fixture
def hosted(make_app, stripe_fake):
    """``hosted(**overrides)``: a hosted app (CSRF on) wired to the fake Stripe, its device a test CPU
    whose calibrations time nothing."""
    made = []

    def make(**overrides: Any):
        values = dict(mode="hosted", stripe_secret_key=SECRET_KEY, stripe_webhook_secret=WEBHOOK_SECRET,
                      stripe_api_base=stripe_fake.url, credit_packs=PACKS, prices={"cpu": PRICE_CPU}, **FAST)
        values.update(overrides)
        app = make_app(**values)
        app.extensions["ncs_calibrator"] = estimate.Calibrator(probe=lambda: dict(DEVICE), run=lambda s, b: None)
        database.connect(reuse_if_open=True)
        made.append(app)
        return app

    return make


@pytest.fixture(autouse=True)
def ledger_checked(_store_backend, db_url):
    """After the test: the audit finds nothing wrong (when the test opened a store). It asks for the
    store's fixtures so that it ends before them, while the test's database still exists."""
    yield
    if database.obj is None:
        return
    try:
        database.connect(reuse_if_open=True)
    except Exception:
        return
    if not database.table_exists("ledger_transaction"):
        return
    problems = ledger.audit()
    assert problems == [], problems


def verified(name: str, *, credits: float = 0, admin: bool = False) -> User:
    """A persona whose email is verified, with ``credits`` granted."""
    user = make_user(name, admin=admin)
    User.update(email_verified_at=utcnow()).where(User.id == user.id).execute()
    if credits:
        billing.grant(user, credits, "test credits")
    return User.get_by_id(user.id)


def available(user: User) -> int:
    return ledger.balances(user.id)["available"]


def calibrate(seconds: float, *, depth: int = 1, max_steps: int = 20) -> None:
    """Make the estimate of a demo job of ``depth`` and ``max_steps`` steps exactly ``seconds``: the
    estimate adds a run's fixed parts (start-up, data, evaluations, exit) to its steps, so the step rate
    is chosen to leave the rest."""
    shape = sizing.shape_for(depth, sizing.DEMO_FACTS["vocab_size"], 256)  # the demo's own tokenizer
    tokens = max_steps * 8 * 256
    config = {"depth": depth, "max_steps": max_steps}
    facts = {"status": "known", "origin": "precomputed", **sizing.DEMO_FACTS}

    def total(tokens_per_sec: float) -> float:
        estimate.store_calibration(DEVICE["device_name"], shape, 8, {"tokens_per_sec": tokens_per_sec,
                                                                     "eval_batch_s": 0.0, "sample_s": 0.0,
                                                                     "checkpoint_s": 0.0})
        plan = estimate.estimate(config, DEVICE, data_bytes=sizing.DEMO_CORPUS_BYTES, facts=facts)
        assert plan["time"]["source"] == "calibrated" and plan["steps"] == max_steps
        return plan["time"]["seconds"]

    fixed = total(tokens / seconds) - seconds  # what the estimate adds besides the steps
    assert fixed < seconds, f"the fixed parts alone ({fixed:.1f} s) exceed {seconds} s"
    total(tokens / (seconds - fixed))


def post_json(client, url: str, body: Any, **kw: Any):
    return client.post(url, data=json.dumps(body), content_type="application/json", **kw)


def in_threads(n: int, fn) -> list:
    """Run ``fn(i)`` in ``n`` threads started together; their results in order (exceptions re-raised)."""
    results: list = [None] * n
    errors: list = []
    gate = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            gate.wait()
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)
        finally:
            if database.obj is not None and not database.is_closed():
                database.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return results


__all__ = ["DEVICE", "FAST", "PACKS", "PRICE_CPU", "RATE", "available", "calibrate", "client_as", "hosted",
           "in_threads", "ledger_checked", "post_json", "stripe_fake", "verified"]
