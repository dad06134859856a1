"""The trainer with --dtype: the start event says the dtype, bf16 runs train and resume within bf16's tolerance.

Real ``python -m trainer.train`` subprocesses on the CPU, as tests/test_train.py (whose helpers and
tiny shape these share; its own runs pin float32). Runs with ``--dtype bfloat16`` run bf16 products
whatever the CPU: on one without bf16 units they are slow, not wrong.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from test_train import only, run_trainer, steps_losses
from trainer import precision

pytestmark = pytest.mark.trainer  # the trainer alone: never opens the store

BF16_EPS = 2.0 ** -8  # the spacing of bf16 numbers in [1, 2): 8 significant bits


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_the_start_event_and_the_checkpoint_name_the_dtype(tmp_path, cache):
    for dtype in ("float32", "bfloat16"):
        code, events, err = run_trainer(["--max-steps", "2", "--dtype", dtype], tmp_path / dtype, cache)
        assert code == 0, err
        start = events[0]
        assert start["event"] == "start" and start["dtype"] == dtype and start["config"]["dtype"] == dtype
        saved = json.loads((Path(events[-1]["checkpoint"]) / "config.json").read_text())
        assert saved["train"]["dtype"] == dtype  # what a resumed auto run keeps
    code, events, err = run_trainer(["--max-steps", "1", "--dtype", "auto"], tmp_path / "auto", cache)
    assert code == 0, err
    assert events[0]["dtype"] in ("float32", "bfloat16")  # the probe's choice on this CPU


def test_a_bad_dtype_is_a_usage_error(tmp_path):
    code, events, _ = run_trainer(["--dtype", "half"], tmp_path)
    assert code == 2 and events[-1]["event"] == "error" and "dtype" in events[-1]["message"]


def test_a_bf16_run_learns_evaluates_and_samples(tmp_path, cache):
    code, events, err = run_trainer(["--max-steps", "60", "--seq-len", "64", "--eval-every", "60",
                                     "--sample-every", "60", "--dtype", "bfloat16"], tmp_path, cache)
    assert code == 0, err
    losses = steps_losses(events)
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[60] < 0.7 * losses[1]
    assert 0 < only(events, "eval")[-1]["val_bpb"] < 4
    assert only(events, "sample")[-1]["samples"][0]["text"]  # decoding under bf16 autocast works


def test_a_stopped_bf16_run_resumes_within_bf16s_tolerance(tmp_path, cache):
    # bf16 kernels are as deterministic as float32 ones on one machine, so this is in fact exact
    # here (measured: identical losses); the promise is bf16's own tolerance, 2^-8 relative, which
    # a resume that lost the optimizer state or the data position misses by far.
    plan = ["--max-steps", "30", "--checkpoint-every", "1000", "--dtype", "bfloat16"]
    code, straight, err = run_trainer(plan, tmp_path / "straight", cache)
    assert code == 0, err
    code, first, err = run_trainer([*plan, "--stop-at-step", "15"], tmp_path / "resumed", cache)
    assert code == 0, err
    code, second, err = run_trainer([*plan, "--resume"], tmp_path / "resumed", cache)
    assert code == 0, err
    assert second[0]["resumed_from_step"] == 15 and second[0]["dtype"] == "bfloat16"
    a, b = steps_losses(straight), steps_losses(first) | steps_losses(second)
    assert sorted(a) == sorted(b) == list(range(1, 31))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=BF16_EPS), step


@pytest.mark.parametrize("saved,probed,device,kept", [("float32", "bfloat16", "cpu", "float32"),
                                                      ("bfloat16", "float32", "cpu", "bfloat16"),
                                                      ("bfloat16", "float32", "mps", "float32"),  # cannot
                                                      (None, "bfloat16", "cpu", "bfloat16")])  # an older checkpoint
def test_a_resumed_auto_run_keeps_its_checkpoints_dtype(saved, probed, device, kept):
    lines = []
    assert precision.kept(probed, saved, device, lines.append) == kept
    assert bool(lines) == (kept != probed)  # a switch back is logged


def test_ranks_of_an_auto_run_train_in_rank_zeros_choice(tmp_path, cache):
    # each rank's probe is its own timing and could come out the other way on a busy machine:
    # rank 0's choice is broadcast, so this runs the broadcast (and a wrong one would hang or fail)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    code, events, err = run_trainer(["--max-steps", "2", "--dtype", "auto"], tmp_path, cache, python=torchrun,
                                    module=("--standalone", "--nproc_per_node=2", "-m", "trainer.train"))
    assert code == 0, err
    assert events[0]["world_size"] == 2 and events[0]["dtype"] in ("float32", "bfloat16")
