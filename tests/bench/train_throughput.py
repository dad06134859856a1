"""Training throughput and MFU on this device, in float32 and bf16, against peaks measured in the same run.

    OMP_NUM_THREADS=2 .venv/bin/python tests/bench/train_throughput.py --depths 4
    OMP_NUM_THREADS=2 .venv/bin/python tests/bench/train_throughput.py --depths 4 --nanochat /path/to/nanochat
    .venv/bin/python tests/bench/train_throughput.py --device cuda --depths 12,20 --seq 2048 --batch 16

A step is the trainer's: forward, backward, gradient clipping, AdamW + Muon, each phase timed on its
own (forward / backward / optimizer in the JSON). Contestants, all built first and then timed in
turns (``--rounds`` rounds of ``--steps`` steps each, so a neighbour's burst on a shared machine falls
on every contestant alike):

- "plain": our model with trainer/cpu_ops.py turned off (textbook PyTorch, float32): the baseline.
- "eager": what the trainer runs on a CPU in float32 (oneDNN products, lean element-wise passes).
- "bf16": the same under bf16 autocast, with Muon in bf16: ``--dtype bfloat16`` (float32 weights).
- "compiled": torch.compile of the model (float32 on a CPU, bf16 autocast on CUDA).
- "nanochat": with ``--nanochat DIR``, karpathy/nanochat's own model and optimizer from that checkout,
  at its own depth-to-shape rule (tests/bench/nanochat_side.py), in its own dtype. Without it no
  ratio to nanochat is printed: a ratio is only ever to a system measured in the same run.

Figures use the median step (a few steps are slowed by neighbours; the median is what a long run
sees). MFU = flops_per_token * tokens/s / peak, with the peak of the dtype the contestant runs in:
on a CPU the best float32 and bf16 GEMM rates measured here on the model's own product shapes
(faster of MKL and oneDNN); on CUDA the datasheet dense-bf16 peak of the GPU (trainer.train's
GPU_BF16_PEAK: NVIDIA's H100/H200 SXM 989, A100 312, L4 121, RTX 4090 165 TFLOP/s), with the measured
bf16 GEMM rate reported beside it. The auto-dtype probe's own timing (trainer/precision.py) is
reported too. Human lines go to stderr; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time

import torch

from trainer import cpu_ops, optim, precision, sizing
from trainer.model import GPT, GPTConfig
from trainer.train import peak_flops


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn, device, min_s: float = 0.6, min_iters: int = 3) -> float:
    """Seconds per call, the best of three timed batches after a warm-up call."""
    fn()
    best = float("inf")
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while n < min_iters or time.perf_counter() - t0 < min_s / 3:
            fn()
            n += 1
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def measured_peaks(shape: sizing.ModelShape, rows: int, device: torch.device) -> dict:
    """{"float32": ..., "bfloat16": ...} FLOP/s: the best GEMM rate on the model's MLP and head products."""
    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):
        best = 0.0
        for k, n in ((shape.n_embd, 4 * shape.n_embd), (shape.n_embd, shape.vocab_size)):
            a = torch.randn(rows, k, device=device).to(dtype)
            b = torch.randn(n, k, device=device).to(dtype)
            s = _best(lambda: a @ b.t(), device)
            if device.type == "cpu":
                s = min(s, _best(lambda: cpu_ops.mm_nt(a, b), device))  # oneDNN where it applies
            best = max(best, 2 * rows * k * n / s)
        peaks[str(dtype).replace("torch.", "")] = best
    return peaks


class Ours:
    """Our model and optimizers in one of the modes above."""

    def __init__(self, mode: str, shape: sizing.ModelShape, device: torch.device):
        self.mode, self.device = mode, device
        self.dtype = "bfloat16" if mode == "bf16" or (device.type == "cuda" and mode != "fp32") else "float32"
        torch.manual_seed(0)
        self.model = GPT(GPTConfig.from_shape(shape)).to(device)
        self.opts = optim.build_optimizers(self.model.param_groups(), shape.n_embd, device_type=device.type,
                                           dtype=self.dtype)
        self.fwd = torch.compile(self.model) if mode == "compiled" else self.model
        self.flops_per_token = sizing.flops_per_token(shape)
        self.params = self.model.num_params()

    def forward(self, x, y):
        plain = cpu_ops.plain() if self.mode == "plain" else contextlib.nullcontext()
        with precision.autocast(self.device.type, self.dtype), plain:
            return self.fwd(x, y)

    def optimizer_step(self):
        optim.clip_grad_norm(self.model.parameters(), 1.0)
        for o in self.opts:
            o.step()
        self.model.zero_grad(set_to_none=True)


def time_steps(side, x, y, steps: int, device) -> list[tuple[float, float, float]]:
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = side.forward(x, y)
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        side.optimizer_step()
        _sync(device)
        out.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
    return out


