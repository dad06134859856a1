"""Decoding speed: tokens/s with and without the KV cache, and time to first token.

    OMP_NUM_THREADS=1 python tests/bench/generate.py [--depth 4 --vocab 8192 --prompt 64 --new 256]

A randomly initialised model (speed does not depend on the weights) in float32 on the CPU, with
torch's thread count taken from OMP_NUM_THREADS. The model's sequence_len is prompt + new tokens
rounded up to a power of two, so the cached run never has to rebuild its cache and measures
plain incremental decoding. Both kinds run --repeats times, interleaved, and the best of each is
reported (the machine is shared). Prints human lines, then LAST one line of JSON with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from trainer import sizing
from trainer.model import GPT, GPTConfig
from trainer.sample import generate_tokens


def timed_generation(model, prompt, new_tokens, use_cache):
    """(seconds to the first token, tokens/s over the whole generation)."""
    t0 = time.perf_counter()
    first = None
    n = 0
    for _ in generate_tokens(model, prompt, max_tokens=new_tokens, temperature=0, use_cache=use_cache):
        n += 1
        if first is None:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    assert n == new_tokens
    return first, n / total


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--new", type=int, default=256, help="tokens to generate")
    p.add_argument("--repeats", type=int, default=3, help="runs of each kind, best taken (the CPU is shared)")
    args = p.parse_args()

    seq_len = 1 << (args.prompt + args.new - 1).bit_length()
    shape = sizing.shape_for(args.depth, args.vocab, seq_len)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_shape(shape)).eval()
    prompt = torch.randint(0, args.vocab, (args.prompt,)).tolist()
    threads = torch.get_num_threads()
    print(f"depth {args.depth}: {model.num_params() / 1e6:.2f}M params, width {shape.n_embd}, vocab {args.vocab}, "
          f"seq_len {seq_len}, float32 on cpu, {threads} thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")

    timed_generation(model, prompt, 8, True)  # warm-up: allocator, kernels
    # interleaved, best of each: other processes on the machine slow single runs down at random
    cached, uncached = [], []
    for _ in range(args.repeats):
        cached.append(timed_generation(model, prompt, args.new, True))
        uncached.append(timed_generation(model, prompt, args.new, False))
    ttft_cached, tps_cached = min(c[0] for c in cached), max(c[1] for c in cached)
    ttft_uncached, tps_uncached = min(u[0] for u in uncached), max(u[1] for u in uncached)
    speedup = tps_cached / tps_uncached

    print(f"cached:   {tps_cached:8.1f} tokens/s  ({args.new} new tokens after a {args.prompt}-token prompt)")
    print(f"uncached: {tps_uncached:8.1f} tokens/s  (whole context recomputed every token)")
    print(f"speed-up: {speedup:.1f}x (target >= 5x)")
    print(f"time to first token: {ttft_cached * 1000:.1f} ms cached, {ttft_uncached * 1000:.1f} ms uncached")
    print(json.dumps({"bench": "generate", "depth": args.depth, "vocab_size": args.vocab, "seq_len": seq_len,
                      "prompt_tokens": args.prompt, "new_tokens": args.new, "threads": threads,
                      "cached_tokens_per_s": round(tps_cached, 1), "uncached_tokens_per_s": round(tps_uncached, 1),
                      "speedup": round(speedup, 2), "ttft_ms": round(ttft_cached * 1000, 2),
                      "ttft_uncached_ms": round(ttft_uncached * 1000, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
