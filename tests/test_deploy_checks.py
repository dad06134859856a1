"""The deployment files checked by the real tools on the real files: promtool (the alert rules and their
unit tests, the dashboard's queries), hadolint (both images) and systemd-analyze (the units); the
Grafana dashboard is parsed and its queries checked against issue 13's metric names. Every check also
runs on a broken copy, to show it can fail. `docker build` cannot run here (no engine): hadolint and
the structural checks of the Dockerfiles are what we have. Kubernetes, compose and the workflows:
tests/test_deploy_manifests.py.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from deploy_tools import (  # noqa: E402
    DOCKERFILES, ISSUE_METRICS, NAMED_HERE, PKG, WEB_PORT, WORKER_METRICS_PORT, cli_problems, env_problems,
    metric_names, promtool_parses, query_problems, run, tool,
)


def test_the_metric_names_chosen_here_belong_to_the_issues_families():
    for name in NAMED_HERE - {"ncs_worker_up"}:
        assert name.startswith(("ncs_gpu_", "ncs_credits_")), name
    assert metric_names('sum by (le) (rate(ncs_a_bucket{x="y|z"}[5m])) / on() ncs_b offset 1h') == {
        "ncs_a_bucket", "ncs_b"}


# --- alerts -----------------------------------------------------------------------------------------
ALERT_TOPICS = {  # the issue's list -> the alerts that cover it
    "job failure rate": ["NcsJobFailureRateHigh"], "infrastructure failures": ["NcsInfrastructureFailures"],
    "queue stuck": ["NcsQueueStuck"], "no worker": ["NcsNoWorker"], "lease lost": ["NcsWorkerLeaseLost"],
    "GPU gone or Xid errors": ["NcsGpuGone", "NcsGpuXidErrors", "NcsGpuQuarantined"],
    "credits audit failure or overdraft attempt": ["NcsCreditsAuditFailed", "NcsCreditsOverdraftAttempts"],
    "preemptions": ["NcsPreemptionsFrequent"],
}


def alert_rules(doc: dict) -> list[dict]:
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_alert_rules_pass_promtool_and_a_broken_rule_fails(tmp_path):
    ok = run(tool("promtool"), "check", "rules", PKG / "prometheus" / "alerts.yml")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    text = (PKG / "prometheus" / "alerts.yml").read_text()
    broken = text.replace("(increase(ncs_worker_lease_lost_total[15m]))", "(increase(ncs_worker_lease_lost_total[15m])")
    assert broken != text
    (tmp_path / "alerts.yml").write_text(broken)
    bad = run(tool("promtool"), "check", "rules", tmp_path / "alerts.yml")
    assert bad.returncode != 0 and "NcsWorkerLeaseLost" in bad.stdout + bad.stderr


MUTATIONS = {  # a change of meaning each unit test must catch
    "NcsNoWorker": lambda r: r.update({"for": "25m"}),
    "NcsGpuGone": lambda r: r.update({"expr": r["expr"].split("and on(instance)")[0]}),
    "NcsQueueStuck": lambda r: r.update({"expr": r["expr"].replace('"preparing|running"', '"preparing"')}),
}


def test_alert_unit_tests_pass_and_catch_a_changed_rule(tmp_path):
    ok = run(tool("promtool"), "test", "rules", "alerts.test.yml", cwd=PKG / "prometheus")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    original = yaml.safe_load((PKG / "prometheus" / "alerts.yml").read_text())
    shutil.copy(PKG / "prometheus" / "alerts.test.yml", tmp_path)
    for alert, mutate in MUTATIONS.items():
        doc = copy.deepcopy(original)
        mutate(next(r for r in alert_rules(doc) if r["alert"] == alert))
        (tmp_path / "alerts.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
        bad = run(tool("promtool"), "test", "rules", "alerts.test.yml", cwd=tmp_path)
        assert bad.returncode != 0 and alert in bad.stdout + bad.stderr, (alert, bad.stdout)


def test_alerts_cover_the_issues_list_with_its_metric_names():
    rules = alert_rules(yaml.safe_load((PKG / "prometheus" / "alerts.yml").read_text()))
    by_name = {r["alert"]: r for r in rules}
    assert set(by_name) == {a for names in ALERT_TOPICS.values() for a in names}
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    assert query_problems([r["expr"] for r in rules]) == []
    assert query_problems(['sum(rate(ncs_jobs_finished_total{outcome="failed"}[5m]))', "up == 0"]) != []


# --- the Grafana dashboard --------------------------------------------------------------------------
def dashboard_exprs(dash: dict) -> list[str]:
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert all(p.get("targets") for p in panels), "a panel without a query"
    return [t["expr"] for p in panels for t in p["targets"]]


def test_dashboard_queries_parse_and_use_only_the_issues_metrics(tmp_path):
    dash = json.loads((PKG / "grafana" / "nanochat-studio.json").read_text())
    exprs = dashboard_exprs(dash)
    assert query_problems(exprs) == []
    parsed = promtool_parses(exprs, tmp_path)
    assert parsed.returncode == 0, parsed.stdout + parsed.stderr
    shown = set().union(*map(metric_names, exprs))
    missing = {m for m in ISSUE_METRICS if not ({m} | {m + "_bucket", m + "_sum", m + "_count"}) & shown}
    assert not missing, f"main figures missing from the dashboard: {missing}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert promtool_parses(["sum(rate(ncs_queue_jobs[5m])"], tmp_path).returncode != 0


# --- images -----------------------------------------------------------------------------------------
def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip()]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    result = False
    parts = path.strip("/").split("/")
    for pattern in patterns:
        negate, pat = pattern.startswith("!"), pattern.lstrip("!").strip("/")
        if any(fnmatch("/".join(parts[:i]), pat) for i in range(1, len(parts) + 1)):
            result = not negate
    return result


def image_problems(path: Path) -> list[str]:
    ins = instructions(path)
    problems = []
    kinds = [k for k, _ in ins]
    users = [v for k, v in ins if k == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("does not end as a non-root USER")
    health = [v for k, v in ins if k == "HEALTHCHECK"]
    if len(health) != 1 or health[0].upper().startswith("NONE"):
        problems.append("needs exactly one HEALTHCHECK")
    pips = [i for i, (k, v) in enumerate(ins) if k == "RUN" and "pip install" in v]
    torch_at = [i for i in pips if "torch==" in ins[i][1] and "--index-url" in ins[i][1]]
    project_at = [i for i in pips if "./[" in ins[i][1]]
    if not torch_at or not project_at or torch_at[0] > project_at[0]:
        problems.append("must install torch from its index before the project (README)")
    patterns = [line.strip() for line in Path(f"{path}.dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for k, v in ins:
        if k == "COPY":
            problems += [f"COPY {src} is excluded by the dockerignore" for src in v.split()[:-1]
                         if not src.startswith("--") and ignored(src, patterns)]
    if "CMD" not in kinds or kinds.index("USER") > kinds.index("CMD"):
        problems.append("CMD before USER")
    return problems


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_is_hadolint_clean_and_a_careless_line_is_not(name, tmp_path):
    ok = run(tool("hadolint"), "--no-color", PKG / name)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / name
    broken.write_text((PKG / name).read_text() + "\nRUN cd /tmp && apt-get install curl\n")
    bad = run(tool("hadolint"), "--no-color", broken)
    assert bad.returncode != 0 and "DL3003" in bad.stdout


def test_images_are_non_root_with_healthchecks_and_torch_first(tmp_path):
    for name in DOCKERFILES:
        assert image_problems(PKG / name) == [], name
    cpu, cuda = (dict(reversed(instructions(PKG / n))) for n in ("Dockerfile", "Dockerfile.cuda"))
    assert "download.pytorch.org/whl/cpu" in (PKG / "Dockerfile").read_text()
    # The CUDA worker: an NVIDIA CUDA runtime base and torch built for the same CUDA major.minor.
    text = (PKG / "Dockerfile.cuda").read_text()
    base = re.search(r"ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?runtime-", text)
    index = re.search(r"ARG TORCH_INDEX=https://download.pytorch.org/whl/cu(\d+)", text)
    assert base and index and index.group(1) == base.group(1) + base.group(2)
    assert f"{WORKER_METRICS_PORT}" in cuda["EXPOSE"] and f":{WORKER_METRICS_PORT}/metrics" in cuda["HEALTHCHECK"]
    assert f"{WEB_PORT}" in cpu["EXPOSE"] and f":{WEB_PORT}/healthz" in cpu["HEALTHCHECK"]
    broken = tmp_path / "Dockerfile"
    broken.write_text((PKG / "Dockerfile").read_text().replace("USER 10001:10001", "USER root")
                      .replace("COPY trainer trainer", "COPY tests tests"))
    shutil.copy(PKG / "Dockerfile.dockerignore", tmp_path)
    assert len(image_problems(broken)) == 2


def test_the_env_and_cli_checks_reject_what_does_not_exist():
    assert env_problems({"NCS_DATABASE_URL", "NCS_SECRET_KEY_FILE", "NCS_PORT"}) == []
    assert env_problems({"NCS_DATABSE_URL", "NCS_PORT_FILE"}) == [f"{n} is no setting" for n in
                                                                   ("NCS_DATABSE_URL", "NCS_PORT_FILE")]
    assert cli_problems(["nanochat-studio", "serve", "--no-worker"]) == []
    assert cli_problems(["nanochat-studio", "serve", "--no-wroker"]) != []
    assert cli_problems(["nanochat-studio", "wrker"]) != []


# --- systemd ----------------------------------------------------------------------------------------
UNITS = sorted(p.name for p in (PKG / "systemd").glob("*.service"))


def systemd_root(tmp_path: Path, units: dict[str, str]) -> Path:
    """A root with the system's unit directory, our units and a stand-in for the installed venv's
    console script (verify checks that ExecStart's binary exists)."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    exe = root / "opt/nanochat-studio/.venv/bin/nanochat-studio"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name, text in units.items():
        (root / "etc/systemd/system" / name).write_text(text)
    return root


def verify(root: Path, name: str) -> subprocess.CompletedProcess:
    return run(tool("systemd-analyze"), "verify", f"--root={root}", "--man=no", f"/etc/systemd/system/{name}")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or not Path("/usr/lib/systemd/system").is_dir(),
                    reason="systemd-analyze is not installed (Debian: apt-get install systemd): units not verified")
