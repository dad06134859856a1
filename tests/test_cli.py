"""The command line: serve in a real subprocess, migrate, users, keys, settings, and clean errors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from nanochat_studio import db
from nanochat_studio.cli import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(home, db_url):
    return {"NCS_HOME": str(home), "NCS_DATABASE_URL": db_url}


def run(env, *args, ok=True):
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def subprocess_env(env):
    return {**os.environ, **env, "PYTHONPATH": str(REPO)}


@pytest.mark.process
def test_serve_with_port_0_prints_the_real_url_and_answers_healthz(env, home):
    # No subcommand: serve is the default, and takes its options directly.
    proc = subprocess.Popen([sys.executable, "-m", "nanochat_studio", "--port", "0"],
                            env=subprocess_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, seen = None, []
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            match = re.search(r"Serving on (http://127\.0\.0\.1:(\d+)/)", line)
            if match:
                url = match.group(1)
                assert int(match.group(2)) != 0
        assert url, "".join(seen)
        with urllib.request.urlopen(url + "healthz", timeout=10) as response:
            assert response.status == 200
            assert response.read() == b'{"db":"ok","status":"ok"}\n'
        with urllib.request.urlopen(url, timeout=10) as response:
            assert b"nanochat" in response.read()  # the dashboard, as the solo owner on this machine
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "Traceback" not in out


def test_python_dash_m_and_the_console_script_speak_the_same_cli(env):
    out = subprocess.run([sys.executable, "-m", "nanochat_studio", "--help"], env=subprocess_env(env),
                         capture_output=True, text=True, check=True).stdout
    for command in ("serve", "worker", "migrate", "users", "keys", "settings"):
        assert command in out


def test_serve_options_work_without_naming_serve(env, tmp_path, monkeypatch):
    import nanochat_studio.cli as cli

    seen = {}
    monkeypatch.setattr(cli.serve, "callback", lambda **kw: seen.update(kw))
    run(env, "--home", str(tmp_path / "h"), "--port", "0", "--no-worker")
    assert seen["port"] == 0 and seen["worker"] is False
    seen.clear()
    run(env)
    assert seen["port"] is None  # bare command: serve with the defaults
    assert "Usage" in run(env, "--help").output and "serve" not in seen


def test_a_bad_setting_is_a_clean_message_naming_it(env):
    proc = subprocess.run([sys.executable, "-m", "nanochat_studio", "serve"], capture_output=True, text=True,
                          env=subprocess_env({**env, "NCS_PORT": "eighty"}), timeout=60)
    assert proc.returncode != 0
    assert "NCS_PORT: expected an integer 0-65535, got 'eighty'" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_bad_flags_and_files_are_clean_errors_too(env, tmp_path):
    result = run(env, "--config", str(tmp_path / "missing.toml"), "settings", ok=False)
    assert result.exit_code == 1 and "NCS_CONFIG: cannot read" in result.output
    result = run({**env, "NCS_MODE": "party"}, "migrate", ok=False)
    assert result.exit_code == 1 and "NCS_MODE" in result.output


def test_an_unreachable_database_is_a_clean_error(env):
    result = run({**env, "NCS_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}, "migrate", ok=False)
    assert result.exit_code == 1 and result.output.startswith("Error: database:")
    result = run({**env, "NCS_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}, "users", "list", ok=False)
    assert result.exit_code == 1 and "NCS_DATABASE_URL: cannot connect" in result.output


def test_migrate_applies_once(env):
    assert "applied migration(s): 1" in run(env, "migrate").output
    assert "database is up to date" in run(env, "migrate").output


def test_users_create_list_promote(env):
    assert "created user" in run(env, "users", "create", "Alice@Example.com", "--name", "Alice",
                                 "--password", "correct horse battery").output
    run(env, "users", "create", "bob@example.com")
    listing = run(env, "users", "list").output
    assert "alice@example.com\tAlice\tadmin" in listing  # the first account of an install
    assert re.search(r"bob@example.com\t-\t-", listing)
    assert "now an administrator" in run(env, "users", "promote", "bob@example.com").output
    assert re.search(r"bob@example.com\t-\tadmin", run(env, "users", "list").output)
    dup = run(env, "users", "create", "alice@example.com", ok=False)
    assert dup.exit_code == 1 and "already exists" in dup.output and "Traceback" not in dup.output
    assert run(env, "users", "promote", "nobody@example.com", ok=False).exit_code == 1


def test_keys_create_prints_the_key_alone_on_the_last_line(env):
    from nanochat_studio.auth import digest
    from nanochat_studio.models import ApiKey

    out = run(env, "keys", "create").output
    key = out.strip().splitlines()[-1]
    assert re.fullmatch(r"ncs_[A-Za-z0-9_-]{20,}", key)
    database = db.open_database(env["NCS_DATABASE_URL"])
    row = ApiKey.get(ApiKey.key_hash == digest(key))
    assert row.user.email is None  # the solo owner
    database.close()

    run(env, "users", "create", "alice@example.com")
    out = run(env, "keys", "create", "--user", "alice@example.com", "--name", "laptop").output
    alice_key = out.strip().splitlines()[-1]
    assert alice_key.startswith("ncs_") and alice_key != key
    prefix = alice_key[:12]
    assert "revoked" in run(env, "keys", "revoke", prefix).output
    again = run(env, "keys", "revoke", prefix, ok=False)
    assert again.exit_code == 1 and "no active key" in again.output


def test_keys_create_needs_a_user_outside_solo_mode(env):
    result = run({**env, "NCS_MODE": "lab"}, "keys", "create", ok=False)
    assert result.exit_code == 1 and "--user EMAIL is required in lab mode" in result.output


def test_settings_prints_effective_values_with_secrets_masked(env):
    out = run({**env, "NCS_GITHUB_CLIENT_SECRET": "gh-very-secret", "NCS_PORT": "9001"}, "settings").output
    assert "port = 9001" in out and "github_client_secret = '***'" in out
    assert "gh-very-secret" not in out
    table = run(env, "settings", "--markdown").output
    assert table.startswith("| setting | environment | default | meaning |")
