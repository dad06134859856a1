"""The URL guard and fetcher against real servers on loopback.

A TLS server on 127.0.0.1 with a certificate for ``public.test`` (signed by a CA made here) stands in
for a public host through fetch's test seam (``NetPolicy``): the seam resolves test names and treats
exactly 127.0.0.1 as public. Every other address is judged by the real rules, so a redirect to a
private address is refused, and the success path proves we connect to the vetted address with the
original name for SNI, Host and certificate checks (``public.test`` exists in no DNS).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import http.server
import ipaddress
import ssl
import threading
import time

import pytest

from nanochat_studio import fetch
from nanochat_studio.fetch import FetchFailed, NetPolicy, SourceTooLarge, URLRefused, check_url, download
from nanochat_studio.settings import load_settings

BODY = bytes(range(256)) * 400  # 100 KiB


def settings(**kw):
    """Real settings with these tests' fetch limits. The secret key is given, so nothing is written."""
    base = load_settings(environ={"NCS_HOME": "/nonexistent/ncs-fetch-tests", "NCS_SECRET_KEY": "k" * 32})
    return dataclasses.replace(base, **{"url_max_bytes": 1 << 20, "url_timeout_s": 5.0, "allow_private_urls": False,
                                        **kw})


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = tmp_path_factory.mktemp("tls")
    now = dt.datetime.now(dt.timezone.utc)

    def cert(subject, issuer, key, signer, san=None, ca=False):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in san]), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("test CA", "test CA", ca_key, ca_key, ca=True)
    leaf = cert("public.test", "test CA", leaf_key, ca_key, san=["public.test", "internal.test"])
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (d / "leaf.key").write_bytes(leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    return d


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hits: list[tuple[str, str]] = []

    def log_message(self, *a):
        pass

    def redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):  # noqa: N802
        self.server.hits.append((self.path, self.headers.get("Host")))
        port = self.server.server_address[1]
        p = self.path
        if p == "/data":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(BODY)
        elif p == "/to-data":
            self.redirect("/data")
        elif p == "/to-private":
            self.redirect(f"https://internal.test:{port}/data")
        elif p == "/to-metadata":
            self.redirect("https://169.254.169.254/latest/meta-data/iam/")
        elif p == "/to-http":
            self.redirect(f"http://public.test:{port}/data")
        elif p.startswith("/chain/"):
            n = int(p.rsplit("/", 1)[1])
            self.redirect(f"/chain/{n - 1}" if n > 0 else "/data")
        elif p == "/big-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(10 << 20))
            self.end_headers()
            self.wfile.write(b"x" * 1000)
        elif p == "/big-undeclared":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for _ in range(40):
                    self.wfile.write(b"y" * 65536)
            except OSError:
                pass
            self.close_connection = True
        elif p == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(100):  # 1 byte per 0.1 s: each read is quick, the whole is slow
                    self.wfile.write(b"z")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


def serve(tls_dir=None):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.hits = []
    if tls_dir is not None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(tls_dir / "leaf.pem", tls_dir / "leaf.key")
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def https_server(tls_files):
    server = serve(tls_files)
    yield server
    server.shutdown()


@pytest.fixture
def plain_server():
    server = serve()
    yield server
    server.shutdown()


def seam(tls_files, names=None, calls=None):
    """The test seam: test names resolve here; 127.0.0.1 (and only it) counts as public."""
    names = {"public.test": ["127.0.0.1"], "other.test": ["127.0.0.1"], "internal.test": ["10.20.30.40"],
             **(names or {})}

    def resolve(host, port):
        if calls is not None:
            calls.append(host)
        if host not in names:
            raise OSError("unknown test name")
        return names[host]

    return NetPolicy(resolve=resolve, is_public=lambda ip: ip == ipaddress.ip_address("127.0.0.1")
                     or fetch.is_public_address(ip), ca_bundle=str(tls_files / "ca.pem"))


