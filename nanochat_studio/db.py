"""The database: one DatabaseProxy every model binds to, opened from a URL, with numbered migrations.

``sqlite:///path/to/file.db`` (the default lives in NCS_HOME) or ``postgresql://user@host:port/db``.
"""

from __future__ import annotations

import peewee as pw
from playhouse.db_url import connect as _connect_url

database = pw.DatabaseProxy()

SQLITE_PRAGMAS = {
    "journal_mode": "wal",  # readers never block the writer (the web process and the trainer supervisor)
    "busy_timeout": 10_000,  # wait for a lock instead of failing at once
    "foreign_keys": 1,
    "synchronous": "normal",  # safe with WAL; a power cut loses at most the last transactions
}


def open_database(url: str) -> pw.Database:
    """Connect ``database`` to ``url`` and return the concrete database."""
    if url.startswith("sqlite"):
        db = _connect_url(url, pragmas=SQLITE_PRAGMAS, check_same_thread=False)
    else:
        db = _connect_url(url, autorollback=True) if url.startswith("postgres") else _connect_url(url)
    database.initialize(db)
    return db
