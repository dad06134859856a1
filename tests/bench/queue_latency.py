"""Submit-to-trainer-start latency and the queue's overhead per job, with a free slot.

    /work/venv/bin/python tests/bench/queue_latency.py [--jobs 10] [--no-real]

A consumer runs in threads of this process (as inside ``serve``) on a fresh SQLite store and a SQLite
queue. Fake-trainer jobs (tests/fake_trainer.py, 6 steps of 10 ms) measure the queue itself; one real
``trainer.train --depth 1 --max-steps 6`` run measures what a user sees. Times:

- start:    submit -> the trainer process is running (its first line of its own log / trainers.txt)
- first step: submit -> the first ``step`` event is in the jobs table
- overhead: submit -> completed, minus the trainer's own lifetime (claim, prepare, spawn, Python start,
            event ingestion, finish)

Human lines first; the LAST line is one JSON object. Target: start under 2 s.
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

# nanochat_studio and trainer are installed (pip install -e .); the test helpers imported below
# are not, so the repository root goes on the path for `tests.test_jobs`.
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from nanochat_studio import jobs, tasks  # noqa: E402
from nanochat_studio.models import JobEvent, TrainingJob, User  # noqa: E402
from tests.test_jobs import make_settings, open_store  # noqa: E402


def _wait(predicate, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(0.005)
    raise TimeoutError("timed out")


def _trainer_window(run_dir: Path) -> tuple[float, float]:
    """(start, end) wall times of the trainer process, from the supervisor's trainers.txt."""
    start = end = 0.0
    for line in (run_dir / "trainers.txt").read_text().splitlines():
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        start = float(fields.get("start", start))
        end = float(fields.get("end", end))
    return start, end


def measure(user: User, settings, config: dict, timeout: float) -> dict:
    t_submit_wall = time.time()
    t0 = time.monotonic()
    job = jobs.submit(user, config, settings)
    tasks.enqueue_job(job.id, settings)
    run_dir = Path(settings.runs_dir) / f"job-{job.id}"
    t_start = _wait(lambda: (run_dir / "trainers.txt").exists(), timeout)
    t_step = _wait(lambda: JobEvent.select().where((JobEvent.job == job.id) & (JobEvent.kind == "step")).exists(),
                   timeout)
    t_done = _wait(lambda: TrainingJob.get_by_id(job.id).status in jobs.FINAL, timeout)
    final = TrainingJob.get_by_id(job.id)
    if final.status != "completed":
        raise RuntimeError(f"job {job.id} ended {final.status}: {final.status_reason}")
    p_start, p_end = _trainer_window(run_dir)
    return {
        "start_s": t_start - t0,
        "spawn_s": p_start - t_submit_wall,
        "first_step_s": t_step - t0,
        "total_s": t_done - t0,
        "trainer_s": p_end - p_start,
        "overhead_s": (t_done - t0) - (p_end - p_start),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10)
    ap.add_argument("--no-real", action="store_true", help="skip the real trainer run")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ncs-bench-"))
    fake = make_settings(tmp, trainer_module="tests.fake_trainer")
    open_store(fake.database_url)
    user = User.create(email="bench@example.com", name="bench")
    os.environ["FAKE_STEP_S"] = "0.01"
    os.environ.setdefault("PYTHONPATH", str(REPO))
    handle = tasks.start_consumer(fake)
    results: dict = {"device": "cpu", "queue": "sqlite", "jobs": args.jobs}
    try:
        time.sleep(1.0)  # an idle consumer: its poll has backed off to the longest delay
        runs = []
        for _ in range(args.jobs):
            runs.append(measure(user, fake, {"depth": 1, "dataset": "demo", "max_steps": 6,
                                             "checkpoint_every": 3}, timeout=60))
            time.sleep(0.3)  # idle again between jobs
        for key in ("start_s", "first_step_s", "overhead_s", "trainer_s"):
            values = [r[key] for r in runs]
            results[f"fake_{key}_median"] = round(statistics.median(values), 3)
            results[f"fake_{key}_max"] = round(max(values), 3)
        print(f"fake trainer, {args.jobs} jobs one after another on a free CPU slot:")
        print(f"  submit -> trainer running : median {results['fake_start_s_median']:.3f} s, "
              f"max {results['fake_start_s_max']:.3f} s")
        print(f"  submit -> first step event: median {results['fake_first_step_s_median']:.3f} s, "
              f"max {results['fake_first_step_s_max']:.3f} s")
        print(f"  queue overhead per job    : median {results['fake_overhead_s_median']:.3f} s "
              f"(total minus the trainer's own {results['fake_trainer_s_median']:.3f} s)")
    finally:
        tasks.stop_consumer(handle, timeout=30)
    if not args.no_real:
        real = make_settings(tmp / "real", trainer_module="trainer.train", term_grace_seconds=30)
        open_store(real.database_url)
        user = User.create(email="bench@example.com", name="bench")
        handle = tasks.start_consumer(real)
        try:
            time.sleep(1.0)
            for label in ("cold", "warm"):  # warm: the tokenized demo corpus is in the shared data cache
                r = measure(user, real, {"depth": 1, "dataset": "demo", "max_steps": 6, "checkpoint_every": 3},
                            timeout=600)
                results.update({f"real_{label}_{k}": round(v, 3) for k, v in r.items()})
                print(f"real trainer (depth 1, 6 steps, demo corpus, CPU), {label} data cache:")
                print(f"  submit -> trainer running : {r['start_s']:.3f} s")
                print(f"  submit -> first step event: {r['first_step_s']:.3f} s (imports torch, prepares data)")
                print(f"  submit -> completed       : {r['total_s']:.3f} s; queue overhead {r['overhead_s']:.3f} s")
        except Exception as exc:
            results["real_error"] = str(exc)
            print(f"real trainer run failed: {exc}")
        finally:
            tasks.stop_consumer(handle, timeout=60)
    results["target_start_s"] = 2.0
    results["meets_target"] = results["fake_start_s_max"] < 2.0 and all(
        results.get(f"real_{label}_start_s", 0) < 2.0 for label in ("cold", "warm"))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
