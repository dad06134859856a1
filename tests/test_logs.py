"""The process log: one JSON object per line with request, user and job ids, or text for people; the
request id honoured from X-Request-ID (when sane) and returned; the trainer's stderr in the job log and
in the process log with its job id."""

from __future__ import annotations

import io
import json
import logging

import pytest
from conftest import client_as, make_user
from flask_login import current_user

from nanochat_studio import logs
from nanochat_studio.auth import login_required
from tests.test_jobs import alice, settings, store  # noqa: F401
from tests.test_runner import wait_for
from tests.test_tasks import consumer, status_of, submit  # noqa: F401


@pytest.fixture
def json_app(make_app):
    app = make_app(log_format="json")

    @app.get("/_say")
    def say():  # a view that logs, as views do
        logging.getLogger("nanochat_studio.views.test").info("hello %s", "there")
        return "ok"

    @app.get("/_mine")
    @login_required
    def mine():  # a signed-in view: flask-login has loaded the user before it logs
        logging.getLogger("nanochat_studio.views.test").info("hello %s", current_user.name)
        return "ok"

    return app


@pytest.fixture
def captured(json_app):
    buf = io.StringIO()
    logs.configure(json_app.config["NCS_SETTINGS"], stream=buf)
    yield buf
    logs.configure(json_app.config["NCS_SETTINGS"])


def lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_lines_carry_the_request_id_given_and_the_user(json_app, captured):
    alice = make_user("alice")
    c = client_as(json_app, alice)
    r = c.get("/_mine", headers={"X-Request-ID": "req-42.abc"})
    assert r.status_code == 200 and r.headers["X-Request-ID"] == "req-42.abc"
    (line,) = [x for x in lines(captured) if x["message"] == "hello Alice"]
    assert line["level"] == "info" and line["logger"] == "nanochat_studio.views.test"
    assert line["request_id"] == "req-42.abc" and line["user_id"] == alice.id
    assert line["time"].endswith("+00:00") and "job_id" not in line


@pytest.mark.parametrize("incoming", ["", "x" * 129, "two words", "<script>", "quote\"d", "tab\there"])
def test_a_missing_or_unsafe_request_id_is_replaced_by_a_new_one(json_app, captured, incoming):
    r = json_app.test_client().get("/_say", headers={"X-Request-ID": incoming} if incoming else {})
    rid = r.headers["X-Request-ID"]
    assert rid != incoming and len(rid) == 32 and int(rid, 16) >= 0
    (line,) = [x for x in lines(captured) if x["message"] == "hello there"]
    assert line["request_id"] == rid and "user_id" not in line  # the view never asked who is signed in
    other = json_app.test_client().get("/_say").headers["X-Request-ID"]
    assert other != rid  # each request its own


def test_every_line_is_one_json_object_even_with_a_traceback(json_app, captured):
    log = logging.getLogger("nanochat_studio.test")
    try:
        raise ValueError("multi\nline")
    except ValueError:
        log.exception("it broke: %s", {"a": 1})
    with logs.job_context(17):
        log.warning("about a job")
    got = lines(captured)
    broke = next(x for x in got if x["message"].startswith("it broke"))
    assert "ValueError: multi\nline" in broke["exc"] and broke["level"] == "error"
    assert next(x for x in got if x["message"] == "about a job")["job_id"] == 17
    assert len(captured.getvalue().splitlines()) == len(got)  # no line that is not an object


def test_text_lines_name_the_context_for_people(make_app):
    app = make_app()  # log_format defaults to text
    buf = io.StringIO()
    logs.configure(app.config["NCS_SETTINGS"], stream=buf)
    try:
        with logs.job_context(5):
            logging.getLogger("nanochat_studio.x").info("working")
    finally:
        logs.configure(app.config["NCS_SETTINGS"])
    (line,) = buf.getvalue().splitlines()
    assert line.endswith("INFO nanochat_studio.x [job_id=5]: working")


def test_the_trainers_stderr_reaches_the_job_log_and_the_process_log_with_its_job_id(alice, settings, consumer,
                                                                                      caplog):
    caplog.set_level(logging.INFO, logger=logs.TRAINER_LOGGER)
    consumer()
    job = submit(alice, settings)
    wait_for(lambda: status_of(job) == "completed", timeout=30)
    from nanochat_studio.models import TrainingJob

    job_log = open(TrainingJob.get_by_id(job.id).log_path).read()
    assert "fake trainer starting on cpu" in job_log
    relayed = [r for r in caplog.records if r.name == logs.TRAINER_LOGGER]
    assert [(r.getMessage(), r.job_id) for r in relayed] == [("fake trainer starting on cpu", job.id)]


def test_a_relay_keeps_a_half_written_line_until_it_ends(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=logs.TRAINER_LOGGER)
    path = tmp_path / "train.log"
    path.write_bytes(b"from an earlier attempt\n")
    relay = logs.LineRelay(path, 9)
    with open(path, "ab") as fh:
        fh.write(b"step 1 loss 4.2\nstep 2 lo")
        fh.flush()
        assert relay.pump() == 1
        fh.write(b"ss 3.9\n\nTraceback (most rec")
        fh.flush()
        assert relay.pump() == 1
        assert relay.pump(final=True) == 1
    relay.close()
    assert [(r.getMessage(), r.job_id) for r in caplog.records] == [
        ("step 1 loss 4.2", 9), ("step 2 loss 3.9", 9), ("Traceback (most rec", 9)]
