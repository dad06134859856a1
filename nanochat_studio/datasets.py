"""Datasets: uploads into storage under a size cap and a per-user quota, and dataset specs for jobs.

A job's dataset *spec* is one of:

- ``"demo"``: the built-in corpus;
- ``"ds:<id>"``: a dataset the same user uploaded (anyone else's id is "not found");
- ``"https://..."``: fetched through fetch.py's guard (http only on lab networks);
- ``"s3://bucket/prefix"``, or ``{"source": "s3://...", "credentials": {"key", "secret", "token",
  "endpoint_url"}}``: read anonymously or with the user's own credentials;
- an absolute server path, when ``allow_server_paths`` is on (solo) or the user is an admin.

An upload's row exists from the moment its bytes start arriving (its id names the storage key); until
the bytes are all stored its ``sha256`` is empty and it counts as absent everywhere.

Errors: ``BadRequest`` (400) for a bad name, type or spec, ``TooLarge`` (413) for the size cap or quota,
``NotFound`` (404) for a dataset that is not the user's, ``Forbidden`` (403) for a server path.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import urlsplit

from . import datafacts, expansion, fetch, secretbox, serverpaths
from .errors import BadRequest, Forbidden, NotFound, TooLarge
from .models import Dataset, TrainingJob, User, parse_id
from .settings import Settings
from .storage import Storage, TooLargeError, dataset_prefix

ALLOWED_EXTENSIONS = (".txt", ".md", ".jsonl", ".parquet")
GZIP_MAGIC, PARQUET_MAGIC = b"\x1f\x8b", b"PAR1"
SNIFF_BYTES = 64 << 10


class DatasetError(BadRequest):
    """A dataset spec or upload that cannot be used."""


class QuotaExceeded(TooLarge):
    """The user's datasets would take more than ``user_quota_bytes``."""


