"""Fixtures of the security suite; the harness itself (the real ``serve`` in a subprocess, personas,
browser-like sessions) is harness.py."""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from nanochat_studio import db


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[str]:
    """A store for one module's server(s): a SQLite file, or a PostgreSQL database (NCS_TEST_DB)."""
    if os.environ.get("NCS_TEST_DB", "sqlite").strip().lower() == "postgres":
        dbs = request.getfixturevalue("postgres_databases")
        name = dbs.acquire()
        try:
            yield dbs.url(name)
        finally:
            if db.database.obj is not None and not db.database.is_closed():
                db.database.close()
            dbs.release(name)
        return
    yield f"sqlite:///{tmp_path_factory.mktemp('store')}/studio.db"




@pytest.fixture
def fresh_store_url(tmp_path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A store of this test's own (the same kinds as store_url)."""
    if os.environ.get("NCS_TEST_DB", "sqlite").strip().lower() == "postgres":
        yield request.getfixturevalue("postgres")
        return
    yield f"sqlite:///{tmp_path}/own-store/studio.db"