# -- the guard, without any network ---------------------------------------------------------------------
@pytest.mark.parametrize("url", [
    "https://127.0.0.1/x", "https://127.9.9.9/", "https://localhost/", "https://2130706433/",
    "https://10.0.0.1/", "https://172.16.5.4/", "https://192.168.1.10/", "https://100.64.0.1/",
    "https://169.254.169.254/latest/meta-data/", "https://0.0.0.0/", "https://224.0.0.1/",
    "https://255.255.255.255/", "https://192.0.2.1/",
    "https://[::1]/", "https://[::]/", "https://[fe80::1]/", "https://[fc00::1]/", "https://[fd12:3456::1]/",
    "https://[ff02::1]/", "https://[::ffff:127.0.0.1]/", "https://[::ffff:10.0.0.1]/",
    "https://[::ffff:169.254.169.254]/", "https://[2002:a00:1::]/", "https://[64:ff9b::a9fe:a9fe]/",
])
def test_the_guard_refuses_non_public_addresses(url):
    with pytest.raises(URLRefused):
        check_url(url, settings())


@pytest.mark.parametrize("url", ["http://example.com/data.txt", "ftp://example.com/x", "file:///etc/passwd",
                                 "gopher://example.com/", "javascript:alert(1)", "https://user:pw@example.com/",
                                 "https:///nohost", "https://exa mple.com/", "https://example.com:99999/",
                                 "https://example.com:0/"])
def test_the_guard_refuses_other_schemes_credentials_and_junk(url):
    with pytest.raises(URLRefused):
        check_url(url, settings(), policy=NetPolicy(resolve=lambda h, p: ["93.184.215.14"]))


def test_a_name_resolving_to_a_private_address_is_refused():
    policy = NetPolicy(resolve=lambda h, p: ["192.168.0.5"])
    with pytest.raises(URLRefused, match="resolves to 192.168.0.5, a private network address"):
        check_url("https://intranet.example.com/data.txt", settings(), policy=policy)
    both = NetPolicy(resolve=lambda h, p: ["93.184.215.14", "10.0.0.8"])  # one bad answer is enough
    with pytest.raises(URLRefused, match="10.0.0.8"):
        check_url("https://mixed.example.com/", settings(), policy=both)


def test_a_public_name_passes_and_keeps_its_vetted_addresses():
    t = check_url("https://data.example.com:8443/a/b.txt?x=1#frag", settings(),
                  policy=NetPolicy(resolve=lambda h, p: ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]))
    assert (t.host, t.port, t.path, t.host_header) == ("data.example.com", 8443, "/a/b.txt?x=1", "data.example.com:8443")
    assert t.addresses == ("93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c")


def test_lab_networks_may_use_private_addresses_and_http_but_never_loopback_or_metadata():
    lab = settings(allow_private_urls=True)
    assert check_url("https://10.0.0.1/x", lab).addresses == ("10.0.0.1",)
    assert check_url("http://192.168.1.2:8000/x", lab).scheme == "http"
    for url in ("http://127.0.0.1/", "https://169.254.169.254/", "https://[::1]/", "https://[fe80::1]/"):
        with pytest.raises(URLRefused, match="never fetched"):
            check_url(url, lab)


# -- against servers on loopback ------------------------------------------------------------------------
def test_http_to_a_loopback_server_is_refused_before_connecting(plain_server, tmp_path):
    port = plain_server.server_address[1]
    for url in (f"http://127.0.0.1:{port}/data", f"http://localhost:{port}/data"):
        with pytest.raises(URLRefused):
            download(url, tmp_path / "d", settings())
    assert plain_server.hits == []  # nothing reached it


def test_https_to_loopback_is_refused_before_connecting(https_server, tmp_path):
    port = https_server.server_address[1]
    before = len(https_server.hits)
    for url in (f"https://127.0.0.1:{port}/data", f"https://[::ffff:127.0.0.1]:{port}/data"):
        with pytest.raises(URLRefused):
            download(url, tmp_path / "d", settings())
    assert len(https_server.hits) == before
    assert not (tmp_path / "d").exists()


def test_a_download_connects_to_the_vetted_address_with_the_original_name(https_server, tls_files, tmp_path):
    port = https_server.server_address[1]
    calls = []
    got = download(f"https://public.test:{port}/to-data", tmp_path / "out" / "data.txt", settings(),
                   policy=seam(tls_files, calls=calls))
    assert (tmp_path / "out" / "data.txt").read_bytes() == BODY
    assert got.size == len(BODY) and got.sha256 == hashlib.sha256(BODY).hexdigest()
    assert got.final_url == f"https://public.test:{port}/data" and got.content_type == "text/plain"
    assert calls == ["public.test", "public.test"]  # one lookup per hop, none behind our back
    assert https_server.hits[-1] == ("/data", f"public.test:{port}")