# -- names and types ------------------------------------------------------------------------------------
def safe_filename(filename: str) -> str:
    """A storage-safe name for an uploaded file, keeping its extension; DatasetError if the type is not
    one of .txt .md .jsonl .parquet (optionally .gz)."""
    base = re.split(r"[/\\]", unicodedata.normalize("NFKC", filename or ""))[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip("._-")
    lower = base.lower()
    ext = next((e + gz for e in ALLOWED_EXTENSIONS for gz in (".gz", "") if lower.endswith(e + gz)), None)
    if ext is None or len(base) <= len(ext):
        allowed = ", ".join(ALLOWED_EXTENSIONS)
        raise DatasetError(f"{filename!r}: datasets must be {allowed} files (optionally gzipped, .gz)")
    stem = base[: -len(ext)][:100].rstrip("._-") or "data"
    return stem + lower[-len(ext):]


def _sniff(name: str, head: bytes) -> None:
    """Refuse a file whose first bytes contradict its extension (a renamed binary, say)."""
    if name.endswith(".gz"):
        ok, what = head.startswith(GZIP_MAGIC), "gzip"
    elif name.endswith(".parquet"):
        ok, what = head.startswith(PARQUET_MAGIC), "Parquet"
    else:
        ok, what = b"\x00" not in head, "text"
    if not ok:
        raise DatasetError(f"{name} does not look like a {what} file")


class _Prepended:
    """``read`` over the upload stream: the already-read (sniffed) first block first, then the rest."""

    def __init__(self, head: bytes, stream: IO[bytes]):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out, self.head = self.head, b""
            return out
        return self.stream.read(n)


# -- uploads --------------------------------------------------------------------------------------------
def used_bytes(user: User, exclude_id: int | None = None) -> int:
    """The user's datasets as the quota counts them: gzip by what it expands to."""
    query = Dataset.select().where(Dataset.user == user)
    if exclude_id is not None:
        query = query.where(Dataset.id != exclude_id)
    return sum(d.counted_bytes for d in query)


def _metered(name: str, stream: Any, settings: Settings, room: int) -> expansion.ExpansionMeter | None:
    """For a .gz upload, a meter counting what it expands to, stopping past the smaller of
    ``expanded_max_bytes`` and the quota's ``room`` (a decompression bomb stops there)."""
    if not name.endswith(".gz"):
        return None
    return expansion.ExpansionMeter(stream, min(settings.expanded_max_bytes, max(0, room)))


def _expansion_refusal(exc: Exception, settings: Settings, used: int, name: str) -> BadRequest:
    if isinstance(exc, expansion.BadGzip):
        return DatasetError(f"{name}: {exc}")
    assert isinstance(exc, expansion.ExpansionTooLarge)
    if exc.cap >= settings.expanded_max_bytes:
        return TooLarge(f"{name} {exc}: the limit of what a gzipped dataset may expand to is "
                        f"{settings.expanded_max_bytes:,} bytes (expanded_max_bytes)")
    return QuotaExceeded(_quota_message(settings, used, f"{name}, which expands to more than {exc.cap:,} bytes"))


def _quota_message(settings: Settings, used: int, adding: str) -> str:
    quota = settings.user_quota_bytes
    return (f"this upload ({adding}) would exceed your dataset quota: {used:,} of {quota:,} bytes used, "
            f"{max(0, quota - used):,} bytes free; delete a dataset to make room")


def save_upload(user: User, filename: str, stream: IO[bytes], settings: Settings, *,
                size_hint: int | None = None, storage: Storage | None = None) -> Dataset:
    """Stream ``stream`` into storage as a new Dataset of ``user``.

    ``size_hint`` (the file's length if the client said it, else the request's Content-Length, which
    overstates it by the multipart framing) lets an oversize upload fail before any byte is read.
    Raises DatasetError (name, type), TooLarge (over ``upload_max_bytes``), QuotaExceeded.
    """
    name = safe_filename(filename)
    cap, quota = int(settings.upload_max_bytes), int(settings.user_quota_bytes)
    used = used_bytes(user)
    if size_hint is not None and size_hint > cap:
        raise TooLarge(f"the upload is {size_hint:,} bytes; the limit is {cap:,} bytes (upload_max_bytes)")
    if size_hint is not None and used + size_hint > quota:
        raise QuotaExceeded(_quota_message(settings, used, f"{size_hint:,} bytes"))
    if used >= quota:
        raise QuotaExceeded(_quota_message(settings, used, "any size"))
    head = stream.read(SNIFF_BYTES)
    _sniff(name, head)
    storage = storage or Storage.from_settings(settings)
    ds = Dataset.create(user=user, name=name, storage_key="", size_bytes=0, sha256="")
    key = f"{dataset_prefix(user.id, ds.id)}/{name}"
    limit = min(cap, quota - used)
    source: Any = _Prepended(head, stream)
    meter = _metered(name, source, settings, quota - used)
    try:
        meta = storage.put_stream(meter or source, key, max_bytes=limit)
        expanded = meter.finish() if meter is not None else 0
        # Another upload may have finished meanwhile; the quota holds for their sum.
        others = used_bytes(user, exclude_id=ds.id)
        if others + max(meta["size"], expanded) > quota:
            raise QuotaExceeded(_quota_message(settings, others, f"{max(meta['size'], expanded):,} bytes"))
    except (expansion.ExpansionTooLarge, expansion.BadGzip) as exc:
        _forget(ds, storage)
        raise _expansion_refusal(exc, settings, used, name) from None
    except TooLargeError:
        _forget(ds, storage)
        if limit == cap:
            raise TooLarge(f"the upload is larger than the limit of {cap:,} bytes (upload_max_bytes)") from None
        raise QuotaExceeded(_quota_message(settings, used, f"more than {limit:,} bytes")) from None
    except BaseException:
        _forget(ds, storage)
        raise
    Dataset.update(storage_key=key, size_bytes=meta["size"], sha256=meta["sha256"], expanded_bytes=expanded).where(
        Dataset.id == ds.id).execute()
    ds = Dataset.get_by_id(ds.id)
    # The estimates need the trainer's own view of the data (vocabulary, tokens): a queued task prepares it.
    datafacts.request_upload(ds, settings)
    return ds


def _forget(ds: Dataset, storage: Storage) -> None:
    storage.delete(dataset_prefix(ds.user_id, ds.id))
    datafacts.forget_dataset(ds.id)
    ds.delete_instance()


def list_datasets(user: User) -> list[Dataset]:
    """The user's complete uploads, newest first."""
    return list(Dataset.select().where((Dataset.user == user) & (Dataset.sha256 != ""))
                .order_by(Dataset.created_at.desc(), Dataset.id.desc()))


def get_dataset(user: User, dataset_id: int | str) -> Dataset:
    """The user's complete dataset ``dataset_id``; NotFound for anyone else's, or an unfinished one."""
    pk = parse_id(dataset_id)
    ds = None if pk is None else Dataset.get_or_none((Dataset.id == pk) & (Dataset.user == user) & (Dataset.sha256 != ""))
    if ds is None:
        raise NotFound(f"no dataset {dataset_id}")
    return ds


def delete_dataset(user: User, dataset_id: int, settings: Settings, *, storage: Storage | None = None) -> None:
    """Delete the user's dataset and its bytes. NotFound for anyone else's."""
    ds = get_dataset(user, dataset_id)
    _forget(ds, storage or Storage.from_settings(settings))


# -- specs ----------------------------------------------------------------------------------------------
def _split(spec: Any) -> tuple[str, dict | None]:
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"source", "credentials"})
        if unknown or not isinstance(spec.get("source"), str):
            raise DatasetError('a dataset object is {"source": "s3://...", "credentials": {...}}')
        creds = spec.get("credentials")
        if creds is not None and not isinstance(creds, dict):
            raise DatasetError("dataset credentials must be an object")
        return spec["source"].strip(), creds
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError('the dataset must be "demo", "ds:<id>", an https:// URL, an s3:// prefix or a path')
    return spec.strip(), None


