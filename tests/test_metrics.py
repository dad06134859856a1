"""/metrics: who may read it, what it exports (exactly issue 13's names), and that each figure is counted
once, by the process where it happened, so Prometheus' sum over processes is right (a real `worker`
process with its own --metrics-port beside this test's "web" process)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nanochat_studio import gpus, jobs, metrics, quarantine, tasks, workers
from nanochat_studio.db import database
from nanochat_studio.inference import ModelPool
from nanochat_studio.models import TrainingJob
from tests.deploy_tools import ALLOWED_METRICS, ISSUE_METRICS, NAMED_HERE
from tests.test_jobs import REPO, TEST_SETTINGS, alice, open_store, settings, store  # noqa: F401
from tests.test_runner import wait_for
from tests.test_tasks import consumer, status_of, submit  # noqa: F401

TOKEN = "metrics-token-" + "x" * 20


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of an exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text_or_samples, name: str, **labels: str) -> float | None:
    got = samples(text_or_samples) if isinstance(text_or_samples, str) else text_or_samples
    return got.get((name, frozenset(labels.items())))


def here(name: str, **labels: str) -> float:
    """The value in this process's registry (0 when the series does not exist)."""
    return value(metrics.exposition()[0].decode(), name, **labels) or 0.0


# --- access -------------------------------------------------------------------------------------------

def test_metrics_answer_this_machine_or_the_bearer_token_only(make_app):
    app = make_app(metrics_token=TOKEN)
    local = app.test_client()  # REMOTE_ADDR 127.0.0.1, Host localhost
    r = local.get("/metrics")
    assert r.status_code == 200 and r.content_type.startswith("text/plain; version=")
    assert "ncs_queue_jobs" in r.get_data(as_text=True)
    remote = {"REMOTE_ADDR": "203.0.113.7"}
    assert app.test_client().get("/metrics", environ_base=remote).status_code == 403
    ok = app.test_client().get("/metrics", environ_base=remote, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200  # the token is Prometheus' way in; it is no API key (no 401)
    for bad in ("Bearer " + TOKEN[:-1], "Basic " + TOKEN, TOKEN):
        assert app.test_client().get("/metrics", environ_base=remote, headers={"Authorization": bad}).status_code == 403
    # A proxy on this machine connects from loopback too: what it relays is not local.
    relayed = local.get("/metrics", headers={"X-Forwarded-For": "198.51.100.4"})
    assert relayed.status_code == 403
    assert local.get("/metrics", headers={"X-Real-IP": "198.51.100.4"}).status_code == 403


def test_without_a_token_only_this_machine_reads_metrics(make_app):
    app = make_app()
    remote = {"REMOTE_ADDR": "203.0.113.7"}
    assert app.test_client().get("/metrics", environ_base=remote,
                                 headers={"Authorization": "Bearer anything-at-all-here"}).status_code == 403
    assert app.test_client().get("/metrics").status_code == 200


# --- what is exported -----------------------------------------------------------------------------

def test_queue_gauges_are_read_from_the_store_and_cancels_are_counted_once(app, client):
    from conftest import make_user

    alice = make_user("alice")
    cancelled_before = here("ncs_jobs_finished_total", outcome="cancelled")
    settings = app.config["NCS_SETTINGS"]
    for _ in range(3):
        jobs.submit(alice, {"depth": 1, "dataset": "demo"}, settings)
    job = TrainingJob.select().first()
    assert jobs.request_cancel(job) == "cancelled"
    assert jobs.request_cancel(job) == "cancelled"  # a second cancel changes nothing and counts nothing
    got = samples(client.get("/metrics").get_data(as_text=True))
    assert value(got, "ncs_queue_jobs", state="queued") == 2
    assert value(got, "ncs_queue_jobs", state="cancelled") == 1
    assert {labels for name, labels in got if name == "ncs_queue_jobs"} == {
        frozenset({("state", s)}) for s in jobs.STATES}
    assert value(got, "ncs_jobs_finished_total", outcome="cancelled") == cancelled_before + 1


def test_request_durations_are_labelled_by_url_rule_not_by_path(app, client):
    from conftest import client_as, make_user

    c = client_as(app, make_user("alice"))
    route = "/api/jobs/<int:job_id>"
    before = here("ncs_http_request_duration_seconds_count", route=route, method="GET", status="404")
    for job_id in (123456, 654321):
        assert c.get(f"/api/jobs/{job_id}").status_code == 404
    client.get("/no/such/page/1")
    client.open("/healthz", method="BREW")
    got = samples(client.get("/metrics").get_data(as_text=True))
    assert value(got, "ncs_http_request_duration_seconds_count", route=route, method="GET", status="404") == before + 2
    assert not [labels for name, labels in got if "123456" in str(labels)]
    assert value(got, "ncs_http_request_duration_seconds_count", route="unmatched", method="GET", status="404") >= 1
    assert value(got, "ncs_http_request_duration_seconds_count", route="unmatched", method="other", status="405") >= 1


def test_every_exported_name_is_the_contracts_and_the_main_ones_are_there(alice, settings, consumer):
    consumer()
    pool = ModelPool(settings)  # a web process's chat pool: ncs_chat_queue_depth exists with it
    try:
        names = {name for name, _ in samples(metrics.exposition()[0].decode())}
    finally:
        pool.close()
    assert names <= ALLOWED_METRICS, names - ALLOWED_METRICS
    gpu_only = {n for n in ISSUE_METRICS | NAMED_HERE if n.startswith("ncs_gpu_")}
    per_job = {"ncs_trainer_tokens_per_second", "ncs_trainer_mfu", "ncs_chat_queue_depth"}  # while there is one
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}
    assert (ISSUE_METRICS | NAMED_HERE) - gpu_only - per_job <= families


