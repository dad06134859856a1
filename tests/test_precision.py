"""--dtype: the measured auto choice, its validation, and bf16 training with float32 master weights.

The probe's decision is tested by injecting timings (never by CPU name: the suite runs on AMD EPYC
and Intel Xeon machines, with and without fast bf16). The bf16 numerics are held to tolerances
derived from bf16's own rounding, 2^-8 relative (8 significant bits).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from trainer import cpu_ops, optim, precision
from trainer.config import TrainConfig, UsageError, parse_config, validate
from trainer.model import GPT, GPTConfig

pytestmark = pytest.mark.trainer  # the trainer alone: never opens the store

BF16_EPS = 2.0 ** -8  # the spacing of bf16 numbers in [1, 2): its relative rounding is half of it


# --- the auto decision -----------------------------------------------------------------------------

@pytest.mark.parametrize("float32_s,bfloat16_s,choice", [
    (1.0, 0.15, "bfloat16"),  # AMX: bf16 products ~6.6x faster
    (1.0, 0.4, "bfloat16"),  # AVX512-BF16 (Zen 4): ~2.5x
    (1.0, 1.0 / precision.MARGIN, "bfloat16"),  # exactly the margin
    (1.0, 0.8, "float32"),  # faster, but not by the margin: conversions would eat the gain
    (1.0, 100.0, "float32"),  # emulated bf16, ~100x slower
    (1.0, None, "float32"),  # the bf16 product failed or was wrong
    (0.0, 0.5, "float32"),  # a timer that measured nothing decides nothing
])
def test_bf16_is_chosen_only_when_measured_faster_by_the_margin(float32_s, bfloat16_s, choice):
    assert precision.decide(float32_s, bfloat16_s) == choice


@pytest.mark.parametrize("timings,choice", [((4e-3, 1e-3), "bfloat16"), ((1e-3, 0.3), "float32")])
def test_the_probe_decides_from_the_timings_it_measures(monkeypatch, timings, choice):
    measured = iter(timings)
    calls = []

    def fake_best_time(fn, repeats, give_up_after=None):
        calls.append(give_up_after)
        fn()  # the product itself still runs: a kernel that raises must count as a failure
        return next(measured)

    monkeypatch.setattr(precision, "_best_time", fake_best_time)
    result = precision.probe_cpu()
    assert result["choice"] == choice and result["float32_s"] == timings[0]
    assert result["speedup"] == pytest.approx(timings[0] / timings[1])
    # the bf16 timing stops early once it is clearly slower: emulated bf16 must not cost seconds
    assert calls == [None, precision.MARGIN * timings[0]]


def test_the_probe_runs_once_per_process(monkeypatch):
    precision.forget()
    runs = []
    monkeypatch.setattr(precision, "probe_cpu", lambda: runs.append(1) or {"choice": "bfloat16"})
    try:
        assert precision.resolve("auto", "cpu") == precision.resolve("auto", "cpu") == "bfloat16"
        assert len(runs) == 1
    finally:
        precision.forget()


def test_the_real_probe_gives_a_consistent_answer_on_this_cpu():
    result = precision.probe_cpu()
    assert result["float32_s"] > 0
    assert result["choice"] == precision.decide(result["float32_s"], result["bfloat16_s"])


def test_each_device_resolves_auto_by_its_own_rule():
    assert precision.resolve("auto", "cuda", cuda_bf16=True) == "bfloat16"
    assert precision.resolve("auto", "cuda", cuda_bf16=False) == "float32"  # pre-Ampere GPUs
    assert precision.resolve("auto", "mps") == "float32"
    assert precision.resolve("float32", "cuda", cuda_bf16=True) == "float32"
    assert precision.resolve("bfloat16", "cpu") == "bfloat16"  # asked for: even where it is slow
    with pytest.raises(ValueError, match="mps"):
        precision.resolve("bfloat16", "mps")
    with pytest.raises(ValueError, match="dtype"):
        precision.resolve("float16", "cpu")


# --- validation ------------------------------------------------------------------------------------

def test_the_dtype_flag_and_config_key_are_validated():
    assert parse_config([]).dtype == "auto"
    assert parse_config(["--dtype", "bfloat16"]).dtype == "bfloat16"
    with pytest.raises(UsageError, match="dtype"):
        parse_config(["--dtype", "float16"])
    for bad in ("fp16", "", None, 16, True):
        with pytest.raises(UsageError, match="dtype"):
            validate(TrainConfig(dtype=bad))


# --- bf16 numerics ---------------------------------------------------------------------------------

def _random_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=1, n_embd=128))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)  # non-zero output projections: every path matters
    return model


def _loss_and_grads(model, idx, targets, dtype, plain):
    model.zero_grad(set_to_none=True)
    with precision.autocast("cpu", dtype), cpu_ops.plain() if plain else contextlib.nullcontext():
        loss = model(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_the_fast_bf16_path_matches_plain_bf16_autocast_with_float32_gradients():
    model = _random_model()
    idx, targets = torch.randint(0, 512, (4, 64)), torch.randint(0, 512, (4, 64))
    fast_loss, fast = _loss_and_grads(model, idx, targets, "bfloat16", plain=False)
    plain_loss, plain = _loss_and_grads(model, idx, targets, "bfloat16", plain=True)
    f32_loss, f32 = _loss_and_grads(model, idx, targets, "float32", plain=False)
    # Both bf16 paths round every product's inputs to 8 bits, in different places (the fast path
    # also rounds the softmax gradient before its products): each gradient is within a few bf16
    # roundings of the other, measured in units of its tensor's norm (~1e-2 here, a broken path
    # is off by O(1)). The loss is a mean over 256 tokens, so its rounding averages out.
    assert fast_loss == pytest.approx(float(plain_loss), rel=BF16_EPS)
    assert fast_loss == pytest.approx(float(f32_loss), rel=BF16_EPS)
    for name, g in fast.items():
        assert g.dtype == torch.float32, name  # master weights' gradients stay float32
        scale = float(f32[name].norm())
        assert float((g - plain[name]).norm()) <= 8 * BF16_EPS * scale, name
        assert float((g - f32[name]).norm()) <= 8 * BF16_EPS * scale, name
    # and bf16 was really used: float32 rounding alone would leave differences ~1e-6
    assert max(float((fast[n] - f32[n]).norm() / f32[n].norm()) for n in fast) > 1e-4


def test_muon_in_bf16_still_orthogonalises():
    torch.manual_seed(0)
    for shape in ((256, 64), (64, 256), (128, 128)):
        g = torch.randn(*shape)
        out = optim.newton_schulz(g, dtype=torch.bfloat16)
        assert out.dtype == torch.float32 and out.shape == g.shape
        s, ref = torch.linalg.svdvals(out), torch.linalg.svdvals(optim.newton_schulz(g))  # float32 route
        # the quintic leaves singular values in ~[0.7, 1.2] (trainer/optim.py; a square Gaussian
        # matrix's very smallest stay below, in float32 too); bf16's rounding of a unit value
        # (2^-8, amplified by five rounds) moves each by far less than the 0.05 allowed here
        assert float(s.max()) < 1.3 and float(torch.quantile(s, 0.05)) > 0.6, shape
        assert float((s - ref).abs().max()) < 0.05, shape


def test_a_bf16_model_trains_with_finite_falling_loss():
    model = _random_model(seed=1)
    opts = optim.build_optimizers(model.param_groups(), 128, dtype="bfloat16")
    assert opts[-1].ns_dtype == torch.bfloat16
    idx = torch.randint(0, 512, (4, 65))
    x, y = idx[:, :-1], idx[:, 1:]
    losses = []
    for _ in range(30):
        with precision.autocast("cpu", "bfloat16"):
            loss = model(x, y)
        loss.backward()
        optim.clip_grad_norm(model.parameters(), 1.0)
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32
    assert losses[-1] < 0.5 * losses[0]  # one fixed batch: it is memorised


# --- attention's dtype in a bf16 run ---------------------------------------------------------------

@pytest.mark.parametrize("timings,choice", [((7.7e-3, 11.1e-3), "float32"),  # Zen 4 here: float32 faster
                                            ((7.7e-3, 4e-3), "bfloat16"),
                                            ((5e-3, 5e-3), "bfloat16")])  # a tie keeps the run's dtype
def test_the_attention_probe_decides_from_its_timings(monkeypatch, timings, choice):
    measured = iter(timings)

    def fake_best_time(fn, repeats, give_up_after=None):
        fn()  # the attention forward and backward still run
        return next(measured)

    monkeypatch.setattr(precision, "_best_time", fake_best_time)
    assert precision.probe_attention()["choice"] == choice


def test_attention_is_probed_only_for_bf16_on_a_cpu_and_once(monkeypatch):
    precision.forget()
    runs = []
    monkeypatch.setattr(precision, "probe_attention", lambda: runs.append(1) or {"choice": "float32"})
    try:
        assert precision.attention_dtype("float32", "cpu") == "float32"
        assert precision.attention_dtype("bfloat16", "cuda") == "bfloat16"
        assert runs == []
        assert precision.attention_dtype("bfloat16", "cpu") == precision.attention_dtype("bfloat16", "cpu") == "float32"
        assert runs == [1]
    finally:
        precision.forget()


def test_the_real_attention_probe_answers_on_this_cpu():
    result = precision.probe_attention()
    assert result["float32_s"] > 0 and result["choice"] in ("float32", "bfloat16")
    if result["bfloat16_s"] is not None:
        assert (result["choice"] == "bfloat16") == (result["bfloat16_s"] <= result["float32_s"])


def test_float32_attention_under_bf16_autocast_is_what_it_says(monkeypatch):
    import torch.nn.functional as F
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = _random_model()
    idx, targets = torch.randint(0, 512, (4, 64)), torch.randint(0, 512, (4, 64))
    bf_loss, bf = _loss_and_grads(model, idx, targets, "bfloat16", plain=False)
    assert seen and all(s[:3] == (torch.bfloat16,) * 3 for s in seen)
    seen.clear()
    model.set_attention_dtype("float32")
    mixed_loss, mixed = _loss_and_grads(model, idx, targets, "bfloat16", plain=False)
    assert seen and all(s == (torch.float32, torch.float32, torch.float32, False) for s in seen)
    f32_loss, f32 = _loss_and_grads(model, idx, targets, "float32", plain=False)
    # the products stay bf16 (the gradients differ from float32's by bf16 roundings, not float32's)
    assert mixed_loss == pytest.approx(float(f32_loss), rel=BF16_EPS)
    assert mixed_loss == pytest.approx(float(bf_loss), rel=BF16_EPS)
    for name, g in mixed.items():
        assert float((g - f32[name]).norm()) <= 8 * BF16_EPS * float(f32[name].norm()), name
    assert max(float((mixed[n] - f32[n]).norm() / f32[n].norm()) for n in mixed) > 1e-4
    model.set_attention_dtype("bfloat16")  # back to autocast's choice
    assert not any(b.attn.float32_attention for b in model.blocks)


class _Rt:
    def __init__(self, dtype, attention):
        self.dtype, self.attention = dtype, attention


@pytest.mark.parametrize("saved,rt,kept", [
    ({"dtype": "bfloat16", "attention_dtype": "bfloat16"}, ("bfloat16", "float32"), "bfloat16"),
    ({"dtype": "bfloat16", "attention_dtype": "float32"}, ("bfloat16", "bfloat16"), "float32"),
    ({"dtype": "bfloat16"}, ("bfloat16", "float32"), "bfloat16"),  # before the choice: the products' dtype
    ({"dtype": "float32", "attention_dtype": "float32"}, ("bfloat16", "bfloat16"), "bfloat16"),  # dtype changed
    ({"dtype": "bfloat16", "attention_dtype": "float16"}, ("bfloat16", "float32"), "float32"),  # nonsense: ours
])
def test_a_resumed_run_keeps_the_attention_dtype_it_started_in(saved, rt, kept):
    assert precision.kept_attention(_Rt(*rt), {"train": saved}) == kept


def test_the_chat_stage_orthogonalises_in_the_runs_dtype():
    from trainer import chat_stage
    model = _random_model()
    for dtype, ns in (("bfloat16", torch.bfloat16), ("float32", None)):
        rt = _Rt(dtype, dtype)
        rt.device = torch.device("cpu")
        opts = chat_stage.build_optimizers(TrainConfig(), model, rt)
        assert opts[-1].ns_dtype == ns, dtype
        # at the chat stage's scale of pretraining's rates
        assert opts[-1].param_groups[0]["lr"] == pytest.approx(TrainConfig().matrix_lr * TrainConfig().chat_lr_scale)