def test_systemd_units_verify_are_hardened_and_a_bad_key_fails(tmp_path):
    units = {n: (PKG / "systemd" / n).read_text() for n in UNITS}
    root = systemd_root(tmp_path, units)
    for name, text in units.items():
        result = verify(root, name)
        # verify exits 0 on unknown keys and bad values, printing warnings: any output is a failure.
        assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stderr
        security = run(tool("systemd-analyze"), "security", "--offline=true", f"--root={root}", "--no-pager",
                       "--threshold=40", f"/etc/systemd/system/{name}")
        assert security.returncode == 0, security.stdout[-400:]
        for key in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                    "CapabilityBoundingSet=\n", "RestrictAddressFamilies=", "DynamicUser=yes", "TimeoutStopSec=150"):
            assert key in text, (name, key)
        exec_start = re.search(r"^ExecStart=(\S+)\s+(.*)$", text, re.M)
        assert cli_problems(["nanochat-studio", *exec_start.group(2).split()]) == []
    bad = {"bad.service": units[UNITS[0]].replace("NoNewPrivileges=yes", "NoNewPrivileges=maybe\nProtecSystem=strict")}
    broken_root = systemd_root(tmp_path / "broken", bad)
    result = verify(broken_root, "bad.service")
    assert "Failed to parse boolean value, ignoring: maybe" in result.stderr
    assert "Unknown key 'ProtecSystem'" in result.stderr
    loose = {"loose.service": re.sub(r"(?s)# --- hardening.*?\n\n", "", units[UNITS[0]])}
    loose_root = systemd_root(tmp_path / "loose", loose)
    assert run(tool("systemd-analyze"), "security", "--offline=true", f"--root={loose_root}", "--no-pager",
               "--threshold=40", "/etc/systemd/system/loose.service").returncode != 0
