"""Which dtype the matrix products of training run in: ``--dtype auto|float32|bfloat16``.

Weights, gradients and optimizer state are float32 whatever is chosen; "bfloat16" means the
products (and the activations between them) run in bf16 under autocast, as on GPUs.

On CUDA, auto means bf16 wherever the GPU has bf16 units (Ampere and later), as the trainer has
always done. On MPS it means float32. On a CPU it depends on the CPU, by a wide margin either way:
an Intel Xeon with AMX ran a 2048 x 2048 bf16 product at ~2,500 GFLOP/s, 6.6x its float32 peak; an
AMD EPYC Zen 4 (AVX512-BF16) ~390 against ~117 GFLOP/s, ~3x; and CPUs without bf16 instructions
(older EPYC, many laptop CPUs) emulate it, ~100x slower than float32. CPU names and flags
do not say what torch's kernels will do on them, so :func:`cpu_choice` measures both dtypes on a
product the size of a small model's MLP, once per process, and picks bf16 only when it is at least
:data:`MARGIN` times faster: the products are only part of a step (norms, softmax and the loss stay
float32, and operands are converted), so a small edge in the product would not pay for the
conversions around it. 1.5 sits between the two kinds of CPU with room on both sides: at the probe's
shape this Zen 4 measured 2.0-2.3x (a whole depth-1 step 1.4x faster in bf16), AMX more, emulated
bf16 ~0.01x. A resumed ``auto`` run keeps the dtype it started in (trainer/train.py's keep_dtype).
"""

from __future__ import annotations

import time
from typing import Callable

DTYPES = ("auto", "float32", "bfloat16")
MARGIN = 1.5  # bf16 products must be at least this much faster than float32 ones to be chosen
# rows x inner x columns of the probe's product: a depth-4 model's MLP on a 256-row chunk. Big
# enough for the fast kernels to reach their speed, small enough that emulated bf16 costs ~0.1 s.
PROBE_SHAPE = (256, 256, 1024)
PROBE_REPEATS = 5

_cache: dict[str, dict] = {}


def decide(float32_s: float, bfloat16_s: float | None, margin: float = MARGIN) -> str:
    """"bfloat16" when one bf16 product took at most 1/margin of a float32 one, else "float32"
    (also when bf16 failed, ``bfloat16_s`` None, or a timing is not a positive number)."""
    if bfloat16_s is None or not (bfloat16_s > 0) or not (float32_s > 0):
        return "float32"
    return "bfloat16" if float32_s >= margin * bfloat16_s else "float32"


