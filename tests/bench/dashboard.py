"""The dashboard's latency under 32 concurrent clients, against one client, in one run, in the scaled-out
layout (tests/cluster.py: `serve --no-worker` in its own network namespace, PostgreSQL over the network).

    .venv/bin/python tests/bench/dashboard.py [--clients 32] [--seconds 15]

The user owns 200 jobs and 60 models (rows written straight into the store). Each client keeps one
HTTP connection and asks for ``/`` (signed in with an API key) again and again for ``--seconds``;
every answer is checked (200, the page names the user's newest job). Latency: request sent -> body
read. The load generator shares the machine's 2 cores with the server. Human lines first; the LAST
line is one JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.cluster import Cluster  # noqa: E402
from tests.netlab import Lab  # noqa: E402


def seed(cluster: Cluster) -> str:
    from nanochat_studio import db
    from nanochat_studio.models import Model, TrainingJob, User

    db.open_database(cluster.database_url)
    try:
        user = User.get(User.email == "bench@example.com")
        for i in range(200):
            status = ("completed", "failed", "queued", "running")[i % 4]
            job = TrainingJob.create(user=user, name=f"seeded job {i}", status=status,
                                     config={"depth": 2, "dataset": "demo", "max_steps": 100})
            if i % 10 < 3:
                Model.create(user=user, job=job, name=f"seeded model {i}", step=100, checkpoint_key="x",
                             tokenizer_key="x")
        return f"seeded job {199}"
    finally:
        db.database.close()


def hammer(host: str, port: int, key: str, seconds: float, marker: str, out: list[float], errors: list[str],
           start: threading.Barrier) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=60)
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/html"}
    start.wait()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            conn.request("GET", "/", headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            errors.append(repr(exc))
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=60)
            continue
        out.append(time.perf_counter() - t0)
        if resp.status != 200 or marker.encode() not in body:
            errors.append(f"status {resp.status}")
    conn.close()


def measure(cluster: Cluster, key: str, clients: int, seconds: float, marker: str) -> dict:
    times: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    barrier = threading.Barrier(clients)
    threads = [threading.Thread(target=hammer, args=(cluster.web_machine.ip, cluster.web_port, key, seconds, marker,
                                                     times[i], errors, barrier)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = sorted(x for ts in times for x in ts)
    q = statistics.quantiles(flat, n=100)
    return {"clients": clients, "requests": len(flat), "errors": len(errors), "rps": round(len(flat) / seconds, 1),
            "p50_ms": round(q[49] * 1000, 1), "p99_ms": round(q[98] * 1000, 1), "max_ms": round(flat[-1] * 1000, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=15)
    args = ap.parse_args()
    load_before = os.getloadavg()[0]  # the machine is shared: how busy it was says how noisy the run is
    tmp = tempfile.mkdtemp(prefix="ncs-bench-dash-")
    with Lab(tmp) as lab:
        cluster = Cluster(lab, tmp, workers=0, web_threads=max(48, args.clients + 8))
        try:
            key = cluster.api_key("bench")
            marker = seed(cluster)
            measure(cluster, key, 4, 2, marker)  # warm-up: templates compiled, connections pooled
            one = measure(cluster, key, 1, args.seconds, marker)
            print(f"1 client:  {one}", flush=True)
            many = measure(cluster, key, args.clients, args.seconds, marker)
            print(f"{args.clients} clients: {many}", flush=True)
        finally:
            cluster.stop()
    print(json.dumps({"benchmark": "dashboard", "layout": "netns" if lab.isolated else "loopback", "path": "/",
                      "clients": args.clients, "seconds": args.seconds,
                      "p50_ms": many["p50_ms"], "p99_ms": many["p99_ms"], "rps": many["rps"], "errors": many["errors"],
                      "single_client_p50_ms": one["p50_ms"], "single_client_p99_ms": one["p99_ms"],
                      "single_client_rps": one["rps"],
                      "p99_ratio_to_single_client": round(many["p99_ms"] / one["p99_ms"], 1),
                      "load_1m_before": round(load_before, 2), "load_1m_after": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
