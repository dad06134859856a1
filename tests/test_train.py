"""The trainer as the web app runs it: real `python -m trainer.train` subprocesses on the CPU.

Tiny models (depth 1, seq 32, batch 4) so the fast tests take seconds; the demo-quality run is
marked slow. Every run shares one prepared-data cache (tokenizing the demo corpus once).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from trainer import progress, sizing

pytestmark = pytest.mark.trainer  # the trainer alone: never opens the store

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
TINY = ["--depth", "1", "--seq-len", "32", "--batch-size", "4", "--vocab-size", "512", "--device", "cpu",
        "--eval-every", "1000", "--eval-tokens", "512", "--sample-every", "1000", "--seed", "7",
        "--dtype", "float32"]  # the tolerances below are float32's; tests/test_train_bf16.py holds bf16's


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# Another instruction set for every kernel library torch uses (its own, MKL's, oneDNN's): on this
# machine, the code paths a CPU without AVX-512 would take.
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def run_trainer(args, out, cache=None, module=("-m", "trainer.train"), timeout=300, python=sys.executable,
                threads=1, env=None):
    argv = [python, *module, *TINY, "--out", str(out), *(["--cache-dir", str(cache)] if cache else []), *args]
    env = dict(ENV, OMP_NUM_THREADS=str(threads), **(env or {}))
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    return proc.returncode, events_of(proc.stdout), proc.stderr


def events_of(stdout: str) -> list[dict]:
    events = []
    for line in stdout.splitlines():
        event = progress.parse_line(line)
        assert event is not None, f"a stdout line is not a contract event: {line!r}"
        events.append(event)
    return events


def only(events, name):
    return [e for e in events if e["event"] == name]


def steps_losses(events):
    return {e["step"]: e["loss"] for e in only(events, "step")}


def test_a_tiny_run_learns_and_speaks_only_the_contract(tmp_path, cache):
    code, events, err = run_trainer(["--max-steps", "150", "--eval-every", "150", "--seq-len", "64",
                                     "--sample-every", "150", "--checkpoint-every", "100"], tmp_path / "run", cache)
    assert code == 0, err
    names = [e["event"] for e in events]
    assert names[0] == "start" and names[-1] == "done"
    assert {"step", "eval", "checkpoint"} <= set(names)
    start = events[0]
    assert start["world_size"] == 1 and start["resumed_from_step"] is None and start["total_steps"] == 150
    assert start["params"] > 0 and start["flops_per_token"] > 0 and start["device"] == "cpu"
    assert all(e["mfu"] is None for e in only(events, "step"))  # no known peak on a CPU
    done = events[-1]
    assert done["step"] == 150 and Path(done["checkpoint"]).is_dir()
    assert done["final_val_bpb"] == only(events, "eval")[-1]["val_bpb"] > 0

    # The unigram entropy of the training tokens: what a model that ignores context achieves.
    from trainer import data
    prepared = data.prepare_dataset("demo", cache, vocab_size=512)
    import numpy as np
    tokens = np.fromfile(prepared.train_path, dtype=prepared.dtype)
    counts = np.array(list(Counter(tokens.tolist()).values()), dtype=np.float64)
    p = counts / counts.sum()
    unigram = float(-(p * np.log(p)).sum())
    final = done["final_loss"]
    assert final < 0.8 * unigram, (final, unigram)
    assert only(events, "eval")[-1]["val_loss"] < 0.8 * unigram


PLAN = ["--max-steps", "80", "--checkpoint-every", "1000"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache):
    """One uninterrupted run that the stopped-and-resumed runs must reproduce."""
    code, events, err = run_trainer(PLAN, tmp_path_factory.mktemp("straight"), cache)
    assert code == 0, err
    return events


# Resuming is held to bit-identity (1e-6 on losses of ~3-6, below float32's spacing there). That holds
# on any CPU because both runs are on the same one: the same kernels (chosen by instruction set,
# thread count and shape, all equal), the same summation orders, the states restored exactly. Other
# CPUs give other bits, the same in both runs; the two-thread test below checks that on a second
# instruction set too. Comparisons of *different* paths (two processes, micro-batches) get tolerances.
def test_stopping_and_resuming_gives_the_same_losses_as_a_straight_run(tmp_path, cache, straight):
    code, first, err = run_trainer([*PLAN, "--stop-at-step", "40"], tmp_path, cache)
    assert code == 0, err
    assert only(first, "checkpoint")[-1]["step"] == 40 and not only(first, "done")
    code, second, err = run_trainer([*PLAN, "--resume"], tmp_path, cache)
    assert code == 0, err
    assert second[0]["resumed_from_step"] == 40
    a, b = steps_losses(straight), steps_losses(first) | steps_losses(second)
    assert sorted(a) == sorted(b) == list(range(1, 81))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    assert abs(straight[-1]["final_loss"] - second[-1]["final_loss"]) <= 1e-6
    assert straight[-1]["final_val_bpb"] == pytest.approx(second[-1]["final_val_bpb"], abs=1e-6)


@pytest.mark.parametrize("kernels, depth, steps", [(None, 4, 10), (AVX2, 1, 30)], ids=["native-depth4", "avx2"])
def test_resuming_is_exact_on_two_threads_too(tmp_path, cache, kernels, depth, steps):
    # Two threads take other code paths: multi-threaded products, and Muon's matrices orthogonalised
    # side by side on single-threaded workers; from depth 4 (256 wide) Muon's float64 eigenbasis
    # route runs too. Those must be just as repeatable, and so must the AVX2 kernels a CPU without
    # AVX-512 runs.
    plan = ["--max-steps", str(steps), "--checkpoint-every", "1000", "--depth", str(depth)]
    code, straight, err = run_trainer(plan, tmp_path / "straight", cache, threads=2, env=kernels)
    assert code == 0, err
    code, first, err = run_trainer([*plan, "--stop-at-step", str(steps // 2)], tmp_path / "resumed", cache,
                                   threads=2, env=kernels)
    assert code == 0, err
    code, second, err = run_trainer([*plan, "--resume"], tmp_path / "resumed", cache, threads=2, env=kernels)
    assert code == 0, err
    a, b = steps_losses(straight), steps_losses(first) | steps_losses(second)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_sigterm_checkpoints_exits_75_and_resume_finishes_exactly(tmp_path, cache, straight):
    argv = [sys.executable, "-m", "trainer.train", *TINY, "--out", str(tmp_path), "--cache-dir", str(cache), *PLAN]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        event = progress.parse_line(line)
        if event and event["event"] == "step" and event["step"] >= 3:
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == progress.EXIT_PREEMPTED, err
    events = events_of("".join(lines) + rest)
    ckpt = only(events, "checkpoint")
    assert len(ckpt) == 1 and ckpt[0]["step"] < 80 and Path(ckpt[0]["path"]).is_dir()
    assert not only(events, "done")
    stopped_at = ckpt[0]["step"]

    code, resumed, err = run_trainer([*PLAN, "--resume"], tmp_path, cache)
    assert code == 0, err
    assert resumed[0]["resumed_from_step"] == stopped_at and resumed[-1]["step"] == 80
    assert abs(straight[-1]["final_loss"] - resumed[-1]["final_loss"]) <= 1e-6


@pytest.mark.parametrize("content, why", [(b"", "empty"), (bytes(range(256)) * 64, "binary"),
                                          (b"hi there.\n", "too small")])
def test_a_bad_dataset_fails_fast_as_a_user_error(tmp_path, content, why):
    source = tmp_path / "data.txt"
    source.write_bytes(content)
    code, events, err = run_trainer(["--data", str(source), "--max-steps", "5"], tmp_path / "run")
    assert code == progress.EXIT_DATA, (why, err)
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "user", why


def test_a_diverging_run_stops_as_a_user_error(tmp_path, cache):
    code, events, err = run_trainer(["--max-steps", "50", "--matrix-lr", "1e38", "--grad-clip", "0"],
                                    tmp_path, cache)
    assert code == progress.EXIT_DIVERGED, err
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "user" and events[-1]["code"] == "diverged"


def test_bad_config_exits_2_with_an_error_event(tmp_path):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"depth": 2, "colour": "blue"}))
    code, events, _ = run_trainer(["--config", str(job)], tmp_path / "a")
    assert code == progress.EXIT_USAGE
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "user" and "colour" in events[-1]["message"]
    code, events, _ = run_trainer(["--max-steps", "-3"], tmp_path / "b")
    assert code == progress.EXIT_USAGE and "max_steps" in events[-1]["message"]
    job.write_text(json.dumps({"max_steps": "many"}))
    code, events, _ = run_trainer(["--config", str(job)], tmp_path / "c")
    assert code == progress.EXIT_USAGE and "max_steps" in events[-1]["message"]


def test_storage_credentials_never_reach_events_or_checkpoints(tmp_path, cache):
    secret = "AKIA-not-a-real-key"
    code, events, err = run_trainer(["--max-steps", "2", "--storage-options", json.dumps({"secret": secret})],
                                    tmp_path, cache)
    assert code == 0, err
    assert secret not in json.dumps(events)
    for f in (tmp_path / "checkpoints").rglob("*.json"):
        assert secret not in f.read_text()


def test_flags_override_the_config_file_and_web_app_keys_are_accepted(tmp_path):
    from trainer.train import parse_config
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"depth": 3, "max_steps": 9, "data": "demo", "device": "cpu", "job_id": 4,
                               "name": "my run", "seq_len": 64, "batch_size": 2, "seed": 1}))
    cfg = parse_config(["--config", str(job), "--depth", "2", "--resume"])
    assert (cfg.depth, cfg.max_steps, cfg.resume, cfg.job_id) == (2, 9, True, 4)


def test_without_a_length_a_small_corpus_is_read_at_most_four_times(tmp_path, cache):
    # Depth 2 on 2 MB of demo stories: twenty tokens per parameter would read its ~450K tokens ~13 times.
    from trainer import data, demo
    small = demo.write_corpus(tmp_path / "stories.txt", 2_000_000)
    n_train = data.prepare_dataset(str(small), cache, vocab_size=512).n_train_tokens
    tokens_per_step = 4 * 32
    code, events, err = run_trainer(["--depth", "2", "--stop-at-step", "1", "--data", str(small)],
                                    tmp_path / "capped", cache)
    assert code == 0, err
    start = events[0]
    assert start["budget"] == "data"
    assert start["total_steps"] == math.ceil(4 * n_train / tokens_per_step)
    assert f"data-limited: 4 epochs of {n_train:,} tokens" in err
    counted = sizing.scaling_params(sizing.ModelShape(**start["shape"]))  # all but the input embedding
    assert counted == start["params"] - start["shape"]["vocab_size"] * start["shape"]["n_embd"]
    uncapped = math.ceil(20 * counted / tokens_per_step)
    assert start["total_steps"] < uncapped

    code, events, err = run_trainer(["--depth", "2", "--stop-at-step", "1", "--max-epochs", "0", "--data", str(small)],
                                    tmp_path / "uncapped", cache)
    assert code == 0, err
    assert events[0]["budget"] == "tokens_per_param" and events[0]["total_steps"] == uncapped
    assert "data-limited" not in err


def test_the_start_event_names_the_data_and_its_hash(tmp_path, cache):
    from trainer import data
    prepared = data.prepare_dataset("demo", cache, vocab_size=512)
    code, events, err = run_trainer(["--max-steps", "1"], tmp_path, cache)
    assert code == 0, err
    start = events[0]
    assert start["data_source"] == prepared.source == "demo"
    assert start["data_sha256"] == prepared.data_sha256
    assert len(start["data_sha256"]) == 64 and int(start["data_sha256"], 16) >= 0


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, cache):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun is installed with torch"
    args = ["--max-steps", "4"]
    code, single, err = run_trainer(args, tmp_path / "one", cache)
    assert code == 0, err
    code, double, err = run_trainer(args, tmp_path / "two", cache, python=torchrun,
                                    module=("--standalone", "--nproc_per_node=2", "-m", "trainer.train"))
    assert code == 0, err
    assert double[0]["world_size"] == 2
    a, b = steps_losses(single), steps_losses(double)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    # Not bit-identical on any CPU: each process multiplies half the rows (other GEMM blocking) and
    # gloo sums the two halves' gradients, so sums run in another order. Losses near 6 have a float32
    # spacing of ~5e-7; measured at most 2 of those apart over 4 steps (AVX-512 and AVX2 kernels,
    # oneDNN on and off). 1e-5 allows 20, while a rank that read other rows than its half of the
    # batch would be off at step 1 already (a loss over other tokens: ~1e-1 apart).
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])


def test_gradient_accumulation_matches_the_full_batch(tmp_path, cache, straight):
    code, events, err = run_trainer([*PLAN, "--stop-at-step", "5", "--device-batch-size", "1"], tmp_path, cache)
    assert code == 0, err
    assert events[0]["grad_accum_steps"] == 4
    a, b = steps_losses(straight), steps_losses(events)
    # Four one-row passes sum the gradient in another order than one four-row pass: float32 rounding,
    # as for the two gloo processes above (measured at most 2 float32 steps of ~5e-7 apart).
    for step in range(1, 6):
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])


@pytest.mark.slow
def test_the_demo_run_writes_grammatical_stories(tmp_path):
    from trainer import demo
    code, events, err = run_trainer(
        ["--depth", "2", "--seq-len", "256", "--batch-size", "8", "--vocab-size", "1024", "--max-steps", "600", "--eval-tokens", "16384",
         "--eval-every", "300", "--sample-every", "600"], tmp_path / "demo", timeout=900)
    assert code == 0, err
    from trainer import checkpoint, sample
    model, tokenizer, _ = checkpoint.load_model(events[-1]["checkpoint"])
    texts = []
    for seed, prompt in enumerate(["Once upon a time,", "There once was", "One day,", "The next morning,"] * 3):
        texts.append(prompt + "".join(sample.complete(model, tokenizer, prompt, max_tokens=96, temperature=0.7,
                                                      top_k=20, seed=seed)))
    sentences = [s for t in texts for s in demo.split_sentences(t)[:-1]]  # the last one may be cut off
    assert len(sentences) >= 20
    score = sum(demo.check_sentence(s) for s in sentences) / len(sentences)
    assert score >= 0.9, (score, texts[:3])
