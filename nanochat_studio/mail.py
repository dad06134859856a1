"""The studio's outgoing mail: one sender over SMTP, configured by ``smtp_url``, ``smtp_from`` and the
``smtp_username`` / ``smtp_password`` secrets.

``smtp://host:587`` speaks STARTTLS and refuses to go on without it (credentials and links never cross
the network in clear); ``smtps://host:465`` is TLS from the first byte; ``smtp+insecure://host:25`` is
plain SMTP for a relay on the same machine. The server's certificate is verified against the system's
CAs (``SSL_CERT_FILE`` points OpenSSL at a private CA).

With no ``smtp_url`` (solo and lab installs often have no mail server), :func:`send` writes the message
to the log instead, at WARNING, so the operator can pass the link on; hosted mode needs a mail server
(`serve` refuses to start without one).

Errors: :class:`MailError` when the server cannot be reached or refuses the message.
"""

from __future__ import annotations

import logging
import smtplib
import socket
import ssl
from email.message import EmailMessage
from email.utils import formataddr, make_msgid
from urllib.parse import unquote, urlsplit

from .settings import Settings

log = logging.getLogger(__name__)

TIMEOUT_S = 15.0
DEFAULT_PORTS = {"smtp": 587, "smtps": 465, "smtp+insecure": 25}


class MailError(Exception):
    """The message could not be handed to the mail server; the text says why, without secrets."""


def from_address(settings: Settings) -> str:
    if settings.smtp_from:
        return settings.smtp_from
    host = urlsplit(settings.base_url).hostname if settings.base_url else None
    return formataddr(("nanochat studio", f"studio@{host or 'localhost'}"))


def compose(settings: Settings, to: str, subject: str, body: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = from_address(settings)
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="nanochat-studio")
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies
    msg.set_content(body)
    return msg


def configured(settings: Settings) -> bool:
    return bool(settings.smtp_url)


def send(settings: Settings, to: str, subject: str, body: str) -> bool:
    """Send a plain-text mail; True when a mail server took it, False when it was logged instead (no
    ``smtp_url``). Raises MailError."""
    msg = compose(settings, to, subject, body)
    if not configured(settings):
        log.warning("no mail server (smtp_url) is set; this mail to %s was not sent:\nSubject: %s\n\n%s",
                    to, subject, body)
        return False
    url = urlsplit(settings.smtp_url)
    host, port = url.hostname or "", url.port or DEFAULT_PORTS[url.scheme]
    user = settings.smtp_username or unquote(url.username or "")
    password = settings.smtp_password or unquote(url.password or "")
    context = ssl.create_default_context()
    try:
        if url.scheme == "smtps":
            client: smtplib.SMTP = smtplib.SMTP_SSL(host, port, timeout=TIMEOUT_S, context=context)
        else:
            client = smtplib.SMTP(host, port, timeout=TIMEOUT_S)
        with client:
            client.ehlo()
            if url.scheme == "smtp":
                if not client.has_extn("starttls"):
                    raise MailError(f"the mail server {host}:{port} does not offer STARTTLS; use smtps:// or "
                                    "a server that encrypts")
                client.starttls(context=context)
                client.ehlo()
            if user:
                client.login(user, password)
            client.send_message(msg)
    except MailError:
        raise
    except smtplib.SMTPAuthenticationError:
        raise MailError(f"the mail server {host}:{port} refused the user name or password") from None
    except (smtplib.SMTPException, ssl.SSLError, socket.timeout, OSError) as exc:
        raise MailError(f"the mail server {host}:{port} failed: {exc.__class__.__name__}: {exc}") from None
    log.info("mail sent to %s: %s", to, subject)
    return True
