"""Prometheus metrics (prometheus-client): the ``ncs_*`` families of issue 13, in one registry.

Where each figure comes from decides how Prometheus must add it up across processes
(packaging/prometheus/alerts.yml relies on this):

* **Read from the store at scrape time**, the same in every process: ``ncs_queue_jobs{state}``. Two
  web replicas and a worker report the same numbers: take ``max()``, never ``sum()``.
* **Per process**, each counted exactly once by the process where it happened: the ``*_total``
  counters (a job's state changes by compare-and-set, so exactly one process wins each change and
  counts it), ``ncs_running_jobs`` and ``ncs_trainer_*`` (the supervising process), the chat and HTTP
  histograms (the web process), ``ncs_worker_up`` (1 in each process running a queue consumer), and
  the GPU families of the GPUs this process trains on. Every process that runs a consumer or serves
  pages must be scraped (``serve`` at ``/metrics``; ``worker --metrics-port``) and these are
  ``sum()``-ed. No shared multiprocess directory is needed: waitress serves from threads, and a
  worker on another host exports its own, which is also the only place its NVML can be read.

Access (:func:`allowed`): a direct loopback request, or ``Authorization: Bearer <metrics_token>``.
Billing subscribes :func:`count_billing_event` to its events; jobs.py, supervisor.py, tasks.py and inference.py call the other
recorders below. The worker's listener is :func:`serve_worker_metrics`.
"""

from __future__ import annotations

import hmac
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import peewee as pw
import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from . import gpus

log = logging.getLogger(__name__)

# No ``*_created`` series: the families are exactly the names (tests/deploy_tools.py).
prometheus_client.disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=False)
OUTCOMES = ("completed", "failed_user", "failed_infra", "cancelled", "preempted")
ATTEMPT_REASONS = ("first", "retry", "lost", "preempted")  # why an attempt started: see jobs.attempt_reason
CREDIT_KINDS = {  # credits_event(kind) -> (family, help)
    "purchase": ("ncs_credits_purchases_total", "Credit purchases completed."),
    "hold": ("ncs_credits_holds_total", "Credit holds placed before work runs."),
    "settlement": ("ncs_credits_settlements_total", "Holds settled against the work done."),
    "refused": ("ncs_credits_refused_total", "Holds or charges refused for insufficient funds."),
    "audit_failure": ("ncs_credits_audit_failures_total", "Ledger audits that found balances not adding up."),
}

JOBS_FINISHED = Counter("ncs_jobs_finished_total", "Job attempts that ended, by outcome (preempted ones are "
                        "requeued; the others are final).", ["outcome"], registry=REGISTRY)
JOB_ATTEMPTS = Counter("ncs_job_attempts_total", "Attempts started, by why: first, retry (after an "
                       "infrastructure failure), lost (its worker vanished), preempted (after a stop).",
                       ["reason"], registry=REGISTRY)
RUNNING_JOBS = Gauge("ncs_running_jobs", "Jobs this process supervises now, by device kind (cuda, cpu).",
                     ["device"], registry=REGISTRY)
TRAINER_TPS = Gauge("ncs_trainer_tokens_per_second", "Training throughput of each running job, from its "
                    "last step event.", ["job"], registry=REGISTRY)
TRAINER_MFU = Gauge("ncs_trainer_mfu", "Model FLOPs utilisation of each running job (CUDA only).", ["job"],
                    registry=REGISTRY)
CHAT_TTFT = Histogram("ncs_chat_time_to_first_token_seconds", "Chat and completion requests: request sent to "
                      "first text.", buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
                      registry=REGISTRY)
CHAT_TPS = Histogram("ncs_chat_tokens_per_second", "Chat and completion requests: decoding speed after the "
                     "first token.", buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
                     registry=REGISTRY)
HTTP_DURATION = Histogram("ncs_http_request_duration_seconds", "Time to the response's headers, by URL rule "
                          "(not the raw path), method and status.", ["route", "method", "status"],
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                          registry=REGISTRY)
LEASE_LOST = Counter("ncs_worker_lease_lost_total", "Supervisors fenced out of their job: the lease expired "
                     "while the trainer still ran.", registry=REGISTRY)
WORKER_UP = Gauge("ncs_worker_up", "1 while this process runs a queue consumer.", registry=REGISTRY)
GPU_XIDS = Counter("ncs_gpu_xid_errors_total", "Xid errors NVML reported, per GPU index.", ["gpu"],
                   registry=REGISTRY)
CREDITS = {kind: Counter(name, doc, registry=REGISTRY) for kind, (name, doc) in CREDIT_KINDS.items()}

for _o in OUTCOMES:  # every series exists from the start, so increase() sees the first one
    JOBS_FINISHED.labels(_o)