def _server_path(source: str, user: User, settings: Settings) -> str:
    if not (settings.allow_server_paths or user.is_admin):
        raise Forbidden("server paths as datasets are allowed only in solo mode or for admins")
    path = serverpaths.check(source, settings)  # never the data directory, a secret or a system file
    if not os.path.exists(path):
        raise DatasetError(f"the server path {path} does not exist")
    if not os.access(path, os.R_OK):
        raise DatasetError(f"the server path {path} is not readable")
    return path


def validate_spec(spec: Any, user: User, settings: Settings, *, policy: fetch.NetPolicy | None = None) -> dict:
    """Check a job's dataset spec for ``user`` now; return it normalised:
    ``{"kind": "demo"|"upload"|"url"|"s3"|"path", "source": str, ...}`` (``credentials`` for s3 only if
    given: store it, never show it; :func:`describe_spec` is the safe display). ``policy``: tests only.
    """
    source, creds = _split(spec)
    if creds is not None and not source.startswith("s3://"):
        raise DatasetError("credentials are accepted only for s3:// datasets")
    if source == "demo":
        return {"kind": "demo", "source": "demo"}
    if source.startswith("ds:"):
        if not source[3:].isdigit():
            raise DatasetError("an uploaded dataset is named ds:<id>, with a numeric id")
        ds = get_dataset(user, source[3:])
        return {"kind": "upload", "source": source, "dataset_id": ds.id, "name": ds.name, "sha256": ds.sha256}
    if source.startswith(("https://", "http://")):
        fetch.check_url(source, settings, policy=policy)
        return {"kind": "url", "source": source}
    if source.startswith("s3://"):
        out = {"kind": "s3", "source": fetch.check_s3_url(source)}
        fetch.s3_options(creds, settings, policy=policy)  # validates; the options are built at run time
        if creds:  # sealed: the row never holds them in clear (and they go when the job ends)
            out[secretbox.SEALED_KEY] = secretbox.seal({k: v for k, v in creds.items() if v not in (None, "")},
                                                       settings)
        return out
    if source.startswith("/"):
        return {"kind": "path", "source": _server_path(source, user, settings)}
    raise DatasetError(f"{source[:200]!r} is not a dataset: use \"demo\", \"ds:<id>\", an https:// URL, "
                       "an s3://bucket/prefix or an absolute server path")


def describe_spec(spec: Any) -> str:
    """The spec's source for display and the model card: never its credentials."""
    if isinstance(spec, dict):
        return str(spec.get("source", ""))
    return str(spec)


