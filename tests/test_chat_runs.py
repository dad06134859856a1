"""Chat-tuning runs through the real supervisor and a real trainer subprocess (tests/fake_trainer.py,
speaking issue 12's contract): both stages in one run leave a chat model, a chat-tune of a model starts
from its published checkpoint with no pretraining data, and bad conversations fail as the user's error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from nanochat_studio import datasets, jobs
from nanochat_studio.checkpoints import local_checkpoint_dir
from nanochat_studio.models import JobEvent, Model, TrainingJob
from nanochat_studio.storage import Storage
from tests.test_jobs import alice, settings, store  # noqa: F401  (fixtures)
from tests.test_runner import claim_and_run, fake_log

CONVERSATION = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def events(job, kind: str) -> list[dict]:
    return [e.data for e in JobEvent.select().where((JobEvent.job == job.id) & (JobEvent.kind == kind))
            .order_by(JobEvent.seq)]


def upload(user, settings, name: str, data: bytes):
    import io

    return datasets.save_upload(user, name, io.BytesIO(data), settings)


def test_a_job_with_chat_runs_both_stages_and_leaves_a_chat_model(alice, settings):
    job = jobs.submit(alice, {"depth": 1, "dataset": "demo", "max_steps": 6, "checkpoint_every": 4, "chat": True,
                              "chat_steps": 3, "name": "both"}, settings)
    job, status = claim_and_run(settings)
    assert status == "completed"
    begin = fake_log(settings, job)[0]
    assert begin["chat_data"] == "demo" and begin["init_from"] is None and begin["has_data"]
    assert "init_from_model" not in begin["keys"]
    start = events(job, "start")[0]
    assert start["total_steps"] == 9 and start["stages"] == [{"stage": "pretrain", "steps": 6},
                                                             {"stage": "chat", "steps": 3}]
    assert [(d["step"], d["stage"]) for d in events(job, "step")] == [
        (1, "pretrain"), (2, "pretrain"), (3, "pretrain"), (4, "pretrain"), (5, "pretrain"), (6, "pretrain"),
        (7, "chat"), (8, "chat"), (9, "chat")]
    (stage,) = events(job, "stage")
    assert stage["stage"] == "chat" and stage["step"] == 6 and stage["steps"] == 3
    job = TrainingJob.get_by_id(job.id)
    assert job.progress["stage"] == "chat" and job.progress["stage_from_step"] == 6
    assert job.progress["chat_val_loss"] > 0 and job.progress["val_bpb"] > 0  # each stage its own curve
    model = Model.get(Model.job == job)
    assert model.kind == "chat" and model.step == 9


def test_a_job_without_chat_leaves_a_base_model(alice, settings):
    jobs.submit(alice, {"depth": 1, "dataset": "demo", "max_steps": 4}, settings)
    job, status = claim_and_run(settings)
    assert status == "completed"
    assert fake_log(settings, job)[0]["chat_data"] is None and not events(job, "stage")
    assert Model.get(Model.job == job).kind == "base"


def test_chat_tuning_a_model_starts_from_its_published_checkpoint_without_pretraining(alice, settings):
    jobs.submit(alice, {"depth": 2, "dataset": "demo", "max_steps": 4, "name": "base"}, settings)
    _, status = claim_and_run(settings)
    base = Model.get(Model.name == "base")
    assert status == "completed" and base.kind == "base"
    chats = upload(alice, settings, "chats.jsonl", (json.dumps(CONVERSATION) + "\n").encode() * 10)
    job = jobs.submit(alice, {"init_from_model": base.id, "chat_data": f"ds:{chats.id}", "chat_steps": 2,
                              "name": "tuned"}, settings)
    assert job.config["depth"] == 2
    job, status = claim_and_run(settings)
    assert status == "completed"
    begin = fake_log(settings, job)[0]
    # the model's checkpoint as storage keeps it, handed over as --init-from; no --data, no shape flags
    assert begin["init_from"] == local_checkpoint_dir(base, settings)
    assert Path(begin["init_from"], "config.json").is_file()
    assert not begin["has_data"] and "depth" not in begin["keys"] and "vocab_size" not in begin["keys"]
    assert begin["chat_data"].endswith("chats.jsonl") and Path(begin["chat_data"]).is_file()
    assert events(job, "start")[0]["stages"] == [{"stage": "chat", "steps": 2}]
    assert events(job, "stage")[0]["step"] == 0
    tuned = Model.get(Model.job == job)
    assert tuned.kind == "chat" and tuned.step == 2 and tuned.config["depth"] == 2
    assert Model.get_by_id(base.id).kind == "base"  # the base model is left as it was


def test_a_model_deleted_before_its_chat_tune_runs_fails_the_job_as_the_users_error(alice, settings):
    base = Model.create(user=alice, name="gone soon", checkpoint_key="/nowhere", tokenizer_key="t",
                        config={"depth": 1})
    job = jobs.submit(alice, {"init_from_model": base.id, "chat": True}, settings)
    base.delete_instance()
    job, status = claim_and_run(settings)
    assert status == "failed"
    job = TrainingJob.get_by_id(job.id)
    assert job.error_kind == "user" and "no longer exists" in job.status_reason and job.attempt == 1


def test_conversations_the_trainer_refuses_fail_the_job_without_a_retry(alice, settings):
    chats = upload(alice, settings, "chats.jsonl", (json.dumps(CONVERSATION) + "\n").encode() * 3)
    job = jobs.submit(alice, {"depth": 1, "dataset": "demo", "max_steps": 2, "chat_data": f"ds:{chats.id}"},
                      settings)
    # The upload check reads the first lines only; the trainer reads them all (here: as if line 1 broke).
    stored = Path(Storage.from_settings(settings).local_path(chats.storage_key))
    stored.write_text('{"text": "no messages"}\n')
    job, status = claim_and_run(settings)
    assert status == "failed"
    job = TrainingJob.get_by_id(job.id)
    assert job.error_kind == "user" and job.attempt == 1
    assert "line 1: no messages" in events(job, "error")[0]["message"]


# --- the real trainer (issue 12's trainer side): skipped until trainer/config.py has the chat stage ------

def _trainer_has_chat_stage() -> bool:
    import dataclasses as dc

    from trainer.config import TrainConfig

    return {"chat_data", "init_from", "chat_steps"} <= {f.name for f in dc.fields(TrainConfig)}


def _real(settings):
    import dataclasses as dc

    return dc.replace(settings, trainer_module="trainer.train")


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.skipif(not _trainer_has_chat_stage(), reason="the trainer has no chat stage yet")
def test_the_real_trainer_pretrains_then_chat_tunes_then_chat_tunes_the_result_again(alice, settings, tmp_path):
    real = _real(settings)
    jobs.submit(alice, {"depth": 1, "dataset": "demo", "max_steps": 4, "batch_size": 4, "seq_len": 128,
                        "chat": True, "chat_steps": 3, "name": "both"}, real)
    job, status = claim_and_run(real)
    job = TrainingJob.get_by_id(job.id)
    assert status == "completed", job.status_reason + Path(job.log_path).read_text()[-3000:]
    assert [d["stage"] for d in events(job, "step")] == ["pretrain"] * 4 + ["chat"] * 3
    assert events(job, "stage")[0]["step"] == 4 and events(job, "start")[0]["total_steps"] == 7
    assert job.progress["chat_val_loss"] > 0
    tuned = Model.get(Model.job == job)
    assert tuned.kind == "chat" and tuned.step == 7
    chats = upload(alice, settings, "chats.jsonl", (json.dumps(CONVERSATION) + "\n").encode() * 400)
    jobs.submit(alice, {"init_from_model": tuned.id, "chat_data": f"ds:{chats.id}", "chat_steps": 2,
                        "batch_size": 4, "name": "again"}, real)
    job, status = claim_and_run(real)
    job = TrainingJob.get_by_id(job.id)
    assert status == "completed", job.status_reason + Path(job.log_path).read_text()[-3000:]
    assert events(job, "start")[0]["stages"] == [{"stage": "chat", "steps": 2}]
    assert Model.get(Model.job == job).kind == "chat"


def test_the_plans_demo_set_is_the_trainers():
    """The plan's figures of the built-in set are the generator's, and its epochs the trainer's default."""
    from nanochat_studio import chatplan
    from trainer import demo_chat
    from trainer.config import TrainConfig

    convs = demo_chat.conversations(chatplan.DEMO_SEED, demo_chat.N_CONVERSATIONS)
    assert sum(len(m["content"].encode()) for c in convs for m in c) == chatplan.DEMO_CHAT_CONTENT_BYTES
    assert chatplan.CHAT_EPOCHS == TrainConfig().chat_epochs == TrainConfig.__dataclass_fields__["chat_epochs"].default
    assert chatplan.DEMO_SEED == TrainConfig().seed
    # rows grow as they shorten, but not in proportion: at 128 nearly one conversation a row (11,400
    # training conversations), at 512 several
    assert 10_000 < chatplan.demo_rows(128) < 11_400 and chatplan.demo_rows(128) < 1.6 * chatplan.demo_rows(256)
    assert chatplan.demo_rows(256) > 2 * chatplan.demo_rows(512) > 4 * chatplan.demo_rows(1024)
    assert chatplan.demo_steps(8, 256) == math.ceil(chatplan.CHAT_EPOCHS * chatplan.demo_rows(256) / 8)


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.skipif(not _trainer_has_chat_stage(), reason="the trainer has no chat stage yet")
@pytest.mark.parametrize("seq_len,batch", [(128, 4), (256, 8)])
def test_the_plans_chat_length_for_the_demo_is_near_the_trainers_own(tmp_path, seq_len, batch):
    """The plan replays the trainer's packing of the demo set: its step count is within 5% of the trainer's
    at two row lengths that pack differently (nearly one conversation a row at 128, ~1.5 at 256)."""
    import subprocess
    import sys

    from nanochat_studio import chatplan
    from nanochat_studio.runner import trainer_env
    from trainer import progress

    out = subprocess.run([sys.executable, "-m", "trainer.train", "--data", "demo", "--depth", "1", "--max-steps", "1",
                          "--stop-at-step", "1", "--seq-len", str(seq_len), "--batch-size", str(batch),
                          "--chat-data", "demo", "--device", "cpu", "--compile", "false", "--out", str(tmp_path / "run")],
                         env=trainer_env(), capture_output=True, timeout=600)
    start = next(r for r in map(progress.parse_line, out.stdout.splitlines()) if r and r["event"] == "start")
    trainer_steps = next(s["steps"] for s in start["stages"] if s["stage"] == "chat")
    planned = chatplan.demo_steps(batch, seq_len)
    assert abs(planned - trainer_steps) / trainer_steps < 0.05, (planned, trainer_steps)
