"""Optimizers and schedules: Muon for the hidden matrices, AdamW for embeddings and the lm_head.

Why two optimizers (the nanochat / modded-nanogpt recipe): the 2-D weight matrices inside the
transformer blocks train fastest when each update is orthogonalised (all singular values pushed
towards 1), which Muon does with a few Newton-Schulz iterations; embedding tables and the output
head are not "linear maps between hidden spaces" in the same sense and stay with AdamW.

Learning rates and width: the defaults below were tuned by nanochat at n_embd = 768. Muon's
update is already scale-free (unit spectral norm, times a shape factor), so its lr is used as is.
The AdamW learning rates are multiplied by (n_embd / 768) ** -0.5, so a narrower model gets a
proportionally larger step and a wider one a smaller step (muP-like width scaling).

Under DistributedDataParallel both optimizers see gradients that DDP has already averaged across
ranks, so every rank computes exactly the same update and the replicas stay identical; no extra
communication happens here.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import torch

from trainer import cpu_ops

REFERENCE_WIDTH = 768  # the width nanochat's learning rates were tuned at

# Defaults (nanochat's figures).
MATRIX_LR = 0.02
EMBEDDING_LR = 0.2
UNEMBEDDING_LR = 0.004
ADAM_BETAS = (0.8, 0.95)
ADAM_EPS = 1e-10
MUON_MOMENTUM = 0.95
MUON_MOMENTUM_START = 0.85
MUON_MOMENTUM_WARMUP_STEPS = 300

# Quintic Newton-Schulz coefficients (Keller Jordan's figures): chosen to push small singular values
# up quickly; the result has singular values in roughly [0.7, 1.2] rather than exactly 1, which
# trains as well as a true polar factor and costs five iterations instead of dozens.
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximately orthogonal matrix with the singular vectors of ``g`` (2-D).

    Each step maps X to (a I + b A + c A^2) X with A = X X^T, i.e. every singular value s to
    s (a + b s^2 + c s^4), leaving the singular vectors alone. On CUDA that iteration runs as is,
    in bfloat16 (fast, and good enough: the iteration is self-correcting); elsewhere in float32.

    On CPU, for clearly wide or tall matrices of 256 rows or more (the MLP's 1:4 and the fused
    QKV's 3:1 from depth 4 on), the same polynomial is applied in the eigenbasis of the small Gram
    matrix instead (:func:`_spectral`): one float64 eigendecomposition and a few products in place
    of ``steps`` rounds of products. It computes what the iteration computes, to the iteration's own
    float32 accuracy (the tests hold both to a float64 reference of the iteration); where that
    cannot be promised (many steps on a very wide matrix) or the eigendecomposition fails, the
    iteration runs instead.
    """
    if g.ndim != 2:
        raise ValueError(f"newton_schulz wants a matrix, got shape {tuple(g.shape)}")
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(0) > x.size(1)
    if tall:  # work on the smaller Gram matrix
        x = x.mT
    # Scale so the spectral norm is at most 1 (the Frobenius norm bounds it from above).
    x = x / (x.norm() + eps)
    out = None
    if SPECTRAL and x.device.type == "cpu" and x.dtype == torch.float32:
        out = _spectral(x, steps)
    if out is None:
        out = _iterate(x, steps)
    if tall:
        out = out.mT
    return out.to(g.dtype)


SPECTRAL = True  # the eigenbasis route on CPU (see newton_schulz); False runs the plain iteration