def _best_time(fn: Callable[[], object], repeats: int, give_up_after: float | None = None) -> float:
    """The fastest of ``repeats`` calls after one warm-up call (which also JIT-compiles oneDNN's
    kernel); stops early once a call is slower than ``give_up_after`` seconds: the answer is then
    already clear, and emulated bf16 is slow enough that the full probe would cost seconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if give_up_after is not None and best > give_up_after:
            break
    return best


def probe_cpu(margin: float = MARGIN) -> dict:
    """Time one float32 and one bf16 product as training runs them (trainer/cpu_ops.py's path) on
    this CPU with the current thread count: ``{"float32_s", "bfloat16_s", "speedup", "choice"}``."""
    import torch

    from trainer import cpu_ops
    with torch.autocast("cpu", enabled=False):  # float32 must mean float32 even if called under autocast
        return _probe_cpu(margin)


def _probe_cpu(margin: float) -> dict:
    import torch

    from trainer import cpu_ops
    m, k, n = PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    f32 = _best_time(lambda: cpu_ops.mm_nt(a, b), PROBE_REPEATS)
    ab, bb = a.bfloat16(), b.bfloat16()
    try:
        got = cpu_ops.mm_nt(ab, bb).float()
        # a broken kernel must not win the race: bf16 inputs, float32 accumulation, so the
        # result is within a few bf16 roundings (2^-8 relative) of the float32 product
        ok = bool(torch.allclose(got, a @ b.t(), rtol=0.05, atol=0.05 * k ** 0.5))
        bf16 = _best_time(lambda: cpu_ops.mm_nt(ab, bb), PROBE_REPEATS, give_up_after=margin * f32) if ok else None
    except (RuntimeError, NotImplementedError):
        bf16 = None
    return {"float32_s": f32, "bfloat16_s": bf16, "speedup": (f32 / bf16) if bf16 else None,
            "choice": decide(f32, bf16, margin)}


def cpu_choice() -> dict:
    """:func:`probe_cpu`'s result, measured once per process (like cpu_ops' oneDNN probe)."""
    if "cpu" not in _cache:
        _cache["cpu"] = probe_cpu()
    return _cache["cpu"]


def forget() -> None:
    """Measure again at the next :func:`cpu_choice` (tests; after changing the thread count)."""
    _cache.clear()


# --- attention in a bf16 run on a CPU ----------------------------------------------------------------
# A bf16 run's products are fast, but attention is not a plain product: torch's CPU flash-attention
# kernel works in blocks with its own conversions, and whether its bf16 path beats its float32 one
# depends on the CPU. Measured here (AMD EPYC Zen 4, 2 threads, the depth-2 shape below, forward and
# backward): float32 7.7 ms, bf16 11.1 ms, so a depth-2 step spent ~7 ms (~10%) more on attention in
# bf16 than it needed to. So a bf16 run on a CPU times both at a small model's attention shape, once
# per process, and runs attention in bf16 only when that is not slower; q, k and v are then float32
# (the products around them stay bf16). Timings, not CPU names, decide, as for the products.
ATTENTION_PROBE_SHAPE = (8, 4, 256, 32)  # batch, heads, sequence, head size: the depth-2 CPU default's
ATTENTION_REPEATS = 3


def probe_attention() -> dict:
    """Causal attention's forward and backward in float32 and bf16 on this CPU (torch's kernel, the
    current thread count): ``{"float32_s", "bfloat16_s", "choice"}``, the choice "bfloat16" when bf16
    took at most the float32 time."""
    import torch
    import torch.nn.functional as F
    b, h, t, d = ATTENTION_PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(b, h, t, d, generator=gen) for _ in range(4)]

    def timed(dtype):
        q, k, v = (x.to(dtype).requires_grad_() for x in base[:3])
        grad = base[3].to(dtype)

        def step():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
        return _best_time(step, ATTENTION_REPEATS)

    with torch.autocast("cpu", enabled=False), torch.enable_grad():
        f32 = timed(torch.float32)
        try:
            bf16 = timed(torch.bfloat16)
        except (RuntimeError, NotImplementedError):
            bf16 = None
    choice = "bfloat16" if bf16 is not None and bf16 <= f32 else "float32"
    return {"float32_s": f32, "bfloat16_s": bf16, "choice": choice}


def attention_dtype(dtype: str, device_type: str) -> str:
    """What a run's attention computes in, given the dtype of its products: the same dtype, except a
    bf16 run on a CPU whose probe (:func:`probe_attention`, once per process) found float32 faster."""
    if dtype != "bfloat16" or device_type != "cpu":
        return dtype
    if "attention" not in _cache:
        _cache["attention"] = probe_attention()
    return _cache["attention"]["choice"]


def resolve(requested: str, device_type: str, cuda_bf16: bool | None = None) -> str:
    """The dtype a run on ``device_type`` ("cpu", "cuda", "mps") uses for ``requested``; raises
    ValueError for a dtype the device cannot train in. ``cuda_bf16`` (whether the GPU has bf16
    units) is looked up when not given."""
    if requested not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {requested!r}")
    if device_type == "mps":
        if requested == "bfloat16":
            raise ValueError("dtype bfloat16 is supported on cpu and cuda devices, not on mps")
        return "float32"
    if requested != "auto":
        return requested
    if device_type == "cuda":
        if cuda_bf16 is None:
            import torch
            cuda_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return "bfloat16" if cuda_bf16 else "float32"
    return cpu_choice()["choice"]


def kept(probed: str, saved: str | None, device_type: str, log=None) -> str:
    """The dtype a resumed ``auto`` run trains in: its checkpoint's (``saved``) where the device can,
    else this process's probe's. A timing probe on a busy machine must not switch a run's arithmetic
    halfway, and a resumed run is exact only in the arithmetic it started in."""
    if saved not in ("float32", "bfloat16") or saved == probed or (saved == "bfloat16" and device_type == "mps"):
        return probed
    if log is not None:
        log(f"resuming in {saved}, the dtype the run started in (this machine's probe chose {probed})")
    return saved


def kept_attention(rt, saved_config: dict, log=None) -> str:
    """The attention dtype a resumed run computes in: its checkpoint's where the run keeps the dtype it
    started in (a checkpoint from before this choice existed ran attention in its products' dtype),
    else this process's (``rt.attention``). Like :func:`kept`, so a resume stays exact."""
    train = saved_config.get("train", {}) or {}
    if train.get("dtype") != rt.dtype:
        return rt.attention
    saved = train.get("attention_dtype", rt.dtype)
    if saved not in ("float32", "bfloat16") or saved == rt.attention:
        return rt.attention
    if log is not None:
        log(f"resuming with attention in {saved}, as the run started (this machine's probe chose {rt.attention})")
    return saved


def rank_zeros(dtype: str, device) -> str:
    """Rank 0's choice on every rank of a distributed run: each rank's probe is its own timing."""
    import torch
    import torch.distributed as dist
    flag = torch.tensor([float(dtype == "bfloat16")], device=device)
    dist.broadcast(flag, src=0)
    return "bfloat16" if float(flag) > 0.5 else "float32"


def autocast(device_type: str, dtype: str):
    """The context the forward pass runs in: bf16 autocast for "bfloat16", nothing for "float32"."""
    import contextlib

    import torch
    if dtype == "bfloat16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