def resolve_for_training(job: TrainingJob, settings: Settings, run_dir: str | os.PathLike | None = None, *,
                         policy: fetch.NetPolicy | None = None, key: str = "dataset") -> tuple[str, dict | None]:
    """``(data, storage_options)`` for the trainer's ``--data`` for ``job``, re-checked for its owner now
    (``key="chat_data"``: the same for its ``--chat-data``, prepared in ``run_dir/chat_data/``).

    ``"demo"``; a local path (an upload on local storage, or one copied from remote storage into
    ``run_dir/data/``; an https file downloaded there once, reused by later attempts); an ``s3://`` URL
    with the user's options (pass them to the trainer by file or environment, not argv: they may hold a
    secret). Writes ``run_dir/data/source.json`` (source, sha256, size) when the bytes are known.
    ``run_dir`` defaults to ``runs_dir/<job id>``. Raises DatasetError, NotFound, Forbidden and fetch's
    errors: all user errors, not to be retried.
    """
    spec = _unsealed_spec(job.config.get(key) if isinstance(job.config, dict) else None, settings)
    source, creds = _split(spec)
    user = User.get_by_id(job.user_id)
    data_dir = Path(run_dir or Path(settings.runs_dir) / str(job.id)) / ("data" if key == "dataset" else key)
    if source == "demo":
        return "demo", None
    if source.startswith("ds:") and source[3:].isdigit():
        ds = get_dataset(user, source[3:])
        storage = Storage.from_settings(settings)
        if storage.is_local:
            path = storage.local_path(ds.storage_key)
        else:
            path = data_dir / ds.name
            if not _recorded(data_dir, source, ds.sha256, path):
                storage.get_file(ds.storage_key, path, sha256=ds.sha256)
        _record(data_dir, source, ds.sha256, ds.size_bytes)
        return str(path), None
    if source.startswith(("https://", "http://")):
        path = data_dir / _url_filename(source)
        if not _recorded(data_dir, source, None, path):
            got = fetch.download(source, path, settings, policy=policy)
            _check_expansion(path, settings)
            _record(data_dir, source, got.sha256, got.size)
        return str(path), None
    if source.startswith("s3://"):
        return fetch.check_s3_url(source), fetch.s3_options(creds, settings, policy=policy)
    if source.startswith("/"):
        return _server_path(source, user, settings), None
    raise DatasetError(f"job {job.id} has no usable dataset spec")


def _unsealed_spec(spec: Any, settings: Settings) -> Any:
    """A stored spec (normalised by validate_spec) as _split reads it: its credentials unsealed (or, in a
    row stored before they were sealed, as they are). Raises DatasetError when they cannot be opened."""
    if not (isinstance(spec, dict) and "kind" in spec):
        return spec
    creds = spec.get("credentials")
    if spec.get(secretbox.SEALED_KEY):
        try:
            creds = secretbox.unseal(spec[secretbox.SEALED_KEY], settings)
        except secretbox.SealError as exc:
            raise DatasetError(str(exc)) from None
    return {"source": spec["source"], **({"credentials": creds} if creds else {})}


def _check_expansion(path: Path, settings: Settings) -> None:
    """A fetched .gz must not expand past ``expanded_max_bytes`` (the trainer would read it all)."""
    if path.name.endswith(".gz"):
        try:
            expansion.expanded_size(path, settings.expanded_max_bytes)
        except (expansion.ExpansionTooLarge, expansion.BadGzip) as exc:
            path.unlink(missing_ok=True)
            raise DatasetError(f"{path.name} {exc}" if isinstance(exc, expansion.ExpansionTooLarge) else
                               f"{path.name}: {exc}") from None


def _url_filename(url: str) -> str:
    """A local name for a fetched URL that keeps a known extension (the trainer reads by extension)."""
    last = PurePosixPath(urlsplit(url).path).name
    try:
        return safe_filename(last)
    except DatasetError:
        return "source.txt"


def _recorded(data_dir: Path, source: str, sha256: str | None, path: Path) -> bool:
    """Did an earlier attempt already put this source's bytes at ``path``? (Resume must not refetch:
    the remote file may have changed since the first steps were trained on it.)"""
    try:
        rec = json.loads((data_dir / "source.json").read_text())
    except (FileNotFoundError, ValueError):
        return False
    return rec.get("source") == source and path.is_file() and (sha256 is None or rec.get("sha256") == sha256)


def recorded_source(run_dir: str | os.PathLike) -> dict | None:
    """What :func:`resolve_for_training` noted about the bytes it prepared in ``run_dir``:
    ``{"source", "sha256", "size"}`` (uploads and https files), or None (demo, s3, server paths)."""
    try:
        return json.loads((Path(run_dir) / "data" / "source.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def _record(data_dir: Path, source: str, sha256: str, size: int) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / "source.json.tmp"
    tmp.write_text(json.dumps({"source": source, "sha256": sha256, "size": size}))
    os.replace(tmp, data_dir / "source.json")
