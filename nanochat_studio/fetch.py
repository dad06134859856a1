"""Datasets from the network, which is a security boundary: the URL guard and the fetcher.

A user's URL makes *this server* connect somewhere, so every fetch is checked as if it were an attack
on the machine's own network (SSRF):

- ``https`` only. ``http`` is refused unless an admin sets ``allow_private_urls`` (a lab network, where
  plain http inside the LAN is common); it is then allowed for any host the address rules admit.
- Every address the host resolves to must be public. Always refused: loopback, link-local (169.254/16,
  which holds the cloud metadata service 169.254.169.254, and fe80::/10), multicast, unspecified,
  reserved, documentation and benchmarking ranges, and IPv6 forms that embed one of them (IPv4-mapped,
  6to4, NAT64, Teredo). Refused unless ``allow_private_urls``: RFC 1918, CGNAT 100.64/10, fc00::/7.
- We connect to the address we vetted, never to the name again (a second DNS answer could point
  somewhere else: DNS rebinding), sending the original Host header and TLS SNI, and verifying the
  certificate against the original name.
- Redirects are followed by hand, at most 5, and each hop is checked like the first URL.
- Size (``url_max_bytes``: Content-Length and counted bytes) and time (``url_timeout_s``, whole fetch)
  are capped; the body streams to disk in bounded chunks and only a complete file is renamed into place.
- ``s3://`` sources are read anonymously or with the user's own key and secret, never with the server's
  credentials (see :func:`s3_options`).

Errors: ``URLRefused`` (400) for a URL the guard will not fetch, ``FetchFailed`` (400) when the remote
side misbehaves (status, timeout, too many redirects), ``SourceTooLarge`` (413).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urljoin, urlsplit

import certifi
import urllib3

from .errors import BadRequest, TooLarge
from .settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_REDIRECTS = 5
CHUNK = 64 << 10
REDIRECTS = (301, 302, 303, 307, 308)


class URLRefused(BadRequest):
    """The guard will not fetch this URL (scheme, host or address)."""


class FetchFailed(BadRequest):
    """The URL was allowed but fetching it failed (HTTP status, timeout, redirects)."""


class SourceTooLarge(TooLarge):
    """The remote file is larger than ``url_max_bytes``."""


# -- which addresses may be reached ---------------------------------------------------------------------
_BLOCKED = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "192.0.0.0/24", "192.0.2.0/24", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "::/96", "100::/64", "2001::/23", "2001:db8::/32", "fe80::/10", "fec0::/10",
    "ff00::/8",
)]
_PRIVATE = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                               "100.64.0.0/10", "fc00::/7")]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def address_class(ip: IPAddress) -> str:
    """'public', 'private' (a LAN: allowed only with allow_private_urls) or 'blocked' (never)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_class(embedded)
    if any(ip in net for net in _BLOCKED):
        return "blocked"
    if any(ip in net for net in _PRIVATE):
        return "private"
    if ip.is_multicast or ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_reserved:
        return "blocked"
    return "public" if ip.is_global else "private"


def is_public_address(ip: IPAddress) -> bool:
    return address_class(ip) == "public"