for _r in ATTEMPT_REASONS:
    JOB_ATTEMPTS.labels(_r)


# --- recorders (the rest of the app calls these) ------------------------------------------------------

def job_finished(outcome: str) -> None:
    """An attempt ended with one of OUTCOMES (jobs.py, after the transition won)."""
    JOBS_FINISHED.labels(outcome).inc()


def attempt_started(reason: str) -> None:
    JOB_ATTEMPTS.labels(reason if reason in ATTEMPT_REASONS else "retry").inc()


def lease_lost() -> None:
    LEASE_LOST.inc()


def credits_event(kind: str, n: int = 1) -> None:
    """For billing.py: ``kind`` is purchase, hold, settlement, refused (insufficient funds) or
    audit_failure. Raises ValueError for another kind."""
    if kind not in CREDITS:
        raise ValueError(f"unknown credits event {kind!r}; expected one of {', '.join(CREDITS)}")
    CREDITS[kind].inc(n)


def count_billing_event(event: str, **fields: Any) -> None:
    """billing/events.py's observer (billing subscribes it): refusals count only when they were for
    funds (an unverified email is not an overdraft attempt); "posted" lines are not a family."""
    if event == "refused" and fields.get("reason") != "insufficient":
        return
    if event in CREDITS:
        credits_event(event)


def chat_finished(ttft_s: float | None, tokens_per_sec: float | None) -> None:
    """One chat or completion request ended (inference.py, from its Final)."""
    if ttft_s is not None:
        CHAT_TTFT.observe(ttft_s)
    if tokens_per_sec is not None:
        CHAT_TPS.observe(tokens_per_sec)


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    HTTP_DURATION.labels(route, method, str(status)).observe(seconds)


class JobRun:
    """The running job's figures while one supervisor holds it: ``ncs_running_jobs`` counts it and its
    step events set ``ncs_trainer_*``; :meth:`end` takes them away again."""

    def __init__(self, job_id: int, device: str) -> None:
        self.job, self.device = str(job_id), device
        RUNNING_JOBS.labels(device).inc()

    def step(self, tokens_per_sec: Any, mfu: Any) -> None:
        if isinstance(tokens_per_sec, (int, float)):
            TRAINER_TPS.labels(self.job).set(tokens_per_sec)
        if isinstance(mfu, (int, float)):
            TRAINER_MFU.labels(self.job).set(mfu)

    def end(self) -> None:
        RUNNING_JOBS.labels(self.device).dec()
        for gauge in (TRAINER_TPS, TRAINER_MFU):
            try:
                gauge.remove(self.job)
            except KeyError:
                pass


# --- consumers, GPUs and pools: what this process owns --------------------------------------------------

_owned_lock = threading.Lock()
_consumers = 0
_gpu_ids: list[str] = []  # the GPUs this process trains on (its slots)
_quarantined: Callable[[], set[str]] | None = None
_pools: "weakref.WeakSet[Any]" = weakref.WeakSet()


def consumer_started(gpu_ids: list[str], quarantined: Callable[[], set[str]]) -> None:
    """A queue consumer runs in this process on GPUs ``gpu_ids`` (empty: the CPU); ``quarantined()``
    names those of this host out of service."""
    global _consumers, _gpu_ids, _quarantined
    with _owned_lock:
        _consumers += 1
        _gpu_ids, _quarantined = list(gpu_ids), quarantined
        WORKER_UP.set(1)
        RUNNING_JOBS.labels("cuda" if gpu_ids else "cpu")  # the series exists at 0 before the first job
        for gid in _gpu_ids:
            GPU_XIDS.labels(gid)
    if gpu_ids:
        gpus.nvml().watch_xids([int(g) for g in gpu_ids], on_xid=_count_xid)


def consumer_stopped() -> None:
    global _consumers, _gpu_ids
    with _owned_lock:
        _consumers = max(0, _consumers - 1)
        if not _consumers:
            WORKER_UP.set(0)
            _gpu_ids = []


def _count_xid(index: int, xid: int) -> None:
    GPU_XIDS.labels(str(index)).inc()


def track_pool(pool: Any) -> None:
    """Report ``pool.waiting()`` ({model id: requests waiting}) as ncs_chat_queue_depth while it lives."""
    _pools.add(pool)


class _ScrapeCollector:
    """The families computed when scraped: the store's queue, chat queues, this process's GPUs."""

    def describe(self) -> list:
        return []  # computed per scrape; nothing to check at registration

    def collect(self) -> Iterator[Any]:
        yield from _queue_families()
        depth = GaugeMetricFamily("ncs_chat_queue_depth", "Chat requests waiting for a model server, by model.",
                                  labels=["model"])
        for pool in list(_pools):
            try:
                for model_id, waiting in pool.waiting().items():
                    depth.add_metric([str(model_id)], waiting)
            except Exception:
                log.warning("reading a model pool's queue failed", exc_info=True)
        yield depth
        yield from _gpu_families()


