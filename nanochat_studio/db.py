"""The database: the DatabaseProxy every model binds to (``database``, declared beside the tables in
models.py so that module needs nothing from this one), opened from a URL, with numbered migrations.

``sqlite:///path/to/file.db`` (the default lives in NCS_HOME) or ``postgresql://user@host:port/db``.
``migrate()`` applies the numbered steps in ``MIGRATIONS`` that the ``schema_migrations`` table does not
list yet, each in its own transaction, under a lock so two processes starting at once apply each step
once. A new step is a function appended to ``MIGRATIONS``; never edit one that has shipped.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import peewee as pw
from playhouse.db_url import connect as _connect_url

from .models import ALL_MODELS, BILLING_MODELS, TrainingJob, database  # noqa: F401 - ``db.database`` is how callers reach the proxy

log = logging.getLogger(__name__)

SQLITE_PRAGMAS = {
    "journal_mode": "wal",  # readers never block the writer (the web process and the trainer supervisor)
    "busy_timeout": 10_000,  # wait for a lock instead of failing at once
    "foreign_keys": 1,
    "synchronous": "normal",  # safe with WAL; a power cut loses at most the last transactions
}
MIGRATIONS_TABLE = "schema_migrations"
_PG_LOCK_ID = 0x6E63_7331  # "ncs1": an advisory lock id for migrations


def open_database(url: str) -> pw.Database:
    """Connect ``database`` to ``url`` and return the concrete database (no connection opened yet)."""
    if url.startswith("sqlite"):
        path = urlsplit(url).path
        if path.startswith("/") and path not in ("/", "/:memory:"):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = _connect_url(url, pragmas=SQLITE_PRAGMAS, check_same_thread=False)
    elif url.startswith("postgres"):
        db = _connect_url(url)
    else:
        raise ValueError(f"unsupported database URL {url!r}: use sqlite:/// or postgresql://")
    database.initialize(db)
    return db


def is_postgres(db: pw.Database | None = None) -> bool:
    target = db if db is not None else database.obj
    return isinstance(target, pw.PostgresqlDatabase)


# ------------------------------------------------------------------------------------------ migrations

def _m0001_initial(db: pw.Database) -> None:
    """Every table of models.py as first shipped."""
    db.create_tables(ALL_MODELS, safe=True)


def _add_missing_columns(db: pw.Database, table: str, columns: dict[str, pw.Field]) -> None:
    """Add the columns ``table`` lacks. A store created after the column joined models.py has it already
    (the first migration creates the tables as models.py declares them now)."""
    from playhouse.migrate import SchemaMigrator, migrate as run

    have = {c.name for c in db.get_columns(table)}
    migrator = SchemaMigrator.from_database(db)
    run(*[migrator.add_column(table, name, field) for name, field in columns.items() if name not in have])


def _m0002_security_columns(db: pw.Database) -> None:
    """users: email_verified_at (confirmation links) and session_version (revocable sessions);
    datasets: expanded_bytes (gzip counted as it expands)."""
    _add_missing_columns(db, "user", {"email_verified_at": pw.DateTimeField(null=True),
                                      "session_version": pw.IntegerField(default=0)})
    _add_missing_columns(db, "dataset", {"expanded_bytes": pw.BigIntegerField(default=0)})


def _m0005_forget_finished_jobs_credentials(db: pw.Database) -> None:
    """Finished jobs no longer need the S3 credentials they were submitted with: drop them."""
    import json

    final = ("completed", "failed", "cancelled")
    rows = db.execute_sql(
        'SELECT id, config FROM "training_job" WHERE status IN (%s)' % ",".join([db.param] * len(final)), final)
    for job_id, raw in list(rows):
        config = json.loads(raw) if raw else {}
        spec = config.get("dataset")
        if isinstance(spec, dict) and ("credentials" in spec or "sealed_credentials" in spec):
            spec.pop("credentials", None)
            spec.pop("sealed_credentials", None)
            db.execute_sql(f'UPDATE "training_job" SET config = {db.param} WHERE id = {db.param}',
                           (json.dumps(config, separators=(",", ":")), job_id))


def _m0006_model_kind(db: pw.Database) -> None:
    """models: ``kind`` ("base" | "chat"). Rows made before it are chat models when their config says
    they were chat-tuned (what chat.is_chat_tuned read before the column existed)."""
    import json

    _add_missing_columns(db, "model", {"kind": pw.CharField(max_length=8, default="base")})
    for model_id, raw_config, raw_metrics in list(db.execute_sql('SELECT id, config, metrics FROM "model"')):
        config = json.loads(raw_config) if raw_config else {}
        metrics = json.loads(raw_metrics) if raw_metrics else {}
        tuned = (config.get("kind") == "chat" or config.get("chat_tuned") or config.get("sft")
                 or metrics.get("chat_tuned"))
        if tuned:
            db.execute_sql(f'UPDATE "model" SET kind = {db.param} WHERE id = {db.param}', ("chat", model_id))


# The ledger is append-only below the ORM too: these triggers refuse UPDATE and DELETE of ledger rows (and
# TRUNCATE on PostgreSQL), and any change of an account's identity. Only an account's cached balance may
# change (billing/ledger.py does it in the transaction that inserts the postings). `billing audit`
# checks that every trigger named here still exists.
APPEND_ONLY_TABLES = ("ledger_transaction", "ledger_posting")
LEDGER_TRIGGERS = (
    *(f"{t}_no_{op}" for t in APPEND_ONLY_TABLES for op in ("update", "delete")),
    "ledger_account_no_delete", "ledger_account_no_rename",
)


def _ledger_triggers_sqlite() -> list[str]:
    out = []
    for table in APPEND_ONLY_TABLES:
        for op in ("update", "delete"):
            out.append(f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op} BEFORE {op.upper()} ON {table} "
                       f"BEGIN SELECT RAISE(ABORT, 'the ledger is append-only: {op} of {table} refused'); END")
    out.append("CREATE TRIGGER IF NOT EXISTS ledger_account_no_delete BEFORE DELETE ON ledger_account "
               "BEGIN SELECT RAISE(ABORT, 'ledger accounts are never deleted'); END")
    out.append("CREATE TRIGGER IF NOT EXISTS ledger_account_no_rename BEFORE UPDATE OF name, user_id, kind "
               "ON ledger_account BEGIN SELECT RAISE(ABORT, 'a ledger account keeps its name, user and kind'); END")
    return out


def _ledger_triggers_postgres() -> list[str]:
    out = ["CREATE OR REPLACE FUNCTION ncs_ledger_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
           # %% : the driver formats the statement, and plpgsql's placeholder is a single %
           "RAISE EXCEPTION 'the ledger is append-only: %% of %% refused', TG_OP, TG_TABLE_NAME "
           "USING ERRCODE = 'restrict_violation'; END $$"]
    for table in APPEND_ONLY_TABLES:
        for op in ("update", "delete"):
            name = f"{table}_no_{op}"
            out.append(f"DROP TRIGGER IF EXISTS {name} ON {table}")
            out.append(f"CREATE TRIGGER {name} BEFORE {op.upper()} ON {table} "
                       "FOR EACH ROW EXECUTE FUNCTION ncs_ledger_refuse()")
        out.append(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
        out.append(f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                   "FOR EACH STATEMENT EXECUTE FUNCTION ncs_ledger_refuse()")
    out += ["DROP TRIGGER IF EXISTS ledger_account_no_delete ON ledger_account",
            "CREATE TRIGGER ledger_account_no_delete BEFORE DELETE ON ledger_account "
            "FOR EACH ROW EXECUTE FUNCTION ncs_ledger_refuse()",
            "DROP TRIGGER IF EXISTS ledger_account_no_rename ON ledger_account",
            "CREATE TRIGGER ledger_account_no_rename BEFORE UPDATE OF name, user_id, kind ON ledger_account "
            "FOR EACH ROW EXECUTE FUNCTION ncs_ledger_refuse()"]
    return out


def _m0003_billing_ledger(db: pw.Database) -> None:
    """The double-entry ledger, job billing terms, lab allowances and handled Stripe events, with the
    append-only triggers. Replaces ledger_entry, a single-entry table nothing ever wrote."""
    db.execute_sql("DROP TABLE IF EXISTS ledger_entry")
    db.create_tables(BILLING_MODELS, safe=True)
    for sql in (_ledger_triggers_postgres() if is_postgres(db) else _ledger_triggers_sqlite()):
        db.execute_sql(sql)


def ledger_triggers_present(db: pw.Database | None = None) -> set[str]:
    """The names of LEDGER_TRIGGERS that exist in the store (the audit wants all of them)."""
    db = db or database.obj
    if is_postgres(db):
        rows = db.execute_sql("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal").fetchall()
    else:
        rows = db.execute_sql("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall()
    return {r[0] for r in rows} & set(LEDGER_TRIGGERS)


def _m0004_worker_registry_and_gpu_quarantine(db: pw.Database) -> None:
    """The worker registry and quarantined GPUs (issue 13). Declared here as they first shipped, so a
    later change to models.py cannot change what this step creates."""

    class WorkerProcess(pw.Model):
        id = pw.CharField(max_length=160, primary_key=True)
        host = pw.CharField(max_length=255)
        pid = pw.IntegerField()
        role = pw.CharField(max_length=16)
        devices = pw.TextField(default="[]")
        gpu_count = pw.IntegerField(default=0)
        metrics_port = pw.IntegerField(null=True)
        version = pw.CharField(max_length=32, default="")
        beat_seconds = pw.FloatField(default=12.0)
        started_at = pw.DateTimeField()
        last_seen_at = pw.DateTimeField(index=True)

        class Meta:
            table_name = "worker_process"

    class GpuQuarantine(pw.Model):
        host = pw.CharField(max_length=255)
        gpu = pw.CharField(max_length=16)
        uuid = pw.CharField(max_length=96, null=True, index=True)
        device_name = pw.CharField(max_length=255, default="")
        fault = pw.CharField(max_length=32)
        reason = pw.TextField(default="")
        job = pw.ForeignKeyField(TrainingJob, null=True, on_delete="SET NULL")
        created_at = pw.DateTimeField()
        probe_at = pw.DateTimeField(null=True)
        probes = pw.IntegerField(default=0)
        last_probe = pw.TextField(default="")

        class Meta:
            table_name = "gpu_quarantine"
            indexes = ((("host", "gpu"), True),)

    with db.bind_ctx([WorkerProcess, GpuQuarantine], bind_refs=False, bind_backrefs=False):
        db.create_tables([WorkerProcess, GpuQuarantine], safe=True)


MIGRATIONS: list[tuple[int, str, Callable[[pw.Database], None]]] = [
    (1, "initial tables", _m0001_initial),
    (2, "users: email verification and session version; datasets: expanded bytes", _m0002_security_columns),
    (3, "billing: double-entry ledger, append-only", _m0003_billing_ledger),
    (4, "worker registry and GPU quarantine", _m0004_worker_registry_and_gpu_quarantine),
    (5, "finished jobs forget their S3 credentials", _m0005_forget_finished_jobs_credentials),
    (6, "models: kind (base or chat)", _m0006_model_kind),
]


class _Migration(pw.Model):
    version = pw.IntegerField(primary_key=True)
    name = pw.CharField(max_length=200)
    applied_at = pw.DateTimeField()

    class Meta:
        table_name = MIGRATIONS_TABLE


def applied_versions(db: pw.Database | None = None) -> list[int]:
    db = db or database.obj
    with _Migration.bind_ctx(db):
        if not db.table_exists(MIGRATIONS_TABLE):
            return []
        return [row.version for row in _Migration.select().order_by(_Migration.version)]


def migrate(db: pw.Database | None = None) -> list[int]:
    """Apply the pending migrations; return the versions applied (empty when up to date)."""
    db = db or database.obj
    if db is None:
        raise RuntimeError("open_database() first")
    applied: list[int] = []
    with _Migration.bind_ctx(db):
        with _locked_transaction(db):  # concurrent CREATE TABLE IF NOT EXISTS can collide on PostgreSQL
            db.create_tables([_Migration], safe=True)
        for version, name, step in MIGRATIONS:
            with _locked_transaction(db):
                if _Migration.get_or_none(_Migration.version == version) is not None:
                    continue  # done before, or by another process while we waited for the lock
                log.info("applying migration %d: %s", version, name)
                step(db)
                _Migration.create(version=version, name=name,
                                  applied_at=dt.datetime.now(dt.timezone.utc).replace(tzinfo=None))
                applied.append(version)
    return applied


def _locked_transaction(db: pw.Database):
    """A transaction that only one process at a time holds: SQLite's BEGIN IMMEDIATE takes the write
    lock up front; PostgreSQL takes an advisory lock released at commit."""
    if isinstance(db, pw.SqliteDatabase):
        return db.atomic("IMMEDIATE")
    txn = db.atomic()

    class _Ctx:
        def __enter__(self):
            txn.__enter__()
            if isinstance(db, pw.PostgresqlDatabase):
                db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_PG_LOCK_ID,))
            return txn

        def __exit__(self, *exc):
            return txn.__exit__(*exc)

    return _Ctx()


def check(db: pw.Database | None = None) -> bool:
    """True when a trivial query answers (the health check)."""
    db = db or database.obj
    try:
        db.execute_sql("SELECT 1").fetchone()
        return True
    except pw.PeeweeException:
        return False
    except Exception:  # driver errors that peewee does not wrap (e.g. a refused socket)
        return False
