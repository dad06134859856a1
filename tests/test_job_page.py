"""The job page in real Chromium: live charts fed by SSE survive the server going away and coming back
(the browser reconnects with Last-Event-ID and loses no point, duplicates none), and nothing stays
"running" once the job ends."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_jobs_api import FAKE_DEVICE  # noqa: E402

from nanochat_studio import accounts, estimate, jobs  # noqa: E402
from nanochat_studio.db import database  # noqa: E402

pytestmark = pytest.mark.browser


class Server:
    """waitress on a fixed loopback port in a thread; ``stop`` drops every open connection, as a network
    blip or a restart does, and ``start`` serves again on the same port."""

    def __init__(self, app, port: int = 0):
        from waitress.server import create_server

        self.server = create_server(app, host="127.0.0.1", port=port, threads=6)
        self.port = self.server.effective_port
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.server.run()
        except (OSError, ValueError):
            pass

    def stop(self):
        for channel in list(self.server._map.values()):  # the open SSE connections too
            try:
                channel.close()
            except OSError:
                pass
        self.server.close()
        self.thread.join(timeout=5)


def wait_for(page, expression, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if page.evaluate(expression):
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {expression}")


def test_live_charts_survive_a_reconnect_without_losing_or_repeating_points(app, browser, monkeypatch):
    app.extensions["ncs_calibrator"] = estimate.Calibrator(probe=lambda: dict(FAKE_DEVICE),
                                                           run=lambda shape, batch: None)
    database.connect(reuse_if_open=True)
    owner = accounts.solo_owner()  # solo mode: this machine needs no sign-in
    job = jobs.submit(owner, {"depth": 1, "dataset": "demo", "max_steps": 6, "name": "<i>blip</i>"}, app.config["NCS_SETTINGS"])
    for step in (1, 2, 3):
        jobs.record_event(job.id, "step", {"step": step, "total_steps": 6, "loss": 6.0 - step, "lr": 0.02,
                                           "tokens_per_sec": 1000.0, "elapsed_s": step, "eta_s": 6 - step})
    database.close()

    server = Server(app)
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    try:
        page.goto(f"http://127.0.0.1:{server.port}/jobs/{job.id}")
        wait_for(page, "window.__jobPage && window.__jobPage.loss.step.length === 3")
        assert page.text_content("#step") == "3 / 6"
        assert page.text_content("h1") == "<i>blip</i>"  # a name is text, never markup

        server.stop()  # the connection drops; the page says so and the browser retries
        wait_for(page, "document.getElementById('live').textContent.startsWith('reconnecting')")
        with database.connection_context():
            for step in (4, 5):
                jobs.record_event(job.id, "step", {"step": step, "total_steps": 6, "loss": 6.0 - step,
                                                   "lr": 0.02, "tokens_per_sec": 1000.0, "elapsed_s": step,
                                                   "eta_s": 6 - step})
            jobs.record_event(job.id, "eval", {"step": 5, "val_loss": 1.5, "val_bpb": 0.9})
        server = Server(app, port=server.port)

        wait_for(page, "window.__jobPage.loss.step.length === 5 && window.__jobPage.loss.valStep.length === 1")
        assert page.evaluate("window.__jobPage.loss.step") == [1, 2, 3, 4, 5]
        assert page.text_content("#bpb") == "0.900"

        with database.connection_context():
            jobs.request_cancel(job.id)  # a queued job ends at once
        wait_for(page, "document.getElementById('status').textContent === 'cancelled'")
        wait_for(page, "document.getElementById('live').textContent === 'finished'")
        assert page.is_hidden("#cancel")
        assert errors == []
    finally:
        page.close()
        server.stop()