def _iterate(x: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = _NS_COEFFS
    for _ in range(steps):
        gram = cpu_ops.mm_nt(x, x)
        # addmm fuses the scale-and-add into the GEMM: no extra passes over the matrices.
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x


# The eigenbasis route. With X wide (m x n, m <= n) and G = X X^T = U diag(s^2) U^T, `steps` rounds
# of the iteration turn X into U diag(f) U^T X, where f is the product of every round's factor
# a + b s^2 + c s^4, computed on the m eigenvalues as scalars.
#
# Why float64. The route works with squared singular values, and an eigendecomposition is accurate
# to a fraction of the largest eigenvalue, not of each one: in float32 an eigenvalue is off by
# ~eps32 ||G|| (measured ~2 eps32 ||G||), so squared singular values below ~1e-6 are wrong by large
# factors. The polynomial is steepest where it lifts s from its linear regime (f ~ a^steps) to
# ~1, around s ~ 2 / a^steps: there an eigenvalue error d moves the output by up to 0.15 a^(2 steps) d.
# For five steps that is ~3e-2 ||G|| in float32 (measured against float64 on real training
# gradients: 3e-3 to 5e-2, where the float32 iteration is off by 1e-5), and for ten steps the error
# exceeds the value itself: a singular value that eigh underestimates gets f(s_est) s_true > 1,
# 1.4 on a 64 x 64 Gaussian matrix on an Intel Xeon, ~50 on a real gradient on an AMD EPYC. In float64
# (Gram matrix of the float32 X, eigh, and the m x m product U diag(f) U^T) the same error is
# ~n eps64, below the float32 iteration's own rounding (~eps32 a^steps) for up to ~12 steps; only
# the last product, Q X, is float32, as the iteration's are.
#
# Eigenvalues below that rounding floor cannot be told apart from zero; they are set to zero, so
# their whole subspace gets f = a^steps, the linear regime's factor: exact to first order there
# (the guard below keeps the second-order error under the iteration's own rounding) and blind to how
# eigh mixed their eigenvectors.
#
# Why only for wide or tall matrices of 256 rows or more. The float64 eigendecomposition costs what
# ~35 m^3 float32 flops do; five rounds of the iteration cost 20 m^2 n + 10 m^3. Measured on one
# thread, the route's time over the iteration's (AMD EPYC here / an Intel Xeon with AMX):
# 256 x 1024 0.79 / 0.79, 384 x 1536 0.73 / 0.67, 512 x 2048 0.66 / 0.62; 256 x 768 ~1.0 / 0.87,
# 384 x 1152 0.79 / 0.77; 1:2 and square 1.0-2.3; and at 128 rows (depth 2) 1.1-2.2 whatever the
# shape, the decomposition's fixed costs dominating. So: the MLP's 1:4 and the fused QKV's 3:1 from
# depth 4 on. A rule of shapes, not a timing probe: the route must not differ between the runs a
# resume joins.
SPECTRAL_MIN_RATIO = 2.5  # use the route when n >= this * m ...
SPECTRAL_MIN_ROWS = 256  # ... and m >= this
_EPS32 = torch.finfo(torch.float32).eps
_EPS64 = torch.finfo(torch.float64).eps
_STEEPEST = 0.15  # max over s of s |d f / d(s^2)|, divided by a^(2 steps) (the same for any steps)


def _spectral_applies(m: int, n: int, steps: int) -> bool:
    a = _NS_COEFFS[0]
    # the route's rounding (eigenvalues off by up to ~n eps64, ||X||_F = 1, times the polynomial's
    # steepest slope) must stay below the float32 iteration's (eps32, amplified by up to a^steps)
    return (m >= SPECTRAL_MIN_ROWS and n >= SPECTRAL_MIN_RATIO * m
            and n * _EPS64 * _STEEPEST * a ** (2 * steps) <= _EPS32 * a ** steps)


def _spectral(x: torch.Tensor, steps: int) -> torch.Tensor | None:
    """The iteration's result through the float64 eigenbasis (see above), or None where it does not apply."""
    m, n = x.shape
    if not _spectral_applies(m, n, steps):
        return None
    a, b, c = _NS_COEFFS
    x64 = x.double()
    try:
        s2, u = torch.linalg.eigh(x64 @ x64.mT)
    except RuntimeError:  # torch.linalg.LinAlgError: did not converge
        return None
    s2 = torch.where(s2 > n * _EPS64, s2, 0.0)  # below the rounding floor: zero (also any negative one)
    factor = torch.ones_like(s2)
    for _ in range(steps):
        step = s2.square().mul_(c).add_(s2, alpha=b).add_(a)  # a + b s^2 + c s^4
        factor.mul_(step)
        s2.mul_(step.square())
    # U diag(f) U^T in float64, rounded once: forming it from float32 eigenvectors would round each
    # of them first, and f reaches a^steps (measured 5-10x less exact)
    q = ((u * factor) @ u.mT).float()
    return q @ x


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D parameters.

    Each step: momentum buffer m <- beta*m + (1-beta)*g; the update direction is the Nesterov
    look-ahead g + beta*(m - g) (or m without Nesterov), orthogonalised with :func:`newton_schulz`
    and scaled by sqrt(max(1, rows/cols)) so tall matrices (e.g. the MLP's down-projection viewed
    as out x in) get per-element updates of the same RMS as square ones. Weight decay is decoupled.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float = MATRIX_LR,
                 momentum: float = MUON_MOMENTUM, nesterov: bool = True, ns_steps: int = 5,
                 weight_decay: float = 0.0):
        if lr < 0 or not 0 <= momentum < 1 or ns_steps < 1 or weight_decay < 0:
            raise ValueError("Muon: need lr >= 0, 0 <= momentum < 1, ns_steps >= 1, weight_decay >= 0")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D parameters, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []  # (param, direction, group)
        for group in self.param_groups:
            beta = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - beta)
                work.append((p, g.lerp(buf, beta) if group["nesterov"] else buf, group))
        updates = _orthogonalize_all([(d, group["ns_steps"]) for _, d, group in work])
        for (p, _, group), update in zip(work, updates):
            lr, wd = group["lr"], group["weight_decay"]
            scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(update, alpha=-lr * scale)
        return loss


