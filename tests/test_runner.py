"""runner.py's spawn primitive, slots and run lock, and supervisor.py against real trainer subprocesses
(tests/fake_trainer.py) and a real SQLite file."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from nanochat_studio import jobs, runner, supervisor
from nanochat_studio.models import JobEvent, Model, TrainingJob
from tests.s3server import s3_server  # noqa: F401  (fixture)
from tests.test_storage import visible
from tests.test_jobs import alice, settings, store  # noqa: F401  (fixtures)

CPU = runner.Slot("cpu0", "cpu", (), 1)


def fake_log(settings, job) -> list[dict]:
    path = Path(settings.runs_dir) / f"job-{job.id}" / "fake_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def claim_and_run(settings, **kw):
    job = jobs.claim_next(jobs.owner_id("cpu0"), "cpu0", lease_seconds=settings.lease_seconds)
    assert job is not None
    return job, supervisor.run_training(job, CPU, settings, **kw)


def wait_for(predicate, timeout=20.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out waiting")


def current_step(job_id: int) -> int:
    return (TrainingJob.get_by_id(job_id).progress or {}).get("step") or 0


def in_thread(fn, *args, **kwargs):
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", fn(*args, **kwargs)))
    thread.start()
    return thread, box


def states(job) -> list[str]:
    return [e.data["to"] for e in jobs.events_since(job) if e.kind == "state"]


def test_a_job_runs_to_completed_with_events_progress_and_a_model(alice, settings):
    job = jobs.submit(alice, {"depth": 1, "dataset": "demo", "max_steps": 8, "checkpoint_every": 4,
                              "name": "tiny"}, settings)
    seen: list[str] = []
    job, status = claim_and_run(settings, on_event=lambda _id, _seq, kind, _data: seen.append(kind))
    assert status == "completed"
    job = TrainingJob.get_by_id(job.id)
    assert states(job) == ["queued", "preparing", "running", "completed"]
    assert seen[0] == "start" and seen[-2:] == ["done", "publish"] and seen.count("step") == 8
    kinds = [e.kind for e in JobEvent.select().where(JobEvent.job == job).order_by(JobEvent.seq)]
    assert kinds.count("step") == 8 and "not JSON" not in str(kinds)
    assert job.progress["step"] == 8 and job.progress["total_steps"] == 8 and job.progress["val_bpb"] > 0
    assert job.finished_at and job.lease_owner is None and job.error_kind is None
    model = Model.get(Model.job == job)
    assert model.name == "tiny" and model.step == 8 and model.params == 1234 and model.user_id == alice.id
    assert model.checkpoint_key == f"users/{alice.id}/models/job-{job.id}-a1/checkpoints/step_0000008"
    assert (Path(settings.home) / "storage" / model.checkpoint_key / "model.bin").exists()
    assert model.samples[0]["text"].startswith("Once") and model.metrics["final_loss"] > 0
    assert model.data_source == "demo" and model.data_sha256 == "f" * 64
    begin = fake_log(settings, job)[0]
    assert begin["lock_held"] and begin["env_cuda"] == "" and begin["omp"] == "1"
    assert Path(job.log_path).exists()  # the trainer's stderr goes here
    assert Path(job.output_path, "job.json").exists()


def test_cancel_mid_run_ends_cancelled_with_a_usable_checkpoint(alice, settings, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.2")
    job = jobs.submit(alice, {"depth": 1, "dataset": "demo", "max_steps": 100, "checkpoint_every": 50}, settings)
    thread, box = in_thread(claim_and_run, settings)
    wait_for(lambda: current_step(job.id) >= 3)
    assert jobs.request_cancel(job) == "cancelling"
    thread.join(30)
    assert box["result"][1] == "cancelled"
    job = TrainingJob.get_by_id(job.id)
    assert job.status == "cancelled" and job.attempt == 1
    model = Model.get(Model.job == job)
    stopped_at = fake_log(settings, job)[-1]["step"]
    assert model.step == stopped_at and f"(cancelled at step {stopped_at})" in model.name
    assert (Path(settings.home) / "storage" / model.checkpoint_key / "manifest.json").exists()


@pytest.mark.process
def test_a_trainer_killed_by_sigkill_is_retried_from_its_checkpoint(alice, settings, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.1")
    job = jobs.submit(alice, {"depth": 1, "dataset": "demo", "max_steps": 12, "checkpoint_every": 4}, settings)
    thread, box = in_thread(claim_and_run, settings)
    wait_for(lambda: current_step(job.id) >= 6)
    pid = fake_log(settings, job)[0]["pid"]
    os.kill(pid, signal.SIGKILL)
    thread.join(30)
    assert box["result"][1] == "queued"
    job = TrainingJob.get_by_id(job.id)
    assert job.status_reason.startswith("retrying in 0.2 s after the trainer was killed by SIGKILL")
    time.sleep(0.25)
    job, status = claim_and_run(settings)
    assert status == "completed" and job.attempt == 2
    log = fake_log(settings, job)
    begins = [r for r in log if r["kind"] == "begin"]
    assert [b["resumed_from"] for b in begins] == [None, 4]
    second = [r["step"] for r in log if r["kind"] == "step" and r["pid"] == begins[1]["pid"]]
    assert second == list(range(5, 13))  # resumed at checkpoint + 1, nothing after it trained twice
    assert states(job) == ["queued", "preparing", "running", "interrupted", "queued", "preparing", "running",
                           "completed"]


def test_a_bad_dataset_fails_as_a_user_error_without_retry(alice, settings, tmp_path_factory):
    empty = tmp_path_factory.mktemp("data") / "empty.txt"  # a server path outside the data directory
    empty.write_text("")
    job = jobs.submit(alice, {"depth": 1, "dataset": str(empty), "max_steps": 5}, settings)
    job, status = claim_and_run(settings)
    assert status == "failed"
    job = TrainingJob.get_by_id(job.id)
    assert job.error_kind == "user" and "is empty" in job.status_reason and job.attempt == 1
    assert jobs.reconcile() == [] and jobs.claim_next("w", "cpu0") is None
    assert not Model.select().exists()


def test_attempts_exhausted_fail_as_infrastructure(alice, settings, monkeypatch):
    monkeypatch.setenv("FAKE_EXIT_AT", "2:1")
    two = dataclasses.replace(settings, max_attempts=2, retry_backoff_seconds=0)
    job = jobs.submit(alice, {"depth": 1, "dataset": "demo", "max_steps": 5}, two)
    assert claim_and_run(two)[1] == "queued"
    assert claim_and_run(two)[1] == "failed"
    job = TrainingJob.get_by_id(job.id)
    assert job.error_kind == "infrastructure" and "gave up after 2 failed attempts" in job.status_reason
    assert "the trainer exited with code 1: fake exit 1 at step 2" in job.status_reason


@pytest.mark.process
def test_a_second_supervisor_cannot_start_a_trainer_while_the_first_lives(alice, settings, monkeypatch):
    # The first trainer ignores SIGTERM so it outlives its fencing for a while, like a slow checkpoint.
    monkeypatch.setenv("FAKE_STEP_S", "0.1")
    monkeypatch.setenv("FAKE_IGNORE_TERM", "1")
    quick = dataclasses.replace(settings, lease_seconds=1.5, retry_backoff_seconds=0, term_grace_seconds=3)
    job = jobs.submit(alice, {"depth": 1, "dataset": "demo", "max_steps": 400, "checkpoint_every": 3}, quick)
    first, box = in_thread(claim_and_run, quick)
    wait_for(lambda: current_step(job.id) >= 4)
    # The first supervisor is declared lost (as if its lease ran out) and another one claims the job.
    assert jobs.reconcile(jobs.utcnow() + jobs.dt.timedelta(hours=1), backoff_base=0) == [job.id]
    again = jobs.claim_next("second-supervisor", "cpu1", lease_seconds=1.5)
    assert again.attempt == 2
    assert supervisor.run_training(again, CPU, quick) == "queued"  # it waited for the lock and gave up
    again = TrainingJob.get_by_id(job.id)
    assert "still holds the run directory" in again.status_reason
    assert len([r for r in fake_log(quick, job) if r["kind"] == "begin"]) == 1
    first.join(30)
    assert box["result"][1] is None  # fenced: it left the row alone and killed its trainer
    monkeypatch.setenv("FAKE_IGNORE_TERM", "0")
    monkeypatch.setenv("FAKE_STEP_S", "0.005")
    job, status = claim_and_run(quick)
    assert status == "completed"
    log = fake_log(quick, job)
    begins = [r for r in log if r["kind"] == "begin"]
    ends = [r for r in log if r["kind"] == "end"]
    assert len(begins) == 2 and begins[1]["t"] > max(r["t"] for r in log if r["pid"] == begins[0]["pid"])
    assert begins[1]["resumed_from"] is not None and ends[-1]["rc"] == 0


@pytest.mark.process
def test_the_run_lock_is_held_by_the_trainer_itself(settings, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fd = runner.acquire_run_lock(run_dir)
    proc = runner.spawn([os.sys.executable, "-c", "import time; time.sleep(30)"], pass_fds=(fd,))
    os.close(fd)  # the supervisor is gone; its child still holds the lock
    try:
        assert runner.acquire_run_lock(run_dir, wait_s=0.3) is None
    finally:
        proc.kill()
        proc.wait()
    again = runner.acquire_run_lock(run_dir, wait_s=2)
    assert again is not None
    os.close(again)


def test_a_child_dies_with_the_thread_that_spawned_it(tmp_path):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault(
        "proc", runner.spawn([os.sys.executable, "-c", "import time; time.sleep(30)"])))
    thread.start()
    thread.join()
    assert box["proc"].wait(timeout=10) == -signal.SIGTERM


def test_slots_from_settings(settings):
    assert [s.name for s in runner.local_slots(dataclasses.replace(settings, cpu_slots=2))] == ["cpu0", "cpu1"]
    gpus = runner.local_slots(dataclasses.replace(settings, gpus="0,1"))
    assert [(s.name, s.env()["CUDA_VISIBLE_DEVICES"]) for s in gpus] == [("gpu0", "0"), ("gpu1", "1")]
    multi = runner.Slot("gpus0-1", "gpu", ("0", "1"))
    argv = runner.trainer_argv(settings, multi, Path("/r/job.json"), Path("/r"))
    assert argv[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert argv[-5:] == ["--config", "/r/job.json", "--out", "/r", "--resume"]


@pytest.mark.slow  # imports torch twice and times real steps: ~20 s here
def test_the_device_probe_and_a_calibration_ask_the_trainer_itself(settings):
    probe = runner.probe_device(settings)
    assert probe["device"] == "cpu" and probe["memory_bytes"] > 0 and probe["device_name"]
    from trainer import sizing

    result = runner.calibrate(settings, sizing.shape_for(1, 512, 32), 2, timeout=300)
    assert result["tokens_per_sec"] > 0


def test_a_helper_that_fails_raises_spawn_error(settings):
    with pytest.raises(runner.SpawnError, match="without a calibration event"):
        runner.run_helper(settings, "no_such_module_here", [], event="calibration", timeout=30)


# --- the real trainer -----------------------------------------------------------------------------------

@pytest.mark.slow  # ~25 s on 2 cores: torch import, tokenizer, 6 steps, eval, samples
def test_the_real_trainer_completes_a_tiny_job_into_a_published_model(alice, settings):
    real = dataclasses.replace(settings, trainer_module="trainer.train")
    job = jobs.submit(alice, {"depth": 1, "dataset": "demo", "max_steps": 6, "checkpoint_every": 3,
                              "batch_size": 4, "seq_len": 64}, real)
    job, status = claim_and_run(real)
    job = TrainingJob.get_by_id(job.id)
    assert status == "completed", job.status_reason + Path(job.log_path).read_text()[-2000:]
    assert job.progress["step"] == 6 and job.progress["val_bpb"] > 0
    kinds = [e.kind for e in jobs.events_since(job)]
    assert kinds.count("step") == 6 and {"start", "eval", "sample", "checkpoint", "done"} <= set(kinds)
    model = Model.get(Model.job == job)
    assert model.params > 0 and model.step == 6 and model.samples
    stored = Path(settings.home) / "storage" / model.checkpoint_key
    assert (stored / "model.safetensors").exists() and model.tokenizer_key == model.checkpoint_key + "/tokenizer"


@pytest.mark.process
def test_the_real_trainer_fails_an_empty_dataset_as_a_user_error(alice, settings, tmp_path_factory):
    empty = tmp_path_factory.mktemp("data") / "empty.txt"  # a server path outside the data directory
    empty.write_text("")
    real = dataclasses.replace(settings, trainer_module="trainer.train")
    job = jobs.submit(alice, {"depth": 1, "dataset": str(empty), "max_steps": 6}, real)
    job, status = claim_and_run(real)
    job = TrainingJob.get_by_id(job.id)
    assert status == "failed" and job.error_kind == "user" and job.attempt == 1, job.status_reason
    assert jobs.reconcile() == [] and jobs.claim_next("w", "cpu0") is None


def test_a_slow_data_preparation_keeps_its_lease(alice, settings, monkeypatch):
    from nanochat_studio import datasets

    def slow_download(job, settings, run_dir):  # a large https dataset, fetched for longer than the lease
        time.sleep(2.0)
        return "demo", None

    monkeypatch.setattr(datasets, "resolve_for_training", slow_download)
    short = dataclasses.replace(settings, lease_seconds=0.6)
    job = jobs.submit(alice, {"depth": 1, "dataset": "demo", "max_steps": 3}, short)
    thread, box = in_thread(claim_and_run, short)
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        assert jobs.reconcile(backoff_base=0) == []
        time.sleep(0.1)
    thread.join(30)
    assert box["result"][1] == "completed" and TrainingJob.get_by_id(job.id).attempt == 1


@pytest.mark.process
def test_another_machine_resumes_from_the_checkpoint_mirrored_in_storage(alice, settings, tmp_path, monkeypatch):
    # Two workers share the store and the storage but not their run directories (two machines).
    monkeypatch.setenv("FAKE_STEP_S", "0.1")
    machine_a = dataclasses.replace(settings, runs_dir=str(tmp_path / "a-runs"), mirror_checkpoints=True)
    machine_b = dataclasses.replace(settings, runs_dir=str(tmp_path / "b-runs"), mirror_checkpoints=True)
    job = jobs.submit(alice, {"depth": 1, "dataset": "demo", "max_steps": 20, "checkpoint_every": 4}, machine_a)
    mirrored = Path(settings.home) / "storage" / f"users/{alice.id}/runs/{job.id}/checkpoints"
    thread, box = in_thread(claim_and_run, machine_a)
    # the mirror uploads the newest finished checkpoint it sees (it may skip one the trainer outpaced)
    wait_for(lambda: any(int(p.parent.name[5:]) >= 8 for p in mirrored.glob("step_*/_COMMITTED.json")), timeout=30)
    os.kill(fake_log(machine_a, job)[0]["pid"], signal.SIGKILL)  # machine A is lost mid-run
    thread.join(30)
    assert box["result"][1] == "queued"
    kept = sorted(p.name for p in mirrored.iterdir() if not p.name.startswith("."))
    assert len(kept) == 1 and kept[0] >= "step_0000008"  # only the newest is kept
    step = int(kept[0].split("_")[1])
    time.sleep(0.25)
    job, status = claim_and_run(machine_b)
    assert status == "completed"
    begin = fake_log(machine_b, job)[0]
    assert begin["resumed_from"] == step
    assert [r["step"] for r in fake_log(machine_b, job) if r["kind"] == "step"] == list(range(step + 1, 21))
    assert "restore" in [e.kind for e in jobs.events_since(job)]
    assert not any(p for p in mirrored.glob("step_*"))  # forgotten once the model was published


@pytest.mark.process
def test_checkpoints_are_mirrored_to_s3_by_default_and_restored_elsewhere(alice, settings, tmp_path, monkeypatch,
                                                                           s3_server):
    from nanochat_studio.storage import Storage

    monkeypatch.setenv("FAKE_STEP_S", "0.1")
    remote = dict(storage_url=s3_server.url(f"ncs-{tmp_path.name}"), storage_options=s3_server.options)
    machine_a = dataclasses.replace(settings, runs_dir=str(tmp_path / "a-runs"), **remote)
    machine_b = dataclasses.replace(settings, runs_dir=str(tmp_path / "b-runs"), home=str(tmp_path / "b-home"),
                                    **remote)
    # 20 s of training on A: its mirror sidecar has time to start and upload on a loaded machine before the
    # run would end (a finished job's mirror is forgotten). B then runs the rest quickly.
    job = jobs.submit(alice, {"depth": 1, "dataset": "demo", "max_steps": 200, "checkpoint_every": 4}, machine_a)
    store = Storage(remote["storage_url"], remote["storage_options"])
    prefix = f"users/{alice.id}/runs/{job.id}/checkpoints"
    thread, box = in_thread(claim_and_run, machine_a)
    wait_for(lambda: store.list_committed(prefix), timeout=30)
    os.kill(fake_log(machine_a, job)[0]["pid"], signal.SIGKILL)
    thread.join(30)
    step = int(store.list_committed(prefix)[-1].rsplit("_", 1)[1])
    assert step < 200
    monkeypatch.setenv("FAKE_STEP_S", "0.005")
    time.sleep(0.25)
    job, status = claim_and_run(machine_b)
    assert status == "completed" and fake_log(machine_b, job)[0]["resumed_from"] == step
    model = Model.get(Model.job == job)
    assert visible(store, f"{model.checkpoint_key}/model.bin") and store.list_committed(prefix) == []
