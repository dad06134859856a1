"""The first web visitor does not become admin in lab or hosted mode (issue 10, point 10): the first
administrator comes from the CLI, or from the one-time setup link ``serve`` prints while there is none.
"""

from __future__ import annotations

import subprocess
import sys
from urllib.parse import urlsplit

import pytest
import requests

from harness import PASSWORD, Studio, open_store
from nanochat_studio import bootstrap
from nanochat_studio.models import User

NO_MAIL = {"NCS_SMTP_URL": "smtp+insecure://127.0.0.1:9"}  # hosted needs one; these tests send no mail


@pytest.mark.parametrize("mode", ["lab", "hosted"])
def test_the_setup_link_makes_the_first_admin_once(tmp_path, fresh_store_url, mode):
    studio = Studio(tmp_path / "home", fresh_store_url, mode=mode, env=NO_MAIL)
    try:
        open_store(fresh_store_url)
        link = studio.setup_link()
        assert link and not bootstrap.admin_exists()
        path = urlsplit(link).path + "?" + urlsplit(link).query

        # The first visitor signs up: not an administrator (lab: waits for one).
        first = studio.session()
        studio.form(first, "/account/register", {"email": "first@example.com", "password": PASSWORD,
                                                 "confirm": PASSWORD, "name": ""})
        assert not bootstrap.admin_exists()

        # A guessed token shows nothing and makes nobody.
        assert requests.get(studio.url + "/account/setup?token=guess", timeout=30).status_code == 404
        assert requests.get(studio.url + "/account/setup", timeout=30).status_code == 404

        operator = studio.session()
        form = {"email": "root@example.com", "name": "Root", "password": PASSWORD, "confirm": PASSWORD,
                "token": urlsplit(link).query.removeprefix("token=")}
        r = studio.form(operator, "/account/setup", form, page=path)
        assert r.status_code == 302
        root = User.get(User.email == "root@example.com")
        assert root.is_admin and root.is_approved
        assert operator.get(studio.url + "/account/admin/users", timeout=30).status_code == 200

        # Used up: the link no longer works, and nobody else becomes admin through it.
        assert requests.get(studio.url + path, timeout=30).status_code == 404
        again = studio.session()
        r = again.post(studio.url + "/account/setup", allow_redirects=False, timeout=30, data={
            **form, "email": "second@example.com", "csrf_token": studio.csrf(again, "/account/login")})
        assert r.status_code == 404
        assert User.select().where(User.is_admin == True).count() == 1  # noqa: E712
    finally:
        studio.stop()
    studio.assert_no_tracebacks()

    # With an administrator, the next start prints no link.
    restarted = Studio(tmp_path / "home", fresh_store_url, mode=mode, env=NO_MAIL)
    restarted.stop()
    assert restarted.setup_link() is None


def test_an_admin_made_with_the_cli_means_no_setup_link(tmp_path, fresh_store_url):
    env = {"NCS_HOME": str(tmp_path / "home"), "NCS_DATABASE_URL": fresh_store_url, "NCS_MODE": "lab",
           "PATH": "/usr/bin:/bin"}
    made = subprocess.run([sys.executable, "-m", "nanochat_studio", "users", "create", "ops@example.com",
                           "--admin", "--password", PASSWORD], env=env, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    studio = Studio(tmp_path / "home", fresh_store_url, mode="lab")
    studio.stop()
    assert studio.setup_link() is None and "No administrator yet" not in studio.output


def test_solo_mode_has_no_setup(tmp_path, fresh_store_url):
    studio = Studio(tmp_path / "home", fresh_store_url, mode="solo")
    try:
        assert studio.setup_link() is None
        assert requests.get(studio.url + "/account/setup?token=x", timeout=30).status_code == 404
    finally:
        studio.stop()
