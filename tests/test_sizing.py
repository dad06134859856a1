"""trainer.sizing: shapes, counts, FLOPs and memory, checked against the real torch model."""

import subprocess
import sys
from pathlib import Path

import pytest

from trainer import sizing
from trainer.sizing import ModelShape, shape_for

pytestmark = pytest.mark.trainer  # the trainer alone: never opens the store


def test_depth_sets_width_in_whole_heads():
    s = shape_for(2, 512, 64)  # below 256 wide: heads of 32
    assert (s.n_layer, s.n_embd, s.head_dim, s.n_head, s.n_kv_head) == (2, 128, 32, 4, 4)
    assert [shape_for(d, 512, 64).n_head for d in (1, 3, 4, 11)] == [2, 6, 4, 11]  # 256-767 wide: heads of 64
    s = shape_for(12, 65536, 2048)  # 768 wide: GPU-sized, heads of 128
    assert (s.n_embd, s.head_dim, s.n_head) == (768, 128, 6)
    s = shape_for(20, 65536, 2048)
    assert (s.n_embd, s.n_head) == (1280, 10)
    s = shape_for(13, 65536, 2048)  # 832 is not a multiple of 128: round up
    assert (s.n_embd, s.n_head) == (896, 7)
    s = shape_for(3, 512, 64, head_dim=64)
    assert (s.n_embd, s.n_head) == (192, 3)


def test_gqa_option_must_divide_the_heads():
    assert shape_for(4, 512, 64, n_kv_head=2).n_kv_head == 2
    with pytest.raises(ValueError, match="n_kv_head"):
        shape_for(4, 512, 64, n_kv_head=3)


@pytest.mark.parametrize("kwargs,word", [
    (dict(depth=0, vocab_size=512, seq_len=64), "depth"),
    (dict(depth=65, vocab_size=512, seq_len=64), "depth"),
    (dict(depth=2.0, vocab_size=512, seq_len=64), "depth"),
    (dict(depth=2, vocab_size=256, seq_len=64), "vocab_size"),
    (dict(depth=2, vocab_size=512, seq_len=0), "seq_len"),
    (dict(depth=2, vocab_size=512, seq_len=64, head_dim=63), "head_dim"),
])
def test_bad_shapes_are_refused_by_name(kwargs, word):
    with pytest.raises(ValueError, match=word):
        shape_for(**kwargs)


def test_shape_is_frozen_and_serialisable():
    s = shape_for(2, 512, 64)
    assert s.to_dict()["n_embd"] == 128
    assert ModelShape(**s.to_dict()) == s
    with pytest.raises(Exception):
        s.depth = 3


@pytest.mark.parametrize("depth,kv", [(1, None), (2, None), (3, None), (4, 2), (4, 1), (6, 3)])
def test_param_counts_equal_the_torch_model(depth, kv):
    pytest.importorskip("torch")
    from trainer.model import GPT, GPTConfig

    s = shape_for(depth, 300, 32, n_kv_head=kv)
    model = GPT(GPTConfig.from_shape(s))
    counts = sizing.param_counts(s)
    assert counts["embedding"] == model.wte.weight.numel()
    assert counts["lm_head"] == model.lm_head.weight.numel()
    assert counts["blocks"] == sum(p.numel() for p in model.blocks.parameters())
    assert counts["total"] == model.num_params()
    assert model.flops_per_token() == sizing.flops_per_token(s)
    # the length rule counts every parameter a token's compute touches: all but the input table
    assert sizing.scaling_params(s) == model.num_params() - model.wte.weight.numel()


def test_flops_follow_the_palm_convention():
    s = shape_for(4, 8192, 256)
    c = sizing.param_counts(s)
    expected = 6 * (c["total"] - c["embedding"]) + 12 * 4 * 4 * 64 * 256
    assert sizing.flops_per_token(s) == expected
    assert sizing.flops_per_token(shape_for(4, 8192, 512)) > expected  # longer context, more attention


def test_memory_grows_with_depth_and_batch_and_counts_the_logits():
    small = sizing.memory_estimate(shape_for(4, 8192, 256), 8)
    deeper = sizing.memory_estimate(shape_for(8, 8192, 256), 8)
    bigger_batch = sizing.memory_estimate(shape_for(4, 8192, 256), 16)
    assert deeper["total"] > small["total"] and deeper["weights"] > small["weights"]
    assert bigger_batch["activations"] > small["activations"]
    assert bigger_batch["weights"] == small["weights"]
    # the float32 logits alone are B*T*V*4 bytes, and they are part of the activations
    assert small["logits"] >= 8 * 256 * 8192 * 4
    assert small["activations"] > small["logits"]
    assert small["total"] == sum(small[k] for k in ("weights", "grads", "optimizer", "activations"))
    cuda = sizing.memory_estimate(shape_for(4, 8192, 256), 8, device_kind="cuda")
    compiled = sizing.memory_estimate(shape_for(4, 8192, 256), 8, compiled=True)
    assert cuda["activations"] < small["activations"] and compiled["activations"] < small["activations"]
    mps = sizing.memory_estimate(shape_for(4, 8192, 256), 8, device_kind="mps")
    assert mps["total"] == small["total"]  # float32 activations, as on CPU
    with pytest.raises(ValueError, match="device_kind"):
        sizing.memory_estimate(shape_for(4, 8192, 256), 8, device_kind="tpu")


def test_default_training_tokens_is_twenty_per_parameter():
    assert sizing.default_training_tokens(1_000_000) == 20_000_000
    assert sizing.default_training_tokens(1000, tokens_per_param=10) == 10_000