def bench_depth(depth: int, modes: list[str], args, device) -> list[dict]:
    shape = sizing.shape_for(depth, args.vocab, args.seq)
    sides = {}
    for mode in modes:
        t0 = time.perf_counter()
        if mode == "nanochat":
            import nanochat_side
            side = nanochat_side.Side(args.nanochat, depth, args.vocab, args.seq, device, args.nanochat_dtype)
        else:
            side = Ours(mode, shape, device)
        side.x = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
        side.y = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
        time_steps(side, side.x, side.y, 2, device)  # warm-up: compilation, allocator, oneDNN kernels
        side.warmup_s = time.perf_counter() - t0
        side.times = []
        sides[mode] = side
    for _ in range(args.rounds):  # interleaved: every contestant sees the same machine
        for side in sides.values():
            side.times += time_steps(side, side.x, side.y, args.steps, device)
    peaks = measured_peaks(shape, args.batch * args.seq, device)
    table_peak = peak_flops(device)  # CUDA: the datasheet bf16 peak; None on a CPU
    results = []
    for mode, side in sides.items():
        steps = [sum(t) for t in side.times]
        step_s = statistics.median(steps)
        tps = args.batch * args.seq / step_s
        peak = table_peak if device.type == "cuda" and table_peak else peaks.get(side.dtype)
        phases = {name: statistics.median(t[i] for t in side.times) for i, name in
                  enumerate(("forward_s", "backward_s", "optimizer_s"))}
        results.append({"depth": depth, "mode": mode, "dtype": side.dtype, "params": side.params,
                        "shape": getattr(side, "shape", None) or {"n_layer": shape.n_layer, "n_embd": shape.n_embd,
                                                                   "n_head": shape.n_head},
                        "step_s": step_s, "step_s_min": min(steps), "tokens_per_sec": tps, **phases,
                        "flops_per_token": side.flops_per_token, "achieved_flops": side.flops_per_token * tps,
                        "peak_flops": peak, "peak_source": "datasheet" if device.type == "cuda" and table_peak
                        else "measured", "mfu": side.flops_per_token * tps / peak if peak else None,
                        "warmup_s": side.warmup_s, "steps_timed": len(steps)})
        r = results[-1]
        print(f"depth {depth} {mode:9s} {side.dtype:8s}: {tps:8,.0f} tok/s  {step_s * 1e3:7.1f} ms/step "
              f"(fwd {phases['forward_s'] * 1e3:.0f} / bwd {phases['backward_s'] * 1e3:.0f} / "
              f"opt {phases['optimizer_s'] * 1e3:.0f})  MFU {100 * (r['mfu'] or 0):5.1f}% of "
              f"{(peak or 0) / 1e9:,.0f} GFLOP/s", file=sys.stderr, flush=True)
    print(f"depth {depth} measured GEMM peaks: " + ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks.items())
          + (f"; datasheet bf16 {table_peak / 1e12:,.0f} TFLOP/s" if table_peak else ""), file=sys.stderr)
    for r in results:
        r["measured_peaks"] = peaks
    return results


def ratios(results: list[dict]) -> dict:
    by = {(r["depth"], r["mode"]): r["tokens_per_sec"] for r in results}
    out: dict = {}
    for (depth, mode), tps in by.items():
        for base in ("plain", "eager", "nanochat"):
            if mode != base and (depth, base) in by and mode not in ("plain",):
                out.setdefault(f"depth{depth}", {})[f"{mode}_over_{base}"] = tps / by[depth, base]
    return out


def _load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", default="2,4,6")
    p.add_argument("--modes", default=None, help="default: plain,eager,bf16 on a CPU; eager,compiled on CUDA")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed steps per contestant per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--nanochat", metavar="DIR", help="a karpathy/nanochat checkout to time beside ours")
    p.add_argument("--nanochat-dtype", choices=("float32", "bfloat16"),
                   help="override nanochat's own dtype rule (NANOCHAT_DTYPE)")
    args = p.parse_args()
    device = torch.device(args.device)
    modes = (args.modes or ("eager,compiled" if device.type == "cuda" else "plain,eager,bf16")).split(",")
    if args.nanochat and "nanochat" not in modes:
        modes.append("nanochat")
    if "nanochat" in modes and not args.nanochat:
        p.error("the nanochat contestant needs --nanochat DIR")
    if device.type == "cpu":
        cpu_ops.keep_freed_memory()  # as trainer.train.setup_runtime does for CPU runs
    load_before = _load()
    probe = precision.probe_cpu() if device.type == "cpu" else None
    results = []
    for depth in [int(d) for d in args.depths.split(",")]:
        results += bench_depth(depth, modes, args, device)
    summary = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
               else None, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "load_before": load_before, "load_after": _load(), "auto_dtype_probe": probe,
               "results": results, "ratios": ratios(results)}
    for depth, rs in summary["ratios"].items():
        print(f"{depth}: " + ", ".join(f"{k} {v:.2f}x" for k, v in rs.items()), file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
