"""Datasets: read text from anywhere, tokenize it once into cached token files, and batch it.

    prepared = prepare_dataset("demo", "cache/")             # or a path, file://, https://, s3://...
    loader = TokenLoader(prepared.train_path, prepared.dtype, batch_size=8, seq_len=256)
    x, y = loader.next_batch()

Bad data is a user error: every problem found raises :class:`DataError` with a short ``code`` and a
message that names the file and the numbers; the trainer reports it as an ``error`` event of kind
"user" and exits with ``progress.EXIT_DATA``.

Reading streams in bounded pieces (``chunk_size`` bytes at a time): a multi-GB file or one giant line
never sits in memory whole. Formats by extension: .txt/.md (and anything unknown: plain text, split
into documents at blank lines), .jsonl (one JSON object per line with a "text" field), .parquet (a
"text" column; needs pyarrow), and .gz of the text formats.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator

import numpy as np

from trainer import demo
from trainer import sizing
from trainer.tokenizer import Tokenizer, choose_vocab_size

CHUNK_SIZE = 1 << 20  # bytes read at a time, and the longest piece of text yielded as one document
MAX_JSONL_LINE = 64 << 20  # one JSON record must fit in memory; longer is a malformed dataset
DEMO_BYTES = sizing.DEMO_CORPUS_BYTES  # size of the built-in corpus (the web app's estimates read it too)
TOKENIZER_SAMPLE_BYTES = 64 << 20  # train the tokenizer on at most this much text
CACHE_VERSION = 1


class DataError(Exception):
    """The dataset cannot be used. ``code``: empty, binary, undecodable, too_small, not_found,
    bad_format, unsupported."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- finding and reading files ------------------------------------------------------------------

def _open_source(source: str, storage_options: dict | None):
    """(filesystem, [paths]) for a local path or fsspec URL; DataError("not_found") if nothing is there."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(source, **(storage_options or {}))
    except (ValueError, ImportError) as exc:
        raise DataError("not_found", f"cannot open {source!r}: {exc}") from None
    try:
        if not fs.exists(root):
            raise DataError("not_found", f"{source} does not exist")
        if fs.isdir(root):
            paths = sorted(p for p in fs.find(root) if not any(part.startswith(".")
                                                              for part in p[len(root):].split("/")))
            if not paths:
                raise DataError("empty", f"{source} is a directory with no files in it")
            return fs, paths
    except (PermissionError, FileNotFoundError, OSError) as exc:
        raise DataError("not_found", f"cannot read {source}: {exc}") from None
    return fs, [root]


def _format_of(path: str) -> tuple[str, bool]:
    name = path.rsplit("/", 1)[-1].lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    if name.endswith(".jsonl") or name.endswith(".ndjson"):
        return "jsonl", gz
    if name.endswith(".parquet"):
        return "parquet", gz
    return "text", gz  # .txt, .md, or no/unknown extension: binary detection catches non-text


_CONTROL_BYTES = bytes(b for b in range(32) if b not in (9, 10, 12, 13)) + b"\x7f"


def _looks_binary(chunk: bytes) -> bool:
    # NUL never occurs in text; nor do many other control bytes (tab, newlines, form feed excepted)
    if b"\x00" in chunk:
        return True
    sample = chunk[:8192]
    controls = len(sample) - len(sample.translate(None, _CONTROL_BYTES))
    return bool(sample) and controls / len(sample) > 0.05


def _read_chunks(f: IO[bytes], name: str, chunk_size: int) -> Iterator[str]:
    """Decoded text, at most ``chunk_size`` bytes per read; DataError on binary or bad UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")("strict")
    offset = 0
    while True:
        raw = f.read(chunk_size)
        if not raw:
            break
        if _looks_binary(raw):
            raise DataError("binary", f"{name} looks like binary data, not text (control or NUL bytes "
                                      f"near byte {offset:,}); upload UTF-8 text, JSONL or Parquet")
        try:
            text = decoder.decode(raw)
        except UnicodeDecodeError as exc:
            raise DataError("undecodable", f"{name} is not valid UTF-8 (bad byte at offset "
                                           f"{offset + exc.start:,}); re-save it as UTF-8") from None
        offset += len(raw)
        if text:
            yield text
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError("undecodable", f"{name} ends in the middle of a UTF-8 character") from None


