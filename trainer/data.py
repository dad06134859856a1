"""Datasets: read text from anywhere, tokenize it once into cached token files, and batch it.

    prepared = prepare_dataset("demo", "cache/")             # or a path, file://, https://, s3://...
    loader = TokenLoader(prepared.train_path, prepared.dtype, batch_size=8, seq_len=256)
    x, y = loader.next_batch()

Bad data is a user error: every problem found raises :class:`DataError` with a short ``code`` and a
message that names the file and the numbers; the trainer reports it as an ``error`` event of kind
"user" and exits with ``progress.EXIT_DATA``.

Reading the files (formats, bounded chunks, content hashes) lives in trainer/sources.py; this module
tokenizes what it reads and re-exports DataError and iter_documents for its callers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from trainer.sizing import VAL_FRACTION

# DataError and iter_documents are part of this module's interface (the trainer and tests import
# them from here); the readers themselves live in sources.py.
from trainer.sources import CHUNK_SIZE, DataError, content_hash, iter_documents  # noqa: F401
from trainer.sources import _format_of, _open_source
from trainer.tokenizer import Tokenizer, choose_vocab_size

TOKENIZER_SAMPLE_BYTES = 64 << 20  # train the tokenizer on at most this much text
CACHE_VERSION = 2  # 2: entries are keyed by content and file formats, not by path


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
    raw_bytes: int = 0  # bytes of the source's files as stored (compressed ones included)


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _source_identity(source: str, storage_options: dict | None) -> str:
    """What, besides the content hash, decides the documents a source yields: the reader of each file
    (by extension). Not the path: the same bytes read the same way share one cache entry wherever
    they lie, so a dataset prepared once (the web app does it when a dataset is added) is found by
    every later run, even one that reads a fresh copy of the file from its own run directory."""
    if source == "demo":
        return source
    _fs, paths = _open_source(source, storage_options)
    kinds = sorted({kind + (".gz" if gz else "") for kind, gz in map(_format_of, paths)})
    return "files:" + ",".join(kinds)


def _hash_source(source: str, storage_options: dict | None, chunk_size: int, cache_dir: Path) -> tuple[str, int]:
    """content_hash, remembered in the cache for the demo: the corpus is a function of the generator's
    code, its size and Python's random module, and hashing means generating all 16 MB of it again
    (seconds, on every run). Files are always hashed: they can change under the same name."""
    if source != "demo":
        return content_hash(source, storage_options, chunk_size)
    from trainer import demo, sources

    key = _digest({"code": hashlib.sha256(Path(demo.__file__).read_bytes()).hexdigest(),
                   "bytes": sources.DEMO_BYTES, "python": list(sys.version_info[:2])})
    memo = cache_dir / f"demo-{key}.json"
    try:
        got = json.loads(memo.read_text())
        return str(got["sha256"]), int(got["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    sha, size = content_hash(source, storage_options, chunk_size)
    tmp = cache_dir / f".demo-{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"sha256": sha, "bytes": size}))
    os.replace(tmp, memo)
    return sha, size


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
                    val_fraction: float = VAL_FRACTION, min_tokens: int = 0, min_tokens_reason: str = "",
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
    data_sha256, raw_bytes = _hash_source(source, storage_options, chunk_size, cache_dir)
    identity = _source_identity(source, storage_options)
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
                        from_cache=from_cache, n_val_bytes=meta["n_val_bytes"], raw_bytes=raw_bytes)


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