# Newton-Schulz of many small matrices on a multi-core CPU: one matrix per core, each core on one
# thread, beats every matrix on all cores. An eigendecomposition of a 256 x 256 matrix scales
# poorly past one thread (3.2 ms on two, 4.3 ms on one, measured here) and so do 256^3 products;
# run side by side, a depth-4 model's 16 matrices take ~80 ms instead of ~110-140 ms. Each matrix
# is still computed by exactly one single-threaded call, so results do not depend on which worker
# ran it, or when: runs stay bit-for-bit repeatable (resume tests hold them to it).
_pool: dict[int, ThreadPoolExecutor] = {}


def _single_threaded() -> None:
    torch.set_num_threads(1)  # OpenMP and MKL thread counts are per thread: the caller keeps its own


def _orthogonalize_all(jobs: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
    threads = torch.get_num_threads()
    on_cpu = all(d.device.type == "cpu" for d, _ in jobs)
    if threads < 2 or len(jobs) < 2 or not on_cpu or not PARALLEL:
        return [newton_schulz(d, steps=n) for d, n in jobs]
    pool = _pool.get(threads)
    if pool is None:
        pool = _pool[threads] = ThreadPoolExecutor(threads, thread_name_prefix="muon",
                                                   initializer=_single_threaded)
    # largest first, so the last matrices to finish are small ones and the workers end together
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i][0].numel())
    futures = {i: pool.submit(newton_schulz, jobs[i][0], jobs[i][1]) for i in order}
    return [futures[i].result() for i in range(len(jobs))]


PARALLEL = True  # one matrix per core on CPU (see above); False runs them one after another


def width_lr_scale(n_embd: int) -> float:
    """The factor applied to AdamW learning rates: (n_embd / 768) ** -0.5."""
    return (n_embd / REFERENCE_WIDTH) ** -0.5


