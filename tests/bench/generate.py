"""Decoding speed of one stream: our engine vs the model's own cached forward, no cache, nanochat's Engine,
and the bound set by reading the weights, all measured in this run.

    OMP_NUM_THREADS=1 python tests/bench/generate.py [--depth 4 --vocab 8192 --prompt 64 --new 256]
        [--nanochat /work/nanochat-ref]

A randomly initialised model (speed does not depend on the weights) in float32 on the CPU, with torch's
thread count taken from OMP_NUM_THREADS. The model's sequence_len is prompt + new tokens rounded up to a
power of two, so no run rebuilds its cache. Paths, each timed --repeats times, interleaved, best taken
(the machine is shared):
- engine: ``trainer.sample.generate_tokens`` (``trainer/engine.py``, what the model server runs);
- forward: the model's own ``GPT.forward`` with its ``KVCache`` (the decode path before the engine);
- uncached: the whole context recomputed every token;
- nanochat (with --nanochat PATH, a checkout of karpathy/nanochat): its ``Engine.generate`` on its own
  GPT of the same shape (layers, width, heads, vocabulary, context; full-context attention), imported
  from PATH in this process. Without the flag no ratio to it is printed.
The bound: bytes a token must read (every block matrix and the head) divided by the read bandwidth
measured here over a buffer of that size (it sits in cache as the weights do), best of many passes.
The products floor: the token's matrix-vector products alone (every block matrix and the head, in the
(in, out) layout the engine decodes from, one after another as a token meets them), no other op: the
time no decode path of these weights can beat on this CPU with torch's kernels. The sum above runs
hot in one buffer; the products stream 17 matrices through the caches, which is what decoding pays.
Human lines, then LAST one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from trainer import sizing
from trainer.model import GPT, GPTConfig, KVCache
from trainer.sample import generate_tokens


def time_tokens(tokens) -> tuple[float, float, int, float]:
    """(seconds to the first token, tokens/s over the whole generation, count, tokens per CPU second of
    this process) for an iterator of tokens. With one thread the CPU rate is the speed the path has with
    a core to itself: on a shared machine it swings far less than the wall-clock rate."""
    t0, c0 = time.perf_counter(), time.process_time()
    first, n = None, 0
    for _ in tokens:
        n += 1
        if first is None:
            first = time.perf_counter() - t0
    return first, n / (time.perf_counter() - t0), n, n / max(time.process_time() - c0, 1e-9)


def forward_path(model: GPT, prompt: list[int], new: int):
    """Greedy decoding through GPT.forward and its KVCache: the cached path before trainer/engine.py."""
    cache = KVCache.for_model(model, 1, model.config.sequence_len)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), kv_cache=cache, last_only=True)[0, -1]
        for _ in range(new):
            token = int(logits.argmax())
            yield token
            logits = model(torch.tensor([[token]]), kv_cache=cache, last_only=True)[0, -1]


def nanochat_engine(path: str, cfg: GPTConfig, prompt: list[int], new: int):
    """nanochat's Engine on its own GPT of our shape; a generator of its tokens."""
    sys.path.insert(0, os.path.abspath(path))
    from nanochat.engine import Engine
    from nanochat.gpt import GPT as NanoGPT
    from nanochat.gpt import GPTConfig as NanoConfig

    class Tok:  # the engine asks for its tool-use tokens; ids the model can never sample stand in
        def encode_special(self, s):
            return -1 - abs(hash(s)) % 1000

        def get_bos_token_id(self):
            return -2000

    torch.manual_seed(0)
    model = NanoGPT(NanoConfig(sequence_len=cfg.sequence_len, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                               n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd, window_pattern="L"),
                    pad_vocab_size_to=1)
    model.init_weights()
    model.eval()
    engine = Engine(model, Tok())

    def run(n=new):
        for column, _ in engine.generate(prompt, num_samples=1, max_tokens=n, temperature=0.0):
            yield column[0]

    return run


