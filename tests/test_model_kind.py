"""Models carry their kind (issue 12): migration 6 adds it on SQLite and PostgreSQL (rows made before it
keep what their config said), a checkpoint's config decides it at publish time, and the chat code reads it."""

from __future__ import annotations

import json

import pytest

from nanochat_studio import chat, db
from nanochat_studio.checkpoints import checkpoint_kind, create_run_model
from nanochat_studio.models import Model, TrainingJob, User


@pytest.fixture(params=["sqlite", "postgres"])
def any_url(request, tmp_path):
    """Each test runs on both backends, whatever NCS_TEST_DB says."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/studio.db"
    return request.getfixturevalue("postgres")


def test_migration_6_adds_the_kind_and_keeps_what_older_rows_said(any_url, monkeypatch):
    database = db.open_database(any_url)
    before = [m for m in db.MIGRATIONS if m[0] < 6]
    monkeypatch.setattr(db, "MIGRATIONS", before)  # a store as the release before the chat stage made it
    db.migrate(database)
    database.execute_sql('ALTER TABLE "model" DROP COLUMN kind')
    user = User.create(email="old@example.com")
    rows = {}
    for name, config in (("plain", {"depth": 2}), ("tuned", {"depth": 2, "chat_tuned": True}),
                         ("sft", {"sft": 1})):
        cursor = database.execute_sql(
            'INSERT INTO "model" (user_id, name, step, is_snapshot, checkpoint_key, tokenizer_key, params, config, '
            "metrics, samples, data_source, data_sha256, size_bytes, created_at) VALUES "
            f"({', '.join([database.param] * 14)})" + (" RETURNING id" if db.is_postgres(database) else ""),
            (user.id, name, 1, False, "k", "t", 0, json.dumps(config), "{}", "[]", "", "", 0, "2025-01-01 00:00:00"))
        rows[name] = cursor.fetchone()[0] if db.is_postgres(database) else cursor.lastrowid
    monkeypatch.undo()
    assert db.migrate(database) == [6]
    kinds = {name: Model.get_by_id(pk).kind for name, pk in rows.items()}
    assert kinds == {"plain": "base", "tuned": "chat", "sft": "chat"}
    assert Model.create(user=user, name="new", checkpoint_key="k", tokenizer_key="t").kind == "base"
    assert db.migrate(database) == []
    database.close()


def test_a_fresh_store_has_the_kind_column_from_migration_one(any_url):
    database = db.open_database(any_url)
    db.migrate(database)
    assert "kind" in {c.name for c in database.get_columns("model")}
    database.close()


@pytest.mark.parametrize("config, done, kind", [
    ({"kind": "chat", "chat_tuned": True}, {}, "chat"),
    ({"kind": "base"}, {}, "base"),
    ({}, {}, "base"),  # a trainer from before the chat stage
    ({}, {"chat_tuned": True}, "chat"),  # config unreadable, but the done event said so
    ({"kind": "weird"}, {}, "base"),
])
def test_the_kind_comes_from_the_checkpoints_config(config, done, kind):
    assert checkpoint_kind(config, done) == kind


def test_a_run_model_takes_the_kind_its_checkpoint_wrote(tmp_path):
    db.open_database(f"sqlite:///{tmp_path}/studio.db")
    db.migrate()
    user = User.create(email="a@example.com")
    job = TrainingJob.create(user=user, config={"depth": 1, "dataset": {"kind": "demo", "source": "demo"}})
    ckpt = tmp_path / "step_0000003"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"train": {"depth": 1}, "kind": "chat", "chat_tuned": True}))
    model = create_run_model(job, ckpt, key=None, facts={"done": {"step": 3}}, progress={}, cancelled=False)
    assert model.kind == "chat" and chat.is_chat_tuned(model) and chat.default_mode(model) == "chat"
    (ckpt / "config.json").write_text(json.dumps({"train": {"depth": 1}, "kind": "base"}))
    base = create_run_model(job, ckpt, key=None, facts={"done": {"step": 3}}, progress={}, cancelled=False)
    assert base.kind == "base" and not chat.is_chat_tuned(base) and chat.default_mode(base) == "complete"
