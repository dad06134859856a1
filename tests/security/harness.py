"""The security suite's harness (its store fixtures are in tests/conftest.py): the real ``nanochat-studio serve``
(waitress, the CLI's own code path) in a subprocess on loopback, a store the test process shares with
it, and signed-in ``requests`` sessions for the personas alice, bob (her peer), charlie (who must see
none of alice's things) and an admin.

Header-dependent behaviour (proxies, client addresses, body limits) is only true of what waitress
hands the app, so every probe here crosses a real socket into a real server.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests

from nanochat_studio import accounts, db

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "correct horse battery staple"
SERVING = re.compile(r"Serving on (http://\S+?)/?$")
SETUP = re.compile(r"(http://\S+/account/setup\?token=\S+)")


class Studio:
    """``nanochat-studio serve --port 0`` with settings ``env``; its console is kept in ``output``."""

    def __init__(self, home: Path, db_url: str, mode: str = "lab", env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.home, self.db_url, self.mode = home, db_url, mode
        home.parent.mkdir(parents=True, exist_ok=True)
        base = {k: v for k, v in os.environ.items() if not k.startswith("NCS_")}
        self.env = {**base, "NCS_HOME": str(home), "NCS_DATABASE_URL": db_url, "NCS_MODE": mode,
                    "NCS_WORKER": "false", "NCS_LOG_LEVEL": "info", "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": str(REPO), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "nanochat_studio", "serve", "--port", "0", *args],
                                     env=self.env, cwd=str(home.parent), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.url = ""
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(90) or not self.url:
            self.stop()
            raise RuntimeError("serve did not start:\n" + self.output)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            match = SERVING.search(line.strip())
            if match:
                self.url = match.group(1).rstrip("/")
                self._ready.set()
        self._ready.set()  # exited before serving

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def setup_link(self) -> str | None:
        found = SETUP.search(self.output)
        return found.group(1) if found else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def assert_no_tracebacks(self) -> None:
        assert "Traceback" not in self.output and "unhandled error" not in self.output, self.output[-4000:]

    # --- clients -------------------------------------------------------------------------------------

    def session(self, email: str | None = None, password: str = PASSWORD) -> requests.Session:
        """A browser-like session, signed in through the real form when ``email`` is given."""
        s = requests.Session()
        s.headers["User-Agent"] = "ncs-security-suite"
        if email:
            r = self.form(s, "/account/login", {"email": email, "password": password})
            assert r.status_code == 302, (r.status_code, r.text[:500])
        return s

    def form(self, s: requests.Session, path: str, data: dict[str, str], page: str | None = None,
             **kwargs: Any) -> requests.Response:
        """POST a form the way a browser does: the CSRF token read from ``page`` (default ``path``)."""
        html = s.get(self.url + (page or path), timeout=30).text
        token = csrf_token(html)
        return s.post(self.url + path, data={"csrf_token": token, **data}, allow_redirects=False, timeout=60,
                      **kwargs)

    def csrf(self, s: requests.Session, page: str = "/account/profile") -> str:
        return csrf_token(s.get(self.url + page, timeout=30).text)


def csrf_token(html: str) -> str:
    found = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', html) or re.search(
        r'name="csrf-token" content="([^"]+)"', html)
    assert found, html[:2000]
    return found.group(1)


def open_store(url: str) -> None:
    """Point this process's models at the server's store (migrated, as serve leaves it)."""
    if db.database.obj is None or getattr(db.database.obj, "_ncs_url", None) != url:
        database = db.open_database(url)
        database._ncs_url = url  # type: ignore[attr-defined]
    db.database.connect(reuse_if_open=True)
    db.migrate()


def persona(name: str, *, admin: bool = False) -> Any:
    """``{name}@example.com``, approved, email confirmed, password PASSWORD (made as an admin would)."""
    from nanochat_studio.models import User, utcnow

    existing = User.get_or_none(User.email == f"{name}@example.com")
    if existing is not None:
        return existing
    user = accounts.create_user(f"{name}@example.com", password=PASSWORD, name=name.title(), is_admin=admin,
                                first_becomes_admin=False)
    User.update(email_verified_at=utcnow()).where(User.id == user.id).execute()
    return User.get_by_id(user.id)


def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
