"""Shared by tests/test_deploy_checks.py and tests/test_deploy_manifests.py: where the check tools are,
the metric contract of issue 13 (the names every alert, dashboard panel and autoscaler query may read),
a reader of the metric names in a PromQL expression, and checks that the settings and command-line flags
the packaging passes exist in the app."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nanochat_studio import jobs
from nanochat_studio.cli import main as cli_main
from nanochat_studio.settings import Settings, env_name

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "packaging"
BIN = Path(sys.executable).parent

# --- the metric contract (issue 13) -----------------------------------------------------------------
ISSUE_METRICS = {
    "ncs_queue_jobs", "ncs_running_jobs", "ncs_jobs_finished_total", "ncs_job_attempts_total",
    "ncs_trainer_tokens_per_second", "ncs_trainer_mfu", "ncs_chat_time_to_first_token_seconds",
    "ncs_chat_tokens_per_second", "ncs_chat_queue_depth", "ncs_http_request_duration_seconds",
    "ncs_worker_lease_lost_total", "ncs_gpu_utilization_ratio", "ncs_gpu_memory_used_bytes",
    "ncs_gpu_temperature_celsius", "ncs_gpu_power_watts", "ncs_gpu_xid_errors_total",
}
HISTOGRAMS = {"ncs_chat_time_to_first_token_seconds", "ncs_chat_tokens_per_second",
              "ncs_http_request_duration_seconds"}
# Names the issue leaves to us inside its `ncs_gpu_*` / `ncs_credits_*` families, plus worker liveness
# for "no worker". The metrics work must export exactly these.
NAMED_HERE = {"ncs_worker_up", "ncs_gpu_quarantined", "ncs_credits_purchases_total", "ncs_credits_holds_total",
              "ncs_credits_settlements_total", "ncs_credits_refused_total", "ncs_credits_audit_failures_total"}
ALLOWED_METRICS = ISSUE_METRICS | NAMED_HERE | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
OUTCOMES = {"completed", "failed_user", "failed_infra", "cancelled", "preempted"}

# Settings and flags the packaging may name before the app has them (none left: metrics_token,
# log_format and `worker --metrics-port` exist now).
PENDING_ENV: set[str] = set()
PENDING_FLAGS: set[tuple[str, str]] = set()
WEB_PORT, WORKER_METRICS_PORT = 8765, 8766


def tool(name: str) -> str:
    """A check tool: from this venv (PyPI wheels) or the system (.ci/run installs promtool)."""
    found = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing in CI (.ci/run installs it)")
        pytest.skip(f"{name} is not installed (pip install -e '.[test]'; apt-get install prometheus)")
    return found


def run(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=120)


def load_yaml(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# --- PromQL: the metric names an expression reads ---------------------------------------------------
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
             "offset", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                   # strings
    text = re.sub(r"\{[^}]*\}", " ", text)                              # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)                             # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)\b(\s*\()?", text):
        if not m.group(2) and m.group(1) not in _KEYWORDS:
            names.add(m.group(1))
    return names


def label_values(expr: str, label: str) -> set[str]:
    values = set()
    for m in re.finditer(rf'\b{label}\s*(=~|=|!=|!~)\s*"([^"]*)"', expr):
        values.update(m.group(2).split("|") if m.group(1) == "=~" else [m.group(2)])
    return values


def query_problems(exprs: list[str]) -> list[str]:
    problems = []
    for expr in exprs:
        names = metric_names(expr)
        if not names:
            problems.append(f"reads no metric: {expr}")
        problems += [f"{n} is not an issue-13 metric: {expr}" for n in sorted(names - ALLOWED_METRICS)]
        problems += [f"outcome {v!r} unknown: {expr}" for v in sorted(label_values(expr, "outcome") - OUTCOMES)]
        problems += [f"state {v!r} unknown: {expr}" for v in sorted(label_values(expr, "state") - set(jobs.STATES))]
    return problems


def promtool_parses(exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """promtool parses every expression, as recording rules ($__rate_interval is Grafana's)."""
    rules = {"groups": [{"name": "parse", "rules": [
        {"record": f"parse:{i}", "expr": e.replace("$__rate_interval", "5m")} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "parse.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    return run(tool("promtool"), "check", "rules", path)


DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")  # packaging/: the web/CPU image, the CUDA worker


def known_env() -> set[str]:
    names = set(PENDING_ENV)
    for f in dataclasses.fields(Settings):
        names.add(env_name(f))
        if f.metadata["secret"]:
            names.add(env_name(f) + "_FILE")
    return names


def env_problems(names: set[str]) -> list[str]:
    return [f"{n} is no setting" for n in sorted(n for n in names if n.startswith("NCS_") and n not in known_env())]


def cli_problems(argv: list[str]) -> list[str]:
    if argv[:1] != ["nanochat-studio"]:
        return []
    command = cli_main.commands.get(argv[1]) if len(argv) > 1 else None
    if command is None:
        return [f"no command in {argv}"]
    opts = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    return [f"{argv[1]} has no {a}" for a in argv[2:]
            if a.startswith("--") and a not in opts and (argv[1], a) not in PENDING_FLAGS]
