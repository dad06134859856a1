"""Training throughput and MFU on this device, against a peak measured in the same run.

    OMP_NUM_THREADS=1 /work/venv/bin/python tests/bench/train_throughput.py
    /work/venv/bin/python tests/bench/train_throughput.py --depths 4 --modes eager --steps 20

A training step here is the trainer's: forward, backward, gradient clipping, AdamW + Muon. Tokens/s
counts batch * seq_len per step. MFU = flops_per_token * tokens/s / peak, where the peak is the best
float32 GEMM rate (CPU) or bf16 GEMM rate (CUDA) measured on the model's own matmul shapes:
(B*T, n_embd) x (n_embd, 4*n_embd) for the MLP and (B*T, n_embd) x (n_embd, vocab) for the lm_head.
Human lines go to stderr; the last line on stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from trainer import optim, sizing
from trainer.model import GPT, GPTConfig


def _time(fn, min_s: float = 1.0, min_iters: int = 3) -> float:
    """Seconds per call, the best of several timed batches after a warmup call."""
    fn()
    best = float("inf")
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while n < min_iters or time.perf_counter() - t0 < min_s / 3:
            fn()
            n += 1
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def measured_peak(shape: sizing.ModelShape, rows: int, device: torch.device) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    figures = {}
    for name, (k, n) in {"mlp": (shape.n_embd, 4 * shape.n_embd),
                         "lm_head": (shape.n_embd, shape.vocab_size)}.items():
        a = torch.randn(rows, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        s = _time(lambda: a @ b)
        figures[name] = 2 * rows * k * n / s
    return figures


def bench(depth: int, mode: str, vocab: int, seq: int, batch: int, steps: int, device: torch.device) -> dict:
    shape = sizing.shape_for(depth, vocab, seq)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_shape(shape)).to(device)
    opts = optim.build_optimizers(model.param_groups(), shape.n_embd, device_type=device.type)
    fwd = torch.compile(model) if mode == "compiled" else model
    x = torch.randint(0, vocab, (batch, seq), device=device)
    y = torch.randint(0, vocab, (batch, seq), device=device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    muon_s = [0.0]

    def step():
        with ctx:
            loss = fwd(x, y)
        loss.backward()
        optim.clip_grad_norm(model.parameters(), 1.0)
        for o in opts:
            t = time.perf_counter()
            o.step()
            if isinstance(o, optim.Muon):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                muon_s[0] += time.perf_counter() - t
        model.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()  # warmup (compilation happens here)
    step()
    warmup_s = time.perf_counter() - t0
    muon_s[0] = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / steps
    tps = batch * seq / step_s
    peaks = measured_peak(shape, batch * seq, device)
    peak = max(peaks.values())
    fpt = sizing.flops_per_token(shape)
    return {"depth": depth, "mode": mode, "params": model.num_params(), "n_embd": shape.n_embd,
            "vocab": vocab, "seq": seq, "batch": batch, "step_s": step_s, "tokens_per_sec": tps,
            "flops_per_token": fpt, "achieved_flops": fpt * tps, "peak_flops": peak,
            "peak_by_shape": peaks, "mfu": fpt * tps / peak, "warmup_s": warmup_s,
            # Newton-Schulz is real work that flops_per_token does not count: its share of the step
            "muon_share": muon_s[0] / steps / step_s}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", default="2,4,6")
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    results = []
    for depth in [int(d) for d in args.depths.split(",")]:
        for mode in args.modes.split(","):
            r = bench(depth, mode, args.vocab, args.seq, args.batch, args.steps, device)
            results.append(r)
            print(f"depth {depth} {mode:8s}: {r['tokens_per_sec']:8,.0f} tok/s  {r['step_s'] * 1e3:7.1f} ms/step  "
                  f"{r['achieved_flops'] / 1e9:6.1f} GFLOP/s of a measured {r['peak_flops'] / 1e9:6.1f} "
                  f"-> MFU {100 * r['mfu']:5.1f}%  muon {100 * r['muon_share']:4.1f}%  (warmup {r['warmup_s']:.1f}s)", file=sys.stderr, flush=True)
    summary = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "results": results}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