_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def _text_documents(f: IO[bytes], name: str, chunk_size: int) -> Iterator[str]:
    # Documents end at blank lines. A paragraph longer than chunk_size is cut (at its last whitespace
    # when there is one) and handed on in pieces, so memory stays bounded by about 2 x chunk_size.
    buf = ""
    for text in _read_chunks(f, name, chunk_size):
        buf += text
        parts = _BLANK_LINE.split(buf)
        buf = parts.pop()
        yield from parts
        while len(buf) > chunk_size:
            cut = max(buf.rfind(" ", 0, chunk_size), buf.rfind("\n", 0, chunk_size)) + 1
            if cut <= chunk_size // 2:
                cut = chunk_size
            yield buf[:cut]
            buf = buf[cut:]
    yield buf


def _jsonl_documents(f: IO[bytes], name: str, chunk_size: int) -> Iterator[str]:
    for lineno, line in enumerate(iter(lambda: f.readline(MAX_JSONL_LINE + 1), b""), start=1):
        if len(line) > MAX_JSONL_LINE:
            raise DataError("bad_format", f"{name} line {lineno} is longer than {MAX_JSONL_LINE:,} bytes")
        if lineno == 1 and _looks_binary(line[:chunk_size]) or b"\x00" in line:
            raise DataError("binary", f"{name} looks like binary data, not JSON lines (line {lineno})")
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8-sig" if lineno == 1 else "utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError("undecodable", f"{name} line {lineno} is not valid UTF-8 "
                                           f"(bad byte at column {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise DataError("bad_format", f"{name} line {lineno} is not valid JSON: {exc.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError("bad_format", f"{name} line {lineno} has no string \"text\" field "
                                          "(each line must be an object like {\"text\": \"...\"})")
        yield record["text"]


def _parquet_documents(f: IO[bytes], name: str, chunk_size: int) -> Iterator[str]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("unsupported", "reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(f)
    except (pyarrow.ArrowException, OSError) as exc:
        raise DataError("bad_format", f"{name} is not a valid Parquet file: {exc}") from None
    if "text" not in pf.schema_arrow.names:
        raise DataError("bad_format", f"{name} has no \"text\" column (columns: "
                                      f"{', '.join(pf.schema_arrow.names)})")
    # row groups are the unit pyarrow reads; batches keep even a big row group's text bounded
    for batch in pf.iter_batches(batch_size=max(1, chunk_size // 4096), columns=["text"]):
        column = batch.column(0)
        if not (pyarrow.types.is_string(column.type) or pyarrow.types.is_large_string(column.type)):
            raise DataError("bad_format", f"{name}: the \"text\" column holds {column.type}, not strings")
        for value in column.to_pylist():
            if value is not None:
                yield value


_READERS = {"text": _text_documents, "jsonl": _jsonl_documents, "parquet": _parquet_documents}


def iter_documents(source: str, *, storage_options: dict | None = None,
                   chunk_size: int = CHUNK_SIZE) -> Iterator[str]:
    """Yield the non-blank documents of ``source``: "demo", a local file or directory, or an fsspec URL.

    Raises DataError: not_found, empty (nothing but whitespace), binary, undecodable, bad_format,
    unsupported. Errors surface while iterating, at the first bad piece.
    """
    if source == "demo":
        yield from demo.iter_corpus(DEMO_BYTES, seed=0)
        return
    fs, paths = _open_source(source, storage_options)
    found = False
    for path in paths:
        kind, gz = _format_of(path)
        name = path.rsplit("/", 1)[-1]
        if kind == "parquet" and gz:
            raise DataError("unsupported", f"{name}: Parquet is already compressed inside; "
                                           "upload the .parquet file without .gz")
        with fs.open(path, "rb") as raw:
            f = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
            try:
                for doc in _READERS[kind](f, name, chunk_size):
                    if doc.strip():
                        found = True
                        yield doc
            except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
                raise DataError("bad_format", f"{name} is not a valid gzip file: {exc}") from None
    if not found:
        raise DataError("empty", f"{source} has no text in it (empty, or only whitespace)")


def _content_hash(source: str, storage_options: dict | None, chunk_size: int) -> tuple[str, int]:
    """sha256 over the raw bytes of every file (names included) and their total size."""
    h = hashlib.sha256()
    if source == "demo":
        h.update(f"demo:{DEMO_BYTES}:{demo.__name__}".encode())
        total = 0
        for doc in demo.iter_corpus(DEMO_BYTES, seed=0):
            data = doc.encode()
            h.update(data)
            total += len(data)
        return h.hexdigest(), total
    fs, paths = _open_source(source, storage_options)
    total = 0
    for path in paths:
        if len(paths) > 1:  # in a directory, which bytes live in which file is part of the content
            h.update(path.rsplit("/", 1)[-1].encode() + b"\0")
        with fs.open(path, "rb") as f:
            for block in iter(lambda: f.read(chunk_size), b""):
                h.update(block)
                total += len(block)
    if total == 0:
        raise DataError("empty", f"{source} is empty (0 bytes)")
    return h.hexdigest(), total


# ---- preparing: tokenize once into cached token files -------------------------------------------

@dataclass
class PreparedData:
    train_path: Path
    val_path: Path
    tokenizer: Tokenizer
    tokenizer_dir: Path
    n_train_tokens: int
    n_val_tokens: int
    dtype: str  # "uint16" or "uint32", for np.memmap
    data_sha256: str
    n_bytes: int  # UTF-8 bytes of the text that was tokenized
    source: str
    from_cache: bool = False
    n_val_bytes: int = 0


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _source_identity(source: str) -> str:
    if source == "demo" or "://" in source:
        return source
    return str(Path(source).resolve())


def _digest(doc: dict) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def _read_meta(entry: Path) -> dict | None:
    # An entry counts only when meta.json says complete and the token files have the promised sizes;
    # meta.json is written last, inside a temp dir renamed into place, so a killed prepare never passes.
    try:
        meta = json.loads((entry / "meta.json").read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        if (meta.get("complete") is True
                and (entry / "train.bin").stat().st_size == meta["n_train_tokens"] * itemsize
                and (entry / "val.bin").stat().st_size == meta["n_val_tokens"] * itemsize):
            return meta
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _tokenize_into(docs: Iterator[str], tok: Tokenizer, out: Path, dtype: str, val_fraction: float,
                   log: Callable[[str], None]) -> dict:
    """Write train.bin / val.bin under ``out``: bos + tokens per document. Document i goes to
    validation when (i+1)*val_fraction crosses an integer, which spreads validation through the data."""
    n = {"train_tokens": 0, "val_tokens": 0, "train_bytes": 0, "val_bytes": 0, "documents": 0}
    started = last_log = time.monotonic()

    def flush(batch: list[str]) -> None:
        parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        for doc, ids in zip(batch, tok.encode_batch(batch, num_threads=os.cpu_count() or 1)):
            i = n["documents"]
            split = "val" if math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction) else "train"
            parts[split].append(np.array([tok.bos_id] + ids, dtype=dtype))
            n[f"{split}_bytes"] += len(doc.encode())
            n["documents"] += 1
        for split, f in (("train", ftrain), ("val", fval)):
            if parts[split]:
                arr = np.concatenate(parts[split])
                arr.tofile(f)
                n[f"{split}_tokens"] += len(arr)

    with open(out / "train.bin", "wb") as ftrain, open(out / "val.bin", "wb") as fval:
        batch: list[str] = []
        size = 0
        for doc in docs:
            batch.append(doc)
            size += len(doc)
            if size >= 4 << 20:  # ~4M characters per encode_batch call: threads stay busy, memory bounded
                flush(batch)
                batch, size = [], 0
                if time.monotonic() - last_log > 10:
                    last_log = time.monotonic()
                    log(f"tokenized {n['documents']:,} documents, {n['train_tokens'] + n['val_tokens']:,}"
                        f" tokens ({last_log - started:.0f}s)")
        flush(batch)
    if val_fraction > 0 and n["val_tokens"] == 0 and n["train_tokens"] > 1:
        # Too few documents to hold one out (one long text): move the tail of the token stream instead.
        n_val = max(1, int(n["train_tokens"] * val_fraction))
        train = np.memmap(out / "train.bin", dtype=dtype, mode="r")
        np.asarray(train[-n_val:]).tofile(out / "val.bin")
        del train
        os.truncate(out / "train.bin", (n["train_tokens"] - n_val) * np.dtype(dtype).itemsize)
        moved = n["train_bytes"] * n_val // n["train_tokens"]  # an estimate: bytes are not per token
        n.update(train_tokens=n["train_tokens"] - n_val, val_tokens=n_val,
                 train_bytes=n["train_bytes"] - moved, val_bytes=moved)
    return {f"n_{k}": v for k, v in n.items()}


def prepare_dataset(source: str, cache_dir: str | os.PathLike, *, tokenizer: Tokenizer | None = None,
                    tokenizer_dir: str | os.PathLike | None = None, vocab_size: int | None = None,
                    val_fraction: float = 0.05, min_tokens: int = 0, min_tokens_reason: str = "",
                    storage_options: dict | None = None, chunk_size: int = CHUNK_SIZE,
                    tokenizer_sample_bytes: int = TOKENIZER_SAMPLE_BYTES,
                    log: Callable[[str], None] = _log_stderr) -> PreparedData:
    """Validate ``source``, get a tokenizer, and tokenize once into ``cache_dir``; reuse the cache when
    the same data (by content hash) comes with the same tokenizer.

    The tokenizer is ``tokenizer`` if given, else the one saved in ``tokenizer_dir``, else one trained
    here on up to ``tokenizer_sample_bytes`` of text (``vocab_size`` or :func:`choose_vocab_size`) and
    saved into ``tokenizer_dir`` (or the cache entry). Raises DataError (see :func:`iter_documents`),
    and DataError("too_small") when there are fewer than ``min_tokens`` training tokens.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError("val_fraction must be in [0, 1)")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    data_sha256, raw_bytes = _content_hash(source, storage_options, chunk_size)
    identity = _source_identity(source)
    if tokenizer is None and tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").exists():
        tokenizer = Tokenizer.load(tokenizer_dir)
    if tokenizer is None:
        # A tokenizer trained on this data is cached too, under what it was trained from.
        wanted = vocab_size or choose_vocab_size(raw_bytes)
        train_key = _digest({"v": CACHE_VERSION, "source": identity, "sha": data_sha256,
                             "vocab": wanted, "sample": tokenizer_sample_bytes})
        trained_dir = cache_dir / "tokenizers" / train_key
        if (trained_dir / "tokenizer.json").exists():
            tokenizer = Tokenizer.load(trained_dir)
        else:
            tokenizer = _train_tokenizer(source, storage_options, chunk_size, wanted,
                                         tokenizer_sample_bytes, log)
            tokenizer.save(trained_dir)
        tok_dir = trained_dir
    else:
        tok_dir = None
    if tokenizer_dir is not None:
        if not (Path(tokenizer_dir) / "tokenizer.json").exists():
            tokenizer.save(tokenizer_dir)
        tok_dir = Path(tokenizer_dir)

    key = _digest({"v": CACHE_VERSION, "source": identity, "sha": data_sha256,
                   "tok": tokenizer.fingerprint(), "val": val_fraction})
    entry = cache_dir / key
    if tok_dir is None:
        tok_dir = entry / "tokenizer"
    meta = _read_meta(entry)
    from_cache = meta is not None
    if meta is None:
        log(f"preparing {source} ({raw_bytes:,} bytes) into {entry}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir))
        try:
            tokenizer.save(tmp / "tokenizer")
            dtype = token_dtype(tokenizer.vocab_size)
            counts = _tokenize_into(iter_documents(source, storage_options=storage_options,
                                                   chunk_size=chunk_size),
                                    tokenizer, tmp, dtype, val_fraction, log)
            meta = {"version": CACHE_VERSION, "source": source, "data_sha256": data_sha256,
                    "raw_bytes": raw_bytes, "tokenizer_fingerprint": tokenizer.fingerprint(),
                    "vocab_size": tokenizer.vocab_size, "dtype": dtype, "val_fraction": val_fraction,
                    "n_bytes": counts["n_train_bytes"] + counts["n_val_bytes"], **counts,
                    "complete": True}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            if _read_meta(entry) is None:  # a stale or half entry under this key from an older run
                shutil.rmtree(entry, ignore_errors=True)
            try:
                os.rename(tmp, entry)
            except OSError:  # another prepare published the same entry first: use theirs
                meta = _read_meta(entry)
                if meta is None:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"prepared {meta['n_train_tokens']:,} train + {meta['n_val_tokens']:,} val tokens")
    if meta["n_train_tokens"] < min_tokens:
        why = f" ({min_tokens_reason})" if min_tokens_reason else ""
        raise DataError("too_small", f"dataset has {meta['n_train_tokens']:,} training tokens, but one "
                                     f"training batch needs {min_tokens:,}{why}; add data or use a "
                                     "smaller batch size or sequence length")
    return PreparedData(train_path=entry / "train.bin", val_path=entry / "val.bin", tokenizer=tokenizer,
                        tokenizer_dir=tok_dir, n_train_tokens=meta["n_train_tokens"],
                        n_val_tokens=meta["n_val_tokens"], dtype=meta["dtype"],
                        data_sha256=data_sha256, n_bytes=meta["n_bytes"], source=source,
                        from_cache=from_cache, n_val_bytes=meta["n_val_bytes"])


def _train_tokenizer(source, storage_options, chunk_size, vocab_size, sample_bytes, log) -> Tokenizer:
    def sample() -> Iterator[str]:
        seen = 0
        for doc in iter_documents(source, storage_options=storage_options, chunk_size=chunk_size):
            yield doc
            seen += len(doc.encode())
            if seen >= sample_bytes:
                return

    started = time.monotonic()
    tok = Tokenizer.train_from_iterator(sample(), vocab_size)
    log(f"trained a {tok.vocab_size:,}-token tokenizer in {time.monotonic() - started:.1f}s")
    return tok


# ---- batching -----------------------------------------------------------------------------------

class TokenLoader:
    """Batches of (x, y) from a token file, deterministic and resumable.

    ``batch_size`` is the global batch. Each step takes the window of batch_size*seq_len+1 tokens at
    ``position``, wrapping to 0 when the window would run past the end; rank r of world_size gets rows
    [r*B/W, (r+1)*B/W) of it, so W ranks together see exactly what one process sees.
    """

    def __init__(self, path, dtype: str, batch_size: int, seq_len: int, *, rank: int = 0,
                 world_size: int = 1, position: int = 0):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.data = np.memmap(path, dtype=dtype, mode="r")
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.window = batch_size * seq_len + 1
        if len(self.data) < self.window:
            raise DataError("too_small", f"dataset has {len(self.data):,} tokens, but one training batch "
                                         f"needs {self.window:,} (batch {batch_size} x seq_len {seq_len} + 1)")
        self.position = position

    def next_batch(self, device="cpu"):
        import torch

        if self.position + self.window > len(self.data):
            self.position = 0
        rows = self.batch_size // self.world_size
        start = self.position + self.rank * rows * self.seq_len
        chunk = torch.from_numpy(self.data[start:start + rows * self.seq_len + 1].astype(np.int64))
        self.position += self.batch_size * self.seq_len
        x = chunk[:-1].view(rows, self.seq_len)
        y = chunk[1:].view(rows, self.seq_len)
        if torch.device(device).type == "cuda":  # pinned host memory lets the copy overlap compute
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def state(self) -> dict:
        return {"position": self.position, "n_tokens": len(self.data)}

    def load_state(self, state: dict) -> None:
        self.position = int(state["position"])


def iter_val_batches(path, dtype: str, batch_size: int, seq_len: int, max_batches: int,
                     rank: int = 0, world_size: int = 1, device="cpu"):
    """Consecutive (x, y) batches from the start of ``path``, the same every call, no wrap. The last
    batch may have fewer rows (a multiple of world_size) when the file runs out; a file shorter than
    seq_len*world_size+1 tokens yields nothing."""
    import torch

    data = np.memmap(path, dtype=dtype, mode="r")
    position = 0
    for _ in range(max_batches):
        rows_left = (len(data) - position - 1) // seq_len
        rows = min(batch_size, rows_left - rows_left % world_size)
        if rows <= 0:
            return
        per_rank = rows // world_size
        start = position + rank * per_rank * seq_len
        chunk = torch.from_numpy(data[start:start + per_rank * seq_len + 1].astype(np.int64))
        position += rows * seq_len
        yield (chunk[:-1].view(per_rank, seq_len).to(device), chunk[1:].view(per_rank, seq_len).to(device))


def bits_per_byte(total_loss_nats: float, total_bytes: int) -> float:
    """Sum of per-token losses (nats) over the bytes those target tokens stand for, in bits per byte.
    Sum ``tokenizer.token_byte_lengths()[y]`` over the targets for ``total_bytes``; exclude special
    tokens (0 bytes) from both sums."""
    if total_bytes <= 0:
        return float("nan")
    return total_loss_nats / (math.log(2) * total_bytes)
