"""Tokenizer benchmark: our BPE (rustbpe training, tiktoken encoding) against Hugging Face `tokenizers`
(a byte-level BPE trained on the same text to the same vocabulary size), in one run.

    OMP_NUM_THREADS=1 python tests/bench/tokenizer_speed.py [--mb 24] [--vocab 8192] [--threads 2]

The text: the demo story corpus plus varied real text found on this machine (the Python standard
library's source and docs: code, prose, numbers, punctuation), so the figures are not only about a
300-word grammar. Prints human lines, then LAST one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import time
from pathlib import Path

from trainer import demo
from trainer.tokenizer import SPECIAL_TOKENS, Tokenizer


def varied_text(n_bytes: int) -> list[str]:
    """Documents from the standard library's .py files (code, docstrings, comments), up to n_bytes."""
    docs, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(text)
        total += len(text.encode())
        if total >= n_bytes:
            break
    return docs


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=24, help="total text, MB (about 2/3 demo stories)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    total = int(args.mb * 1_000_000)
    docs, gen_s = timed(lambda: list(demo.iter_corpus(total * 2 // 3, seed=0)) + varied_text(total // 3))
    n_bytes = sum(len(d.encode()) for d in docs)
    print(f"text: {len(docs):,} documents, {n_bytes / 1e6:.1f} MB (built in {gen_s:.1f}s), "
          f"vocab {args.vocab}, {args.threads} threads, {os.cpu_count()} CPUs")

    ours, ours_train_s = timed(lambda: Tokenizer.train_from_iterator(docs, args.vocab))
    print(f"ours  train (rustbpe):    {ours_train_s:6.1f}s  -> vocab {ours.vocab_size}")

    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf_trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=list(SPECIAL_TOKENS),
                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                     show_progress=False)
    _, hf_train_s = timed(lambda: hf.train_from_iterator(docs, trainer=hf_trainer))
    print(f"HF    train (tokenizers): {hf_train_s:6.1f}s  -> vocab {hf.get_vocab_size()}")

    ours_ids, ours_enc_s = timed(lambda: ours.encode_batch(docs, num_threads=args.threads))
    hf_out, hf_enc_s = timed(lambda: hf.encode_batch(docs, add_special_tokens=False))
    ours_tokens = sum(map(len, ours_ids))
    hf_tokens = sum(len(e.ids) for e in hf_out)
    single = docs[: len(docs) // 10]
    single_bytes = sum(len(d.encode()) for d in single)
    _, ours_one_s = timed(lambda: [ours.encode(d) for d in single])
    _, hf_one_s = timed(lambda: [hf.encode(d, add_special_tokens=False) for d in single])

    assert ours.decode(ours_ids[0]) == docs[0] and ours.decode(ours_ids[-1]) == docs[-1]
    mb = n_bytes / 1e6
    print(f"ours  encode_batch: {mb / ours_enc_s:6.1f} MB/s, {n_bytes / ours_tokens:.2f} bytes/token")
    print(f"HF    encode_batch: {mb / hf_enc_s:6.1f} MB/s, {n_bytes / hf_tokens:.2f} bytes/token")
    print(f"ours  encode (one at a time): {single_bytes / 1e6 / ours_one_s:6.1f} MB/s;"
          f" HF {single_bytes / 1e6 / hf_one_s:6.1f} MB/s")
    print(json.dumps({
        "bench": "tokenize", "text_bytes": n_bytes, "documents": len(docs), "vocab_size": args.vocab,
        "threads": args.threads, "cpus": os.cpu_count(),
        "ours_train_s": round(ours_train_s, 2), "hf_train_s": round(hf_train_s, 2),
        "ours_encode_batch_mb_s": round(mb / ours_enc_s, 2), "hf_encode_batch_mb_s": round(mb / hf_enc_s, 2),
        "ours_encode_mb_s": round(single_bytes / 1e6 / ours_one_s, 2),
        "hf_encode_mb_s": round(single_bytes / 1e6 / hf_one_s, 2),
        "ours_bytes_per_token": round(n_bytes / ours_tokens, 3), "hf_bytes_per_token": round(n_bytes / hf_tokens, 3),
    }))


if __name__ == "__main__":
    main()
