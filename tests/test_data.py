"""Datasets: every bad input fails fast with its DataError code, all formats read in bounded pieces,
prepared token files are cached and invalidated by content, and batches are deterministic, resumable
and split across ranks exactly as one process would see them."""

from __future__ import annotations

import gzip
import json
import math
import random

import numpy as np
import pytest
import torch

from trainer import data as data_mod
from trainer import demo
from trainer import sources
from trainer.data import DataError, TokenLoader, bits_per_byte, iter_documents, iter_val_batches, prepare_dataset
from trainer.tokenizer import Tokenizer

from tests.s3server import s3_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.trainer  # the trainer alone: never opens the store

VOCAB = 320  # small: training takes milliseconds


def quiet(_msg: str) -> None:
    pass


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "stories.txt"
    demo.write_corpus(path, n_bytes=60_000, seed=7)
    return path


def prepare(source, cache, **kw):
    kw.setdefault("vocab_size", VOCAB)
    return prepare_dataset(str(source), cache, log=quiet, **kw)


# ---- bad data ------------------------------------------------------------------------------------

BAD = {
    "empty": (b"", "empty"),
    "whitespace": (b"  \n\n\t \r\n   \n", "empty"),
    "random_bytes": (random.Random(0).randbytes(4096), "binary"),
    "png": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + random.Random(1).randbytes(500), "binary"),
    "latin1": (("Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve. " * 50).encode("latin-1"), "undecodable"),
    "truncated_utf8": (("ok text " * 10).encode() + "é".encode()[:1], "undecodable"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_text_file_fails_with_its_code(tmp_path, name):
    content, code = BAD[name]
    path = tmp_path / f"{name}.txt"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        prepare(path, tmp_path / "cache")
    assert err.value.code == code
    assert path.name in str(err.value) or code == "empty"
    assert not [p for p in (tmp_path / "cache").glob("*") if (p / "meta.json").exists()]


def test_an_undecodable_byte_is_reported_with_its_offset(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"fine text\n" * 100 + b"\xff oops")
    with pytest.raises(DataError, match="offset 1,000") as err:
        list(iter_documents(str(path)))
    assert err.value.code == "undecodable"


def test_binary_data_fails_before_the_whole_file_is_read(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(b"\x00\x01\x02" * 3_000_000)
    docs = iter_documents(str(path), chunk_size=4096)
    with pytest.raises(DataError) as err:
        next(docs)
    assert err.value.code == "binary"


def test_a_missing_source_is_not_found(tmp_path):
    with pytest.raises(DataError) as err:
        prepare(tmp_path / "nope.txt", tmp_path / "cache")
    assert err.value.code == "not_found"


def test_too_few_tokens_for_one_batch_names_the_numbers(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("A short story about a fox.\n\nAnd another one.\n")
    with pytest.raises(DataError) as err:
        prepare(path, tmp_path / "cache", min_tokens=4 * 1024 + 1, min_tokens_reason="batch 4 x seq_len 1024 + 1")
    assert err.value.code == "too_small"
    assert "4,097" in str(err.value) and "batch 4 x seq_len 1024 + 1" in str(err.value)
    with pytest.raises(DataError) as err:
        TokenLoader(prepare(path, tmp_path / "cache").train_path, "uint16", batch_size=4, seq_len=1024)
    assert err.value.code == "too_small" and "4,097" in str(err.value)


@pytest.mark.parametrize("lines, code", [
    (['{"text": "fine"}', '{"text": "broken'], "bad_format"),
    (['{"content": "wrong field"}'], "bad_format"),
    (['["not", "an", "object"]'], "bad_format"),
    (['{"text": 42}'], "bad_format"),
])
def test_malformed_jsonl_is_bad_format_with_the_line_number(tmp_path, lines, code):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        list(iter_documents(str(path)))
    assert err.value.code == code and f"line {len(lines)}" in str(err.value)


def test_a_parquet_file_without_a_text_column_is_bad_format(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match='no "text" column') as err:
        list(iter_documents(str(tmp_path / "d.parquet")))
    assert err.value.code == "bad_format"
    (tmp_path / "junk.parquet").write_text("this is not parquet at all")
    with pytest.raises(DataError) as err:
        list(iter_documents(str(tmp_path / "junk.parquet")))
    assert err.value.code == "bad_format"


# ---- formats ---------------------------------------------------------------------------------------

DOCS = ["First doc: café ☕.", "Second doc\nwith two lines.", "Third 日本語 doc 🎉."]


def test_plain_text_is_split_into_documents_at_blank_lines(tmp_path):
    path = tmp_path / "d.md"
    path.write_text("\n\n".join(DOCS) + "\n  \n\n\n", encoding="utf-8")
    assert list(iter_documents(str(path))) == DOCS


def test_jsonl_parquet_and_gzip_read_the_same_documents(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    jsonl = "\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)) + "\n\n"
    (tmp_path / "a.jsonl").write_text(jsonl, encoding="utf-8")
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(jsonl.encode()))
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress("\n\n".join(DOCS).encode()))
    pq.write_table(pa.table({"text": DOCS + [None], "n": [1, 2, 3, 4]}), tmp_path / "d.parquet", row_group_size=2)
    for name in ["a.jsonl", "b.jsonl.gz", "c.txt.gz", "d.parquet"]:
        assert list(iter_documents(str(tmp_path / name))) == DOCS, name
    # a directory reads its files in name order
    assert list(iter_documents(str(tmp_path))) == DOCS * 4
    assert list(iter_documents(f"file://{tmp_path}/a.jsonl")) == DOCS


def test_a_huge_single_line_streams_in_bounded_pieces(tmp_path):
    words = " ".join(f"w{i}" for i in range(60_000))  # ~400 KB, one line
    path = tmp_path / "one_line.txt"
    path.write_text(words)
    pieces = list(iter_documents(str(path), chunk_size=4096))
    assert "".join(pieces) == words
    assert len(pieces) > 50 and max(len(p) for p in pieces) <= 4096
    assert all(p.endswith(" ") for p in pieces[:-1])  # cut between words, not through them


def test_a_huge_line_without_spaces_is_still_bounded(tmp_path):
    text = "ab" * 100_000 + "é" * 5000
    path = tmp_path / "blob.txt"
    path.write_text(text)
    pieces = list(iter_documents(str(path), chunk_size=1000))
    assert "".join(pieces) == text and max(len(p) for p in pieces) <= 1000


def test_reads_are_bounded_by_the_chunk_size(tmp_path, monkeypatch):
    path = tmp_path / "one_line.txt"
    path.write_text("x " * 200_000)
    sizes = []
    original = sources._read_chunks

    def spy(f, name, chunk_size):
        real_read = f.read
        f.read = lambda n=-1: (sizes.append(n), real_read(n))[1]
        return original(f, name, chunk_size)

    monkeypatch.setattr(sources, "_read_chunks", spy)
    assert sum(len(p) for p in iter_documents(str(path), chunk_size=2048)) == 400_000
    assert sizes and all(0 < n <= 2048 for n in sizes)


# ---- prepare and the cache ---------------------------------------------------------------------------

def test_prepare_writes_token_files_with_a_validation_split(corpus, tmp_path):
    p = prepare(corpus, tmp_path / "cache", val_fraction=0.1)
    train = np.memmap(p.train_path, dtype=p.dtype, mode="r")
    val = np.memmap(p.val_path, dtype=p.dtype, mode="r")
    assert p.dtype == "uint16" and len(train) == p.n_train_tokens and len(val) == p.n_val_tokens
    assert 0.05 < p.n_val_tokens / (p.n_train_tokens + p.n_val_tokens) < 0.2
    assert train[0] == p.tokenizer.bos_id and val[0] == p.tokenizer.bos_id
    text = p.tokenizer.decode(train.tolist() + val.tolist())
    stories = corpus.read_text().split("\n\n")
    assert sorted(text.split("<|bos|>")[1:]) == sorted(s for s in stories if s)
    assert p.n_bytes == sum(len(s.encode()) for s in stories)
    assert Tokenizer.load(p.tokenizer_dir).fingerprint() == p.tokenizer.fingerprint()
    meta = json.loads((p.train_path.parent / "meta.json").read_text())
    assert meta["data_sha256"] == p.data_sha256 and meta["complete"] is True


def test_a_single_document_still_gets_a_validation_split(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text(" ".join(demo.generate_stories(seed=1, n=40)))
    p = prepare(path, tmp_path / "cache", val_fraction=0.1)
    assert p.n_val_tokens > 0 and abs(p.n_val_tokens / (p.n_train_tokens + p.n_val_tokens) - 0.1) < 0.01


def test_the_same_data_and_tokenizer_reuse_the_cache(corpus, tmp_path, monkeypatch):
    first = prepare(corpus, tmp_path / "cache")
    mtime = first.train_path.stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(Tokenizer, "encode_batch", lambda *a, **k: calls.append(1) or [])
    second = prepare(corpus, tmp_path / "cache")
    assert second.from_cache and not first.from_cache and calls == []
    assert second.train_path == first.train_path and second.train_path.stat().st_mtime_ns == mtime
    assert second.tokenizer.fingerprint() == first.tokenizer.fingerprint()


def test_changed_data_or_another_tokenizer_invalidates_the_cache(corpus, tmp_path):
    first = prepare(corpus, tmp_path / "cache")
    with corpus.open("a") as f:
        f.write("\n\nOne more story about Tom.\n")
    changed = prepare(corpus, tmp_path / "cache")
    assert not changed.from_cache and changed.data_sha256 != first.data_sha256
    assert changed.n_train_tokens + changed.n_val_tokens > first.n_train_tokens + first.n_val_tokens
    other_tok = Tokenizer.train_from_iterator(["something else entirely"] * 10, vocab_size=300)
    retok = prepare(corpus, tmp_path / "cache", tokenizer=other_tok)
    assert not retok.from_cache and retok.tokenizer.fingerprint() == other_tok.fingerprint()


def test_a_saved_tokenizer_dir_is_reused_by_later_prepares(corpus, tmp_path):
    first = prepare(corpus, tmp_path / "cache", tokenizer_dir=tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").exists() and first.tokenizer_dir == tmp_path / "tok"
    second = prepare(corpus, tmp_path / "cache", tokenizer_dir=tmp_path / "tok", vocab_size=None)
    assert second.from_cache and second.tokenizer.fingerprint() == first.tokenizer.fingerprint()


def test_a_prepare_killed_before_publishing_leaves_nothing_that_looks_valid(corpus, tmp_path, monkeypatch):
    original = data_mod._tokenize_into

    def dies_after_writing(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt  # stands in for SIGKILL between the token files and meta.json

    monkeypatch.setattr(data_mod, "_tokenize_into", dies_after_writing)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*/train.bin"))
    monkeypatch.setattr(data_mod, "_tokenize_into", original)
    p = prepare(corpus, tmp_path / "cache")
    # a half-written entry under the final name (an older, non-atomic writer) is not trusted either
    meta = p.train_path.parent / "meta.json"
    meta.write_text(meta.read_text().replace('"complete": true', '"complete": false'))
    again = prepare(corpus, tmp_path / "cache")
    assert not again.from_cache and again.n_train_tokens == p.n_train_tokens


def test_the_demo_source_needs_no_files(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DEMO_BYTES", 30_000)
    p = prepare("demo", tmp_path / "cache")
    text = p.tokenizer.decode(np.memmap(p.train_path, dtype=p.dtype, mode="r")[:2000].tolist())
    assert demo.coherence(text.replace("<|bos|>", " ")) == 1.0


# ---- loading batches ---------------------------------------------------------------------------------

@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(10_007, dtype=np.uint16).tofile(path)
    return path


def test_batches_are_shifted_windows_that_wrap_deterministically(token_file):
    loader = TokenLoader(token_file, "uint16", batch_size=4, seq_len=100)
    x, y = loader.next_batch()
    assert x.dtype == torch.int64 and x.shape == (4, 100)
    assert torch.equal(x.flatten(), torch.arange(400)) and torch.equal(y.flatten(), torch.arange(1, 401))
    batches = [loader.next_batch()[0] for _ in range(30)]
    # 10,007 tokens hold 25 windows of 401; the 26th batch starts again at 0
    assert batches[23][0, 0] == 24 * 400 and batches[24][0, 0] == 0
    again = TokenLoader(token_file, "uint16", batch_size=4, seq_len=100)
    assert all(torch.equal(again.next_batch()[0], b) for b in [x] + batches)


def test_resuming_from_state_gives_identical_batches(token_file):
    loader = TokenLoader(token_file, "uint16", batch_size=2, seq_len=333)
    for _ in range(7):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state()))
    expected = [loader.next_batch() for _ in range(20)]
    resumed = TokenLoader(token_file, "uint16", batch_size=2, seq_len=333)
    resumed.load_state(state)
    for x, y in expected:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)


def test_ranks_together_see_exactly_the_single_process_batch(token_file):
    single = TokenLoader(token_file, "uint16", batch_size=8, seq_len=64)
    ranks = [TokenLoader(token_file, "uint16", batch_size=8, seq_len=64, rank=r, world_size=4) for r in range(4)]
    for _ in range(40):
        x, y = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert all(px.shape == (2, 64) for px, _ in parts)
        assert torch.equal(torch.cat([px for px, _ in parts]), x)
        assert torch.equal(torch.cat([py for _, py in parts]), y)
    with pytest.raises(ValueError, match="divisible"):
        TokenLoader(token_file, "uint16", batch_size=6, seq_len=64, world_size=4)


def test_validation_batches_are_fixed_and_split_by_rank(token_file):
    full = list(iter_val_batches(token_file, "uint16", batch_size=4, seq_len=1000, max_batches=10))
    assert [x.shape[0] for x, _ in full] == [4, 4, 2]  # 10,007 tokens hold 10 rows of 1,000
    assert torch.equal(torch.cat([x for x, _ in full]).flatten(), torch.arange(10_000))
    assert len(list(iter_val_batches(token_file, "uint16", 4, 1000, max_batches=1))) == 1
    by_rank = [list(iter_val_batches(token_file, "uint16", 4, 1000, 10, rank=r, world_size=2)) for r in range(2)]
    for i, (x, y) in enumerate(full):
        assert torch.equal(torch.cat([by_rank[0][i][0], by_rank[1][i][0]]), x)
        assert torch.equal(torch.cat([by_rank[0][i][1], by_rank[1][i][1]]), y)
    assert list(iter_val_batches(token_file, "uint16", 4, 20_000, 10)) == []


def test_bits_per_byte_of_a_uniform_byte_model_is_eight(tmp_path):
    tok = Tokenizer.train_from_iterator(["abc abc"], vocab_size=300)
    lengths = torch.tensor(tok.token_byte_lengths())
    targets = torch.tensor(tok.encode("hello there, café"))
    # a model uniform over 256 byte values pays ln(256) nats per byte
    loss = float((lengths[targets] * math.log(256)).sum())
    assert bits_per_byte(loss, int(lengths[targets].sum())) == pytest.approx(8.0)
    assert math.isnan(bits_per_byte(1.0, 0))


# ---- object storage ------------------------------------------------------------------------------------

@pytest.fixture
def s3(s3_server):
    """fsspec options for the session's loopback S3 server (tests/s3server.py)."""
    pytest.importorskip("s3fs")
    return s3_server.options


def test_an_s3_dataset_prepares_like_a_local_one(s3, corpus, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    fs.mkdir("datasets")
    fs.pipe("datasets/stories/part-0.txt", corpus.read_bytes())
    fs.pipe("datasets/stories/part-1.jsonl.gz", gzip.compress(b'{"text": "Mia found a kite."}\n'))
    docs = list(iter_documents("s3://datasets/stories", storage_options=s3))
    assert docs[-1] == "Mia found a kite." and docs[:-1] == [s for s in corpus.read_text().split("\n\n") if s]
    remote = prepare("s3://datasets/stories/part-0.txt", tmp_path / "cache", storage_options=s3)
    local = prepare(corpus, tmp_path / "cache2")
    assert remote.data_sha256 == local.data_sha256 and remote.n_train_tokens == local.n_train_tokens
    with pytest.raises(DataError) as err:
        list(iter_documents("s3://datasets/missing.txt", storage_options=s3))
    assert err.value.code == "not_found"