def build_optimizers(param_groups: dict[str, list[torch.nn.Parameter]], n_embd: int, *,
                     matrix_lr: float = MATRIX_LR, embedding_lr: float = EMBEDDING_LR,
                     unembedding_lr: float = UNEMBEDDING_LR, weight_decay: float = 0.0,
                     device_type: str = "cpu") -> list[torch.optim.Optimizer]:
    """``[AdamW, Muon]`` for a model's ``param_groups()`` ({"matrix", "embedding", "lm_head"}).

    Every group records its base learning rate as ``initial_lr`` so :func:`set_lr` can apply a
    schedule multiplier. A non-2-D parameter that turns up in "matrix" (a gain, a bias) goes to
    AdamW at the unembedding rate, since Newton-Schulz is undefined for it.
    """
    unknown = set(param_groups) - {"matrix", "embedding", "lm_head"}
    if unknown:
        raise ValueError(f"unknown parameter groups: {sorted(unknown)}")
    scale = width_lr_scale(n_embd)
    matrices = [p for p in param_groups.get("matrix", []) if p.ndim == 2]
    stray = [p for p in param_groups.get("matrix", []) if p.ndim != 2]
    adam_groups = [
        dict(params=list(param_groups.get("embedding", [])), lr=embedding_lr * scale),
        dict(params=list(param_groups.get("lm_head", [])) + stray, lr=unembedding_lr * scale),
    ]
    adam_groups = [g for g in adam_groups if g["params"]]
    for g in adam_groups:
        g["initial_lr"] = g["lr"]
    # The fused kernel makes one pass over each tensor where the for-each loop makes about eight: on
    # CPU that is ~3 ms instead of ~15 ms a step for a depth-4 model's embedding and head (measured
    # here), and it is deterministic. MPS and others keep the for-each loop.
    adam_kwargs = dict(betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay)
    if device_type in ("cuda", "cpu"):
        adam_kwargs["fused"] = True
    optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW(adam_groups, **adam_kwargs)]
    if matrices:
        muon = Muon(matrices, lr=matrix_lr, momentum=MUON_MOMENTUM, weight_decay=weight_decay)
        for g in muon.param_groups:
            g["initial_lr"] = g["lr"]
        optimizers.append(muon)
    return optimizers


def lr_multiplier(step: int, total_steps: int, warmup_ratio: float = 0.0,
                  warmdown_ratio: float = 0.2, final_lr_frac: float = 0.0) -> float:
    """The schedule's factor at ``step`` (0-based) of ``total_steps``.

    Linear warmup from ~0 to 1 over the first ``warmup_ratio`` of the run, constant at 1, then a
    linear warmdown over the last ``warmdown_ratio`` to ``final_lr_frac`` at the final step.
    It depends only on (step, total_steps), so a resumed run that keeps its planned total follows
    exactly the same curve.
    """
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    warmup = round(warmup_ratio * total_steps)
    warmdown = round(warmdown_ratio * total_steps)
    if warmup and step < warmup:
        return (step + 1) / warmup
    if warmdown and step >= total_steps - warmdown:
        progress = (total_steps - step) / warmdown  # 1 at the start of warmdown, 1/warmdown at the end
        return progress + (1 - progress) * final_lr_frac
    return 1.0


def muon_momentum(step: int, start: float = MUON_MOMENTUM_START, end: float = MUON_MOMENTUM,
                  warmup_steps: int = MUON_MOMENTUM_WARMUP_STEPS) -> float:
    """Muon's momentum, ramped linearly from ``start`` to ``end`` over ``warmup_steps``."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * end


def set_lr(optimizers: list[torch.optim.Optimizer], multiplier: float) -> None:
    """Set every group's lr to its ``initial_lr`` times ``multiplier``."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier


def set_muon_momentum(optimizers: list[torch.optim.Optimizer], momentum: float) -> None:
    for opt in optimizers:
        if isinstance(opt, Muon):
            for group in opt.param_groups:
                group["momentum"] = momentum


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Clip in place (when ``max_norm`` > 0) and return the total gradient norm as a float."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    if max_norm and max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))


__all__ = [
    "Muon", "newton_schulz", "build_optimizers", "lr_multiplier", "muon_momentum", "set_lr",
    "set_muon_momentum", "width_lr_scale", "clip_grad_norm",
]
