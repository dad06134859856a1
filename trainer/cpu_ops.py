"""Eager CPU training, made fast: the same math as the plain PyTorch code, fewer passes.

On a CPU a training step of these small models is spent in two places: the matrix products and the
element-wise passes around them, which on a 2-core machine with modest memory bandwidth cost a few
milliseconds each over a (batch x sequence, 4 x width) activation. Everything here computes exactly
what the textbook code in ``trainer/model.py`` computes (the tests hold the two to float32 rounding);
it is used only for CPU tensors outside ``torch.compile``, which fuses the plain code itself
(and so on CUDA the plain code runs).

bf16 (``--dtype bfloat16``, trainer/precision.py). Under ``torch.autocast("cpu", bfloat16)`` the same
functions run their products in bf16: oneDNN's bf16 kernels (AVX512-BF16, AMX) behind the same op,
the float32 master weights cast once per use, float32 accumulation inside the kernels, and every
weight gradient handed back in float32. Autocast does not look inside autograd functions, so they
cast their operands themselves. Norms, soft-cap, softmax and loss stay float32, as autocast keeps
them on GPUs; the tests hold this path to the plain bf16-autocast code within bf16 rounding.

Matrix products. Torch sends every float32 CPU matmul to MKL. On the AMD EPYC (Zen 4) this project is
developed on, MKL runs the forward products of a training step (rows = batch x sequence, a few
hundred columns) at 90-160 GFLOP/s, while oneDNN's kernels for the very same products, reached
through ``torch.ops.mkldnn._linear_pointwise`` (the op torch.compile's CPU backend itself emits), run
at 150-200 GFLOP/s on two threads. The weight gradient (a reduction over the rows, ``g.T @ x``) is
the exception, MKL is as fast there, so it stays on MKL. Both do IEEE float32 multiply-adds and
differ only in summation order. The oneDNN path is taken only when a probe at first use finds the op
present and correct, and never when ``TRAINER_ONEDNN=0`` is set in the environment (for A/B
measurements; :func:`set_enabled` does the same from Python).

Memory. A step allocates and frees ~160 MB of multi-MB tensors. glibc serves blocks that large
with fresh ``mmap``s and hands them back on free, so every step page-faulted ~40,000 fresh pages
(~110 ms of kernel time at depth 4, measured here). :func:`keep_freed_memory`, called once by the
trainer on CPU, raises glibc's thresholds so freed blocks are reused: the faults drop to a few
hundred a step; the process keeps its high-water mark, which it reaches every step anyway.

Element-wise work. Autograd's generic backward formulas make several passes where one or two do:
:func:`rms_norm`, :func:`linear_relu_squared` and :func:`norm_rotary` (QK-norm and rotary embedding in one)
are autograd functions with hand-written backward passes that save one tensor each, and
:class:`SoftcappedCrossEntropy` computes head, soft-cap, loss and gradients over row chunks that
stay in cache. Measured on this machine (``tests/bench/train_throughput.py``), all of it together
takes a depth-4 step from ~1,000 ms to ~750 ms.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

def keep_freed_memory() -> bool:
    """Have glibc's malloc keep and reuse freed large blocks (see the module docstring); False where
    there is no glibc ``mallopt`` (macOS, musl, Windows) and nothing changed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    # 32 MiB is the largest mmap threshold every glibc accepts; a step's tensors are smaller
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


_state: dict[str, bool | None] = {"enabled": None, "fused": True}
MIN_ROWS = 16  # below this (decoding) MKL's matrix-vector kernels are as fast, and no probe is needed


