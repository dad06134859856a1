"""Secrets and files at rest: credentials sealed with a key derived from the secret key, and a data
directory only its owner can read.

- :func:`seal` / :func:`unseal`: a JSON object encrypted and authenticated (Fernet: AES-128-CBC with
  HMAC-SHA256) under a key derived from ``secret_key`` with HKDF for this one purpose. Every process
  that shares the secret key (web, workers) can open what another sealed; a changed secret key makes old
  seals unreadable (:class:`SealError`), which the job reports as a user error to resubmit.
- :func:`scrub_job_credentials`: a job that reached a final state needs its dataset credentials no more;
  they are deleted from its row (jobs.transition calls it).
- :func:`make_private`: the data directory 0700 and the files in it 0600 (``serve`` and ``worker`` call
  it at start, and set the umask so what they create later is private too).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .settings import Settings

log = logging.getLogger(__name__)

PURPOSE = b"nanochat-studio: sealed dataset credentials v1"
SEALED_KEY = "sealed_credentials"  # where a dataset spec keeps its sealed credentials
PRIVATE_UMASK = 0o077


class SealError(ValueError):
    """A sealed value that cannot be opened (another secret key, or altered)."""


def _fernet(secret_key: str) -> Fernet:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=PURPOSE).derive(secret_key.encode("utf-8"))
    return Fernet(base64.urlsafe_b64encode(key))


def seal(value: dict[str, Any], settings: Settings) -> str:
    return _fernet(settings.secret_key).encrypt(json.dumps(value, separators=(",", ":")).encode()).decode()


def unseal(token: str, settings: Settings) -> dict[str, Any]:
    """The sealed object. Raises SealError when it cannot be opened."""
    try:
        value = json.loads(_fernet(settings.secret_key).decrypt(token.encode()))
    except (InvalidToken, ValueError, TypeError):
        raise SealError("the stored S3 credentials cannot be read with this server's secret key (was it "
                        "changed?); submit the job again with its credentials") from None
    if not isinstance(value, dict):
        raise SealError("the stored S3 credentials are damaged; submit the job again")
    return value


def scrub_job_credentials(job_id: int) -> bool:
    """Delete the dataset credentials of job ``job_id`` from its row (those of its pretraining data and
    of its chat-tuning conversations); True if there were any."""
    from .models import TrainingJob

    row = TrainingJob.get_or_none(TrainingJob.id == job_id)
    config = dict(row.config or {}) if row is not None else {}
    found = False
    for key in ("dataset", "chat_data"):
        spec = config.get(key)
        if isinstance(spec, dict) and ({SEALED_KEY, "credentials"} & set(spec)):
            config[key] = {k: v for k, v in spec.items() if k not in (SEALED_KEY, "credentials")}
            found = True
    if found:
        TrainingJob.update(config=config).where(TrainingJob.id == job_id).execute()
    return found


# --------------------------------------------------------------------------------------------- files

def make_private(settings: Settings) -> None:
    """The data directory 0700 and every file directly in it 0600 (studio.db, queue.db and their -wal
    and -shm files, secret_key, ...); the process umask 077 so files and directories created from now
    on (runs, storage, logs, trainer outputs) are private too."""
    os.umask(PRIVATE_UMASK)
    home = Path(settings.home)
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    _chmod(home, 0o700)
    for entry in home.iterdir():
        try:
            mode = entry.lstat().st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISREG(mode):
            _chmod(entry, 0o600)
        elif stat.S_ISDIR(mode):
            _chmod(entry, 0o700)


def _chmod(path: Path, mode: int) -> None:
    try:
        if stat.S_IMODE(path.stat().st_mode) != mode:
            os.chmod(path, mode)
    except PermissionError:  # not ours (a mounted volume): say so, do not stop the start
        log.warning("cannot make %s private (mode %o): not owned by this user", path, mode)
    except FileNotFoundError:
        pass