def system_resolve(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for ``host`` (raises OSError when it gives none)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


@dataclass(frozen=True)
class NetPolicy:
    """How names resolve and which addresses count as public.

    TEST SEAM, used only by tests: a test passes ``policy=NetPolicy(resolve=..., is_public=...)`` so a
    TLS server on 127.0.0.1 can stand in for a public host named ``public.test``, while every other
    address is still judged by the real rules. ``allow_http`` lets a test reach a plain-http stand-in
    (an S3 endpoint); ``ca_bundle`` trusts the test's own certificate authority. Production code never
    passes a policy, so it always gets ``DEFAULT_POLICY``: the system resolver and :func:`address_class`.
    """

    resolve: Callable[[str, int], list[str]] = system_resolve
    is_public: Callable[[IPAddress], bool] = is_public_address
    allow_http: bool = False
    ca_bundle: str | None = None  # None: certifi's bundle, as requests uses (certifi comes with it)


DEFAULT_POLICY = NetPolicy()


@dataclass(frozen=True)
class Target:
    """A URL the guard accepted, with the addresses it vetted (connect only to these)."""

    url: str
    scheme: str
    host: str  # lowercase, IDNA-encoded; no brackets around IPv6
    port: int
    addresses: tuple[str, ...]
    path: str  # path and query, what goes on the request line

    @property
    def host_header(self) -> str:
        name = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return name if self.port == default else f"{name}:{self.port}"


def check_url(url: str, settings: Settings, *, policy: NetPolicy | None = None) -> Target:
    """Validate ``url`` for fetching now: scheme, host, and every resolved address. Raise URLRefused."""
    policy = policy or DEFAULT_POLICY
    lab = settings.allow_private_urls
    if not isinstance(url, str) or len(url) > 2048 or any(c in url for c in "\r\n\t\x00 "):
        raise URLRefused("the URL must be a single line of at most 2048 characters without spaces")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise URLRefused(f"{url!r} is not a valid URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme != "https" and not (scheme == "http" and (lab or policy.allow_http)):
        hint = " (http is allowed only on lab networks, by the admin setting allow_private_urls)" \
            if scheme == "http" else ""
        raise URLRefused(f"{url!r}: only https:// URLs can be fetched{hint}")
    if parts.username is not None or parts.password is not None:
        raise URLRefused(f"{url!r}: credentials in URLs are not accepted")
    host = parts.hostname or ""
    if not host:
        raise URLRefused(f"{url!r} has no host")
    try:
        host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise URLRefused(f"{url!r}: {host!r} is not a valid host name") from None
    if port == 0:
        raise URLRefused(f"{url!r}: port 0 cannot be fetched")
    port = port or (443 if scheme == "https" else 80)
    try:
        literal = ipaddress.ip_address(host)
        addresses = [str(literal)]
    except ValueError:
        try:
            addresses = policy.resolve(host, port)
        except OSError as e:
            raise URLRefused(f"{url!r}: the host {host} does not resolve ({e})") from None
        if not addresses:
            raise URLRefused(f"{url!r}: the host {host} does not resolve")
    for a in addresses:
        ip = ipaddress.ip_address(a.split("%", 1)[0])  # drop an IPv6 zone id
        if policy.is_public(ip):
            continue
        kind = address_class(ip)
        if kind == "private" and lab:
            continue
        what = f"{host} resolves to {ip}, " if str(ip) != host else f"{ip} is "
        if kind == "private":
            raise URLRefused(f"{url!r}: {what}a private network address; only public internet addresses can "
                             f"be fetched (an admin can allow private networks with allow_private_urls)")
        raise URLRefused(f"{url!r}: {what}a loopback, link-local, multicast or reserved address, "
                         f"which is never fetched")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(url=url, scheme=scheme, host=host, port=port, addresses=tuple(addresses), path=path)


@dataclass(frozen=True)
class Fetched:
    path: str
    size: int
    sha256: str
    final_url: str
    content_type: str


def download(url: str, dest: str | os.PathLike, settings: Settings, *, policy: NetPolicy | None = None) -> Fetched:
    """Fetch ``url`` into the file ``dest`` under the guard, the size cap and the time cap.

    Raises URLRefused, FetchFailed or SourceTooLarge; on any failure nothing is left at ``dest``.
    """
    max_bytes = settings.url_max_bytes
    deadline = time.monotonic() + settings.url_timeout_s
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    current = url
    for _hop in range(MAX_REDIRECTS + 1):
        target = check_url(current, settings, policy=policy)
        resp = _request(target, deadline, policy or DEFAULT_POLICY)
        try:
            if resp.status in REDIRECTS:
                location = resp.headers.get("Location")
                if not location:
                    raise FetchFailed(f"{current}: HTTP {resp.status} redirect without a Location")
                current = urljoin(current, location)
                continue
            if resp.status != 200:
                raise FetchFailed(f"{current} answered HTTP {resp.status}")
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise SourceTooLarge(f"{current} is {int(length):,} bytes; the limit is {max_bytes:,} bytes")
            try:
                size, digest = _stream_to(resp, part, max_bytes, deadline, current)
            except BaseException:
                _unlink(part)
                raise
            os.replace(part, dest)
            return Fetched(str(dest), size, digest, current, resp.headers.get("Content-Type", ""))
        finally:
            resp.release_conn()
            resp.close()
    raise FetchFailed(f"{url}: more than {MAX_REDIRECTS} redirects")


def _remaining(deadline: float, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchFailed(f"{url}: timed out (the limit is url_timeout_s)")
    return left


def _request(target: Target, deadline: float, policy: NetPolicy) -> urllib3.BaseHTTPResponse:
    """GET ``target`` on one of its vetted addresses (tried in order), never re-resolving the name."""
    last: Exception | None = None
    for address in target.addresses:
        left = _remaining(deadline, target.url)
        timeout = urllib3.Timeout(connect=min(10.0, left), read=min(30.0, left))
        if target.scheme == "https":
            pool = urllib3.HTTPSConnectionPool(
                address, target.port, timeout=timeout, retries=False, cert_reqs="CERT_REQUIRED",
                ca_certs=policy.ca_bundle or certifi.where(), server_hostname=target.host, assert_hostname=target.host)
        else:
            pool = urllib3.HTTPConnectionPool(address, target.port, timeout=timeout, retries=False)
        headers = {"Host": target.host_header, "User-Agent": "nanochat-studio dataset fetcher",
                   "Accept-Encoding": "identity"}
        try:
            return pool.urlopen("GET", target.path, headers=headers, redirect=False, retries=False,
                                assert_same_host=False, preload_content=False, decode_content=False)
        except urllib3.exceptions.SSLError as e:
            raise FetchFailed(f"{target.url}: TLS failed ({e.__class__.__name__}: certificate not valid for "
                              f"{target.host}?)") from None
        except (urllib3.exceptions.TimeoutError, urllib3.exceptions.ProtocolError,
                urllib3.exceptions.NewConnectionError, OSError) as e:
            last = e
    raise FetchFailed(f"{target.url}: could not connect ({last.__class__.__name__})")


def _stream_to(resp: urllib3.BaseHTTPResponse, part: Path, max_bytes: int, deadline: float,
               url: str) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with open(part, "wb") as f:
        while True:
            _remaining(deadline, url)
            try:
                chunk = resp.read1(CHUNK, decode_content=False)  # whatever arrived, up to CHUNK
            except (urllib3.exceptions.TimeoutError, urllib3.exceptions.ProtocolError, OSError) as e:
                if time.monotonic() >= deadline or isinstance(e, urllib3.exceptions.TimeoutError):
                    raise FetchFailed(f"{url}: timed out (the limit is url_timeout_s)") from None
                raise FetchFailed(f"{url}: the connection broke ({e.__class__.__name__})") from None
            if not chunk:
                return n, h.hexdigest()
            n += len(chunk)
            if n > max_bytes:
                raise SourceTooLarge(f"{url} is larger than the limit of {max_bytes:,} bytes")
            h.update(chunk)
            f.write(chunk)


# -- s3:// sources --------------------------------------------------------------------------------------
_S3_URL = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\x00-\x1f\\]*)?$")
CREDENTIAL_FIELDS = ("key", "secret", "token", "endpoint_url")


def check_s3_url(url: str) -> str:
    """``s3://bucket[/prefix]`` with a valid bucket name; raise URLRefused otherwise."""
    if not isinstance(url, str) or not _S3_URL.match(url) or "/../" in url + "/":
        raise URLRefused(f"{url!r} is not an s3://bucket/prefix URL")
    return url.rstrip("/")


def s3_options(credentials: Mapping[str, Any] | None, settings: Settings, *,
               policy: NetPolicy | None = None) -> dict:
    """s3fs storage_options for reading a user's ``s3://`` source.

    Built only from what the user gave: no credentials means ``anon=True`` (unsigned requests, so
    neither the environment, a profile nor an instance role can sign them); a key and secret are passed
    explicitly. A custom ``endpoint_url`` (an S3-compatible service) passes the same URL guard as
    datasets; the S3 client resolves it again itself, a narrow rebinding window documented here.
    """
    creds = {k: v for k, v in dict(credentials or {}).items() if v not in (None, "")}
    unknown = sorted(set(creds) - set(CREDENTIAL_FIELDS))
    if unknown:
        raise URLRefused(f"unknown S3 credential fields {unknown}; accepted: {list(CREDENTIAL_FIELDS)}")
    if any(not isinstance(v, str) for v in creds.values()):
        raise URLRefused("S3 credentials must be strings")
    if ("key" in creds) != ("secret" in creds):
        raise URLRefused("S3 credentials need both a key and a secret (or neither, to read anonymously)")
    options: dict[str, Any] = {"anon": "key" not in creds}
    if "key" in creds:
        options.update(key=creds["key"], secret=creds["secret"])
        if "token" in creds:
            options["token"] = creds["token"]
    if "endpoint_url" in creds:
        check_url(creds["endpoint_url"], settings, policy=policy)
        options["client_kwargs"] = {"endpoint_url": creds["endpoint_url"]}
    return options


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
