"""Failed GPUs taken out of service (issue 13): a device error in a trainer quarantines its GPU, the job
retries from its checkpoint on another GPU, and the GPU comes back when a health probe passes or an admin
clears it. There is no GPU here: the fake trainer fails on the GPU the test names (FAKE_DEVICE_ERROR_AT),
and the real trainer gets a CUDA error injected through a sitecustomize module of the test's own."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from nanochat_studio import jobs, metrics, quarantine, runner, tasks
from nanochat_studio.models import GpuQuarantine, JobEvent, TrainingJob
from tests.test_jobs import REPO, alice, settings, store  # noqa: F401
from tests.test_runner import fake_log, wait_for
from tests.test_tasks import consumer, status_of, submit  # noqa: F401
from trainer import progress

GiB = 1 << 30
GPU0, GPU01 = runner.Slot("gpu0", "gpu", ("0",)), runner.Slot("gpu0+gpu1", "gpu", ("0", "1"))
L4 = {"device": "cuda", "device_name": "NVIDIA L4", "memory_bytes": 24 * GiB}


# --- what counts as the device's fault -------------------------------------------------------------------

@pytest.mark.parametrize("type_name, message, fault", [
    ("OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB", "oom"),
    ("RuntimeError", "CUDA error: out of memory", "oom"),
    ("RuntimeError", "CUDA error: an illegal memory access was encountered", "cuda"),
    ("RuntimeError", "CUDA error: unspecified launch failure", "cuda"),
    ("RuntimeError", "CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx(...)`", "cuda"),
    ("RuntimeError", "CUDA error: uncorrectable ECC error encountered", "ecc"),
    ("RuntimeError", "Unable to determine the device handle for GPU 0000:3B:00.0: GPU is lost.", "lost"),
    ("RuntimeError", "the assigned GPU is gone: CUDA_VISIBLE_DEVICES=1 but CUDA finds no device", "lost"),
    ("DistBackendError", "NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error", "nccl"),
    ("RuntimeError", "CUDA error: device-side assert triggered", None),  # the program's bug, on any GPU
    ("ValueError", "could not convert string to float", None),
    ("MemoryError", "", None),  # the host's RAM, not a GPU
])
def test_the_trainer_names_device_faults_from_the_exception(type_name, message, fault):
    assert progress.device_fault(type_name, message) == fault


def device_error(fault="cuda", index=0, message="CUDA error: an illegal memory access was encountered"):
    event = {"kind": "infrastructure", "code": progress.DEVICE_ERROR_CODE, "fault": fault, "message": message}
    if index is not None:
        event["device_index"] = index
    return event


def test_judging_a_failed_gpu_attempt(store):
    config = {"depth": 2, "dataset": "demo"}
    v = quarantine.judge(device_error(index=1), {}, GPU01, config, L4)
    assert (v.kind, v.fault, v.gpus) == ("device", "cuda", ("1",))  # the trainer named its GPU
    v = quarantine.judge(device_error(index=None), {}, GPU01, config, L4)
    assert v.gpus == ("0", "1")  # torchrun: every GPU of the attempt, until their probes pass
    v = quarantine.judge({"code": "RuntimeError", "message": "boom"}, {"0": [13, 79]}, GPU0, config, L4)
    assert (v.kind, v.fault, v.gpus) == ("device", "xid", ("0",)) and "Xid 79" in v.message
    assert quarantine.judge({"code": "RuntimeError"}, {"0": [13, 31]}, GPU0, config, L4) is None  # program Xids
    assert quarantine.judge({"code": "RuntimeError", "message": "x"}, {}, GPU0, config, L4) is None
    assert quarantine.judge(None, {}, GPU0, config, L4) is None  # killed, nothing said: an ordinary retry
    cpu = runner.Slot("cpu0", "cpu")
    assert quarantine.judge(device_error(), {}, cpu, config, {"device": "cpu", "memory_bytes": GiB}) is None


def test_out_of_memory_accuses_the_gpu_only_at_a_size_that_fits(store):
    oom = device_error("oom", message="CUDA out of memory. Tried to allocate 20.00 GiB")
    small = quarantine.judge(oom, {}, GPU0, {"depth": 2, "dataset": "demo"}, L4)
    assert (small.kind, small.gpus) == ("device", ("0",)) and "at a size that fits" in small.message
    huge = quarantine.judge(oom, {}, GPU0, {"depth": 24, "seq_len": 2048, "batch_size": 64}, L4)
    assert huge.kind == "user" and not huge.gpus
    assert "needs about" in huge.message and "24.0 GiB" in huge.message and "Lower batch_size" in huge.message
    unknown = quarantine.judge(oom, {}, GPU0, {"depth": 2}, {**L4, "memory_bytes": 0})
    assert unknown is None  # nothing to judge the size by: retry, accuse nobody


# --- the whole path: a device error, a quarantine, a retry on the other GPU ------------------------------

@pytest.mark.process
def test_a_device_error_quarantines_the_gpu_and_the_job_resumes_on_another(alice, settings, consumer, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.05")
    monkeypatch.setenv("FAKE_DEVICE_ERROR_AT", "5:0")  # at step 5, on GPU 0 only
    s = dataclasses.replace(settings, gpus="0,1", gpu_probe_seconds=0)  # no probes: only an admin clears
    consumer(s)
    job = submit(alice, s, max_steps=10, checkpoint_every=2)
    wait_for(lambda: status_of(job) == "completed", timeout=60)

    job = TrainingJob.get_by_id(job.id)
    assert job.attempt == 2 and jobs.charged_failures(job.id) == 1
    begins = [r for r in fake_log(s, job) if r["kind"] == "begin"]
    assert [(b["env_cuda"], b["resumed_from"]) for b in begins] == [("0", None), ("1", 4)]
    (row,) = quarantine.rows()
    assert (row.gpu, row.fault, row.job_id, row.probe_at) == ("0", "cuda", job.id, None)
    assert "illegal memory access" in row.reason
    (device,) = [e.data for e in JobEvent.select().where((JobEvent.job == job.id) & (JobEvent.kind == "device"))]
    assert device["verdict"] == "device" and device["gpus"] == ["0"]
    interrupted = [e.data["reason"] for e in JobEvent.select().where(JobEvent.job == job.id)
                   if e.kind == "state" and e.data.get("to") == "interrupted"]
    assert interrupted and "quarantined" in interrupted[0] and "GPU 0" in interrupted[0]
    assert metrics.REGISTRY.get_sample_value("ncs_gpu_quarantined", {"gpu": "0"}) == 1

    # No new job on GPU 0: a job that needs both GPUs waits; returned to service, it runs on both.
    monkeypatch.delenv("FAKE_DEVICE_ERROR_AT")
    both = submit(alice, s, max_steps=4, checkpoint_every=2, gpus=2)
    time.sleep(1.5)
    assert status_of(both) == "queued"
    quarantine.clear(row.id)
    tasks.ring_if_ready(s)
    wait_for(lambda: status_of(both) == "completed", timeout=30)
    assert {r["env_cuda"] for r in fake_log(s, both) if r["kind"] == "begin"} == {"0,1"}  # torchrun's two ranks
    assert metrics.REGISTRY.get_sample_value("ncs_gpu_quarantined", {"gpu": "0"}) == 0


# --- health probes ------------------------------------------------------------------------------------------

def probe_pool(*slots):
    free = list(slots)
    taken = []

    def take(gpu):
        for slot in free:
            if slot.gpu_ids == (gpu,):
                free.remove(slot)
                taken.append(slot)
                return slot
        return None

    return free, taken, take, free.append


@pytest.mark.process
def test_a_probe_that_cannot_train_on_the_gpu_keeps_it_out(alice, settings):
    s = dataclasses.replace(settings, gpu_probe_seconds=0.01)  # the real trainer: there is no CUDA here
    row = quarantine.quarantine("0", fault="cuda", reason="test", job_id=None, settings=s)
    time.sleep(0.05)
    free, taken, take, give = probe_pool(GPU0)
    assert quarantine.probe_due(s, take, give) == []
    row = GpuQuarantine.get_by_id(row.id)
    assert row.probes == 1 and "without a calibration event" in row.last_probe
    assert free == [GPU0] and taken == [GPU0]  # the slot was out of the pool while probed, and came back


HEALTHY = {"event": "calibration", "v": 1, "time": 0, "device": "cuda", "device_name": "Fake GPU",
           "memory_bytes": 24 * GiB, "tokens_per_sec": 1000.0}


def healthy_python(tmp_path, answer=HEALTHY):
    """A stand-in interpreter that answers the probe as a healthy GPU would (there is none here)."""
    fake_python = tmp_path / "python"
    fake_python.write_text(f"#!/bin/sh\necho '{json.dumps(answer)}'\n")
    fake_python.chmod(0o755)
    return fake_python


def test_a_passing_probe_returns_the_gpu_and_a_busy_one_is_not_probed(alice, settings, tmp_path):
    fake_python = healthy_python(tmp_path)
    answer = HEALTHY
    s = dataclasses.replace(settings, gpu_probe_seconds=0.01, trainer_python=str(fake_python))
    quarantine.quarantine("0", fault="cuda", reason="test", job_id=None, settings=s)
    quarantine.quarantine("1", fault="cuda", reason="test", job_id=None, settings=s)
    time.sleep(0.05)
    free, taken, take, give = probe_pool(GPU0)  # GPU 1's slot is busy (not free): it waits for the next round
    assert quarantine.probe_due(s, take, give) == ["0"]
    assert [r.gpu for r in quarantine.rows()] == ["1"]
    cpu_answer = {**answer, "device": "cpu"}
    fake_python.write_text(f"#!/bin/sh\necho '{json.dumps(cpu_answer)}'\n")
    free, taken, take, give = probe_pool(runner.Slot("gpu1", "gpu", ("1",)))
    assert quarantine.probe_due(s, take, give) == []  # it fell back to the CPU: the GPU is not back
    assert "not the GPU" in quarantine.rows()[0].last_probe


def test_the_consumer_probes_its_quarantined_gpus_when_due(alice, settings, consumer, tmp_path):
    s = dataclasses.replace(settings, gpus="0,1", gpu_probe_seconds=1.5,
                            trainer_python=str(healthy_python(tmp_path)))
    quarantine.quarantine("1", fault="xid", reason="Xid 79", job_id=None, settings=s)
    consumer(s)
    assert [r.gpu for r in quarantine.rows()] == ["1"]  # not before its probe time
    wait_for(lambda: quarantine.rows() == [], timeout=10)


def test_a_quarantine_follows_the_cards_uuid_to_another_host_name(alice, settings):
    GpuQuarantine.create(host="old-pod-name", gpu="3", uuid="GPU-abc", fault="xid", reason="Xid 79",
                         created_at=jobs.utcnow())
    assert quarantine.quarantined_here({"0": "GPU-abc", "1": "GPU-def"}) == {"0"}
    assert quarantine.quarantined_here({"0": None}) == set()


# --- the real trainer, with a CUDA error injected --------------------------------------------------------

INJECT = """
import os
if os.environ.get("INJECT_AT"):
    from trainer import optim
    real, calls = optim.clip_grad_norm, [0]

    def clip_grad_norm(params, max_norm):
        calls[0] += 1
        if calls[0] == int(os.environ["INJECT_AT"]):
            raise RuntimeError(os.environ["INJECT_MESSAGE"])
        return real(params, max_norm)

    optim.clip_grad_norm = clip_grad_norm
