"""Jobs per minute drained by one worker, then by two, in the scaled-out layout (tests/cluster.py: serve
and workers each in their own network namespace, sharing PostgreSQL, Redis and an S3 server).

    .venv/bin/python tests/bench/drain.py [--jobs 20] [--steps 10] [--step-s 0.02]

Fake-trainer jobs (tests/fake_trainer.py): what is measured is the studio's cost per job: claim,
prepare, spawn the trainer and its mirror sidecar, ingest events, upload the model, finish. One run
measures both: N jobs with one worker, then a second worker starts and N more are drained by both.
Drain time: first submit to the last job's finished_at. On this 2-core machine two workers share the
cores, so the ratio says how much of a job's cost is waiting (storage, database, queue), not CPU.
Human lines first; the LAST line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.cluster import Cluster  # noqa: E402
from tests.netlab import Lab  # noqa: E402


def drain(cluster: Cluster, key: str, n: int, steps: int, tag: str) -> dict:
    from nanochat_studio import db
    from nanochat_studio.models import TrainingJob

    t0 = time.time()
    ids = [cluster.api(key, "/api/jobs", {"depth": 1, "dataset": "demo", "max_steps": steps,
                                          "checkpoint_every": steps, "name": f"{tag} {i}"})["id"] for i in range(n)]
    submitted = time.time() - t0
    db.open_database(cluster.database_url)
    try:
        deadline = time.monotonic() + 600
        while True:
            rows = list(TrainingJob.select().where(TrainingJob.id.in_(ids)))
            if all(r.status in ("completed", "failed", "cancelled") for r in rows):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{tag}: jobs still waiting after 600 s")
            cluster.check_alive()
            time.sleep(0.1)
    finally:
        db.database.close()
    bad = [(r.id, r.status, r.status_reason) for r in rows if r.status != "completed"]
    if bad:
        raise RuntimeError(f"{tag}: jobs did not complete: {bad[:3]}")
    end = max(r.finished_at for r in rows).timestamp()
    start = min(r.created_at for r in rows).timestamp()
    # The store keeps naive UTC; both ends come from it, so their difference is right.
    seconds = end - start
    per_job = [(r.finished_at - r.started_at).total_seconds() for r in rows]
    return {"jobs": n, "seconds": round(seconds, 2), "jobs_per_minute": round(60 * n / seconds, 1),
            "submit_s": round(submitted, 2), "median_job_s": round(statistics.median(per_job), 2),
            "attempts": sorted({r.attempt for r in rows})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--step-s", type=float, default=0.02)
    args = ap.parse_args()
    load_before = os.getloadavg()[0]  # the machine is shared: how busy it was says how noisy the run is
    tmp = tempfile.mkdtemp(prefix="ncs-bench-drain-")
    with Lab(tmp) as lab:
        cluster = Cluster(lab, tmp, workers=1, env={"FAKE_STEP_S": str(args.step_s)})
        try:
            key = cluster.api_key("bench")
            print(f"layout: {'separate network namespaces' if lab.isolated else 'loopback'}; "
                  f"{args.jobs} jobs of {args.steps} steps x {args.step_s} s per phase", flush=True)
            drain(cluster, key, 2, args.steps, "warm-up")  # first imports, first bucket writes
            one = drain(cluster, key, args.jobs, args.steps, "one worker")
            print(f"one worker: {one}", flush=True)
            cluster.start_worker("w2")
            time.sleep(3)  # its imports and registration, outside the measured window
            two = drain(cluster, key, args.jobs, args.steps, "two workers")
            print(f"two workers: {two}", flush=True)
        finally:
            cluster.stop()
    print(json.dumps({"benchmark": "drain", "layout": "netns" if lab.isolated else "loopback",
                      "jobs_per_phase": args.jobs, "steps": args.steps, "step_s": args.step_s,
                      "one_worker_jobs_per_minute": one["jobs_per_minute"],
                      "two_workers_jobs_per_minute": two["jobs_per_minute"],
                      "speedup": round(two["jobs_per_minute"] / one["jobs_per_minute"], 2),
                      "one_worker_median_job_s": one["median_job_s"], "two_workers_median_job_s": two["median_job_s"],
                      "load_1m_before": round(load_before, 2), "load_1m_after": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
