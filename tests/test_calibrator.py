"""The app's Calibrator: the device probe and the timing runs behind estimates, one at a time, only for
shapes that fit, with the job config's bounds (the slot a timing run takes is test_tasks.py's)."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import client_as

from nanochat_studio import estimate
from nanochat_studio.db import database
from nanochat_studio.runner import SpawnError
from trainer import sizing

DEVICE = {"device": "cpu", "device_name": "test cpu", "memory_bytes": 8 << 30}


class Recorder:
    """A ``run`` that holds each timing run until released and counts how many run at once."""

    def __init__(self):
        self.started: list[tuple[int, int]] = []  # (depth, batch_size) in the order they ran
        self.running = self.most = 0
        self.release = threading.Semaphore(0)
        self.lock = threading.Lock()

    def __call__(self, shape, batch_size):
        with self.lock:
            self.started.append((shape.depth, batch_size))
            self.running += 1
            self.most = max(self.most, self.running)
        self.release.acquire(timeout=10)
        with self.lock:
            self.running -= 1
        return None  # no answer: nothing is cached


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_calibrations_run_one_at_a_time_newest_first_and_old_requests_are_dropped(app):
    database.connect(reuse_if_open=True)
    run = Recorder()
    calibrator = estimate.Calibrator(probe=lambda: dict(DEVICE), run=run)
    shapes = [sizing.shape_for(depth, 512, 64) for depth in range(1, 8)]
    assert calibrator.request("test cpu", shapes[0], 2)
    wait_for(lambda: run.started)  # the first runs at once
    for shape in shapes[1:]:
        assert calibrator.request("test cpu", shape, 2)
    assert calibrator.request("test cpu", shapes[-1], 2)  # already waiting: not asked twice
    for _ in shapes:
        run.release.release()
    wait_for(lambda: calibrator._thread is None)
    assert run.most == 1
    # depth 1 ran first; of the six asked while it ran, only the newest MAX_PENDING waited, newest first
    assert run.started == [(1, 2), (7, 2), (6, 2), (5, 2), (4, 2)]
    # a shape whose run gave no answer is not asked for again at once
    assert not calibrator.request("test cpu", shapes[-1], 2)


def test_the_probe_answers_once_and_its_last_answer_stands_in_when_it_fails(app):
    database.connect(reuse_if_open=True)
    calls = []

    def probe():
        calls.append(1)
        return dict(DEVICE)

    calibrator = estimate.Calibrator(probe=probe, run=lambda shape, batch: None)
    assert calibrator.device() == DEVICE and calibrator.device() == DEVICE and len(calls) == 1

    def broken():
        raise SpawnError("no trainer here")

    assert estimate.Calibrator(probe=broken, run=lambda shape, batch: None).device() == DEVICE


def planning_app(app, device):
    run = Recorder()
    app.extensions["ncs_calibrator"] = estimate.Calibrator(probe=lambda: dict(device), run=run)
    return run


def test_only_a_shape_that_fits_in_memory_is_timed(app, alice):
    run = planning_app(app, {**DEVICE, "memory_bytes": 1 << 30})  # 1 GiB
    c = client_as(app, alice)
    small = c.get("/api/estimate?depth=2&dataset=demo&max_steps=10&batch_size=8").get_json()
    assert small["memory"]["verdict"] == "fits" and small["calibrating"] is True
    wait_for(lambda: run.started == [(2, 8)])
    # the same small model (well under the CPU size limit of timing runs) with a batch that needs more
    # than the device holds comfortably
    big = c.get("/api/estimate?depth=2&dataset=demo&max_steps=10&batch_size=128").get_json()
    assert big["params"] == small["params"] and big["memory"]["verdict"] != "fits"
    assert big["calibrating"] is False
    run.release.release()
    time.sleep(0.2)
    assert len(run.started) == 1  # the shape that does not fit was never handed to a timing run


@pytest.mark.parametrize("query, message", [
    ("depth=2&seq_len=100000", "'seq_len' must be between 8 and 65536"),
    ("depth=2&batch_size=100000", "'batch_size' must be between 1 and 65536"),
    ("depth=2&vocab_size=99", "'vocab_size' must be between"),
    ("depth=2&max_steps=100000000", "'max_steps' must be between 1 and 10000000"),
])
def test_estimate_arguments_have_the_job_configs_bounds(app, alice, query, message):
    run = planning_app(app, DEVICE)
    r = client_as(app, alice).get("/api/estimate?" + query)
    assert r.status_code == 400 and message in r.get_json()["error"]["message"]
    assert run.started == []