"""


@pytest.mark.trainer
@pytest.mark.process
def test_the_real_trainer_reports_a_cuda_error_as_a_device_error(tmp_path):
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(INJECT)
    data = tmp_path / "stories.txt"
    data.write_text(" ".join(f"The cat {i % 7} sat on the mat and the dog ran." for i in range(600)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{tmp_path / 'inject'}{os.pathsep}{REPO}",
               INJECT_AT="3", INJECT_MESSAGE="CUDA error: an illegal memory access was encountered")
    argv = [sys.executable, "-m", "trainer.train", "--depth", "1", "--seq-len", "32", "--batch-size", "4",
            "--vocab-size", "512", "--device", "cpu", "--max-steps", "10", "--data", str(data),
            "--out", str(tmp_path / "run"), "--eval-every", "1000", "--sample-every", "1000"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    events = [progress.parse_line(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 1, proc.stderr[-2000:]
    error = events[-1]
    assert error["event"] == "error" and error["code"] == progress.DEVICE_ERROR_CODE
    assert error["kind"] == "infrastructure" and error["fault"] == "cuda"
    assert "illegal memory access" in error["message"]
    assert "device_index" not in error  # it trained on the CPU: no CUDA index to name
    assert progress.outcome_of_exit(proc.returncode) == "infrastructure"
    assert [e["step"] for e in events if e["event"] == "step"][-1] == 2  # it failed in step 3