def test_credits_events_are_counted_for_billing():
    before = {k: here(name) for k, (name, _) in metrics.CREDIT_KINDS.items()}
    for kind in ("purchase", "hold", "hold", "settlement", "refused", "audit_failure"):
        metrics.credits_event(kind)
    assert {k: here(name) - before[k] for k, (name, _) in metrics.CREDIT_KINDS.items()} == {
        "purchase": 1, "hold": 2, "settlement": 1, "refused": 1, "audit_failure": 1}
    with pytest.raises(ValueError, match="unknown credits event"):
        metrics.credits_event("refund")


def test_chat_queue_depth_counts_requests_waiting_beyond_what_a_server_decodes(settings):
    pool = ModelPool(settings, max_active=1, queue_limit=4)
    model = SimpleNamespace(id=77, checkpoint_key="k77")
    try:
        streams = [pool.stream(model, "chat", [{"role": "user", "content": "hi"}]) for _ in range(3)]
        assert here("ncs_chat_queue_depth", model="77") == 2  # admitted: one decodes, two wait
        for s in streams:
            s.close()
        assert here("ncs_chat_queue_depth", model="77") == 0
    finally:
        pool.close()


@pytest.mark.process
def test_a_chat_request_records_its_time_to_first_token_and_speed(settings, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from chat_fixtures import scripted_checkpoint

    pool = ModelPool(settings, checkpoint_dir_of=lambda m: m.path, device="cpu", load_timeout=60)
    model = SimpleNamespace(id=5, path=str(scripted_checkpoint(tmp_path / "s", "a b c d e f g h", delay_s=0.01)))
    ttft, tps = here("ncs_chat_time_to_first_token_seconds_count"), here("ncs_chat_tokens_per_second_count")
    try:
        items = list(pool.stream(model, "chat", [{"role": "user", "content": "hi"}], {}))
    finally:
        pool.close()
    final = items[-1]
    assert here("ncs_chat_time_to_first_token_seconds_count") == ttft + 1
    assert here("ncs_chat_tokens_per_second_count") == tps + (1 if final.tokens_per_sec is not None else 0)
    assert final.ttft_s is not None and final.tokens_per_sec is not None


# --- a running job, in this process ---------------------------------------------------------------------

def test_a_running_job_reports_its_figures_and_its_end_is_counted_once(alice, settings, consumer, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.1")
    done, first = here("ncs_jobs_finished_total", outcome="completed"), here("ncs_job_attempts_total", reason="first")
    consumer()
    assert here("ncs_worker_up") == 1
    job = submit(alice, settings, max_steps=30, checkpoint_every=10)
    wait_for(lambda: here("ncs_trainer_tokens_per_second", job=str(job.id)) > 0)
    assert here("ncs_trainer_tokens_per_second", job=str(job.id)) == 1000.0  # the fake trainer's figure
    assert here("ncs_running_jobs", device="cpu") == 1
    assert here("ncs_job_attempts_total", reason="first") == first + 1
    wait_for(lambda: status_of(job) == "completed", timeout=30)
    wait_for(lambda: here("ncs_running_jobs", device="cpu") == 0)
    assert value(metrics.exposition()[0].decode(), "ncs_trainer_tokens_per_second", job=str(job.id)) is None
    assert here("ncs_jobs_finished_total", outcome="completed") == done + 1


def test_a_retried_attempt_is_counted_by_its_reason(alice, settings, consumer, monkeypatch):
    monkeypatch.setenv("FAKE_EXIT_AT", "2:1")  # every attempt fails before step 2: infrastructure
    before = {o: here("ncs_jobs_finished_total", outcome=o) for o in metrics.OUTCOMES}
    retries = here("ncs_job_attempts_total", reason="retry")
    consumer()
    job = submit(alice, settings)
    wait_for(lambda: status_of(job) == "failed", timeout=30)
    assert TrainingJob.get_by_id(job.id).error_kind == "infrastructure"
    assert here("ncs_job_attempts_total", reason="retry") == retries + settings.max_attempts - 1
    after = {o: here("ncs_jobs_finished_total", outcome=o) - before[o] for o in metrics.OUTCOMES}
    assert after == {"completed": 0, "failed_user": 0, "failed_infra": 1, "cancelled": 0, "preempted": 0}


# --- GPUs (a stand-in NVML: there is no GPU on the test machines) --------------------------------------

class FakeNvml:
    """The pynvml functions gpus.py calls, for two cards; GPU 1 cannot report power."""

    class NVMLError(Exception):
        pass

    nvmlEventTypeXidCriticalError = 8

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-uuid-{h}"

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=80 * 2**30, used=(h + 1) * 2**30)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=50 + h)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 60 + h

    def nvmlDeviceGetPowerUsage(self, h):
        if h == 1:
            raise self.NVMLError("Not Supported")
        return 150_000  # milliwatts

    def nvmlEventSetCreate(self):
        raise self.NVMLError("Not Supported")  # Xids are fed by hand below