def test_the_certificate_is_checked_against_the_original_name(https_server, tls_files, tmp_path):
    port = https_server.server_address[1]
    with pytest.raises(FetchFailed, match="TLS"):
        download(f"https://other.test:{port}/data", tmp_path / "d", settings(), policy=seam(tls_files))
    with pytest.raises(FetchFailed, match="TLS"):  # the default (certifi) bundle does not know the test CA
        download(f"https://public.test:{port}/data", tmp_path / "d", settings(),
                 policy=NetPolicy(resolve=seam(tls_files).resolve, is_public=seam(tls_files).is_public))


@pytest.mark.parametrize("path,match", [("/to-private", "10.20.30.40, a private network address"),
                                        ("/to-metadata", "169.254.169.254"),
                                        ("/to-http", "only https")])
def test_a_redirect_hop_to_a_private_address_is_refused(https_server, tls_files, tmp_path, path, match):
    port = https_server.server_address[1]
    with pytest.raises(URLRefused, match=match):
        download(f"https://public.test:{port}{path}", tmp_path / "d", settings(), policy=seam(tls_files))
    assert https_server.hits[-1][0] == path  # the first hop was fetched, the bad one never
    assert not (tmp_path / "d").exists()


def test_redirects_stop_after_five(https_server, tls_files, tmp_path):
    port = https_server.server_address[1]
    ok = download(f"https://public.test:{port}/chain/4", tmp_path / "ok", settings(), policy=seam(tls_files))
    assert ok.size == len(BODY)  # 4 chain hops + the hop to /data = 5 redirects
    with pytest.raises(FetchFailed, match="more than 5 redirects"):
        download(f"https://public.test:{port}/chain/5", tmp_path / "d", settings(), policy=seam(tls_files))


def test_size_is_capped_by_declared_and_by_counted_bytes(https_server, tls_files, tmp_path):
    port = https_server.server_address[1]
    with pytest.raises(SourceTooLarge, match="10,485,760 bytes"):
        download(f"https://public.test:{port}/big-declared", tmp_path / "d", settings(), policy=seam(tls_files))
    with pytest.raises(SourceTooLarge):
        download(f"https://public.test:{port}/big-undeclared", tmp_path / "d", settings(), policy=seam(tls_files))
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_the_whole_fetch_is_time_capped(https_server, tls_files, tmp_path):
    port = https_server.server_address[1]
    t0 = time.monotonic()
    with pytest.raises(FetchFailed, match="timed out"):
        download(f"https://public.test:{port}/drip", tmp_path / "d", settings(url_timeout_s=1),
                 policy=seam(tls_files))
    assert time.monotonic() - t0 < 3
    assert list(tmp_path.iterdir()) == []


def test_an_error_status_fails_clearly(https_server, tls_files, tmp_path):
    port = https_server.server_address[1]
    with pytest.raises(FetchFailed, match="HTTP 404"):
        download(f"https://public.test:{port}/missing", tmp_path / "d", settings(), policy=seam(tls_files))


# -- s3 sources -----------------------------------------------------------------------------------------
def test_s3_urls_are_checked():
    assert fetch.check_s3_url("s3://my-bucket/data/") == "s3://my-bucket/data"
    for bad in ("s3://", "s3://A_B/x", "s3:/x/y", "https://x", "s3://ab", "s3://bucket/../x"):
        with pytest.raises(URLRefused):
            fetch.check_s3_url(bad)


def test_s3_options_are_anonymous_or_the_users_own():
    assert fetch.s3_options(None, settings()) == {"anon": True}
    assert fetch.s3_options({"key": "AK", "secret": "SK"}, settings()) == {"anon": False, "key": "AK", "secret": "SK"}
    for bad in ({"key": "AK"}, {"profile": "default"}, {"key": "AK", "secret": 3}):
        with pytest.raises(URLRefused):
            fetch.s3_options(bad, settings())
    with pytest.raises(URLRefused):  # an endpoint is a URL like any other
        fetch.s3_options({"endpoint_url": "http://169.254.169.254"}, settings())
    with pytest.raises(URLRefused):
        fetch.s3_options({"endpoint_url": "https://127.0.0.1:9000"}, settings())
