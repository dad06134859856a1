"""The store: opened from a URL with the right pragmas, numbered migrations applied once, on SQLite and
on a real PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import threading

import peewee as pw
import pytest

from nanochat_studio import db
from nanochat_studio.models import ALL_MODELS, User


@pytest.fixture(params=["sqlite", "postgres"])
def any_url(request, tmp_path):
    """Each test runs on both backends, whatever NCS_TEST_DB says."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/nested/dir/studio.db"
    return request.getfixturevalue("postgres")


@pytest.mark.sqlite_only
def test_sqlite_opens_in_wal_with_foreign_keys_and_a_busy_timeout(tmp_path):
    database = db.open_database(f"sqlite:///{tmp_path}/a/studio.db")
    assert (tmp_path / "a").is_dir()  # the directory is created
    assert database.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert database.execute_sql("PRAGMA foreign_keys").fetchone()[0] == 1
    assert database.execute_sql("PRAGMA busy_timeout").fetchone()[0] == 10_000
    database.close()


@pytest.mark.sqlite_only
def test_sqlite_enforces_foreign_keys(tmp_path):
    from nanochat_studio.models import ApiKey

    database = db.open_database(f"sqlite:///{tmp_path}/studio.db")
    db.migrate(database)
    with pytest.raises(pw.IntegrityError):
        ApiKey.create(user=12345, prefix="ncs_x", key_hash="h")
    database.close()


def test_an_unknown_url_is_refused():
    with pytest.raises(ValueError, match="unsupported database URL"):
        db.open_database("mysql://localhost/x")


def test_migration_one_creates_every_table_and_a_second_start_applies_nothing(any_url):
    database = db.open_database(any_url)
    assert db.applied_versions(database) == []
    assert db.migrate(database) == [v for v, _, _ in db.MIGRATIONS]
    for model in ALL_MODELS:
        assert database.table_exists(model._meta.table_name), model.__name__
    User.create(email="alice@example.com")
    database.close()

    database = db.open_database(any_url)  # the next start
    assert db.migrate(database) == []
    assert db.applied_versions(database) == [v for v, _, _ in db.MIGRATIONS]
    assert User.select().count() == 1  # nothing was recreated
    database.close()


def test_first_by_returns_what_a_select_returns_on_both_backends(any_url):
    from nanochat_studio.models import Model

    database = db.open_database(any_url)
    db.migrate(database)
    alice, bob = User.create(email="alice@example.com"), User.create(email="bob@example.com")
    mine = Model.create(user=alice, name="m", step=3, checkpoint_key="k", tokenizer_key="t",
                        config={"n_layer": [2, 4]}, metrics={"loss": 1.5})
    for _ in range(2):  # the second call runs the text written by the first
        got = Model.first_by(user=alice, id=mine.id)
        assert got.__data__ == Model.select().where((Model.user == alice) & (Model.id == mine.id)).first().__data__
        assert got.config == {"n_layer": [2, 4]} and got.user_id == alice.id and not got.is_dirty()
        assert Model.first_by(user=bob.id, id=mine.id) is None  # someone else's row
        assert Model.get_owned(str(mine.id), alice.id).id == mine.id and Model.get_owned(mine.id, bob) is None
        assert User.first_by(id=bob.id).__data__ == User.get_by_id(bob.id).__data__
        assert User.first_by(email="carol@example.com") is None
        assert User.first_by(email=None) is None and User.first_by(id=bob.id, oauth_id=None).id == bob.id  # IS NULL
    database.close()


def test_a_new_migration_is_applied_once_in_order(any_url, monkeypatch):
    database = db.open_database(any_url)
    db.migrate(database)
    calls = []

    def add_column(d):
        calls.append(d)
        d.execute_sql('ALTER TABLE "user" ADD COLUMN nickname VARCHAR(40)')

    monkeypatch.setattr(db, "MIGRATIONS", [*db.MIGRATIONS, (99, "nickname", add_column)])
    assert db.migrate(database) == [99]
    assert db.migrate(database) == []
    assert len(calls) == 1
    assert "nickname" in [c.name for c in database.get_columns("user")]
    database.close()