@pytest.fixture
def fake_nvml():
    old = gpus.use(gpus.Nvml(FakeNvml()))
    yield gpus.nvml()
    gpus.use(old)


def test_gpu_figures_come_from_nvml_per_gpu_with_quarantine_and_xids(alice, settings, consumer, fake_nvml):
    consumer(dataclasses.replace(settings, gpus="0,1"))
    got = samples(metrics.exposition()[0].decode())
    assert value(got, "ncs_gpu_utilization_ratio", gpu="0") == 0.5
    assert value(got, "ncs_gpu_memory_used_bytes", gpu="1") == 2 * 2**30
    assert value(got, "ncs_gpu_temperature_celsius", gpu="1") == 61
    assert value(got, "ncs_gpu_power_watts", gpu="0") == 150.0
    assert value(got, "ncs_gpu_power_watts", gpu="1") is None  # unsupported: left out, not zero
    assert value(got, "ncs_gpu_quarantined", gpu="1") == 0
    xids = here("ncs_gpu_xid_errors_total", gpu="1")
    fake_nvml.record_xid(1, 79)  # what the NVML event thread does
    quarantine.quarantine("1", fault="xid", reason="Xid 79", job_id=None, settings=settings)
    got = samples(metrics.exposition()[0].decode())
    assert value(got, "ncs_gpu_xid_errors_total", gpu="1") == xids + 1
    assert value(got, "ncs_gpu_quarantined", gpu="1") == 1 and value(got, "ncs_gpu_quarantined", gpu="0") == 0
    (row,) = workers.live()
    assert row.gpu_count == 2 and {d["device_name"] for d in row.devices} == {"NVIDIA H100 80GB HBM3"}
    assert [d["memory_bytes"] for d in row.devices] == [80 * 2**30] * 2


def test_no_gpu_means_no_gpu_series_and_no_error(alice, settings, consumer, caplog):
    consumer(dataclasses.replace(settings, gpus="0"))  # a GPU slot asked for, but no NVML on this machine
    caplog.clear()
    names = {name for name, _ in samples(metrics.exposition()[0].decode())}
    for family in ("utilization_ratio", "memory_used_bytes", "temperature_celsius", "power_watts"):
        assert f"ncs_gpu_{family}" not in names
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]


# --- another process: a real `worker` with its own --metrics-port ----------------------------------------

