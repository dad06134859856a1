"""A real SMTP server on loopback for the tests (aiosmtpd): STARTTLS with a certificate made here, a
login the studio must send, and a mailbox the tests read links from.

``MailServer()`` starts it; ``env`` holds the settings that point the studio at it (the user name and
password as ``*_FILE`` secrets), ``ca_file`` the certificate the client must trust (``SSL_CERT_FILE``).
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import ipaddress
import re
import socket
import ssl
import threading
import time
from email.message import EmailMessage
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

USER, PASSWORD = "studio-mailer", "mail password 42"
LINK = re.compile(r"https?://\S+")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "smtp-cert.pem", directory / "smtp-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class _Handler:
    def __init__(self, box: "MailServer") -> None:
        self.box = box

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001 - aiosmtpd's hook
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.box.lock:
            self.box.messages.append(msg)
            self.box.sessions.append({"tls": session.ssl is not None, "login": session.authenticated})
        return "250 OK"


class MailServer:
    def __init__(self, directory: Path, *, require_starttls: bool = True, offer_tls: bool = True) -> None:
        self.messages: list[EmailMessage] = []
        self.sessions: list[dict] = []
        self.lock = threading.Lock()
        self.ca_file, key_file = _certificate(directory)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.ca_file, key_file)
        self.port = _free_port()
        self.controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port,
                                     tls_context=context if offer_tls else None,
                                     require_starttls=require_starttls and offer_tls, auth_require_tls=offer_tls,
                                     authenticator=self._authenticate, ready_timeout=30)
        self.controller.start()
        (directory / "smtp-user").write_text(USER + "\n")
        (directory / "smtp-password").write_text(PASSWORD + "\n")
        self.env = {"NCS_SMTP_URL": f"smtp://127.0.0.1:{self.port}", "NCS_SMTP_FROM": "studio@example.org",
                    "NCS_SMTP_USERNAME_FILE": str(directory / "smtp-user"),
                    "NCS_SMTP_PASSWORD_FILE": str(directory / "smtp-password")}

    @staticmethod
    def _authenticate(server, session, envelope, mechanism, auth_data):  # noqa: ANN001 - aiosmtpd's hook
        ok = isinstance(auth_data, LoginPassword) and auth_data.login.decode() == USER \
            and auth_data.password.decode() == PASSWORD
        return AuthResult(success=ok)

    def stop(self) -> None:
        self.controller.stop()

    def to(self, address: str) -> list[EmailMessage]:
        with self.lock:
            return [m for m in self.messages if m["To"] == address]

    def wait(self, address: str, count: int = 1, timeout: float = 20.0) -> EmailMessage:
        """The ``count``-th mail to ``address`` (1 = the first), waiting for it to arrive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.to(address)
            if len(got) >= count:
                return got[count - 1]
            time.sleep(0.02)
        raise AssertionError(f"no mail #{count} to {address}; got {[m['To'] for m in self.messages]}")

    def link(self, address: str, count: int = 1) -> str:
        """The first link in the ``count``-th mail to ``address``."""
        body = self.wait(address, count).get_content()
        match = LINK.search(body)
        assert match, body
        return match.group(0)
