"""Email addresses are proved by a link mailed to them (issue 10, point 2), against the real ``serve``
and a real SMTP server on loopback (aiosmtpd, STARTTLS, a login read from ``*_FILE`` secrets).

The takeover the issue found: a user typed someone else's address into their profile, and the owner's
first GitHub sign-in landed in that user's account. Now an address counts only once its owner opened a
link sent to it, and providers join accounts only by confirmed addresses (test_oauth.py covers the
provider side in-process).
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from urllib.parse import urlsplit

import pytest
import requests

from harness import PASSWORD, Studio, open_store, persona
from mailserver import LINK, MailServer
from nanochat_studio import accounts, mail
from nanochat_studio.models import AppState, User


@pytest.fixture(scope="module")
def smtp(tmp_path_factory):
    server = MailServer(tmp_path_factory.mktemp("smtp"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hosted(tmp_path_factory, store_url, smtp):
    studio = Studio(tmp_path_factory.mktemp("hosted") / "home", store_url, mode="hosted",
                    env={**smtp.env, "SSL_CERT_FILE": str(smtp.ca_file)})
    yield studio
    studio.stop()
    studio.assert_no_tracebacks()


@pytest.fixture
def store(store_url):
    open_store(store_url)


def sign_up(studio, email, password=PASSWORD):
    s = studio.session()
    r = studio.form(s, "/account/register", {"email": email, "name": "", "password": password, "confirm": password})
    assert r.status_code == 200 and "Check your email" in r.text, r.text[:500]
    return s


def test_a_hosted_sign_up_exists_only_once_its_mailed_link_is_opened(hosted, smtp, store):
    s = sign_up(hosted, "dana@example.com")
    assert not User.select().where(User.email == "dana@example.com").exists()
    message = smtp.wait("dana@example.com")
    assert message["From"] == "studio@example.org"
    assert smtp.sessions[-1] == {"tls": True, "login": True}  # STARTTLS first, then the *_FILE login
    path = urlsplit(smtp.link("dana@example.com")).path
    assert path.startswith("/account/confirm-signup/")

    page = s.get(hosted.url + path, timeout=30)
    assert page.status_code == 200 and "dana@example.com" in page.text
    assert not User.select().where(User.email == "dana@example.com").exists()  # a GET changes nothing

    wrong = hosted.form(s, path, {"password": "not the password at all"})
    assert wrong.status_code == 400 and not User.select().where(User.email == "dana@example.com").exists()
    right = hosted.form(s, path, {"password": PASSWORD})
    assert right.status_code == 302
    dana = User.get(User.email == "dana@example.com")
    assert accounts.email_verified(dana) and not dana.is_admin
    assert s.get(hosted.url + "/api/jobs", timeout=30).status_code == 200  # signed in

    again = requests.get(hosted.url + path, timeout=30)
    assert again.status_code == 404  # used up


def test_someone_elses_link_cannot_be_finished_without_its_password(hosted, smtp, store):
    # Mallory signs up with Erin's address; Erin gets the mail and opens it. Without Mallory's password
    # nothing is made, so Erin cannot be tricked into an account whose password Mallory knows.
    sign_up(hosted, "erin@example.com", password="mallory's own password")
    path = urlsplit(smtp.link("erin@example.com")).path
    erin = hosted.session()
    r = hosted.form(erin, path, {"password": PASSWORD})
    assert r.status_code == 400 and not User.select().where(User.email == "erin@example.com").exists()
    # ...and Mallory's pending sign-up does not block Erin's own.
    sign_up(hosted, "erin@example.com")
    own = urlsplit(smtp.link("erin@example.com", count=2)).path
    assert hosted.form(erin, own, {"password": PASSWORD}).status_code == 302
    assert User.get(User.email == "erin@example.com").email_verified_at is not None


def test_an_expired_sign_up_link_makes_nothing(hosted, smtp, store):
    sign_up(hosted, "fay@example.com")
    path = urlsplit(smtp.link("fay@example.com")).path
    for row in AppState.select().where(AppState.key.startswith("signup:")):
        value = dict(row.value)
        if value["email"] == "fay@example.com":
            value["expires_at"] = (dt.datetime.utcnow() - dt.timedelta(minutes=1)).isoformat()
            AppState.update(value=value).where(AppState.key == row.key).execute()
    s = hosted.session()
    assert s.get(hosted.url + path, timeout=30).status_code == 404
    assert not User.select().where(User.email == "fay@example.com").exists()


def test_typing_someone_elses_address_into_a_profile_claims_nothing(hosted, smtp, store):
    """The issue's takeover, first half: the address does not become the typist's."""
    persona("bob")
    bob = hosted.session("bob@example.com")
    r = hosted.form(bob, "/account/profile", {"email": "victim@example.com", "name": "Bob"})
    assert r.status_code == 302
    assert User.get(User.email == "bob@example.com").email == "bob@example.com"  # unchanged
    assert not User.select().where(User.email == "victim@example.com").exists()
    assert "/account/confirm-email/" in smtp.wait("victim@example.com").get_content()  # the owner is asked
    # The victim can still sign up with their own address: nobody holds it.
    victim = sign_up(hosted, "victim@example.com")
    links = [m for m in smtp.to("victim@example.com") if "confirm-signup" in m.get_content()]
    path = urlsplit(LINK.search(links[-1].get_content()).group(0)).path
    assert hosted.form(victim, path, {"password": PASSWORD}).status_code == 302


def test_a_new_address_counts_once_confirmed_by_that_account(hosted, smtp, store):
    persona("carol")
    persona("charlie")
    carol = hosted.session("carol@example.com")
    assert hosted.form(carol, "/account/profile", {"email": "carol.new@example.com", "name": "Carol"}).status_code == 302
    path = urlsplit(smtp.link("carol.new@example.com")).path
    # Another account cannot confirm it (the link names carol's account)...
    charlie = hosted.session("charlie@example.com")
    page = charlie.get(hosted.url + path, timeout=30)
    assert page.status_code == 400 and "another account" in page.text
    # ...and nobody signed out can (sign in first).
    assert requests.get(hosted.url + path, allow_redirects=False, timeout=30).status_code == 302
    assert User.get(User.name == "Carol").email == "carol@example.com"
    assert hosted.form(carol, path, {}).status_code == 302
    carol_row = User.get(User.name == "Carol")
    assert carol_row.email == "carol.new@example.com" and accounts.email_verified(carol_row)

    # A link for an address asked for before a later change is void.
    hosted.form(carol, "/account/profile", {"email": "carol.a@example.com", "name": "Carol"})
    hosted.form(carol, "/account/profile", {"email": "carol.b@example.com", "name": "Carol"})
    first = urlsplit(smtp.link("carol.a@example.com")).path
    assert hosted.form(carol, urlsplit(smtp.link("carol.b@example.com")).path, {}).status_code == 302
    stale = carol.get(hosted.url + first, timeout=30)
    assert stale.status_code == 400 and "overtaken" in stale.text


def test_hosted_mode_does_not_start_without_a_mail_server(tmp_path, store_url):
    env = {"NCS_HOME": str(tmp_path / "home"), "NCS_DATABASE_URL": store_url, "NCS_MODE": "hosted",
           "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "nanochat_studio", "serve", "--port", "0"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "NCS_SMTP_URL" in done.stderr


def test_lab_mode_without_smtp_logs_the_link(tmp_path, store_url):
    open_store(store_url)
    persona("gina")
    lab = Studio(tmp_path / "home", store_url, mode="lab")
    try:
        gina = lab.session("gina@example.com")
        assert lab.form(gina, "/account/profile", {"email": "gina.new@example.com", "name": "Gina"}).status_code == 302
        profile = gina.get(lab.url + "/account/profile", timeout=30).text
        assert "the confirmation link is in the server&#39;s log" in profile or "server's log" in profile
        assert "/account/confirm-email/" in lab.output and "gina.new@example.com" in lab.output
    finally:
        lab.stop()


def test_smtp_without_starttls_is_refused_before_any_credential_is_sent(tmp_path, monkeypatch):
    """smtp:// means STARTTLS: a server that does not offer it gets neither the login nor the mail."""
    from nanochat_studio.settings import load_settings

    plain = MailServer(tmp_path, require_starttls=False, offer_tls=False)
    try:
        settings = load_settings(environ={"NCS_HOME": str(tmp_path / "home"), **plain.env})
        with pytest.raises(mail.MailError, match="STARTTLS"):
            mail.send(settings, "x@example.com", "hi", "body")
        assert plain.messages == []
    finally:
        plain.stop()
