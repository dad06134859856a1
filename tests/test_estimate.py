"""Estimates that match the run (issue 9): the vocabulary, parameters, steps and tokens of a plan are what
the trainer decides, for the demo and for an upload; data no run has read yet is labelled as assumed;
the time and memory of a plan add a run's fixed costs from the calibration of its shape."""

from __future__ import annotations

import io
import json
import random
import time

import pytest
from conftest import client_as

from nanochat_studio import datafacts, datasets, estimate, jobs, tasks
from nanochat_studio.db import database
from nanochat_studio.models import AppState, JobEvent, TrainingJob
from nanochat_studio.views import jobs as job_views
from trainer import sizing

FAKE_DEVICE = {"device": "cpu", "device_name": "test cpu", "memory_bytes": 8 << 30}


@pytest.fixture(autouse=True)
def _no_background_calibration(app):
    """No torch timing runs here (the calibration is stored by hand where a test needs one); the data's
    preparation is queued on the app's queue as in the app."""
    settings = app.config["NCS_SETTINGS"]
    app.extensions["ncs_calibrator"] = estimate.Calibrator(
        probe=lambda: dict(FAKE_DEVICE), run=lambda shape, batch: None,
        prepare=lambda key: tasks.enqueue_facts(key, settings))


def corpus(n_bytes: int, seed: int = 3) -> bytes:
    """Seeded made-up prose with paragraphs: many words, many merges, nothing like the demo grammar."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ra", "tse", "vu", "ne", "dor", "pha", "qi", "sul", "e", "an", "ix", "o"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    out, size = [], 0
    while size < n_bytes:
        para = " ".join(rng.choice(words) for _ in range(rng.randint(20, 120))).capitalize() + "."
        out.append(para)
        size += len(para) + 2
    return "\n\n".join(out).encode()


def get_estimate(client, query: str) -> dict:
    r = client.get("/api/estimate?" + query)
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def upload(user, settings, data: bytes, name: str = "prose.txt"):
    database.connect(reuse_if_open=True)
    return datasets.save_upload(user, name, io.BytesIO(data), settings)


# --- the demo ---------------------------------------------------------------------------------------------

def test_the_default_demo_plan_is_exact_and_shows_no_warning(app, alice):
    assert job_views.START_DEPTH["cpu"] == 2  # where the plan page's slider starts on a CPU
    e = get_estimate(client_as(app, alice), "depth=2&dataset=demo")
    assert e["warnings"] == []
    assert e["exact"] and e["data"]["status"] == "known"
    assert e["vocab_size"] == sizing.DEMO_FACTS["vocab_size"]
    assert e["budget"] == "tokens_per_param" and e["tokens_per_param"] >= 20  # not cut short by the data
    assert e["data"]["train_tokens"] == sizing.DEMO_FACTS["n_train_tokens"]
    assert "Exact" in e["data"]["note"]


def test_the_demo_is_prepared_once_on_the_queue_and_then_answers_for_itself(app, alice, monkeypatch):
    rung = []
    monkeypatch.setattr(tasks, "enqueue_facts", lambda key, settings: rung.append(key) or True)
    c = client_as(app, alice)
    get_estimate(c, "depth=2&dataset=demo")
    get_estimate(c, "depth=3&dataset=demo")
    assert rung == [datafacts.key_for("demo", alice.id, None)]  # asked once, not per estimate
    database.connect(reuse_if_open=True)
    # what the preparation stored wins over the shipped figures (a different tokenizer build, say)
    datafacts._write(rung[0], {"status": "ready", "at": time.time(),
                               "facts": {**sizing.DEMO_FACTS, "vocab_size": 1000, "warm_prepare_s": 1.5}})
    e = get_estimate(c, "depth=2&dataset=demo")
    assert e["vocab_size"] == 1000 and e["data"]["origin"] == "prepared"
    assert e["time"]["breakdown"]["data"] == 1.5


# --- uploads ----------------------------------------------------------------------------------------------

def test_an_upload_is_estimating_until_the_trainer_has_prepared_it_then_exact(app, alice):
    settings = app.config["NCS_SETTINGS"]
    ds = upload(alice, settings, corpus(120_000))
    key = datafacts.key_for(f"ds:{ds.id}", alice.id, None)
    c = client_as(app, alice)
    before = get_estimate(c, f"depth=1&dataset=ds:{ds.id}")
    assert before["data"]["status"] == "estimating" and not before["exact"]
    assert before["data"]["assumed"]["bytes_per_token"] == estimate.BYTES_PER_TOKEN
    assert before["data"]["note"].startswith("Estimating")

    # A job submitted now still works; its stored plan says what it assumed.
    r = c.post("/api/jobs", data=json.dumps({"depth": 1, "dataset": f"ds:{ds.id}"}), content_type="application/json")
    assert r.status_code == 201, r.get_json()
    assert r.get_json()["estimate"]["data"]["status"] == "estimating"

    assert datafacts.compute(key, settings) == "ready"  # the queue task's body: python -m trainer.facts
    after = get_estimate(c, f"depth=1&dataset=ds:{ds.id}")
    assert after["exact"] and after["data"]["origin"] == "prepared"
    facts = AppState.get_by_id(key).value["facts"]
    assert after["vocab_size"] == facts["vocab_size"] <= sizing.choose_vocab_size(ds.size_bytes)
    assert after["data"]["train_tokens"] == facts["n_train_tokens"]
    shape = sizing.shape_for(1, facts["vocab_size"], 256)
    assert after["params"] == sizing.param_counts(shape)["total"]
    steps, budget = sizing.run_length(after["scaling_params"], 8 * 256, facts["n_train_tokens"])
    assert (after["steps"], after["budget"]) == (steps, budget)


def test_data_the_trainer_cannot_read_says_why(app, alice):
    settings = app.config["NCS_SETTINGS"]
    ds = upload(alice, settings, b"fine text, then a bad byte \xff here\n" * 50, "broken.txt")
    key = datafacts.key_for(f"ds:{ds.id}", alice.id, None)
    assert datafacts.compute(key, settings) == "error"
    e = get_estimate(client_as(app, alice), f"depth=1&dataset=ds:{ds.id}")
    assert e["data"]["status"] == "error" and not e["exact"]
    assert any("not valid UTF-8" in w for w in e["warnings"])


def test_deleting_an_upload_forgets_its_facts_and_others_cannot_read_them(app, alice, bob):
    settings = app.config["NCS_SETTINGS"]
    ds = upload(alice, settings, corpus(20_000))
    key = datafacts.key_for(f"ds:{ds.id}", alice.id, None)
    assert datafacts.compute(key, settings) == "ready"
    assert client_as(app, bob).get(f"/api/estimate?depth=1&dataset=ds:{ds.id}").status_code == 404
    datasets.delete_dataset(alice, ds.id, settings)
    assert AppState.get_or_none(AppState.key == key) is None


# --- data no run has read yet ------------------------------------------------------------------------------

def test_a_server_path_is_assumed_until_a_run_has_read_it(app, alice, tmp_path):
    assert app.config["NCS_SETTINGS"].allow_server_paths  # solo mode
    path = tmp_path / "corpus.txt"
    path.write_bytes(corpus(50_000))
    c = client_as(app, alice)
    e = get_estimate(c, f"depth=1&dataset={path}")
    assert e["data"]["status"] == "unknown" and not e["exact"]
    assert e["data"]["note"].startswith("Assumed") and "job page" in e["data"]["note"]
    # A run reads it: its start event carries the facts, and the next plan uses them.
    database.connect(reuse_if_open=True)
    job = TrainingJob.create(user=alice, config={"depth": 1, "dataset": {"kind": "path", "source": str(path)}})
    jobs.record_event(job.id, "start", {"params": 1, "vocab_size": 700, "n_train_tokens": 12_345,
                                        "n_val_tokens": 600, "data_bytes": 50_000, "total_steps": 3})
    e = get_estimate(c, f"depth=1&dataset={path}")
    assert e["exact"] and e["vocab_size"] == 700 and e["data"]["train_tokens"] == 12_345
    assert f"job #{job.id}" in e["data"]["note"]
    # another vocabulary request is another plan: not known from that run
    assert not get_estimate(c, f"depth=1&dataset={path}&vocab_size=4096")["exact"]


# --- time and memory ----------------------------------------------------------------------------------------

CALIBRATION = {"tokens_per_sec": 20_000.0, "step_s": 8 * 256 / 20_000.0, "first_step_extra_s": 0.4,
               "build_s": 0.3, "startup_s": 2.5, "eval_batch_s": 0.03, "sample_s": 0.2, "checkpoint_s": 0.1,
               "flops_per_sec": 1e10, "flops_per_step": 1e9, "peak_rss_bytes": 450 << 20}


def test_time_adds_a_runs_fixed_costs_to_its_steps(app):
    database.connect(reuse_if_open=True)
    facts = {"status": "known", "origin": "prepared", **sizing.DEMO_FACTS, "warm_prepare_s": 2.0}
    shape = sizing.shape_for(2, facts["vocab_size"], 256)
    estimate.store_calibration("test cpu", shape, 8, CALIBRATION)
    e = estimate.estimate({"depth": 2, "max_steps": 1000}, FAKE_DEVICE, facts=facts)
    parts = e["time"]["breakdown"]
    # 1000 steps: evaluations at 250, 500, 750, 1000; samples (2 prompts) and checkpoints at 500, 1000
    assert parts["steps"] == pytest.approx(1000 * CALIBRATION["step_s"] + 0.4)
    assert parts["evals"] == pytest.approx(4 * 8 * 0.03)
    assert parts["samples"] == pytest.approx(2 * 2 * 0.2)
    assert parts["checkpoints"] == pytest.approx(2 * 0.1)
    assert parts["startup"] == pytest.approx(2.8) and parts["data"] == 2.0
    assert parts["exit"] == estimate.ROUGH_EXIT_S  # no probe said how long this machine's exit takes
    assert estimate.estimate({"depth": 2, "max_steps": 1000}, {**FAKE_DEVICE, "exit_s": 0.7},
                             facts=facts)["time"]["breakdown"]["exit"] == 0.7
    assert e["time"]["seconds"] == pytest.approx(sum(parts.values()), rel=1e-3)
    # checkpoint_every from the job's config changes how many are written
    assert estimate.estimate({"depth": 2, "max_steps": 1000, "checkpoint_every": 100}, FAKE_DEVICE,
                             facts=facts)["time"]["breakdown"]["checkpoints"] == pytest.approx(10 * 0.1)


def test_the_time_says_which_dtype_the_calibration_measured(app):
    database.connect(reuse_if_open=True)
    facts = {"status": "known", "origin": "prepared", **sizing.DEMO_FACTS}
    shape = sizing.shape_for(2, facts["vocab_size"], 256)
    assert estimate.estimate({"depth": 2}, FAKE_DEVICE, facts=facts)["time"]["dtype"] is None  # not measured
    estimate.store_calibration("test cpu", shape, 8, {**CALIBRATION, "dtype": "bfloat16"})
    assert estimate.estimate({"depth": 2}, FAKE_DEVICE, facts=facts)["time"]["dtype"] == "bfloat16"


def test_peak_memory_is_the_calibrated_process_plus_the_token_pages_it_reads(app):
    database.connect(reuse_if_open=True)
    facts = {"status": "known", "origin": "prepared", **sizing.DEMO_FACTS}
    shape = sizing.shape_for(1, facts["vocab_size"], 256)
    uncalibrated = estimate.estimate({"depth": 1, "max_steps": 10}, {**FAKE_DEVICE, "base_rss_bytes": 300 << 20},
                                     facts=facts)
    assert uncalibrated["memory"]["peak_source"] == "rough"
    assert uncalibrated["memory"]["peak_rss_bytes"] > (300 << 20) + uncalibrated["memory"]["needed_bytes"]
    estimate.store_calibration("test cpu", shape, 8, CALIBRATION)
    e = estimate.estimate({"depth": 1, "max_steps": 10}, FAKE_DEVICE, facts=facts)
    read = 10 * 8 * 256 + sizing.eval_rows(facts["n_val_tokens"], 8, 256) * 256  # uint16 tokens
    assert e["memory"]["peak_source"] == "calibrated"
    assert e["memory"]["peak_rss_bytes"] == CALIBRATION["peak_rss_bytes"] + 2 * read


# --- against the real trainer -------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_plan_is_exactly_what_the_real_trainer_starts_with(app, alice):
    """Through the app: the upload is prepared by the queue's task, the plans come from /api/estimate,
    the jobs run the real trainer on the consumer and are cancelled once it has announced its plan."""
    settings = app.config["NCS_SETTINGS"]
    handle = tasks.start_consumer(settings)
    try:
        ds = upload(alice, settings, corpus(150_000))
        key = datafacts.key_for(f"ds:{ds.id}", alice.id, None)
        database.close()

        def prepared():
            with database.connection_context():
                return (AppState.get_by_id(key).value or {}).get("status") == "ready"
        wait(prepared, 120)
        c = client_as(app, alice)
        for spec in ("demo", f"ds:{ds.id}"):
            plan = get_estimate(c, f"depth=1&dataset={spec}")
            assert plan["exact"], plan["data"]
            r = c.post("/api/jobs", data=json.dumps({"depth": 1, "dataset": spec}), content_type="application/json")
            assert r.status_code == 201, r.get_json()
            job_id = r.get_json()["id"]

            def started():
                with database.connection_context():
                    return JobEvent.get_or_none((JobEvent.job == job_id) & (JobEvent.kind == "start"))
            start = wait(started, 300).data
            with database.connection_context():
                jobs.request_cancel(job_id)
            for ours, theirs in (("params", "params"), ("vocab_size", "vocab_size"), ("steps", "total_steps"),
                                 ("tokens", "total_tokens"), ("budget", "budget"),
                                 ("tokens_per_step", "tokens_per_step")):
                assert plan[ours] == start[theirs], (spec, ours, plan[ours], start[theirs])
            assert plan["data"]["train_tokens"] == start["n_train_tokens"]
            with database.connection_context():
                assert TrainingJob.get_by_id(job_id).estimate["steps"] == start["total_steps"]
            wait(lambda: _final(job_id), 300)
    finally:
        tasks.stop_consumer(handle, timeout=60)


def _final(job_id: int) -> bool:
    with database.connection_context():
        return TrainingJob.get_by_id(job_id).status in jobs.FINAL


def wait(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s")


def test_the_device_probe_also_times_a_processs_exit(app):
    def probe():  # a process that was ready after 0.1 s and had exited 0.3 s after it started
        time.sleep(0.3)
        return {**FAKE_DEVICE, "startup_s": 0.1}
    database.connect(reuse_if_open=True)
    device = estimate.Calibrator(probe=probe, run=lambda shape, batch: None).device()
    assert 0.15 <= device["exit_s"] <= 1.0


def test_no_timing_run_starts_while_the_data_is_being_prepared(app, alice):
    timed = []
    app.extensions["ncs_calibrator"] = estimate.Calibrator(
        probe=lambda: dict(FAKE_DEVICE), run=lambda shape, batch: timed.append(shape.vocab_size) or None,
        prepare=lambda key: True)  # queued, never run: the preparation stays under way
    c = client_as(app, alice)
    e = get_estimate(c, "depth=2&dataset=demo")
    assert e["exact"] and e["calibrating"]  # the shipped facts, and a timing run to come
    time.sleep(0.3)
    assert timed == []  # it would have measured the preparation's work too
    database.connect(reuse_if_open=True)
    datafacts._write(datafacts.key_for("demo", alice.id, None),
                     {"status": "ready", "at": time.time(), "facts": {**sizing.DEMO_FACTS, "warm_prepare_s": 0.1}})
    assert get_estimate(c, "depth=2&dataset=demo")["calibrating"]
    wait(lambda: timed == [sizing.DEMO_FACTS["vocab_size"]], 10)
