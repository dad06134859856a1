"""Shared fixtures: settings in a temporary home, the app and its client, a store per test, PostgreSQL,
and the personas alice, bob (her peer) and charlie (who must see none of alice's things).

The store backend is chosen by ``NCS_TEST_DB``:

* ``sqlite`` (default): a fresh SQLite file per test;
* ``postgres``: a real PostgreSQL server is started once on loopback (as the ``postgres`` user: initdb
  refuses root) and every test gets a fresh database. In this mode *every* store a test opens through
  ``db.open_database`` is redirected, so tests written with a SQLite URL run on PostgreSQL too (the same
  file path maps to the same database within a test). The huey queue stays where its URL says.

Tests that need PostgreSQL whatever the mode ask for the ``postgres`` fixture (a fresh database URL).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nanochat_studio import db

PG_BIN = Path(os.environ.get("NCS_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
TEST_DB = os.environ.get("NCS_TEST_DB", "sqlite").strip().lower()
PASSWORD = "correct horse battery staple"
REMOTE = {"REMOTE_ADDR": "203.0.113.7"}  # another machine: no solo-owner sign-in
PERSONAS = ("alice", "bob", "charlie")

if TEST_DB not in ("sqlite", "postgres"):
    raise pytest.UsageError(f"NCS_TEST_DB must be sqlite or postgres, got {TEST_DB!r}")


def pytest_report_header(config: Any) -> str:
    return f"nanochat-studio store backend: {TEST_DB} (NCS_TEST_DB)"


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Under NCS_TEST_DB=postgres, leave out the trainer's own tests: they never open the store, so a
    second pass would only repeat them (CI runs them on the SQLite pass). Leave out the slow ones too
    (long CPU training runs, ~5 minutes together): what they ask of the store (submit, claim, events,
    publish) the quick tests ask of PostgreSQL as well, and the two passes must fit CI's time.
    NCS_TEST_PG_SLOW=1 keeps them."""
    if TEST_DB != "postgres":
        return
    keep_slow = os.environ.get("NCS_TEST_PG_SLOW") == "1"
    kept = [item for item in items if item.get_closest_marker("trainer") is None
            and (keep_slow or item.get_closest_marker("slow") is None)]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No NCS_* setting of the developer's shell leaks into a test (NCS_TEST_* knobs stay)."""
    for name in list(os.environ):
        if name.startswith("NCS_") and not name.startswith("NCS_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _keep_the_umask() -> Iterator[None]:
    """CLI commands run in-process (CliRunner) set the umask to 077 as `serve` does; give the next test
    the one it started with."""
    before = os.umask(0o022)
    os.umask(before)
    try:
        yield
    finally:
        os.umask(before)


@pytest.fixture(autouse=True)
def _cheap_password_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Passwords are hashed with a cheap pbkdf2 in tests (the suite hashes hundreds, and scrypt costs
    ~0.1 s a hash here); test_auth.py checks that production stores scrypt hashes."""
    from nanochat_studio import accounts

    monkeypatch.setattr(accounts, "PASSWORD_HASH_METHOD", "pbkdf2:sha256:1000")


# ------------------------------------------------------------------------------------------ PostgreSQL

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[dict[str, Any]]:
    """A throwaway PostgreSQL cluster on loopback for the whole session: {"port", "base", "url", "restart"}."""
    if not (PG_BIN / "initdb").exists() or not shutil.which("runuser"):
        if TEST_DB == "postgres":
            pytest.fail(f"NCS_TEST_DB=postgres but no PostgreSQL server binaries in {PG_BIN}")
        pytest.skip(f"PostgreSQL server binaries are not installed ({PG_BIN})")
    # pytest's tmp_path is root-only; NCS_TEST_PG_DIR lets .ci/run find (and stop) only its own clusters.
    base = tempfile.mkdtemp(dir=os.environ.get("NCS_TEST_PG_DIR", "/tmp"), prefix="ncs-pg-")
    shutil.chown(base, "postgres")
    port = _free_port()
    as_pg = ["runuser", "-u", "postgres", "--"]
    data = f"{base}/data"
    subprocess.run([*as_pg, str(PG_BIN / "initdb"), "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8"],
                   check=True, capture_output=True)
    pg_ctl = [*as_pg, str(PG_BIN / "pg_ctl"), "-D", data]
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    subprocess.run([*pg_ctl, "-l", f"{base}/log", "-w", "-o", options, "start"], check=True, capture_output=True)
    server = {
        "port": port,
        "base": base,
        "url": f"postgresql://postgres@127.0.0.1:{port}/postgres",
        # -l and DEVNULL: a restarted server must not inherit a pipe we wait on (it would never close).
        "restart": lambda: subprocess.run([*pg_ctl, "-l", f"{base}/log", "-m", "fast", "-w", "restart"],
                                          check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    }
    try:
        yield server
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


class PostgresDatabases:
    """Hands out empty databases on the session's server. CREATE DATABASE costs ~0.5 s here, so a
    released database is emptied (other sessions ended, schema public dropped and recreated: a few ms)
    and handed out again."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.free: list[str] = []

    def _connect(self, dbname: str = "postgres") -> Any:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=dbname)
        conn.autocommit = True
        return conn

    def url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def acquire(self) -> str:
        if self.free:
            return self.free.pop()
        name = "t_" + uuid.uuid4().hex[:16]
        conn = self._connect()
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        conn.close()
        return name

    def release(self, name: str) -> None:
        try:
            admin = self._connect()
            with admin.cursor() as cur:
                cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            admin.close()
            conn = self._connect(name)
            with conn.cursor() as cur:
                cur.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
            conn.close()
        except Exception:  # the server was restarted or the database is gone: forget it
            return
        self.free.append(name)


