"""trainer/calibrate.py: a timing run measures what a training run spends, step by step and besides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainer import progress

pytestmark = pytest.mark.trainer  # the trainer alone: never opens the store

REPO = Path(__file__).resolve().parents[1]


def calibrate(*args: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "trainer.calibrate", "--device", "cpu", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    events = [e for e in map(progress.parse_line, proc.stdout.splitlines()) if e]
    assert len(events) == 1, (proc.stdout, proc.stderr)
    return proc.returncode, events[0]


def test_a_timing_run_reports_the_steps_and_a_runs_fixed_costs():
    code, e = calibrate("--depth", "1", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "2",
                        "--steps", "3", "--min-seconds", "0")
    assert code == 0 and e["event"] == "calibration"
    assert e["steps"] == 3 and e["step_s"] > 0 and e["tokens_per_sec"] == pytest.approx(2 * 32 / e["step_s"])
    for key in ("startup_s", "build_s", "first_step_extra_s", "eval_batch_s", "sample_s", "checkpoint_s"):
        assert e[key] >= 0, key
    assert 0 < e["startup_s"] < 120  # the process's own age when it was ready: imports and set-up
    assert e["eval_batch_s"] < 10 * e["step_s"] + 1  # a forward pass, not a step's work many times over
    assert e["peak_rss_bytes"] >= e["base_rss_bytes"] > 50 << 20  # torch alone is tens of MB


def test_it_keeps_timing_until_the_minimum_time_has_passed():
    code, e = calibrate("--depth", "1", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "2",
                        "--steps", "1", "--min-seconds", "0.5")
    assert code == 0 and e["steps"] * e["step_s"] >= 0.45


def test_bad_arguments_are_usage_errors():
    code, e = calibrate("--depth", "1", "--warmup", "0")
    assert code == progress.EXIT_USAGE and e["event"] == "error" and "warmup" in e["message"]