def test_a_failing_migration_leaves_no_trace(any_url, monkeypatch):
    database = db.open_database(any_url)
    db.migrate(database)

    def broken(d):
        d.execute_sql("CREATE TABLE half_done (id INTEGER)")
        raise RuntimeError("boom")

    version = db.MIGRATIONS[-1][0] + 1
    monkeypatch.setattr(db, "MIGRATIONS", [*db.MIGRATIONS, (version, "broken", broken)])
    with pytest.raises(RuntimeError):
        db.migrate(database)
    assert version not in db.applied_versions(database)
    assert not database.table_exists("half_done")  # rolled back with the step (DDL is transactional)
    database.close()


def test_two_processes_starting_at_once_apply_each_migration_once(any_url):
    """Serve and a worker started together race to migrate; the lock makes one of them do it."""
    code = ("import sys; from nanochat_studio import db; d = db.open_database(sys.argv[1]); "
            "print(','.join(map(str, db.migrate(d))))")
    procs = [subprocess.Popen([sys.executable, "-c", code, any_url], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    applied = [int(v) for out in outs for v in out.split(",") if v]
    # each step is its own locked transaction: one process may apply step 1 and another step 2, but
    # every step is applied exactly once
    assert sorted(applied) == [v for v, _, _ in db.MIGRATIONS]


def test_threads_of_one_process_share_the_store(any_url):
    database = db.open_database(any_url)
    db.migrate(database)
    errors = []

    def work(n):
        try:
            with database.connection_context():
                User.create(email=f"user{n}@example.com")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert User.select().count() == 8
    assert db.check(database)
    database.close()


def test_check_reports_an_unreachable_database(tmp_path):
    database = db.open_database("postgresql://nobody@127.0.0.1:1/none")
    assert db.check(database) is False


def test_a_store_from_before_the_security_columns_gains_them_and_keeps_its_rows(any_url, monkeypatch):
    database = db.open_database(any_url)
    monkeypatch.setattr(db, "MIGRATIONS", db.MIGRATIONS[:1])  # a store as the first release made it
    db.migrate(database)
    for table, column in (("user", "email_verified_at"), ("user", "session_version"), ("dataset", "expanded_bytes")):
        database.execute_sql(f'ALTER TABLE "{table}" DROP COLUMN {column}')
    database.execute_sql("INSERT INTO \"user\" (email, name, is_admin, is_approved, is_active, credit_balance, "
                         "created_at) VALUES ('old@example.com', 'Old', 0 = 1, 1 = 1, 1 = 1, 0, '2025-01-01')")
    monkeypatch.undo()
    assert db.migrate(database) == [v for v, _, _ in db.MIGRATIONS][1:]
    old = User.get(User.email == "old@example.com")
    assert old.session_version == 0 and old.email_verified_at is None  # never confirmed: must confirm
    database.close()


def test_finished_jobs_lose_the_credentials_an_older_release_stored(any_url, monkeypatch):
    from nanochat_studio.models import TrainingJob

    database = db.open_database(any_url)
    monkeypatch.setattr(db, "MIGRATIONS", db.MIGRATIONS[:2])
    db.migrate(database)
    user = User.create(email="alice@example.com")
    spec = {"kind": "s3", "source": "s3://bucket/data", "credentials": {"key": "AKIA", "secret": "s3cr3t"}}
    done = TrainingJob.create(user=user, config={"depth": 1, "dataset": spec}, status="completed")
    waiting = TrainingJob.create(user=user, config={"depth": 1, "dataset": spec}, status="queued")
    monkeypatch.undo()
    db.migrate(database)
    assert TrainingJob.get_by_id(done.id).config["dataset"] == {"kind": "s3", "source": "s3://bucket/data"}
    assert TrainingJob.get_by_id(waiting.id).config["dataset"]["credentials"]["secret"] == "s3cr3t"  # still needed
    database.close()
