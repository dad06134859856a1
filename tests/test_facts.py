"""trainer/facts.py: a dataset prepared the way a run prepares it, and the cache that run then finds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_estimate import corpus
from trainer import data, facts, progress, sizing

pytestmark = pytest.mark.trainer  # the trainer alone: never opens the store

REPO = Path(__file__).resolve().parents[1]


def run_facts(*args: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "trainer.facts", "--nice", "0", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    events = [e for e in map(progress.parse_line, proc.stdout.splitlines()) if e]
    assert len(events) == 1, (proc.stdout, proc.stderr)
    return proc.returncode, events[0]


def test_the_facts_are_what_a_run_prepares_and_the_run_finds_its_tokens_ready(tmp_path):
    text = corpus(80_000)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "prose.txt").write_bytes(text)
    code, event = run_facts("--data", str(tmp_path / "a" / "prose.txt"), "--cache-dir", str(tmp_path / "cache"))
    assert code == 0 and event["event"] == "facts" and not event["from_cache"]
    assert event["prepare_s"] >= event["warm_prepare_s"] >= 0
    # The run reads its own copy of the same bytes (an upload copied into its run directory): the same
    # cache entry, so the same tokenizer and counts, and no tokenizing.
    copy = tmp_path / "run" / "data" / "other-name.txt"
    copy.parent.mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "prose.txt", copy)
    prepared = data.prepare_dataset(str(copy), tmp_path / "cache", log=lambda m: None)
    assert prepared.from_cache
    assert (prepared.tokenizer.vocab_size, prepared.n_train_tokens, prepared.n_val_tokens) == (
        event["vocab_size"], event["n_train_tokens"], event["n_val_tokens"])
    assert prepared.data_sha256 == event["data_sha256"] and prepared.raw_bytes == event["raw_bytes"] == len(text)
    assert prepared.tokenizer.fingerprint() == event["tokenizer_fingerprint"]


def test_a_vocabulary_request_is_passed_on_as_the_trainer_would(tmp_path):
    path = tmp_path / "prose.txt"
    path.write_bytes(corpus(60_000))
    got = facts.gather(str(path), tmp_path / "cache", vocab_size=300)
    assert sizing.MIN_VOCAB_SIZE <= got["vocab_size"] <= 300
    assert facts.gather(str(path), tmp_path / "cache", vocab_size=300)["from_cache"]


def test_the_same_bytes_read_by_another_reader_are_another_entry(tmp_path):
    lines = b"".join(json.dumps({"text": f"line {i} of the {i % 7} kind"}).encode() + b"\n" for i in range(400))
    (tmp_path / "x.jsonl").write_bytes(lines)
    (tmp_path / "x.txt").write_bytes(lines)
    as_jsonl = data.prepare_dataset(str(tmp_path / "x.jsonl"), tmp_path / "cache", log=lambda m: None)
    as_text = data.prepare_dataset(str(tmp_path / "x.txt"), tmp_path / "cache", log=lambda m: None)
    assert as_jsonl.data_sha256 == as_text.data_sha256 and not as_text.from_cache
    assert as_jsonl.n_train_tokens != as_text.n_train_tokens  # JSON syntax is text only in the .txt


def test_bad_data_is_a_user_error_exiting_65(tmp_path):
    path = tmp_path / "broken.txt"
    path.write_bytes(b"good words \xff bad byte\n" * 10)
    code, event = run_facts("--data", str(path), "--cache-dir", str(tmp_path / "cache"))
    assert code == progress.EXIT_DATA
    assert (event["event"], event["kind"], event["code"]) == ("error", "user", "undecodable")


def test_bad_flags_are_usage_errors(tmp_path):
    code, event = run_facts("--data", "demo", "--cache-dir", str(tmp_path), "--vocab-size", "0")
    assert code == progress.EXIT_USAGE and event["code"] == "bad_config"
    code, event = run_facts("--data", "demo", "--cache-dir", str(tmp_path), "--storage-options-file",
                            str(tmp_path / "missing.json"))
    assert code == progress.EXIT_USAGE and "storage options" in event["message"]


@pytest.mark.slow
def test_the_demos_shipped_facts_are_what_the_trainer_prepares(tmp_path):
    got = facts.gather("demo", tmp_path / "cache")
    assert {k: got[k] for k in sizing.DEMO_FACTS} == sizing.DEMO_FACTS
