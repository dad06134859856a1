"""trainer.cpu_ops: every fast CPU path computes what the plain PyTorch code computes, gradients too.

The fast and plain paths sum in different orders (oneDNN or MKL, blocked or not, AVX-512 or AVX2:
which one runs depends on the CPU), so they are compared to float32 rounding, never bit for bit; the
only exact comparisons are of the fallback with the very torch call it makes.
"""

import os
import platform
import sys

import pytest
import torch
import torch.nn.functional as F

from trainer import cpu_ops, sizing
from trainer.model import GPT, GPTConfig, apply_rotary

pytestmark = pytest.mark.trainer  # the trainer alone: never opens the store

# For values of order 1-10 summed over at most a few hundred terms: float32 rounding in another order is
# ~1e-6 there (measured: at most 0.03 of this, on AVX-512 and AVX2 kernels, oneDNN on and off).
TOL = dict(atol=1e-5, rtol=1e-4)


def leaf(*shape, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).requires_grad_()


def grads_of(fn, *inputs, seed=1):
    """fn(*inputs), and the gradients of a fixed random projection of it with respect to inputs."""
    out = fn(*inputs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad((out * weight).sum(), inputs)
    return out.detach(), grads


def close(got, expected):
    """Equal to float32 rounding of sums taken in another order: errors relative to the largest entry."""
    torch.testing.assert_close(got, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-4)


def assert_same(fast, plain):
    (out_f, grads_f), (out_p, grads_p) = fast, plain
    close(out_f, out_p)
    for g_f, g_p in zip(grads_f, grads_p):
        close(g_f, g_p)


def test_onednn_is_found_on_x86_linux():
    # If the probe silently failed here, every other test in this file would only test the fallback.
    if os.environ.get("TRAINER_ONEDNN", "1").strip().lower() in ("0", "false", "no", "off"):
        pytest.skip("TRAINER_ONEDNN=0: the suite is being run on the fallback on purpose")
    if sys.platform.startswith("linux") and platform.machine() == "x86_64" and torch.backends.mkldnn.is_available():
        assert cpu_ops.enabled()
    else:
        pytest.skip("oneDNN is only used on x86-64")


@pytest.mark.parametrize("activation", ["none", "relu", "sigmoid"])
def test_products_equal_torch_mm_with_the_activation_applied(activation):
    a, b = leaf(300, 48).detach(), leaf(72, 48, seed=2).detach()
    expected = {"none": lambda t: t, "relu": torch.relu, "sigmoid": torch.sigmoid}[activation](a @ b.t())
    torch.testing.assert_close(cpu_ops.mm_nt(a, b, activation), expected, **TOL)
    # strided views, as the backward passes use them
    torch.testing.assert_close(cpu_ops.mm_nt(a.t().contiguous().t(), b.t().contiguous().t(), activation),
                               expected, **TOL)
    with cpu_ops.plain():  # the fallback is exactly torch.mm
        assert torch.equal(cpu_ops.mm_nt(a, b, activation), expected)


def test_the_fallback_is_torch_mm_bit_for_bit():
    a, b = leaf(64, 32).detach(), leaf(40, 32, seed=2).detach()
    cpu_ops.set_enabled(False)
    try:
        assert not cpu_ops.enabled()
        assert torch.equal(cpu_ops.mm_nt(a, b), torch.mm(a, b.t()))
    finally:
        cpu_ops.set_enabled(None)


def test_the_environment_can_turn_onednn_off(monkeypatch):
    monkeypatch.setenv("TRAINER_ONEDNN", "0")
    cpu_ops.set_enabled(None)
    try:
        assert not cpu_ops.enabled()
    finally:
        monkeypatch.delenv("TRAINER_ONEDNN")
        cpu_ops.set_enabled(None)


@pytest.mark.parametrize("rows", [4, 200])  # below MIN_ROWS the plain F.linear runs
def test_linear_matches_f_linear_with_gradients(rows):
    x, w = leaf(2, rows // 2, 96), leaf(160, 96, seed=3)
    assert_same(grads_of(cpu_ops.linear, x, w), grads_of(F.linear, x, w))


def test_linear_relu_squared_matches_the_textbook_mlp_activation():
    x, w = leaf(3, 50, 64), leaf(256, 64, seed=4)
    assert_same(grads_of(cpu_ops.linear_relu_squared, x, w),
                grads_of(lambda x, w: F.relu(F.linear(x, w)).square(), x, w))


def test_rms_norm_matches_f_rms_norm():
    x = leaf(4, 33, 128, scale=3.0)
    assert_same(grads_of(cpu_ops.rms_norm, x), grads_of(lambda t: F.rms_norm(t, (t.size(-1),)), x))


def test_norm_rotary_matches_norm_then_rotary():
    x = leaf(2, 40, 3, 32)  # (B, T, H, d)
    angles = torch.outer(torch.arange(40.0), torch.rand(16))[None, :, None, :]
    cos, sin = angles.cos(), angles.sin()
    assert_same(grads_of(lambda t: cpu_ops.norm_rotary(t, cos, sin), x),
                grads_of(lambda t: apply_rotary(F.rms_norm(t, (32,)), cos, sin), x))


def test_nothing_fast_runs_for_other_dtypes():
    x = leaf(2, 8, 32).double()
    assert cpu_ops.norm_rotary(x, torch.ones(1, 8, 1, 16), torch.zeros(1, 8, 1, 16)) is None
    assert not cpu_ops.applies(x)


def model_loss_and_grads(model, idx, targets):
    model.zero_grad(set_to_none=True)
    loss = model(idx, targets=targets)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("softcap", [15.0, 30.0, 50.0])  # 50: above FUSED_MAX_SOFTCAP, the plain loss runs
def test_a_whole_training_step_matches_the_plain_code(softcap):
    torch.manual_seed(0)
    shape = sizing.shape_for(2, 500, 64, n_kv_head=1)
    model = GPT(GPTConfig.from_shape(shape, softcap=softcap))
    with torch.no_grad():  # every weight random (the init zeroes the output projections)
        for p in model.parameters():
            p.normal_(0.0, 2.0 if p.shape[0] == 500 else 0.1)  # a large head: logits saturate at the cap
    idx = torch.randint(0, 500, (3, 64))
    targets = torch.randint(0, 500, (3, 64))
    targets[1, ::4] = -1
    fast = model_loss_and_grads(model, idx, targets)
    with cpu_ops.plain():
        plain = model_loss_and_grads(model, idx, targets)
    assert torch.isfinite(fast[0])
    torch.testing.assert_close(fast[0], plain[0], **TOL)
    for (name, _), g_f, g_p in zip(model.named_parameters(), fast[1], plain[1]):
        torch.testing.assert_close(g_f, g_p, atol=1e-5, rtol=1e-3, msg=name)


def test_freed_memory_is_kept_where_glibc_allows():
    kept = cpu_ops.keep_freed_memory()
    assert kept is (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")