def _queue_families() -> Iterator[Any]:
    from .db import database
    from .jobs import STATES
    from .models import TrainingJob

    family = GaugeMetricFamily("ncs_queue_jobs", "Jobs by state, read from the store (the same in every "
                               "process: aggregate with max).", labels=["state"])
    try:
        opened = database.is_closed()
        if opened:
            database.connect()
        try:
            rows = dict(TrainingJob.select(TrainingJob.status, pw.fn.COUNT(TrainingJob.id))
                        .group_by(TrainingJob.status).tuples())
        finally:
            if opened:
                database.close()
    except Exception as exc:  # a store outage must not take the process's other figures with it
        log.warning("ncs_queue_jobs: the store did not answer (%s)", exc)
        return
    for state in STATES:
        family.add_metric([state], rows.get(state, 0))
    yield family


def _gpu_families() -> Iterator[Any]:
    with _owned_lock:
        ids, quarantined = list(_gpu_ids), _quarantined
    if not ids:
        return
    nv = gpus.nvml()
    names = {"utilization_ratio": "GPU utilisation, 0 to 1.", "memory_used_bytes": "GPU memory in use.",
             "temperature_celsius": "GPU die temperature.", "power_watts": "GPU power draw."}
    families = {k: GaugeMetricFamily(f"ncs_gpu_{k}", doc, labels=["gpu"]) for k, doc in names.items()}
    for gid in ids:
        for key, value in nv.sample(int(gid)).items():
            families[key].add_metric([gid], value)
    yield from (f for f in families.values() if f.samples)
    try:
        out = quarantined() if quarantined else set()
    except Exception as exc:
        log.warning("ncs_gpu_quarantined: the store did not answer (%s)", exc)
        return
    family = GaugeMetricFamily("ncs_gpu_quarantined", "1 while the GPU is out of service after a device error.",
                               labels=["gpu"])
    for gid in ids:
        family.add_metric([gid], 1 if gid in out else 0)
    yield family


REGISTRY.register(_ScrapeCollector())


# --- exposition and access ---------------------------------------------------------------------------

def exposition() -> tuple[bytes, str]:
    """The body and content type of a scrape."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def allowed(authorization: str | None, is_local: bool, token: str) -> bool:
    """A scrape is allowed from this machine (``is_local``: a direct loopback peer, nothing forwarded)
    or with ``Authorization: Bearer <token>`` when a token is set."""
    if token and authorization:
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
            return True
    return is_local


# --- a worker's own listener (``nanochat-studio worker --metrics-port``) -----------------------------------

_FORWARDING = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP", "HTTP_X_FORWARDED_HOST")


def _environ_is_local(environ: dict) -> bool:
    import ipaddress

    try:
        peer = ipaddress.ip_address(environ.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    if not (getattr(peer, "ipv4_mapped", None) or peer).is_loopback:
        return False
    return not any(environ.get(h) for h in _FORWARDING)  # a proxy on this host speaks for someone else


def worker_app(token: str, healthy: Callable[[], bool]) -> Callable:
    """The WSGI app of a worker's listener: ``/metrics`` (loopback or the bearer token) and
    ``/healthz`` (open: says only whether the consumer still runs, for container probes)."""

    def app(environ: dict, start_response: Callable) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            ok = healthy()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"the queue consumer stopped\n"]
        if path != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: try /metrics\n"]
        if not allowed(environ.get("HTTP_AUTHORIZATION"), _environ_is_local(environ), token):
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"metrics: only from this machine, or with the metrics_token as a bearer token\n"]
        body, ctype = exposition()
        start_response("200 OK", [("Content-Type", ctype), ("Content-Length", str(len(body)))])
        return [body]

    return app


def serve_worker_metrics(host: str, port: int, token: str, healthy: Callable[[], bool]) -> Any:
    """Listen on ``host:port`` in a daemon thread; returns the waitress server (``.close()`` it, and
    ``.effective_port`` is the port when 0 was asked). Raises OSError when the port is taken."""
    from waitress import create_server

    # clear_untrusted_proxy_headers=False: the forwarding headers must stay visible, so a request relayed
    # by a proxy on this host is not taken for a local one.
    server = create_server(worker_app(token, healthy), host=host, port=port, threads=2,
                           clear_untrusted_proxy_headers=False, ident="nanochat-studio-worker")
    threading.Thread(target=server.run, name="worker-metrics", daemon=True).start()
    return server