def test_the_default_length_is_capped_at_a_few_passes_over_the_data():
    # 1M params want 20M tokens; 430K tokens of data allow 4 x 430K = 1.72M.
    assert sizing.planned_tokens(1_000_000, 20, data_tokens=430_000) == (1_720_000, "data")
    assert sizing.planned_tokens(1_000_000, 20, data_tokens=430_000, max_epochs=2.5) == (1_075_000, "data")
    # plenty of data: twenty tokens per parameter, as before
    assert sizing.planned_tokens(1_000_000, 20, data_tokens=10**9) == (20_000_000, "tokens_per_param")
    # no cap when the size of the data is unknown or the cap is off
    assert sizing.planned_tokens(1_000_000, 20) == (20_000_000, "tokens_per_param")
    for off in (0, 0.0, None):
        assert sizing.planned_tokens(1_000_000, 20, 430_000, max_epochs=off) == (20_000_000, "tokens_per_param")
    with pytest.raises(ValueError):
        sizing.planned_tokens(1000, 20, data_tokens=-1)
    with pytest.raises(ValueError):
        sizing.planned_tokens(1000, 20, data_tokens=10, max_epochs=-1)


def test_sizing_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import trainer.sizing as s; "
            "print(s.param_counts(s.shape_for(2, 512, 64))['total'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert int(out.stdout) > 0


def test_the_tokenizer_uses_the_vocabulary_floor_from_here():
    tokenizer = pytest.importorskip("trainer.tokenizer")
    assert tokenizer.SPECIAL_TOKENS == sizing.SPECIAL_TOKENS
    with pytest.raises(ValueError):
        shape_for(2, sizing.MIN_VOCAB_SIZE - 1, 64)
    assert shape_for(2, sizing.MIN_VOCAB_SIZE, 64).vocab_size == sizing.MIN_VOCAB_SIZE


# --- a run's length and schedule: the rule train.py follows and the estimates share ----------------------

def test_run_length_is_max_steps_then_target_tokens_then_the_token_rule():
    assert sizing.run_length(1_000_000, 2048, 430_000, max_steps=77) == (77, "max_steps")
    assert sizing.run_length(1_000_000, 2048, 430_000, target_tokens=4097) == (3, "target_tokens")
    assert sizing.run_length(1_000_000, 2048, 430_000) == (-(-1_720_000 // 2048), "data")
    assert sizing.run_length(1_000_000, 2048, 10**9) == (-(-20_000_000 // 2048), "tokens_per_param")
    assert sizing.run_length(1_000_000, 2048, None) == (-(-20_000_000 // 2048), "tokens_per_param")
    assert sizing.run_length(10, 2048, 430_000) == (1, "tokens_per_param")  # at least one step
    with pytest.raises(ValueError):
        sizing.run_length(1000, 0, 10)


def _loop_counts(total: int, eval_every: int, sample_every: int, checkpoint_every: int) -> dict:
    # the conditions of trainer/train.py's loop, step by step
    steps = range(1, total + 1)
    return {"evals": sum(s % eval_every == 0 or s == total for s in steps),
            "sample_rounds": sum(s % sample_every == 0 or s == total for s in steps),
            "checkpoints": sum(s % checkpoint_every == 0 or s == total for s in steps)}


@pytest.mark.parametrize("total", [1, 249, 250, 251, 500, 841, 1000, 6285])
def test_run_events_count_what_the_training_loop_does(total):
    got = sizing.run_events(total)
    want = _loop_counts(total, sizing.EVAL_EVERY, sizing.SAMPLE_EVERY, sizing.CHECKPOINT_EVERY)
    assert {k: got[k] for k in want} == want and got["samples"] == 2 * got["sample_rounds"]
    assert sizing.run_events(total, checkpoint_every=7)["checkpoints"] == _loop_counts(total, 1, 1, 7)["checkpoints"]
    assert sizing.run_events(total, sample_prompts=0)["samples"] == 0


def test_the_schedule_defaults_are_the_trainers():
    from trainer.config import TrainConfig

    cfg = TrainConfig()
    assert (cfg.eval_every, cfg.sample_every, cfg.checkpoint_every) == (
        sizing.EVAL_EVERY, sizing.SAMPLE_EVERY, sizing.CHECKPOINT_EVERY)
    assert len(cfg.sample_prompts) == 2 and cfg.eval_tokens is None


@pytest.mark.parametrize("n_val", [1, 257, 5000, 180_370])
def test_eval_rows_are_the_rows_an_evaluation_reads(tmp_path, n_val):
    pytest.importorskip("torch")
    import numpy as np

    from trainer import data

    path = tmp_path / "val.bin"
    np.zeros(n_val, dtype=np.uint16).tofile(path)
    rows = sum(x.shape[0] for x, _ in data.iter_val_batches(path, "uint16", 8, 256, sizing.EVAL_BATCHES))
    assert sizing.eval_rows(n_val, 8, 256) == rows
    assert sizing.eval_rows(0, 8, 256) == 0


def test_the_default_cpu_plan_fits_the_demo_without_running_out_of_data():
    defaults = sizing.device_defaults("cpu")
    shape = shape_for(2, sizing.DEMO_FACTS["vocab_size"], defaults["seq_len"])
    params = sizing.scaling_params(shape)
    _, budget = sizing.run_length(params, defaults["batch_size"] * defaults["seq_len"],
                                  sizing.DEMO_FACTS["n_train_tokens"])
    assert budget == "tokens_per_param"
