"""Artifact storage over any fsspec URL: the only fsspec user in the appliance.

``file://{home}/storage`` by default, ``s3://bucket/prefix`` (s3fs, with ``storage_options``) by setting.
Keys are relative paths under per-user prefixes (``users/<id>/models/<id>/...``,
``users/<id>/datasets/<id>/...``); a key that is absolute or climbs out with ``..`` is refused.

A *directory* key (a checkpoint) is published atomically for readers: every file goes under the final
key, then the marker ``_COMMITTED.json`` (our manifest: size and sha256 of every file) is written last.
S3 has no rename, so a directory without its marker is absent to every reader here. On local storage the
directory is assembled beside the final key and renamed into place.

Errors: ``StorageError`` (and its ``KeyNotFound`` / ``IntegrityError``) for storage faults, ``ValueError``
for a bad key, ``TooLargeError`` when a capped stream runs over.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

import fsspec

from .archive import GzipTar, archive_dirname, model_members
from .settings import Settings

MARKER = "_COMMITTED.json"
MARKER_FORMAT = "ncs-dir/1"
CHUNK = 1 << 20  # 1 MiB copies: bounded memory on multi-GiB weights
ARCHIVE_CHUNK = 64 << 10  # what one yield of a download carries, about
_KEY_PART = re.compile(r"^[A-Za-z0-9._@+=-]+$")


class StorageError(Exception):
    """Storage could not do what was asked (backend fault, bad checkpoint)."""


class KeyNotFound(StorageError, FileNotFoundError):
    """The key is absent, or is a directory that was never committed."""


class IntegrityError(StorageError):
    """Bytes read back do not match the manifest's size or sha256."""


