"""Reading datasets: find the files of a source and yield their documents as text.

    for doc in iter_documents("corpus/"):       # "demo", a file, a directory, or an fsspec URL
        ...

Formats by extension: .txt/.md (and anything unknown: plain text, split into documents at blank
lines), .jsonl (one JSON object per line with a "text" field), .parquet (a "text" column; needs
pyarrow), and .gz of the text formats. Reading streams in bounded pieces (``chunk_size`` bytes at a
time): a multi-GB file or one giant line never sits in memory whole. Every problem raises
:class:`DataError`; trainer/data.py tokenizes what this module reads and re-exports both.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import re
import zlib
from typing import IO, Iterator

from trainer import demo, sizing

CHUNK_SIZE = 1 << 20  # bytes read at a time, and the longest piece of text yielded as one document
MAX_JSONL_LINE = 64 << 20  # one JSON record must fit in memory; longer is a malformed dataset
DEMO_BYTES = sizing.DEMO_CORPUS_BYTES  # size of the built-in corpus (the web app's estimates read it too)


class DataError(Exception):
    """The dataset cannot be used. ``code``: empty, binary, undecodable, too_small, not_found,
    bad_format, unsupported."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


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


def content_hash(source: str, storage_options: dict | None, chunk_size: int) -> tuple[str, int]:
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