def scrape(port: int, headers: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.process
def test_a_worker_process_exports_its_own_figures_and_the_sum_over_processes_is_right(make_settings, tmp_path):
    s = make_settings(**{**TEST_SETTINGS, "metrics_token": TOKEN, "log_format": "json"})
    open_store(s.database_url)
    from conftest import make_user

    owner = make_user("alice")
    env = dict(os.environ, PYTHONPATH=str(REPO), NCS_HOME=s.home, NCS_DATABASE_URL=s.database_url,
               NCS_QUEUE_URL=s.queue_url, NCS_TRAINER_MODULE="tests.fake_trainer", NCS_GPUS="none",
               NCS_RECONCILE_SECONDS="0.5", NCS_METRICS_TOKEN=TOKEN, NCS_LOG_FORMAT="json", FAKE_STEP_S="0.02")
    err_path = tmp_path / "worker.err"
    proc = subprocess.Popen([sys.executable, "-m", "nanochat_studio", "worker", "--metrics-port", "0"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=open(err_path, "wb"), text=True)
    try:
        port = None
        for line in proc.stdout:
            m = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", line)
            if m:
                port = int(m.group(1))
                break
        assert port, err_path.read_text()
        web_done = here("ncs_jobs_finished_total", outcome="completed")
        web_cancelled = here("ncs_jobs_finished_total", outcome="cancelled")
        ran = jobs.submit(owner, {"depth": 1, "dataset": "demo", "max_steps": 6, "checkpoint_every": 3}, s)
        tasks.enqueue_job(ran.id, s)
        wait_for(lambda: status_of(ran) == "completed", timeout=60)
        waits = jobs.submit(owner, {"depth": 1, "dataset": "demo", "gpus": 2}, s)  # no worker has 2 GPUs
        assert jobs.request_cancel(waits) == "cancelled"  # the web process cancels it: the web counts it

        status, text = scrape(port)
        assert status == 200
        worker = samples(text)
        assert value(worker, "ncs_worker_up") == 1
        assert value(worker, "ncs_jobs_finished_total", outcome="completed") == 1
        assert value(worker, "ncs_jobs_finished_total", outcome="cancelled") == 0
        assert value(worker, "ncs_job_attempts_total", reason="first") == 1
        # The web process did not run the job: it counts only its cancel. Summed over both, each once.
        assert here("ncs_jobs_finished_total", outcome="completed") == web_done
        assert here("ncs_jobs_finished_total", outcome="cancelled") == web_cancelled + 1
        # The store's gauges are the same wherever they are read: Prometheus takes the max.
        assert value(worker, "ncs_queue_jobs", state="completed") == here("ncs_queue_jobs", state="completed") == 1

        (row,) = [w for w in workers.live() if w.role == "worker"]
        assert row.metrics_port == port and row.pid == proc.pid and row.devices[0]["device"] == "cpu"
        assert scrape(port, {"X-Forwarded-For": "198.51.100.4"})[0] == 403  # relayed by a local proxy
        assert scrape(port, {"X-Forwarded-For": "198.51.100.4", "Authorization": f"Bearer {TOKEN}"})[0] == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0
    database.connect(reuse_if_open=True)
    assert not [w for w in workers.all_rows() if w.role == "worker"]  # it unregistered on the way out
    lines = [json.loads(line) for line in err_path.read_text().splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(x) for x in lines)
    relayed = [x for x in lines if x["logger"] == "nanochat_studio.trainer"]
    assert {"message": "fake trainer starting on cpu", "job_id": ran.id} in [
        {k: x.get(k) for k in ("message", "job_id")} for x in relayed]


def test_the_packaged_placeholder_metrics_token_is_refused(tmp_path):
    from nanochat_studio.settings import SettingsError, load_settings
    from tests.deploy_tools import PKG, load_yaml

    secret = next(d for d in load_yaml(PKG / "k8s" / "studio.yaml") if d["kind"] == "Secret")
    (tmp_path / "token").write_text(secret["stringData"]["metrics_token"])
    with pytest.raises(SettingsError, match="NCS_METRICS_TOKEN: too short"):
        load_settings(environ={"NCS_HOME": str(tmp_path), "NCS_METRICS_TOKEN_FILE": str(tmp_path / "token")})
    (tmp_path / "token").write_text(TOKEN + "\n")
    s = load_settings(environ={"NCS_HOME": str(tmp_path), "NCS_METRICS_TOKEN_FILE": str(tmp_path / "token")})
    assert s.metrics_token == TOKEN and s.public()["metrics_token"] == "***"