class TooLargeError(StorageError):
    """A capped stream went over its limit; nothing is kept."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} bytes")
        self.limit = limit


def check_key(key: str) -> str:
    """Return ``key`` normalised (no trailing slash) or raise ValueError if it could escape its prefix."""
    if not isinstance(key, str) or not key or len(key) > 900:
        raise ValueError("storage key must be a non-empty string of at most 900 characters")
    if key.startswith("/") or "\\" in key or "\x00" in key or ":" in key.split("/")[0]:
        raise ValueError(f"storage key must be relative: {key!r}")
    parts = key.rstrip("/").split("/")
    for part in parts:
        if part in ("", ".", "..") or not _KEY_PART.match(part):
            raise ValueError(f"storage key has a bad part {part!r}: {key!r}")
    return "/".join(parts)


def user_prefix(user_id: int) -> str:
    return f"users/{int(user_id)}"


def model_prefix(user_id: int, model_id: int) -> str:
    return f"{user_prefix(user_id)}/models/{int(model_id)}"


def dataset_prefix(user_id: int, dataset_token: str | int) -> str:
    return check_key(f"{user_prefix(user_id)}/datasets/{dataset_token}")


def _copy_hashing(src: IO[bytes], dst: IO[bytes], limit: int | None = None) -> tuple[int, str]:
    """Copy in bounded chunks; return (bytes, sha256). Raise TooLargeError past ``limit``."""
    h = hashlib.sha256()
    n = 0
    while chunk := src.read(CHUNK):
        n += len(chunk)
        if limit is not None and n > limit:
            raise TooLargeError(limit)
        h.update(chunk)
        dst.write(chunk)
    return n, h.hexdigest()


class Storage:
    """Put, open, publish and stream artifacts under one fsspec root URL."""

    def __init__(self, url: str, options: Mapping[str, Any] | None = None, cache_dir: str | os.PathLike | None = None):
        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url, **dict(options or {}))
        self.root = root.rstrip("/")
        self.is_local = "file" in _protocols(self.fs)
        if self.is_local:
            os.makedirs(self.root, exist_ok=True)
        # Remote keys are copied here once for model servers and trainers that need real files.
        self.cache_dir = Path(cache_dir) if cache_dir else None

    @classmethod
    def from_settings(cls, settings: Settings) -> "Storage":
        url = settings.storage_url
        cache = Path(settings.home) / "cache" / "storage" / hashlib.sha256(url.encode()).hexdigest()[:12]
        return cls(url, settings.storage_options or {}, cache_dir=cache)

    # -- paths -------------------------------------------------------------------------------------------
    def _path(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}"

    def _marker(self, key: str) -> str:
        return f"{self._path(key)}/{MARKER}"

    def _read_marker(self, key: str) -> dict | None:
        self.fs.invalidate_cache(self._marker(key))  # another process may have committed it since
        try:
            with self.fs.open(self._marker(key), "rb") as f:
                return json.loads(f.read())
        except (FileNotFoundError, NotADirectoryError):  # the latter: ``key`` is a local file
            return None

    def manifest(self, key: str) -> dict:
        """The committed directory's manifest (``files``: rel path -> size, sha256). KeyNotFound if absent."""
        m = self._read_marker(key)
        if m is None:
            raise KeyNotFound(key)
        return m

    # -- single objects ----------------------------------------------------------------------------------
    def put_stream(self, stream: IO[bytes], key: str, max_bytes: int | None = None) -> dict:
        """Write ``stream`` to ``key`` in bounded chunks; return {"size", "sha256"}.

        Readers never see a partial object: local writes go to a temporary name and are renamed; on S3
        the object appears only when the (multipart) upload completes, and an aborted one is discarded.
        """
        path = self._path(key)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with _replacing(f"{path}.tmp-{uuid.uuid4().hex}", path) as tmp, open(tmp, "wb") as dst:
                size, digest = _copy_hashing(stream, dst, max_bytes)
        else:
            f = self.fs.open(path, "wb")
            try:
                size, digest = _copy_hashing(stream, f, max_bytes)
            except BaseException:
                f.discard()  # aborts a started multipart upload
                f.closed = True  # or the file's finaliser would try to commit what is left
                raise
            f.close()
            self.fs.invalidate_cache(path)
        return {"size": size, "sha256": digest}

    def open(self, key: str, mode: str = "rb") -> IO[bytes]:
        """Open a stored file for reading (KeyNotFound if absent), as it is now: another process may
        have rewritten it since this one listed its directory."""
        if mode != "rb":
            raise ValueError("storage files are opened read-only; use put_*")
        self.fs.invalidate_cache(self._path(key))
        try:
            return self.fs.open(self._path(key), "rb")
        except FileNotFoundError as e:
            raise KeyNotFound(key) from e

    def size(self, key: str) -> int:
        """Bytes of a file or a committed directory. KeyNotFound if absent."""
        m = self._read_marker(key)
        if m is not None:
            return int(m["total_bytes"])
        path = self._path(key)
        if not self.fs.isfile(path):  # a prefix of files without a marker is absent too
            raise KeyNotFound(key)
        return int(self.fs.size(path))

    def delete(self, key: str) -> None:
        """Remove a file or everything under a prefix; the marker goes first so readers stop at once."""
        path = self._path(key)
        marker = self._marker(key)
        if self.fs.exists(marker):
            self.fs.rm(marker)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        self.fs.invalidate_cache(path)

    # -- directories -------------------------------------------------------------------------------------
    def put_dir(self, local_dir: str | os.PathLike, key: str) -> dict:
        """Upload ``local_dir`` under ``key`` atomically for readers; return the manifest written."""
        local_dir = Path(local_dir)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != MARKER)
        rels = [p.relative_to(local_dir).as_posix() for p in files]
        for rel in rels:
            check_key(rel)
        path = self._path(key)
        entries: dict[str, dict] = {}
        if self.is_local:
            parent, name = os.path.split(path)
            os.makedirs(parent, exist_ok=True)
            tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{name}")
            try:
                for src, rel in zip(files, rels):
                    dst = os.path.join(tmp, rel)
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    with open(src, "rb") as s, open(dst, "wb") as d:
                        size, digest = _copy_hashing(s, d)
                    entries[rel] = {"size": size, "sha256": digest}
                manifest = _manifest(entries)
                with open(os.path.join(tmp, MARKER), "w") as f:
                    json.dump(manifest, f, indent=1)
                self._swap_in(tmp, path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return manifest
        # Remote: no rename. Un-commit any earlier version first, upload, drop stale files, marker last.
        if self.fs.exists(self._marker(key)):
            self.fs.rm(self._marker(key))
        for src, rel in zip(files, rels):
            with open(src, "rb") as s, self.fs.open(f"{path}/{rel}", "wb") as d:
                size, digest = _copy_hashing(s, d)
            entries[rel] = {"size": size, "sha256": digest}
        self.fs.invalidate_cache(path)
        for stale in self.fs.find(path):
            rel = stale[len(path) + 1:]
            if rel not in entries and rel != MARKER:
                self.fs.rm(stale)
        manifest = _manifest(entries)
        with self.fs.open(self._marker(key), "wb") as f:
            f.write(json.dumps(manifest, indent=1).encode())
        self.fs.invalidate_cache(path)
        return manifest

    @staticmethod
    def _swap_in(tmp: str, final: str) -> None:
        if not os.path.exists(final):
            os.rename(tmp, final)
            return
        old = f"{final}.old-{uuid.uuid4().hex}"
        os.rename(final, old)  # a reader between these renames sees "absent", never a mix
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def copy_dir(self, src: str, dst: str) -> dict:
        """Copy the committed directory ``src`` to the new key ``dst`` (server-side on S3: no bytes pass
        through here), its marker last; returns the manifest. KeyNotFound when ``src`` is absent or goes
        away meanwhile (nothing is committed at ``dst`` then)."""
        files = self.manifest(src)["files"]
        try:
            for rel, info in files.items():
                target = f"{self._path(dst)}/{rel}"
                if self.is_local:
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                self.fs.copy(f"{self._path(src)}/{rel}", target)
                self.fs.invalidate_cache(target)
                if int(self.fs.size(target)) != info["size"]:  # replaced while we copied
                    raise IntegrityError(f"{src}/{rel}: the copy's size differs from the manifest")
        except (FileNotFoundError, IntegrityError) as e:
            self.delete(dst)
            raise KeyNotFound(src) from e
        manifest = _manifest(files)
        self.put_stream(io.BytesIO(json.dumps(manifest, indent=1).encode()), f"{dst}/{MARKER}")
        return manifest

    def list_keys(self, prefix: str) -> list[str]:
        """Keys directly under ``prefix``, committed or not, sorted (read fresh: another process may
        have written them)."""
        base = self._path(prefix)
        self.fs.invalidate_cache(base)
        try:
            children = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return []
        keys = [f"{check_key(prefix)}/{c.rstrip('/').rsplit('/', 1)[-1]}" for c in children]
        return sorted(k for k in keys if not k.rsplit("/", 1)[-1].startswith("."))

    def list_committed(self, prefix: str) -> list[str]:
        """Keys of committed directories directly under ``prefix`` (e.g. a model's checkpoints), sorted."""
        return [k for k in self.list_keys(prefix) if self._read_marker(k)]

    # -- local copies ------------------------------------------------------------------------------------
    def local_path(self, key: str) -> str:
        """A local filesystem path holding ``key`` (file or committed directory).

        Local storage answers its own path. Remote keys are downloaded once into the cache, verified
        against the manifest (IntegrityError), and re-fetched only if the remote manifest changes.
        """
        remote_manifest = self._read_marker(key)
        if self.is_local:
            path = self._path(key)
            if remote_manifest is None and not os.path.isfile(path):
                raise KeyNotFound(key)
            return path
        if self.cache_dir is None:
            raise StorageError("remote storage needs a cache_dir for local copies")
        target = self.cache_dir / check_key(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        if remote_manifest is None:
            return self._cache_file(key, target)
        cached = target / MARKER
        if cached.is_file() and json.loads(cached.read_text()) == remote_manifest:
            return str(target)
        tmp = target.parent / f".tmp-{uuid.uuid4().hex}-{target.name}"
        try:
            for rel, info in remote_manifest["files"].items():
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                with open(dst, "wb") as d:
                    for piece in self._verified_chunks(f"{key}/{rel}", info):
                        d.write(piece)
            (tmp / MARKER).write_text(json.dumps(remote_manifest, indent=1))
            try:
                self._swap_in(str(tmp), str(target))
            except OSError:
                # Another process cached the same key first; theirs is as good as ours if it matches.
                if not (cached.is_file() and json.loads(cached.read_text()) == remote_manifest):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return str(target)

    def _cache_file(self, key: str, target: Path) -> str:
        if target.is_file() and target.stat().st_size == self.size(key):
            return str(target)
        return self.get_file(key, target)

    def get_file(self, key: str, dest: str | os.PathLike, sha256: str | None = None) -> str:
        """Copy the file ``key`` to the local path ``dest`` (complete or not at all), checking its size
        and, when given, its sha256 (IntegrityError). Returns ``dest``."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        size = self.size(key)
        with _replacing(str(dest.parent / f".tmp-{uuid.uuid4().hex}-{dest.name}"), str(dest)) as tmp:
            with self.open(key) as s, open(tmp, "wb") as d:
                n, digest = _copy_hashing(s, d)
            if n != size or (sha256 and digest != sha256):
                raise IntegrityError(f"{key}: stored bytes do not match (size {n}/{size}, sha256 {digest})")
        return str(dest)

    # -- downloads ---------------------------------------------------------------------------------------
    def stream_model_archive(self, model: Any, extra_files: Mapping[str, bytes | str] | None = None) -> Iterator[bytes]:
        """A ``.tar.gz`` of the model, generated chunk by chunk (never whole in memory).

        Holds ``<name>/model.safetensors``, ``config.json``, ``state.json``, ``tokenizer/...`` and a
        ``manifest.json`` listing just those (so the directory is a trainer checkpoint without optimizer
        state: ``python -m trainer.sample --checkpoint <name>`` loads it), plus ``MODEL_CARD.md``,
        ``SHA256SUMS`` and any ``extra_files`` (name -> content). Stored files are re-hashed while they
        stream; a mismatch raises IntegrityError mid-stream so a corrupt archive never looks whole.
        Missing checkpoint: KeyNotFound, raised before the first byte.
        """
        ckpt = check_key(model.checkpoint_key)
        files = self.manifest(ckpt)["files"]  # KeyNotFound before any byte is sent
        if "model.safetensors" not in files:
            raise StorageError(f"checkpoint {ckpt} has no model.safetensors")
        stored = [(rel, f"{ckpt}/{rel}", files[rel]["size"], files[rel]["sha256"], None)
                  for rel in ("model.safetensors", "state.json") if rel in files]
        # config.json ships without the server's paths (the trainer wrote out, cache_dir, data as they
        # were on this machine): checked against the manifest first, then rewritten.
        run_config = json.loads(b"".join(self._verified_chunks(f"{ckpt}/config.json", files["config.json"]))) \
            if "config.json" in files else model.config or {}
        tokenizer = [(f"tokenizer/{rel}", key, size, sha, None)
                     for rel, size, sha, key in self._tokenizer_files(model, ckpt, files)]
        trainer_manifest: dict[str, Any] = {}
        if "manifest.json" in files:
            with self.open(f"{ckpt}/manifest.json") as f:
                trainer_manifest = json.loads(f.read())
        extra = {check_key(name): content for name, content in (extra_files or {}).items()}
        top = archive_dirname(model)
        members = model_members(model, top, stored, tokenizer, run_config, trainer_manifest, extra)

        out = GzipTar(ARCHIVE_CHUNK)
        mtime = int(time.time())
        for name, key, size, sha, inline in members:
            yield from out.header(f"{top}/{name}", size, mtime)
            if inline is not None:
                yield from out.data(inline)
            else:
                for chunk in self._verified_chunks(key, {"size": size, "sha256": sha}, ARCHIVE_CHUNK):
                    yield from out.data(chunk)
            yield from out.end_member(size)
        yield from out.close()

    def _verified_chunks(self, key: str, entry: dict, chunk: int = CHUNK) -> Iterator[bytes]:
        """The stored file ``key`` in pieces; IntegrityError after the last one when its bytes do not
        match the manifest ``entry`` (size, sha256): a reader streaming them on learns it at the end."""
        h = hashlib.sha256()
        n = 0
        with self.open(key) as f:
            while piece := f.read(chunk):
                n += len(piece)
                h.update(piece)
                yield piece
        if n != entry["size"] or h.hexdigest() != entry["sha256"]:
            raise IntegrityError(f"{key}: stored bytes do not match the manifest")

    def _tokenizer_files(self, model: Any, ckpt: str, files: dict) -> list[tuple[str, int, str, str]]:
        tok = check_key(model.tokenizer_key or f"{ckpt}/tokenizer")
        if tok == ckpt:  # the runner's way of saying "this checkpoint has no tokenizer/ directory"
            return []
        if tok.startswith(ckpt + "/"):
            sub = tok[len(ckpt) + 1:] + "/"
            return [(rel[len(sub):], i["size"], i["sha256"], f"{ckpt}/{rel}") for rel, i in sorted(files.items())
                    if rel.startswith(sub)]
        tfiles = self.manifest(tok)["files"]
        return [(rel, i["size"], i["sha256"], f"{tok}/{rel}") for rel, i in sorted(tfiles.items())]


def _manifest(entries: dict[str, dict]) -> dict:
    return {
        "format": MARKER_FORMAT,
        "files": entries,
        "total_bytes": sum(e["size"] for e in entries.values()),
        "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _protocols(fs: Any) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


@contextlib.contextmanager
def _replacing(tmp: str, final: str) -> Iterator[str]:
    """``tmp``, for the block to write; renamed over ``final`` when the block ends, removed when it
    fails: a reader of ``final`` sees the old file or the whole new one, never a part."""
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
