"""Prepare a dataset exactly as a training run will, and print what a plan needs to know about it.

    python -m trainer.facts --data demo --cache-dir ~/.local/share/nanochat-studio/cache/data
    python -m trainer.facts --data corpus.txt --cache-dir cache/ --vocab-size 4096
    python -m trainer.facts --data s3://bucket/prefix --cache-dir cache/ --storage-options-file opts.json

The web app runs this when a dataset is added, so its estimates use the tokenizer's real vocabulary
and the real token counts, not guesses: it calls ``data.prepare_dataset`` with the arguments
``train.py`` passes, into the cache a run reads (entries are keyed by content, not path), so the run
then finds its tokens ready. Prints one ``facts`` event of trainer/progress.py; bad data prints an
``error`` event of kind "user" and exits 65 (EXIT_DATA), like the trainer. No torch is imported.

``--nice`` (default 10) lowers this process's priority: preparing data in the background must not
slow a training run that holds the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from trainer import progress


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def gather(source: str, cache_dir: str | os.PathLike, vocab_size: int | None = None,
           storage_options: dict | None = None) -> dict:
    """Prepare ``source`` into ``cache_dir`` (or find it there) and return the facts event's fields.

    Raises data.DataError for data a run could not use.
    """
    from trainer import data

    started = time.perf_counter()
    prepared = data.prepare_dataset(source, cache_dir, vocab_size=vocab_size, storage_options=storage_options,
                                    log=_log)
    prepare_s = time.perf_counter() - started
    warm_s = prepare_s
    if not prepared.from_cache:
        # What a run pays once the cache holds the tokens: hashing the data and reading the entry.
        started = time.perf_counter()
        data.prepare_dataset(source, cache_dir, vocab_size=vocab_size, storage_options=storage_options, log=_log)
        warm_s = time.perf_counter() - started
    return {"data_sha256": prepared.data_sha256, "raw_bytes": prepared.raw_bytes,
            "vocab_size": prepared.tokenizer.vocab_size, "n_train_tokens": prepared.n_train_tokens,
            "n_val_tokens": prepared.n_val_tokens, "n_bytes": prepared.n_bytes,
            "tokenizer_fingerprint": prepared.tokenizer.fingerprint(), "prepare_s": round(prepare_s, 3),
            "warm_prepare_s": round(warm_s, 3), "from_cache": prepared.from_cache}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.facts", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help='"demo", a text/JSONL/Parquet file or directory, or an fsspec URL')
    p.add_argument("--cache-dir", required=True, help="the prepared-data cache runs use (their --cache-dir)")
    p.add_argument("--vocab-size", type=int, help="the run's --vocab-size, if it sets one")
    p.add_argument("--storage-options-file", help="a JSON file of fsspec options (kept out of argv: secrets)")
    p.add_argument("--nice", type=int, default=10, help="lower the priority by this much (0: leave it)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed why
        return progress.EXIT_USAGE if exc.code else progress.EXIT_OK
    if args.vocab_size is not None and args.vocab_size < 1:
        progress.emit("error", kind="user", code="bad_config", message="--vocab-size must be positive")
        return progress.EXIT_USAGE
    options = None
    if args.storage_options_file:
        try:
            options = json.loads(Path(args.storage_options_file).read_text())
        except (OSError, ValueError) as exc:
            progress.emit("error", kind="user", code="bad_config", message=f"cannot read the storage options: {exc}")
            return progress.EXIT_USAGE
    if args.nice > 0 and hasattr(os, "nice"):
        os.nice(args.nice)
    from trainer.data import DataError

    try:
        fields = gather(args.data, args.cache_dir, args.vocab_size, options)
    except DataError as exc:
        progress.emit("error", kind="user", code=exc.code, message=exc.message)
        return progress.EXIT_DATA
    except ValueError as exc:  # a vocabulary size the tokenizer refuses
        progress.emit("error", kind="user", code="bad_config", message=str(exc))
        return progress.EXIT_USAGE
    progress.emit("facts", **fields)
    return progress.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
