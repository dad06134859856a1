"""Solo mode's "this machine is the owner" holds only for a browser on this machine talking to the real
``serve`` directly: any proxy header, even one naming loopback, and any sign that the browser's page has
a public name, means someone elsewhere (issue 10, point 1).

waitress deletes X-Forwarded-For and Forwarded before the app sees them unless told not to, which the
Flask test client never does: only these probes, through real waitress, show what the app really gets.
"""

from __future__ import annotations

import http.client
import http.server
import subprocess
import sys
import threading
from urllib.parse import urlsplit

import pytest
import requests

from harness import Studio


@pytest.fixture(scope="module")
def solo(tmp_path_factory, store_url):
    studio = Studio(tmp_path_factory.mktemp("solo") / "home", store_url, mode="solo")
    yield studio
    studio.stop()
    studio.assert_no_tracebacks()


def whoami(studio: Studio, **headers: str) -> int:
    return requests.get(studio.url + "/api/jobs", headers=headers, timeout=30).status_code


def test_the_owner_at_the_machine_needs_no_sign_in(solo):
    assert whoami(solo) == 200
    assert whoami(solo, Origin=solo.url, Referer=solo.url + "/jobs", **{"Sec-Fetch-Site": "same-origin"}) == 200


@pytest.mark.parametrize("headers", [
    {"X-Forwarded-For": "203.0.113.9"},
    {"X-Forwarded-For": "127.0.0.1"},  # a proxy on this machine, forwarding for... whom? not trusted
    {"X-Forwarded-For": "127.0.0.1, 203.0.113.9"},
    {"Forwarded": "for=203.0.113.9;proto=https"},
    {"Forwarded": "for=127.0.0.1"},
    {"X-Real-IP": "192.168.1.20"},
    {"Via": "1.1 nginx"},
    {"X-Forwarded-Host": "studio.example.org"},
    {"X-Forwarded-Proto": "https"},
    {"X-Forwarded-Port": "443"},
    {"X-Forwarded-By": "127.0.0.1"},
    {"True-Client-IP": "203.0.113.9"},
    {"CF-Connecting-IP": "203.0.113.9"},
    {"Origin": "https://studio.example.org"},
    {"Referer": "https://studio.example.org/jobs", "Sec-Fetch-Site": "same-origin"},
], ids=lambda h: "+".join(h))
def test_a_request_with_any_proxy_header_is_asked_to_sign_in(solo, headers):
    assert whoami(solo, **headers) == 401
    page = requests.get(solo.url + "/jobs", headers=headers, allow_redirects=False, timeout=30)
    assert page.status_code == 302 and page.headers["Location"].startswith("/account/login")


class _ReverseProxy(http.server.ThreadingHTTPServer):
    """A reverse proxy on this machine, configured as nginx's docs show: the client's address in
    X-Forwarded-For (``$proxy_add_x_forwarded_for``) and X-Real-IP, the public Host passed on."""

    daemon_threads = True

    def __init__(self, upstream: str, add_headers: bool) -> None:
        self.upstream = urlsplit(upstream)
        self.add_headers = add_headers
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _forward(self) -> None:
        server: _ReverseProxy = self.server  # type: ignore[assignment]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "host")}
        if server.add_headers:
            headers["X-Forwarded-For"] = self.client_address[0]
            headers["X-Real-IP"] = self.client_address[0]
            headers["Host"] = self.headers.get("Host", "")
        else:  # a bare `proxy_pass`: nothing added, Host rewritten to the upstream
            headers["Host"] = server.upstream.netloc
        conn = http.client.HTTPConnection(server.upstream.hostname, server.upstream.port, timeout=30)
        conn.request(self.command, self.path, body=body, headers=headers)
        answer = conn.getresponse()
        data = answer.read()
        self.send_response(answer.status)
        for k, v in answer.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

    do_GET = do_POST = _forward


def test_behind_a_proxy_on_the_same_host_nobody_is_the_owner(solo):
    """The issue's finding: behind nginx on the same host every remote visitor was the owner."""
    proxy = _ReverseProxy(solo.url, add_headers=True)
    try:
        answer = requests.get(proxy.url + "/api/jobs", headers={"Host": "127.0.0.1"}, timeout=30)
        assert answer.status_code == 401
        page = requests.get(proxy.url + "/account/profile", headers={"Host": "127.0.0.1"}, allow_redirects=False,
                            timeout=30)
        assert page.status_code == 302 and "/account/login" in page.headers["Location"]
    finally:
        proxy.shutdown()


def test_a_bare_proxy_is_caught_by_what_the_browser_says_about_its_page(solo):
    """A proxy that adds nothing and rewrites Host cannot be told from the owner at its first request
    (the README says: solo never behind a proxy); the browser's next requests name the public page."""
    proxy = _ReverseProxy(solo.url, add_headers=False)
    try:
        public = "https://studio.example.org"
        nav = {"Referer": public + "/", "Sec-Fetch-Site": "same-origin"}
        assert requests.get(proxy.url + "/api/jobs", headers=nav, timeout=30).status_code == 401
        fetch = {"Origin": public, "Content-Type": "application/json"}
        assert requests.post(proxy.url + "/api/jobs", headers=fetch, json={}, timeout=30).status_code in (401, 403)
    finally:
        proxy.shutdown()


def test_solo_mode_refuses_to_start_with_a_trusted_proxy(tmp_path, store_url):
    env = {"NCS_HOME": str(tmp_path / "home"), "NCS_DATABASE_URL": store_url, "NCS_TRUSTED_PROXY": "127.0.0.1",
           "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "nanochat_studio", "serve", "--port", "0"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "NCS_TRUSTED_PROXY" in done.stderr and "use lab mode" in done.stderr
