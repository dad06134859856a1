"""Sign-in throttling, API rate limits and bounded password hashing (issue 10, point 4), through the real
``serve``. The issue measured 64 guesses in 5.5 s, and 16 parallel guesses growing the process by
500 MiB of scrypt state.

The lab server here sits behind a "proxy" it trusts (``trusted_proxy = 127.0.0.1``), so each request
can claim its client address in X-Forwarded-For, as the proxy would set it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time

import pytest
import requests

from harness import PASSWORD, Studio, csrf_token, open_store, persona, wait_for
from nanochat_studio import accounts, auth

LIMITS = {"NCS_LOGIN_LIMIT_PER_ACCOUNT": "3 per minute", "NCS_LOGIN_LIMIT_PER_ADDRESS": "8 per minute",
          "NCS_API_RATE_LIMIT": "5 per minute", "NCS_API_KEY_RATE_LIMIT": "3 per minute",
          "NCS_TRUSTED_PROXY": "127.0.0.1"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory, store_url):
    studio = Studio(tmp_path_factory.mktemp("throttle") / "home", store_url, mode="lab", env=LIMITS)
    yield studio
    studio.stop()
    studio.assert_no_tracebacks()


@pytest.fixture
def store(store_url):
    open_store(store_url)


def attempt(studio: Studio, email: str, password: str, address: str) -> requests.Response:
    s = requests.Session()
    headers = {"X-Forwarded-For": address}
    token = csrf_token(s.get(studio.url + "/account/login", headers=headers, timeout=30).text)
    return s.post(studio.url + "/account/login", headers=headers, allow_redirects=False, timeout=60,
                  data={"csrf_token": token, "email": email, "password": password})


def retry_after(response: requests.Response) -> int:
    value = int(response.headers["Retry-After"])
    assert 0 < value <= 60
    return value


def test_failed_sign_ins_to_one_account_are_throttled_wherever_they_come_from(lab, store):
    persona("alice")
    for i in range(3):
        assert attempt(lab, "alice@example.com", f"guess number {i}", f"198.51.100.{i + 1}").status_code == 400
    refused = attempt(lab, "alice@example.com", PASSWORD, "198.51.100.9")  # even the right password, now
    assert refused.status_code == 429
    retry_after(refused)
    assert "Too many failed sign-ins" in refused.text
    persona("bob")
    assert attempt(lab, "bob@example.com", PASSWORD, "198.51.100.9").status_code == 302  # others are not


def test_one_address_is_throttled_across_accounts(lab, store):
    for i in range(8):
        assert attempt(lab, f"nobody{i}@example.com", "whatever it is", "203.0.113.50").status_code == 400
    refused = attempt(lab, "nobody9@example.com", "whatever it is", "203.0.113.50")
    assert refused.status_code == 429 and "from your address" in refused.text
    retry_after(refused)
    persona("carol")
    assert attempt(lab, "carol@example.com", PASSWORD, "203.0.113.51").status_code == 302  # another address


def test_a_successful_sign_in_does_not_use_up_the_accounts_attempts(lab, store):
    persona("dora")
    for i in range(5):
        assert attempt(lab, "dora@example.com", PASSWORD, f"192.0.2.{i + 1}").status_code == 302


def test_the_api_is_rate_limited_per_key_and_per_user(lab, store):
    erin = persona("erin")
    _, first = auth.create_api_key(erin, "one")
    _, second = auth.create_api_key(erin, "two")
    one, two = {"Authorization": f"Bearer {first}"}, {"Authorization": f"Bearer {second}"}
    for _ in range(3):
        assert requests.get(lab.url + "/api/jobs", headers=one, timeout=30).status_code == 200
    refused = requests.get(lab.url + "/api/jobs", headers=one, timeout=30)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
    retry_after(refused)
    # The other key has its own 3, but the user's 5 are shared: 2 more, then 429 in OpenAI's shape.
    assert requests.get(lab.url + "/v1/models", headers=two, timeout=30).status_code == 200
    assert requests.get(lab.url + "/v1/models", headers=two, timeout=30).status_code == 200
    refused = requests.get(lab.url + "/v1/models", headers=two, timeout=30)
    assert refused.status_code == 429
    retry_after(refused)
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limited" and "message" in error
    # A browser session of the same user shares the user's limit.
    browser = lab.session("erin@example.com")
    assert browser.get(lab.url + "/api/jobs", timeout=30).status_code == 429
    assert browser.get(lab.url + "/jobs", timeout=30).status_code == 200  # pages are not the API


# --- several web processes share their counts through Redis ----------------------------------------------

@pytest.fixture
def redis_url(tmp_path):
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL, cwd=tmp_path)

    def answers() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    try:
        wait_for(answers, timeout=10)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(10)


def test_two_web_processes_on_redis_share_the_counts(tmp_path, store_url, redis_url):
    open_store(store_url)
    persona("gina")
    env = {**LIMITS, "NCS_QUEUE_URL": redis_url}
    a = Studio(tmp_path / "a" / "home", store_url, mode="lab", env=env)
    b = Studio(tmp_path / "b" / "home", store_url, mode="lab", env=env)
    try:
        assert attempt(a, "gina@example.com", "wrong one", "198.51.100.77").status_code == 400
        assert attempt(b, "gina@example.com", "wrong two", "198.51.100.78").status_code == 400
        assert attempt(a, "gina@example.com", "wrong three", "198.51.100.79").status_code == 400
        assert attempt(b, "gina@example.com", PASSWORD, "198.51.100.80").status_code == 429
    finally:
        a.stop()
        b.stop()


# --- password hashing is bounded ------------------------------------------------------------------------

def test_parallel_sign_ins_hash_at_most_password_hash_concurrency_at_once(make_settings, monkeypatch):
    """16 parallel guesses through real waitress (serve's own options): never more than 2 hashes run at
    once, and a guess that cannot get a slot soon enough is told to retry (429), not queued forever."""
    from waitress import create_server

    from nanochat_studio.app import create_app
    from nanochat_studio.cli import waitress_options

    settings = make_settings(mode="lab", port=0, password_hash_concurrency=2,
                             login_limit_per_address="100 per minute")
    app = create_app(settings)
    app.config.update(WTF_CSRF_ENABLED=False)
    running, peak, lock = [0], [0], threading.Lock()
    real_check = accounts.check_password_hash

    def slow_check(stored, password):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.3)  # scrypt's time, without its memory
            return real_check(stored, password)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(accounts, "check_password_hash", slow_check)
    monkeypatch.setattr(accounts, "HASH_WAIT_S", 1.0)
    server = create_server(app, **waitress_options(settings))

    def run() -> None:
        try:
            server.run()
        except (OSError, ValueError):  # close() below pulls the sockets from under select()
            pass

    threading.Thread(target=run, daemon=True).start()
    url = f"http://127.0.0.1:{server.effective_port}"
    try:
        persona("hana")
        answers: list[requests.Response] = []

        def guess(i: int) -> None:
            answers.append(requests.post(url + "/account/login", timeout=60, allow_redirects=False,
                                         data={"email": f"hana{i % 4}@example.com", "password": f"guess {i}"}))

        threads = [threading.Thread(target=guess, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        statuses = sorted(r.status_code for r in answers)
        assert len(statuses) == 16
        assert peak[0] <= 2, peak[0]
        assert set(statuses) <= {400, 429} and 429 in statuses and 400 in statuses
        assert all(r.headers.get("Retry-After") for r in answers if r.status_code == 429)
    finally:
        server.close()


def test_rate_limits_in_memory_start_no_thread_per_hit_and_still_forget_old_hits(make_settings, monkeypatch):
    """The limits library's memory storage started a timer thread after most hits; ours drops expired
    entries in the hitting thread instead, and the limits themselves are unchanged."""
    from limits import parse_many

    from nanochat_studio import limits
    from nanochat_studio.errors import TooManyRequests

    monkeypatch.setattr(limits._MemoryStorage, "EXPIRE_EVERY", 0.05)
    gate = limits.Limits(make_settings())  # the default queue is SQLite: the counts live in memory
    started = []
    real_start = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda self: (started.append(self), real_start(self))[1])
    for _ in range(10):
        gate.hit(gate.api_user, "api-user", "1", message="")
        time.sleep(0.012)  # past the library's 10 ms timer each time
    assert started == []

    two = parse_many("2 per second")
    gate.hit(two, "probe", message="")
    gate.hit(two, "probe", message="")
    with pytest.raises(TooManyRequests):
        gate.hit(two, "probe", message="")
    time.sleep(1.1)
    gate.hit(two, "probe", message="")  # the window moved on
    events = gate.strategy.storage.events
    assert len(events["LIMITER/probe/2/1/second"]) == 1  # the two old hits were dropped