@pytest.fixture(scope="session")
def postgres_databases(postgres_server: dict[str, Any]) -> PostgresDatabases:
    return PostgresDatabases(postgres_server["port"])


@pytest.fixture
def postgres(postgres_databases: PostgresDatabases) -> Iterator[str]:
    """The URL of an empty PostgreSQL database of its own for this test."""
    name = postgres_databases.acquire()
    try:
        yield postgres_databases.url(name)
    finally:
        _close_store()
        postgres_databases.release(name)


def _close_store() -> None:
    if db.database.obj is not None and not db.database.is_closed():
        db.database.close()


@pytest.fixture(autouse=True)
def _store_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Under NCS_TEST_DB=postgres, every SQLite store a test opens becomes a fresh PostgreSQL database."""
    if TEST_DB != "postgres" or request.node.get_closest_marker("sqlite_only"):
        yield
        return
    dbs: PostgresDatabases = request.getfixturevalue("postgres_databases")
    by_path: dict[str, str] = {}
    real_open = db.open_database

    def open_database(url: str) -> Any:
        if url.startswith("sqlite"):
            if url not in by_path:
                by_path[url] = dbs.acquire()
            url = dbs.url(by_path[url])
        return real_open(url)

    monkeypatch.setattr(db, "open_database", open_database)
    try:
        yield
    finally:
        _close_store()
        for name in by_path.values():
            dbs.release(name)


# ------------------------------------------------------------------------------------ settings and app

@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The store of this test: a fresh SQLite file, or a fresh PostgreSQL database (NCS_TEST_DB)."""
    if TEST_DB == "postgres":
        return request.getfixturevalue("postgres")
    return f"sqlite:///{tmp_path}/studio.db"


@pytest.fixture
def make_settings(home: Path, db_url: str) -> Callable[..., Any]:
    """``make_settings(mode="lab", port=0, ...)``: settings in the test's home over the test's store."""
    from nanochat_studio.settings import load_settings

    def make(environ: dict[str, str] | None = None, **overrides: Any) -> Any:
        env = {"NCS_HOME": str(home), "NCS_DATABASE_URL": db_url, **(environ or {})}
        return load_settings(environ=env, **overrides)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Any]) -> Any:
    return make_settings()


@pytest.fixture
def make_app(make_settings: Callable[..., Any]) -> Callable[..., Any]:
    """``make_app(mode="lab", **settings_overrides)``: a production-like app (CSRF on) for this test."""
    from nanochat_studio.app import create_app

    def make(**overrides: Any) -> Any:
        app = create_app(make_settings(**overrides))
        app.config.update(TESTING=True)
        return app

    return make


@pytest.fixture
def app(make_app: Callable[..., Any]) -> Any:
    return make_app()


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


# -------------------------------------------------------------------------------------------- personas

def make_user(name: str, *, admin: bool = False) -> Any:
    """An approved local account ``{name}@example.com`` with password ``PASSWORD``."""
    from nanochat_studio import auth

    db.database.connect(reuse_if_open=True)
    return auth.create_user(f"{name}@example.com", password=PASSWORD, name=name.title(), is_admin=admin)


def client_as(app: Any, user: Any) -> Any:
    """A test client of ``app`` signed in as ``user``, from another machine (so solo mode adds nothing).
    The session carries what auth.sign_in stamps (session version, sign-in time)."""
    import time

    from nanochat_studio import auth

    client = app.test_client()
    client.environ_base.update(REMOTE)
    with client.session_transaction() as session:
        session["_user_id"] = str(user.id)
        session["_fresh"] = True
        session[auth.SESSION_VERSION_KEY] = user.session_version
        session[auth.SESSION_STARTED_KEY] = time.time()
    return client


@pytest.fixture
def mailbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A real SMTP server on loopback (STARTTLS, a login): ``mailbox.env`` are the settings that send to
    it, ``mailbox.link(address)`` the link in the mail sent there. Its certificate is trusted through
    SSL_CERT_FILE, as an operator's private CA would be."""
    from mailserver import MailServer

    directory = tmp_path / "smtp"
    directory.mkdir()
    server = MailServer(directory)
    monkeypatch.setenv("SSL_CERT_FILE", str(server.ca_file))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def alice(app: Any) -> Any:
    return make_user("alice")


@pytest.fixture
def bob(app: Any) -> Any:
    return make_user("bob")


@pytest.fixture
def charlie(app: Any) -> Any:
    return make_user("charlie")


# -------------------------------------------------------------------------------------------- browser

# Debian's chromium, never a downloaded one; the network flags keep it from calling home (refused here).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium driven by Playwright, shared by a module's tests."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("no /usr/bin/chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


# ------------------------------------------------------------------------------ tests/security's stores

@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[str]:
    """A store for one module's real `serve` subprocess(es) and the test process alike (tests/security):
    a SQLite file, or a PostgreSQL database of its own (NCS_TEST_DB)."""
    if TEST_DB == "postgres":
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
def fresh_store_url(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A store of this test's own (the same kinds as store_url)."""
    if TEST_DB == "postgres":
        yield request.getfixturevalue("postgres")
        return
    yield f"sqlite:///{tmp_path}/own-store/studio.db"
