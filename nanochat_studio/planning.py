"""Planning a run: the device this machine trains on, estimates for a config, and submitting a job.

The web process never imports torch, so what the device is (name, memory) and how fast it trains a
given shape are learnt from the trainer itself, through runner.py: ``probe_device`` once per process,
and calibrations in the background (estimate.Calibrator), cached in AppState per device and shape.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping

from trainer import sizing

from . import datasets, estimate, jobs, runner, tasks
from .errors import BadRequest, NotFound
from .models import AppState, Dataset, TrainingJob, User
from .settings import Settings

_device_lock = threading.Lock()
_device: dict[str, Any] | None = None
_calibrator: estimate.Calibrator | None = None

ESTIMATE_KEYS = ("max_steps", "seq_len", "batch_size", "vocab_size")
CALIBRATION_MAX_PARAMS_CPU = 200_000_000  # beyond this a CPU timing run itself takes minutes


def device(settings: Settings) -> dict[str, Any]:
    """{"device", "device_name", "memory_bytes"} of where this machine's jobs train (cached)."""
    global _device
    with _device_lock:
        if _device is None:
            cached = AppState.get_or_none(AppState.key == "device_probe")
            try:
                _device = runner.probe_device(settings)
                AppState.insert(key="device_probe", value=_device).on_conflict(
                    conflict_target=[AppState.key], update={AppState.value: _device}).execute()
            except runner.SpawnError:
                _device = cached.value if cached else {"device": "cpu", "device_name": "cpu", "memory_bytes": 0}
        return dict(_device)


def calibrator(settings: Settings) -> estimate.Calibrator:
    global _calibrator
    with _device_lock:
        if _calibrator is None:
            _calibrator = estimate.Calibrator(lambda shape, batch: runner.calibrate(settings, shape, batch))
        return _calibrator


def _int_arg(args: Mapping[str, Any], key: str) -> int | None:
    raw = args.get(key)
    if raw in (None, ""):
        return None
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise BadRequest(f"'{key}' must be an integer, got {raw!r}") from None
    if value < 1:
        raise BadRequest(f"'{key}' must be positive, got {value}")
    return value


def data_bytes(spec: str, user: User) -> int | None:
    """Size of the dataset's raw text when known without fetching it."""
    if spec == "demo":
        return sizing.DEMO_CORPUS_BYTES
    if spec.startswith("ds:") and spec[3:].isdigit():
        ds = Dataset.get_or_none((Dataset.id == int(spec[3:])) & (Dataset.user == user))
        if ds is None:
            raise NotFound(f"no dataset {spec}")
        return ds.size_bytes
    return None


def estimate_for(args: Mapping[str, Any], user: User, settings: Settings, *, calibrate: bool = True) -> dict:
    """The plan for the config in ``args`` (query string or JSON), with a background calibration."""
    depth = _int_arg(args, "depth")
    if depth is None:
        raise BadRequest("'depth' is required")
    if not 1 <= depth <= 32:
        raise BadRequest(f"'depth' must be between 1 and 32, got {depth}")
    config: dict[str, Any] = {"depth": depth}
    for key in ESTIMATE_KEYS:
        value = _int_arg(args, key)
        if value is not None:
            config[key] = value
    spec = str(args.get("dataset") or "demo")
    dev = device(settings)
    try:
        plan = estimate.estimate(config, dev, data_bytes=data_bytes(spec, user))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    plan["calibrating"] = False
    if calibrate and (dev["device"] != "cpu" or plan["params"] <= CALIBRATION_MAX_PARAMS_CPU):
        shape = sizing.shape_for(depth, plan["vocab_size"], plan["seq_len"])
        if plan["time"]["source"] != "calibrated":
            plan["calibrating"] = calibrator(settings).request(dev["device_name"], shape, plan["batch_size"])
    return plan


def submit(user: User, body: dict[str, Any], settings: Settings) -> TrainingJob:
    """Validate and queue a job (jobs.submit), remember the estimate it was shown, ring the bell."""
    job = jobs.submit(user, body, settings)
    try:
        spec = datasets.describe_spec(job.config.get("dataset"))
        plan = estimate_for({**job.config, "dataset": spec}, user, settings, calibrate=False)
        TrainingJob.update(estimate={k: plan[k] for k in ("params", "tokens", "steps", "time", "memory")}).where(
            TrainingJob.id == job.id).execute()
    except (BadRequest, NotFound, ValueError):
        pass  # the estimate is a courtesy; the job itself was valid
    tasks.enqueue_job(job.id, settings)
    return jobs.get(job.id)
