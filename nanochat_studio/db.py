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

from .models import ALL_MODELS, database  # noqa: F401 - ``db.database`` is how callers reach the proxy

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


def _m0003_forget_finished_jobs_credentials(db: pw.Database) -> None:
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


MIGRATIONS: list[tuple[int, str, Callable[[pw.Database], None]]] = [
    (1, "initial tables", _m0001_initial),
    (2, "users: email verification and session version; datasets: expanded bytes", _m0002_security_columns),
    (3, "finished jobs forget their S3 credentials", _m0003_forget_finished_jobs_credentials),
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