def read_bandwidth(nbytes: int, passes: int = 200) -> float:
    """Bytes/s reading a float32 buffer of ``nbytes`` (a sum over it), best of ``passes``: what reading the
    weights once per token can reach on this CPU."""
    buf = torch.randn(max(1, nbytes // 4))
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best


def product_matrices(model: GPT) -> list[torch.Tensor]:
    """Every matrix a token meets, in order, in the (in, out) layout the engine decodes from."""
    mats = [lin.weight.detach().t().contiguous() for blk in model.blocks
            for lin in (blk.attn.c_qkv, blk.attn.c_proj, blk.mlp.c_fc, blk.mlp.c_proj)]
    return mats + [model.lm_head.weight.detach().t().contiguous()]


def products_rate(mats: list[torch.Tensor], tokens: int) -> float:
    """Tokens/s of the products alone: x @ W for every matrix of ``mats`` in turn, for ``tokens`` tokens
    in a row (timed as a whole, as the paths' runs are)."""
    xs = {m.size(0): torch.randn(1, m.size(0)) for m in mats}
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(tokens):
            for m in mats:
                torch.mm(xs[m.size(0)], m)
        return tokens / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--new", type=int, default=256, help="tokens to generate")
    p.add_argument("--repeats", type=int, default=5, help="runs of each path, best taken (the CPU is shared)")
    p.add_argument("--nanochat", metavar="PATH", help="a checkout of karpathy/nanochat to time side by side")
    args = p.parse_args()

    seq_len = 1 << (args.prompt + args.new - 1).bit_length()
    shape = sizing.shape_for(args.depth, args.vocab, seq_len)
    torch.manual_seed(0)
    cfg = GPTConfig.from_shape(shape)
    model = GPT(cfg)
    with torch.no_grad():  # init leaves the output projections at zero: give every matrix real values
        for blk in model.blocks:
            blk.attn.c_proj.weight.normal_(0, 0.02)
            blk.mlp.c_proj.weight.normal_(0, 0.02)
    # as sample.load_for_inference leaves a model to chat with: no gradients, so generate_tokens makes its
    # engine once and keeps it, as the model server does (a model still training gets a fresh engine
    # per generation: ~20-30 ms more before its first token here; the warm-up generation, which makes
    # the engine, prints its first-token time)
    model.eval().requires_grad_(False)
    prompt = torch.randint(0, args.vocab, (args.prompt,)).tolist()
    threads = torch.get_num_threads()
    weight_bytes = 4 * (sum(p.numel() for p in model.blocks.parameters()) + model.lm_head.weight.numel())
    print(f"depth {args.depth}: {model.num_params() / 1e6:.2f}M params, width {shape.n_embd}, vocab {args.vocab}, "
          f"seq_len {seq_len}, float32 on cpu, {threads} thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
          f"{weight_bytes / 1e6:.1f} MB of weights read per token")

    paths = {
        "engine": lambda n=args.new: generate_tokens(model, prompt, max_tokens=n, temperature=0),
        "forward": lambda n=args.new: forward_path(model, prompt, n),
        "uncached": lambda n=args.new: generate_tokens(model, prompt, max_tokens=n, temperature=0, use_cache=False),
    }
    if args.nanochat:
        paths["nanochat"] = nanochat_engine(args.nanochat, cfg, prompt, args.new)
    warm = {name: time_tokens(run(8)) for name, run in paths.items()}  # warm-up: allocator, kernels
    print(f"warm-up: the engine's first generation (it makes the engine) took {warm['engine'][0] * 1000:.1f} ms "
          f"to its first token")
    mats = product_matrices(model)
    products_rate(mats, 8)
    same = list(paths["engine"]()) == list(paths["forward"]())
    results: dict[str, list] = {k: [] for k in paths}
    bandwidth, floor = [], []
    for _ in range(args.repeats):  # interleaved, so a busy moment slows every path alike
        for name, run in paths.items():
            results[name].append(time_tokens(run()))
        bandwidth.append(read_bandwidth(weight_bytes))
        floor.append(products_rate(mats, args.new))
    best = {k: max(r[1] for r in v) for k, v in results.items()}
    best_cpu = {k: max(r[3] for r in v) for k, v in results.items()}
    ttft = {k: min(r[0] for r in v) for k, v in results.items()}
    bw = max(bandwidth)
    bound = bw / weight_bytes

    products = max(floor)
    print(f"read bandwidth over {weight_bytes / 1e6:.1f} MB: {bw / 1e9:.1f} GB/s -> bound {bound:.0f} tokens/s")
    print(f"products floor: the matrix-vector products alone run {products:.0f} tokens/s "
          f"({products * weight_bytes / 1e9:.1f} GB/s through the weights)")
    for name, tps in best.items():
        print(f"{name:9s}: {tps:8.1f} tokens/s ({tps / bound:.0%} of the bound), first token {ttft[name] * 1000:.1f} ms; "
              f"{best_cpu[name]:8.1f} tokens per CPU second")
    out = {"bench": "generate", "depth": args.depth, "vocab_size": args.vocab, "seq_len": seq_len,
           "prompt_tokens": args.prompt, "new_tokens": args.new, "threads": threads,
           "weight_mb": round(weight_bytes / 1e6, 2), "read_gb_s": round(bw / 1e9, 2), "bound_tokens_per_s": round(bound, 1),
           "engine_tokens_per_s": round(best["engine"], 1), "forward_tokens_per_s": round(best["forward"], 1),
           "uncached_tokens_per_s": round(best["uncached"], 1),
           "engine_vs_forward": round(best["engine"] / best["forward"], 2),
           "engine_fraction_of_bound": round(best["engine"] / bound, 3),
           "products_floor_tokens_per_s": round(products, 1),
           "engine_fraction_of_products_floor": round(best["engine"] / products, 3),
           "cache_speedup": round(best["engine"] / best["uncached"], 2),
           "ttft_ms": round(ttft["engine"] * 1000, 2), "engine_first_ttft_ms": round(warm["engine"][0] * 1000, 2),
           "greedy_same_as_forward": same,
           "engine_tokens_per_cpu_s": round(best_cpu["engine"], 1),
           "load_average": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
    if args.nanochat:
        ratio = best["engine"] / best["nanochat"]
        ratio_cpu = best_cpu["engine"] / best_cpu["nanochat"]
        print(f"engine vs nanochat's Engine: {ratio:.2f}x wall clock, {ratio_cpu:.2f}x per CPU second (target >= 2x)")
        out.update(nanochat_tokens_per_s=round(best["nanochat"], 1), engine_vs_nanochat=round(ratio, 2),
                   nanochat_fraction_of_bound=round(best["nanochat"] / bound, 3),
                   nanochat_tokens_per_cpu_s=round(best_cpu["nanochat"], 1), engine_vs_nanochat_cpu=round(ratio_cpu, 2))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
