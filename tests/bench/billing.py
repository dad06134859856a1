"""Billing's costs: the Stripe webhook's latency under 100 concurrent deliveries, and what billing adds
to submitting a job.

    .venv/bin/python tests/bench/billing.py [--rounds 5] [--submits 200] [--database-url postgresql://...]

The webhook is served by a real ``nanochat-studio serve`` process (waitress, 32 threads, as a hosted
deployment would size it; no queue consumer) over a fresh SQLite store in a temporary home (or the given
database), talking to the fake Stripe of tests/fake_stripe.py; the 100 clients are threads of this
process, each with its own connection.

- webhook, same event: 100 clients deliver one ``checkout.session.completed`` at once (Stripe retries and
  replays): one top-up, 99 duplicates. Per round, a new session.
- webhook, distinct events: 100 clients deliver 100 different paid sessions at once: 100 top-ups, each
  an IMMEDIATE write transaction on SQLite.
- submit: ``POST /api/jobs`` in process (Flask's test client) alternately with billing on (hosted: the
  estimate, the locked check-and-hold, the job's billing row) and off (lab mode for a user without an
  allowance: the same request path with the null policy), on the same store, interleaved so drift hits
  both alike.

Latencies are client-side wall times of each request. Human lines first; the LAST line is one JSON
object. Target: webhook p99 under 1 s with 100 concurrent deliveries on this 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import requests  # noqa: E402
from fake_stripe import SECRET_KEY, WEBHOOK_SECRET, FakeStripe  # noqa: E402

from nanochat_studio import auth, billing, estimate  # noqa: E402
from nanochat_studio.app import create_app  # noqa: E402
from nanochat_studio.billing import ledger  # noqa: E402
from nanochat_studio.db import database  # noqa: E402
from nanochat_studio.models import User, utcnow  # noqa: E402
from nanochat_studio.settings import load_settings  # noqa: E402

PACKS = [{"id": "small", "credits": 10, "amount": 500, "currency": "usd"}]
DEVICE = {"device": "cpu", "device_name": "bench cpu", "memory_bytes": 8 << 30}
CLIENTS = 100


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs)) - 1))]


def make_app(home: str, mode: str, database_url: str | None):
    env = {"NCS_HOME": home, **({"NCS_DATABASE_URL": database_url} if database_url else {})}
    settings = load_settings(environ=env, mode=mode, stripe_secret_key=SECRET_KEY, stripe_webhook_secret=WEBHOOK_SECRET,
                             stripe_api_base=FAKE.url, credit_packs=PACKS, prices={"cpu": 0.0001},
                             max_queued_jobs=1_000_000, worker=False, gpus="none", threads=40, log_level="warning")
    app = create_app(settings)
    app.config.update(WTF_CSRF_ENABLED=False)
    app.extensions["ncs_calibrator"] = estimate.Calibrator(probe=lambda: dict(DEVICE), run=lambda s, b: None)
    return app


def start_serve(home: str, database_url: str | None) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NCS_")}
    env.update(NCS_HOME=home, NCS_MODE="hosted", NCS_STRIPE_SECRET_KEY=SECRET_KEY,
               NCS_STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET, NCS_STRIPE_API_BASE=FAKE.url,
               NCS_CREDIT_PACKS=json.dumps(PACKS), NCS_THREADS="40", NCS_LOG_LEVEL="error", NCS_GPUS="none")
    if database_url:
        env["NCS_DATABASE_URL"] = database_url
    proc = subprocess.Popen([sys.executable, "-m", "nanochat_studio", "serve", "--port", "0", "--no-worker"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("Serving on "):
            return proc, line.split()[-1].rstrip("/")
    raise SystemExit("serve did not start")


def deliver_all(url: str, events: list[dict]) -> list[float]:
    """Deliver ``events[i]`` from client i, all released at once; each request's latency in ms."""
    gate = threading.Barrier(len(events))
    out = [0.0] * len(events)
    payloads = [json.dumps(e).encode() for e in events]

    def client(i: int) -> None:
        s = requests.Session()
        header = FAKE.sign(payloads[i])
        gate.wait()
        t0 = time.perf_counter()
        r = s.post(url, data=payloads[i], headers={"Stripe-Signature": header, "Content-Type": "application/json"},
                   timeout=120)
        out[i] = (time.perf_counter() - t0) * 1000
        s.close()
        assert r.status_code == 200, r.text

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(events))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def new_paid_session(user: User) -> str:
    from nanochat_studio.billing import checkout

    s = checkout.create_checkout(SETTINGS, user, "small", str(time.perf_counter_ns()),
                                 success_url="http://127.0.0.1/r", cancel_url="http://127.0.0.1/c")
    return s["session_id"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds of 100 concurrent deliveries per kind")
    ap.add_argument("--submits", type=int, default=200, help="submissions with billing on, and as many off")
    ap.add_argument("--database-url", default=None, help="a PostgreSQL URL (default: SQLite in a temp home)")
    args = ap.parse_args()

    global FAKE, SETTINGS
    FAKE = FakeStripe()
    home = tempfile.mkdtemp(prefix="ncs-bench-billing-")
    hosted = make_app(home, "hosted", args.database_url)
    SETTINGS = hosted.config["NCS_SETTINGS"]
    database.connect(reuse_if_open=True)
    alice = auth.create_user("alice@example.com", password="correct horse battery", name="Alice")
    User.update(email_verified_at=utcnow()).where(User.id == alice.id).execute()
    alice = User.get_by_id(alice.id)
    database.close()
    serve, base = start_serve(home, args.database_url)
    url = f"{base}/stripe/webhook"
    database.connect(reuse_if_open=True)

    # One at a time first: what a delivery costs the server when nothing else runs.
    alone_same, alone_distinct = [], []
    event = FAKE.complete(new_paid_session(alice))
    for i in range(40):
        alone_same += deliver_all(url, [event])
        alone_distinct += deliver_all(url, [FAKE.complete(new_paid_session(alice))])
    print(f"one at a time: duplicate median {statistics.median(alone_same):.1f} ms, "
          f"new purchase median {statistics.median(alone_distinct):.1f} ms", flush=True)
    same: list[float] = []
    distinct: list[float] = []
    for r in range(args.rounds):
        event = FAKE.complete(new_paid_session(alice))
        same += deliver_all(url, [event] * CLIENTS)
        events = [FAKE.complete(new_paid_session(alice)) for _ in range(CLIENTS)]
        distinct += deliver_all(url, events)
        print(f"round {r + 1}: same event p99 {pct(same[-CLIENTS:], 99):.0f} ms, "
              f"distinct events p99 {pct(distinct[-CLIENTS:], 99):.0f} ms", flush=True)
    purchases = ledger.balances(alice.id)["available"] // 10_000_000
    assert purchases == args.rounds * (1 + CLIENTS) + 41, purchases  # one top-up per session, never more
    assert ledger.audit() == []
    serve.terminate()
    serve.wait(60)

    # Submit latency, billing on (hosted) vs off (lab, no allowance: the null policy), interleaved.
    lab = make_app(home, "lab", args.database_url)  # the same store
    database.connect(reuse_if_open=True)
    billing.grant(alice, 10_000_000, "bench")
    clients = {}
    for name, app in (("on", hosted), ("off", lab)):
        c = app.test_client()
        c.environ_base["REMOTE_ADDR"] = "203.0.113.7"
        with c.session_transaction() as session:
            session["_user_id"] = str(alice.id)
            session["_fresh"] = True
        clients[name] = c
    body = json.dumps({"depth": 2, "dataset": "demo", "max_steps": 50})
    times: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(2 * args.submits + 20):
        name = "on" if i % 2 == 0 else "off"
        t0 = time.perf_counter()
        r = clients[name].post("/api/jobs", data=body, content_type="application/json")
        dt_ms = (time.perf_counter() - t0) * 1000
        assert r.status_code == 201, r.get_json()
        assert (r.get_json()["billing"] is not None) == (name == "on")
        if i >= 20:  # the first few warm caches and connections
            times[name].append(dt_ms)
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    print(f"submit: billing on median {on:.1f} ms (p95 {pct(times['on'], 95):.1f}), "
          f"off median {off:.1f} ms (p95 {pct(times['off'], 95):.1f}): x{on / off:.2f}")
    FAKE.close()
    result = {
        "db": "postgresql" if args.database_url else "sqlite",
        "concurrent_deliveries": CLIENTS, "rounds": args.rounds,
        "webhook_same_event_p50_ms": round(pct(same, 50), 1), "webhook_same_event_p99_ms": round(pct(same, 99), 1),
        "webhook_distinct_events_p50_ms": round(pct(distinct, 50), 1),
        "webhook_distinct_events_p99_ms": round(pct(distinct, 99), 1),
        "webhook_p99_ms": round(max(pct(same, 99), pct(distinct, 99)), 1),
        "webhook_alone_duplicate_median_ms": round(statistics.median(alone_same), 2),
        "webhook_alone_purchase_median_ms": round(statistics.median(alone_distinct), 2),
        "submit_billing_on_median_ms": round(on, 2), "submit_billing_off_median_ms": round(off, 2),
        "submit_billing_on_p95_ms": round(pct(times["on"], 95), 2),
        "submit_billing_off_p95_ms": round(pct(times["off"], 95), 2),
        "submit_on_over_off": round(on / off, 3), "submits_each": args.submits,
    }
    print(json.dumps(result))


FAKE: FakeStripe = None  # type: ignore[assignment]  # set by main()
SETTINGS = None

if __name__ == "__main__":
    main()
