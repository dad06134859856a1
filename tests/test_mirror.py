"""A running job in storage (mirror.py): the log tail and checkpoints a worker mirrors, read by a web
process and a resuming worker that share no disk with it, and the sidecar that outlives its supervisor."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import tarfile
import threading
import time
from pathlib import Path

import pytest

from nanochat_studio import jobs, mirror
from nanochat_studio.checkpoints import CheckpointMirror
from nanochat_studio.models import JobEvent, Model, TrainingJob
from nanochat_studio.storage import Storage
from tests.conftest import client_as
from tests.s3server import s3_server  # noqa: F401  (fixture)
from tests.test_jobs import make_settings as worker_settings
from tests.test_runner import claim_and_run, fake_log, in_thread, wait_for
from tests.test_storage import make_checkpoint, visible
from tests.test_tasks import start_serve_like


def local_store(tmp_path: Path) -> Storage:
    return Storage(f"file://{tmp_path / 'store'}", cache_dir=tmp_path / "cache")


def stored_log(store: Storage, user_id: int, job_id: int) -> bytes:
    with store.open(f"{mirror.run_prefix(user_id, job_id)}/log.txt") as f:
        return f.read()


def new_attempt(store: Storage, run_dir: Path, attempt: int, job_id: int = 5) -> mirror.RunMirror:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "train.log"
    log.touch()
    return mirror.RunMirror(store, 1, job_id, attempt, run_dir, log, log.stat().st_size)


def append(path: Path, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text)


# --- the log --------------------------------------------------------------------------------------------


def test_the_log_tail_is_mirrored_incrementally_with_bounded_uploads(tmp_path, monkeypatch):
    monkeypatch.setattr(mirror, "LOG_EVERY_S", 0.0)
    store = local_store(tmp_path)
    uploads: list[tuple[str, int]] = []
    real_put = store.put_stream

    def counting_put(stream, key, **kw):
        meta = real_put(stream, key, **kw)
        uploads.append((key.rsplit("/", 1)[-1], meta["size"]))
        return meta

    monkeypatch.setattr(store, "put_stream", counting_put)
    m = new_attempt(store, tmp_path / "run", 1)
    log = tmp_path / "run" / "train.log"
    for batch in range(50):  # ~250 KiB of log, four times what the page shows
        append(log, "".join(f"batch {batch} line {i} " + "x" * 60 + "\n" for i in range(64)))
        m.sweep()
    text = log.read_bytes()
    assert len(text) > 3 * mirror.LOG_TAIL_BYTES
    assert stored_log(store, 1, 5) == text[-mirror.LOG_TAIL_BYTES:]
    logs = [size for key, size in uploads if key == "log.txt"]
    assert len(logs) == 50 and max(logs) <= mirror.LOG_TAIL_BYTES  # one bounded upload per sweep
    uploads.clear()
    m.sweep()  # nothing new: nothing uploaded
    assert [key for key, _ in uploads if key == "log.txt"] == []
    assert m.log.tell() == len(text)  # every byte read once, from where the last sweep stopped


def test_the_tail_continues_across_attempts_and_keeps_what_a_dead_attempt_left(tmp_path, monkeypatch):
    monkeypatch.setattr(mirror, "LOG_EVERY_S", 0.0)
    store = local_store(tmp_path)
    a, b = tmp_path / "machine-a", tmp_path / "machine-b"
    first = new_attempt(store, a, 1)
    append(a / "train.log", "a: attempt one\n")
    first.finish(checkpoints=True)
    second = new_attempt(store, b, 2)  # another machine resumes: its lines follow the first attempt's
    append(b / "train.log", "b: attempt two, mirrored\n")
    second.sweep()
    append(b / "train.log", "b: attempt two, last words before its supervisor and sidecar died\n")
    assert stored_log(store, 1, 5) == b"a: attempt one\nb: attempt two, mirrored\n"
    third = new_attempt(store, b, 3)  # the same machine again: the dead attempt's last lines are here
    append(b / "train.log", "b: attempt three\n")
    third.finish(checkpoints=True)
    assert stored_log(store, 1, 5).decode().splitlines() == [
        "a: attempt one", "b: attempt two, mirrored", "b: attempt two, last words before its supervisor and sidecar died",
        "b: attempt three"]
    fourth = new_attempt(store, a, 4)  # machine A's run directory did not write last: nothing of it is re-sent
    append(a / "train.log", "a: attempt four\n")
    fourth.finish(checkpoints=True)
    assert stored_log(store, 1, 5).decode().splitlines()[-2:] == ["b: attempt three", "a: attempt four"]
    state = mirror.read_state(store, mirror.run_prefix(1, 5))
    assert state["attempt"] == 4 and state["active"] is False


def test_a_resuming_attempt_waits_for_the_previous_mirror_and_not_for_a_dead_one(tmp_path):
    store = local_store(tmp_path)
    prefix = mirror.run_prefix(1, 5)

    def state(attempt: int, active: bool, beat: float) -> None:
        body = {"attempt": attempt, "active": active, "beat": beat}
        store.put_stream(io.BytesIO(json.dumps(body).encode()), f"{prefix}/mirror.json")

    assert mirror.wait_for_previous(store, prefix, 2) < 0.1  # no mirror ever ran
    state(1, True, 1.0)

    def uploading_then_done() -> None:
        for beat in range(2, 8):
            time.sleep(0.2)
            state(1, True, float(beat))
        state(1, False, 9.0)

    thread = threading.Thread(target=uploading_then_done)
    thread.start()
    waited = mirror.wait_for_previous(store, prefix, 2, stale_s=0.5, poll_s=0.05)
    thread.join()
    assert 1.1 < waited < 3  # it waited for the upload, longer than the staleness window, while beats came
    state(2, True, 3.0)  # a sidecar that stopped beating (its machine is gone)
    assert 0.5 <= mirror.wait_for_previous(store, prefix, 3, stale_s=0.5, poll_s=0.05) < 2
    assert mirror.wait_for_previous(store, prefix, 2, stale_s=5) < 0.1  # its own attempt: never a wait


# --- the web reads storage --------------------------------------------------------------------------------


@pytest.fixture
def remote(s3_server, tmp_path):
    return {"storage_url": s3_server.url(f"m{abs(hash(tmp_path.name)) % 10**8}"),
            "storage_options": s3_server.options}


@pytest.mark.process
def _clear_checkpoints_between_writes(pid: int, checkpoints: Path) -> None:
    """Delete a running trainer's checkpoints directory while it is paused between two checkpoints.

    The trainer writes a checkpoint every few tenths of a second; deleting the directory while it makes
    the next one fails ("Directory not empty") or takes the directory from under its writes. So it is
    stopped, and let go again for a moment while a checkpoint is half written (no manifest yet).
    """
    deadline = time.monotonic() + 30
    while True:
        os.kill(pid, signal.SIGSTOP)
        try:
            steps = list(checkpoints.glob("step_*"))
            if all((d / "manifest.json").exists() for d in steps):
                shutil.rmtree(checkpoints, ignore_errors=True)  # the worker may prune a step as we delete
                if not checkpoints.exists():
                    return
        finally:
            os.kill(pid, signal.SIGCONT)
        assert time.monotonic() < deadline, "the trainer never paused between two checkpoints"
        time.sleep(0.01)


def test_the_web_shows_the_log_and_snapshots_from_storage_not_the_workers_disk(make_app, db_url, remote,
                                                                                  tmp_path, monkeypatch):
    from tests.conftest import make_user

    app = make_app(mode="lab", **remote)  # its own home and runs directory: another machine
    alice = make_user("alice")
    web = client_as(app, alice)
    monkeypatch.setenv("FAKE_STEP_S", "0.1")
    worker = worker_settings(tmp_path / "worker", database_url=db_url, **remote)
    job = jobs.submit(alice, {"depth": 1, "dataset": "demo", "max_steps": 60, "checkpoint_every": 5}, worker)
    thread, box = in_thread(claim_and_run, worker)
    try:
        run_dir = Path(worker.runs_dir) / f"job-{job.id}"
        text = wait_for(lambda: (t := web.get(f"/api/jobs/{job.id}/log").get_json()["text"]) and
                        "fake trainer starting" in t and t, timeout=30)
        assert str(run_dir) not in text
        store = Storage(remote["storage_url"], remote["storage_options"])
        ckpts = CheckpointMirror(store, alice.id, job.id)
        wait_for(lambda: ckpts.newest(), timeout=30)
        trainer = fake_log(worker, job)[0]["pid"]
        _clear_checkpoints_between_writes(trainer, run_dir / "checkpoints")  # nothing for the web to fall back on
        r = web.post(f"/api/jobs/{job.id}/snapshot", json={})
        assert r.status_code == 201, r.get_data(as_text=True)
        model = Model.get_by_id(r.get_json()["model_id"])
        assert model.is_snapshot and model.step >= 5 and model.step % 5 == 0
        assert model.checkpoint_key == f"users/{alice.id}/models/{model.id}/checkpoints/step_{model.step:07d}"
        with store.open(f"{model.checkpoint_key}/model.bin") as f:
            assert f.read() == f"fake weights at step {model.step}".encode()
        (run_dir / "train.log").unlink()  # gone from the worker's disk; the sidecar reads its open file
        with open(f"/proc/{trainer}/fd/2", "a") as stderr:  # the trainer's own stderr, the unlinked file
            stderr.write("a line written after the log file was deleted\n")
        wait_for(lambda: "after the log file was deleted" in web.get(f"/api/jobs/{job.id}/log").get_json()["text"],
                 timeout=30)
    finally:
        jobs.request_cancel(job.id)
        thread.join(60)
    assert box["result"][1] == "cancelled"
    assert ckpts.newest() is None  # a final job's mirrored checkpoints are forgotten
    assert "fake trainer starting" in web.get(f"/api/jobs/{job.id}/log").get_json()["text"]  # the log stays


def test_the_newest_checkpoint_downloads_mid_run_from_storage(make_app, remote, tmp_path):
    from tests.conftest import make_user

    app = make_app(mode="lab", **remote)
    alice, bob = make_user("alice"), make_user("bob")
    job = TrainingJob.create(user=alice.id, name="live", status="running", output_path=str(tmp_path / "elsewhere"))
    store = Storage(remote["storage_url"], remote["storage_options"])
    web = client_as(app, alice)
    assert web.post(f"/api/jobs/{job.id}/snapshot", json={}).status_code == 409  # nothing mirrored yet
    ckpts = CheckpointMirror(store, alice.id, job.id)
    weights = os.urandom(50_000)
    ckpts.upload(make_checkpoint(tmp_path / "a", step=40, weights=b"older"))
    ckpts.upload(make_checkpoint(tmp_path / "b", step=80, weights=weights))
    assert store.list_committed(ckpts.prefix) == [f"{ckpts.prefix}/step_0000080"]  # the older one is dropped
    r = web.post(f"/api/jobs/{job.id}/snapshot", json={})
    assert r.status_code == 201
    model_id = r.get_json()["model_id"]
    assert r.get_json()["step"] == 80
    body = web.get(f"/api/models/{model_id}/download").get_data()
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        names = tar.getnames()
        member = next(n for n in names if n.endswith("/model.safetensors"))
        assert tar.extractfile(member).read() == weights
    assert client_as(app, bob).post(f"/api/jobs/{job.id}/snapshot", json={}).status_code == 404
    ckpts.forget()  # the trainer's mirror moves on: the snapshot is a copy of its own
    assert visible(store, f"{Model.get_by_id(model_id).checkpoint_key}/model.safetensors")


# --- the sidecar outlives its supervisor ------------------------------------------------------------------


@pytest.mark.process
@pytest.mark.sqlite_only  # the worker child opens the SQLite URL itself (conftest redirects only ours)
def test_the_checkpoint_a_sigterm_wrote_after_the_supervisor_died_is_resumed_elsewhere(tmp_path, monkeypatch):
    from tests.test_jobs import open_store
    from nanochat_studio.models import User

    monkeypatch.setenv("FAKE_STEP_S", "0.1")
    shared = {"storage_url": f"file://{tmp_path / 'shared-storage'}", "mirror_checkpoints": True,
              "database_url": f"sqlite:///{tmp_path}/studio.db", "lease_seconds": 60}
    machine_a = worker_settings(tmp_path / "a", **shared)
    machine_b = worker_settings(tmp_path / "b", **shared)
    open_store(shared["database_url"])
    alice = User.create(email="alice@example.com", name="alice")
    # checkpoint_every 50: no periodic checkpoint before the kill, so whatever B resumes from was written
    # on SIGTERM, after its supervisor was gone.
    job = jobs.submit(alice, {"depth": 1, "dataset": "demo", "max_steps": 60, "checkpoint_every": 50}, machine_a)
    worker_a = start_serve_like(machine_a, tmp_path / "worker-a.log")
    try:
        wait_for(lambda: (TrainingJob.get_by_id(job.id).progress or {}).get("step", 0) >= 8, timeout=60)
        worker_a.send_signal(signal.SIGKILL)
        worker_a.wait()
    finally:
        if worker_a.poll() is None:
            worker_a.kill()
    wait_for(lambda: jobs.reconcile(backoff_base=0) or TrainingJob.get_by_id(job.id).status == "queued", timeout=30)
    time.sleep(0.3)
    job, status = claim_and_run(machine_b)
    assert status == "completed"
    a_log, b_log = fake_log(machine_a, job), fake_log(machine_b, job)
    a_end = [r for r in a_log if r["kind"] == "end"]
    assert a_end and a_end[0]["rc"] == 75  # SIGTERM from the parent-death signal: it checkpointed
    sigterm_step = a_end[0]["step"]
    assert b_log[0]["resumed_from"] == sigterm_step >= 8
    assert [r["step"] for r in b_log if r["kind"] == "step"] == list(range(sigterm_step + 1, 61))
    restore = [e.data for e in JobEvent.select().where((JobEvent.job == job.id) & (JobEvent.kind == "restore"))]
    assert restore and restore[0]["key"].endswith(f"step_{sigterm_step:07d}")
    mirror_log = (Path(machine_a.runs_dir) / f"job-{job.id}" / "mirror.log").read_text()
    assert "the supervisor is gone" in mirror_log
    assert "fake trainer starting" in mirror.log_tail(TrainingJob.get_by_id(job.id),
                                                      dataclasses.replace(machine_b, runs_dir=str(tmp_path / "web")))