def _probe() -> bool:
    if os.environ.get("TRAINER_ONEDNN", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(64, 48, generator=gen)
        b = torch.randn(40, 48, generator=gen)
        # the first product may come under bf16 autocast: the float32 reference must stay float32
        with torch.autocast("cpu", enabled=False):
            got = torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
            return bool(torch.allclose(got, a @ b.t(), rtol=1e-5, atol=1e-5))
    except (RuntimeError, NotImplementedError):
        return False


def enabled() -> bool:
    """Whether float32 CPU products go through oneDNN (probed once)."""
    if _state["enabled"] is None:
        _state["enabled"] = _probe()
    return bool(_state["enabled"])


def set_enabled(flag: bool | None) -> None:
    """Force the oneDNN path on (if the probe passes) or off; ``None`` probes again."""
    _state["enabled"] = None if flag is None else (flag and _probe())


@contextlib.contextmanager
def plain():
    """Within this block the model runs its plain PyTorch code on CPU too: no oneDNN products and
    no hand-written functions. The reference the tests and the benchmark compare against."""
    saved = dict(_state)
    _state.update(enabled=False, fused=False)
    try:
        yield
    finally:
        _state.update(saved)


def _onednn_applies(a: torch.Tensor, b: torch.Tensor, rows: int) -> bool:
    # bf16 products too: oneDNN has bf16 kernels (AVX512-BF16, AMX) with the same fused activations
    return (rows >= MIN_ROWS and a.device.type == "cpu" and a.dtype in _ONEDNN_DTYPES
            and b.dtype == a.dtype and not torch.compiler.is_compiling() and enabled())


_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def bf16_autocast(x: torch.Tensor) -> bool:
    """Whether ``x``'s products should run in bf16 here: eager CPU code under
    ``torch.autocast("cpu", dtype=torch.bfloat16)`` (the trainer's ``--dtype bfloat16``). The
    functions below then cast their operands to bf16 themselves (autocast does not look inside
    autograd functions) and keep the master weights' gradients float32."""
    return (bool(_state["fused"]) and x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and not torch.compiler.is_compiling())


_ACTIVATIONS = {"none": None, "relu": torch.relu_, "sigmoid": torch.sigmoid_}


def mm_nt(a: torch.Tensor, b: torch.Tensor, activation: str = "none") -> torch.Tensor:
    """``activation(a @ b.T)`` for 2-D ``a`` (m, k) and ``b`` (n, k); either may be a strided view.
    On oneDNN the activation ("relu" or "sigmoid") is applied as the product is written, which
    saves a pass over the result."""
    if _onednn_applies(a, b, a.size(0)):
        return torch.ops.mkldnn._linear_pointwise(a, b, None, activation, [], "")
    out = torch.mm(a, b.t())
    return out if _ACTIVATIONS[activation] is None else _ACTIVATIONS[activation](out)


def pack(w: torch.Tensor) -> torch.Tensor | None:
    """``w`` (n, k) reordered once into oneDNN's blocked layout, for :func:`mm_packed`; None where
    oneDNN's products do not apply (not x86, disabled, another dtype or device). For weights that
    never change (inference, ``trainer/engine.py``): an unpacked weight is reordered on every call,
    which at 16 rows is a third of a small product's time (measured here: the 17 products of a depth-4
    step at 16 rows, 2.5 ms unpacked, 1.6 ms packed; the results are the same to the bit)."""
    if not (w.device.type == "cpu" and w.dtype in _ONEDNN_DTYPES and w.dim() == 2 and enabled()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return None
    try:
        with torch.no_grad():
            return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous())
    except (RuntimeError, NotImplementedError):
        return None


def mm_packed(a: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``a @ w.T`` for a weight from :func:`pack` (2-D ``a`` in the weight's dtype)."""
    return torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")


def _operands(ctx, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x as rows, w) in the dtype the products run in: bf16 under bf16 autocast (the float32
    master weight is cast per step, as autocast does on GPUs), else as given."""
    ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, w.dtype
    x2 = x.reshape(-1, x.size(-1))
    if bf16_autocast(x):
        return x2.to(torch.bfloat16), w.to(torch.bfloat16)
    return x2, w


class _Linear(torch.autograd.Function):
    """``x @ w.T`` with the forward and the input gradient on oneDNN, the weight gradient on MKL.
    Under bf16 autocast all three products are bf16 (float32 accumulation inside the kernels); the
    gradients come back in their inputs' dtypes, the weight's float32."""

    @staticmethod
    def forward(ctx, x, w):
        x2, wc = _operands(ctx, x, w)
        ctx.save_for_backward(x2, wc)
        return mm_nt(x2, wc).view(*x.shape[:-1], w.size(0))

    @staticmethod
    def backward(ctx, grad):
        x2, w = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.size(-1)).to(x2.dtype)
        gx = mm_nt(g2, w.t()).view(ctx.x_shape).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        gw = torch.mm(g2.t(), x2).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return gx, gw


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` without a bias, on oneDNN where that is faster (see the module docstring)."""
    rows = x.numel() // max(x.size(-1), 1)
    if x.dim() >= 2 and rows >= MIN_ROWS and bf16_autocast(x) and w.dtype == torch.float32:
        return _Linear.apply(x, w)
    if x.dim() >= 2 and _onednn_applies(x, w, rows):
        return _Linear.apply(x, w)
    return F.linear(x, w)


class Linear(nn.Linear):
    """A bias-free ``nn.Linear`` (same parameters and state-dict keys) whose product uses :func:`linear`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


# --- element-wise work --------------------------------------------------------------------------

def applies(x: torch.Tensor) -> bool:
    """Whether the hand-written CPU functions below are used for ``x`` (eager float32 on CPU)."""
    return (bool(_state["fused"]) and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.compiler.is_compiling())


_EPS = torch.finfo(torch.float32).eps  # what F.rms_norm uses for float32 when given no eps


def _rms_normalize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rstd = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.size(-1)).add_(_EPS))
    return x * rstd, rstd


def _rms_norm_backward(grad: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    # y = x * rstd  =>  dx = rstd * (g - y * mean(g * y))
    dot = torch.linalg.vecdot(grad, y, dim=-1).unsqueeze(-1).div_(y.size(-1))
    return torch.addcmul(grad, y, dot, value=-1.0).mul_(rstd)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y, rstd = _rms_normalize(x)
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, rstd = ctx.saved_tensors
        return _rms_norm_backward(grad, y, rstd)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """``F.rms_norm(x, (x.size(-1),))``: parameter-free RMSNorm over the last dimension."""
    return _RMSNorm.apply(x) if applies(x) else F.rms_norm(x, (x.size(-1),))


class _LinearReluSquared(torch.autograd.Function):
    """relu(x @ w.T) ** 2, with the relu done as oneDNN writes the product. Backward needs only
    r = relu(x @ w.T): d/dpre = 2 r g, which is already zero wherever the relu cut."""

    @staticmethod
    def forward(ctx, x, w):
        x2, wc = _operands(ctx, x, w)  # bf16 under bf16 autocast, as in _Linear
        r = mm_nt(x2, wc, "relu")
        ctx.save_for_backward(x2, wc, r)
        return (r * r).view(*x.shape[:-1], w.size(0))

    @staticmethod
    def backward(ctx, grad):
        x2, w, r = ctx.saved_tensors
        g = torch.mul(grad.reshape(r.shape).to(r.dtype), r)  # the factor 2 goes on the two small products instead
        gx = mm_nt(g, w.t()).mul_(2.0).view(ctx.x_shape).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        gw = torch.mm(g.t(), x2).mul_(2.0).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return gx, gw


def linear_relu_squared(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``relu(F.linear(x, w)) ** 2`` (the MLP's up-projection and activation) in one autograd node."""
    if x.dim() >= 2 and (applies(x) or bf16_autocast(x)) and w.dtype == torch.float32:
        return _LinearReluSquared.apply(x, w)
    return F.relu(F.linear(x, w)).square()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + d/2) of x (..., d) by the angles whose cos/sin are given
    (broadcasting to (..., d/2)): written into one output, no concatenation."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    out = torch.empty_like(x)
    o1, o2 = out[..., :d], out[..., d:]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1.0)
    torch.mul(x1, sin, out=o2).addcmul_(x2, cos)
    return out


class _NormRotary(torch.autograd.Function):
    # bf16 queries and keys (under bf16 autocast) are normalised and rotated in float32 and handed
    # on in bf16, as autocast runs norms on GPUs: the rounding is the output's only
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.x_dtype = x.dtype
        y, rstd = _rms_normalize(x.float())
        ctx.save_for_backward(y, rstd, cos, sin)
        return rotate(y, cos, sin).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        y, rstd, cos, sin = ctx.saved_tensors
        # a rotation's transpose is the rotation by the opposite angle
        return _rms_norm_backward(rotate(grad.float(), cos, -sin), y, rstd).to(ctx.x_dtype), None, None


def norm_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """RMSNorm over the head dimension then the rotary embedding, for (B, T, H, d) queries or keys;
    ``None`` where the plain code should run instead."""
    return _NormRotary.apply(x, cos, sin) if applies(x) or bf16_autocast(x) else None


# --- the head and the loss ----------------------------------------------------------------------

LOSS_CHUNK_ELEMENTS = 1 << 21  # logits per chunk: 8 MB of float32, 256 rows at vocab 8192
FUSED_MAX_SOFTCAP = 30.0  # exp(2 * 30) times a vocabulary of 2**30 is still far below float32's limit


def fused_loss_applies(h: torch.Tensor, reduction: str, cap: float) -> bool:
    # Eager float32 on CPU only: under torch.compile (and so on CUDA) the compiler fuses the plain
    # path itself, and "none" needs per-row weights the fused backward does not keep.
    return applies(h) and reduction in ("mean", "sum") and 0 < cap <= FUSED_MAX_SOFTCAP


class SoftcappedCrossEntropy(torch.autograd.Function):
    """lm_head + soft-cap + cross-entropy over row chunks, gradients computed in the forward pass.

    Same numbers as the plain path (tests hold them to float32 rounding), but it never holds the
    (B*T, vocab) logits: each chunk of rows is a few MB, so the element-wise passes run in cache
    instead of streaming 64 MB arrays through memory several times. With z = cap * tanh(l / cap):
    loss = log(sum(exp(z))) - z[target], and dL/dl = (softmax(z) - onehot(target)) * (1 - tanh^2),
    zero for ignored rows. Element-wise passes over a chunk are what cost here, so there are few:
    tanh is computed as 2 sigmoid(2u) - 1 (torch's CPU tanh is ~6x slower than its sigmoid) and
    1 - tanh^2 as 4 sig (1 - sig); because |z| <= cap, exp(z) cannot overflow for the caps allowed
    (:data:`FUSED_MAX_SOFTCAP`), so logsumexp needs no max-subtraction pass; the softmax's
    normalisation and the row mask are one row scale, applied to the products' small operands rather than to the chunk. Five
    passes over a chunk instead of fourteen, and the products run on oneDNN where that is faster
    (see above).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, cap, reduction, grad_enabled):
        n, vocab = h.size(0), weight.size(0)
        chunk = max(16, min(1024, LOSS_CHUNK_ELEMENTS // vocab))
        valid = (targets != -1).to(h.dtype)
        safe = targets.clamp(min=0)
        # grad mode is always off in here; the caller's (grad_enabled) says whether to pay for grads
        want_h, want_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        total = h.new_zeros(())
        buf = h.new_empty(min(chunk, n), vocab)  # one chunk's softmax, reused: it stays in cache
        # Under bf16 autocast the three products run in bf16 (the head's weight cast once per step)
        # and all else in float32: the logits are rounded to bf16 once, as autocast's lm_head does on
        # GPUs, before the float32 soft-cap and loss.
        low = bf16_autocast(h)
        w_low = weight.to(torch.bfloat16) if low else weight
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            hc, tc, vc = h[s:e], safe[s:e, None], valid[s:e]
            # tanh(u) = 2 sigmoid(2u) - 1, and torch's CPU sigmoid is ~6x faster than its tanh; the
            # 2 / cap goes on the chunk's few hidden rows rather than on its vocab-wide logits
            if low:
                sig = mm_nt((hc * (2.0 / cap)).to(torch.bfloat16), w_low).float().sigmoid_()
            else:
                sig = mm_nt(hc * (2.0 / cap), weight, "sigmoid")
            z_target = sig.gather(1, tc).squeeze(1).mul_(2.0 * cap).sub_(cap)  # cap * tanh, at the targets
            # exp(z) = exp(2 cap sig) / exp(cap): the constant cancels in the softmax and comes back
            # as "- cap" in the log-sum; 2 * cap + log(vocab) stays far below exp's float32 limit.
            p = torch.mul(sig, 2.0 * cap, out=buf[: e - s]).exp_()
            sums = p.sum(dim=1)
            total += ((sums.log() - cap - z_target) * vc).sum()
            if want_h or want_w:
                # dL/dl = row * (exp(2 cap sig) * sig (1 - sig) + onehot * (t^2 - 1) / row) with
                # row = 4 / sums (softmax(z) * (1 - tanh^2) = softmax(z) * 4 sig (1 - sig)) times
                # the validity mask. The row factors go on the products' small operands, not on p.
                p.mul_(sig.addcmul_(sig, sig, value=-1.0))
                row = 4.0 / sums
                t_target = z_target / cap
                p.scatter_add_(1, tc, ((t_target.square_() - 1.0) / row)[:, None])
                row.mul_(vc)
                if low:
                    p_low = p.to(torch.bfloat16)
                    if want_h:
                        grad_h[s:e] = mm_nt(p_low, w_low.t()).float().mul_(row[:, None])
                    if want_w:
                        grad_w += torch.mm(p_low.t(), (hc * row[:, None]).to(torch.bfloat16))
                    continue
                if want_h:
                    grad_h[s:e] = mm_nt(p, weight.t()).mul_(row[:, None])
                if want_w:
                    grad_w.addmm_(p.t(), hc * row[:, None])
        scale = 1.0 / valid.sum() if reduction == "mean" else h.new_ones(())  # all ignored: nan, like F
        ctx.save_for_backward(grad_h, grad_w, scale)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, scale = ctx.saved_tensors
        factor = grad_out * scale
        return (None if grad_h is None else grad_h * factor, None if grad_w is None else grad_w * factor,
                None, None, None, None)
