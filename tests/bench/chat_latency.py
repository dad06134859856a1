"""Chat latency through the whole HTTP path vs the trainer's generator called in-process.

    OMP_NUM_THREADS=1 python tests/bench/chat_latency.py [--depth 4] [--tokens 64] [--runs 5] [--concurrent 16]

One run, one model, one prompt: (1) direct: trainer.sample.complete / chat in this process; (2) SSE:
POST /api/chat on a live waitress server (the model in its model-server subprocess); (3) OpenAI:
POST /v1/chat/completions with stream=true. Time to first token is measured from sending the request to
the first text arriving (direct: from the call to the first delta); tokens/s over the tokens after the
first. Then --concurrent streams at once to the same model: all must finish, none may starve, p95 TTFT.
Greedy decoding (temperature 0) with a fixed max_tokens so every path generates the same tokens.
Targets (issue 5): first-token overhead under 50 ms once warm; HTTP tokens/s at least 0.9x direct.
Human lines first, then one JSON line last.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
# nanochat_studio and trainer are installed (pip install -e .); the test fixtures are not, so
# tests/ goes on the path for `chat_fixtures`.
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

PROMPT = "Once upon a time, a little fox"


def build_checkpoint(out: Path, depth: int) -> Path:
    """A depth-``depth`` model (untrained weights: speed does not depend on them) with a real tokenizer."""
    import torch

    from trainer import demo
    from trainer.checkpoint import save_checkpoint
    from trainer.model import GPT, GPTConfig
    from trainer.sizing import shape_for
    from trainer.tokenizer import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.train_from_iterator(list(demo.generate_stories(seed=0, n=300)), vocab_size=1024)
    tok.save(out / "tokenizer")
    cfg = GPTConfig.from_shape(shape_for(depth, tok.vocab_size, 512))
    model = GPT(cfg)
    model.init_weights()
    return save_checkpoint(out, 0, model, [torch.optim.SGD(model.parameters(), lr=0.0)], {}, out / "tokenizer",
                           {"model": cfg.to_dict(), "train": {"note": "chat_latency bench"}})


class Direct:
    """The trainer's generator in this process, on the same checkpoint the server loads."""

    def __init__(self, ckpt: Path):
        import torch

        from trainer import sample

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        self.sample = sample
        self.model, self.tok, _ = sample.load_for_inference(str(ckpt), "cpu")

    def run(self, mode: str, n_tokens: int) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        if mode == "chat":
            gen = self.sample.chat(self.model, self.tok, [{"role": "user", "content": PROMPT}],
                                   max_tokens=n_tokens, temperature=0)
        else:
            gen = self.sample.complete(self.model, self.tok, PROMPT, max_tokens=n_tokens, temperature=0)
        first = last = None
        n = 0
        for _ in gen:
            last = time.perf_counter()
            first = first or last
        n = gen.completion_tokens
        return first - t0, (n - 1) / (last - first) if n > 1 else 0.0, n


def stream_http(port: int, path: str, body: dict, headers: dict) -> tuple[float, float, int, str]:
    """(ttft s, tokens/s after the first, tokens, finish) reading the SSE body as it arrives. Tokens are the
    server's count (a delta may carry several tokens when the reader falls behind)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    data = json.dumps(body).encode()
    t0 = time.perf_counter()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **headers})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{path}: HTTP {resp.status} {resp.read()[:300]!r}")
    buf = b""
    first = last = None
    n = 0
    finish = ""
    while True:
        chunk = resp.read1(65536)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            frame, buf = buf.split(b"\n\n", 1)
            event, payload = "message", None
            for line in frame.split(b"\n"):
                if line.startswith(b"event:"):
                    event = line[6:].strip().decode()
                elif line.startswith(b"data:"):
                    payload = line[5:].strip()
            if payload is None:
                continue
            if payload == b"[DONE]":
                break
            obj = json.loads(payload)
            text = None
            if event == "delta":
                text = obj["text"]
            elif event == "done":
                finish = obj["finish_reason"]
                n = obj["completion_tokens"]
            elif obj.get("usage"):
                n = obj["usage"]["completion_tokens"]
            elif "choices" in obj and obj["choices"]:
                text = obj["choices"][0]["delta"].get("content")
                finish = obj["choices"][0].get("finish_reason") or finish
            elif event == "error" or "error" in obj:
                raise RuntimeError(f"stream error: {obj}")
            if text:
                last = time.perf_counter()
                first = first or last
    conn.close()
    return first - t0, (n - 1) / (last - first) if n > 1 else 0.0, n, finish


def via_pool(pool, model, mode: str, n_tokens: int) -> tuple[float, float, int]:
    """The model server through inference.ModelPool in this process: the IPC part of the HTTP path."""
    payload = [{"role": "user", "content": PROMPT}] if mode == "chat" else PROMPT
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for item in pool.stream(model, mode, payload, {"max_tokens": n_tokens, "temperature": 0}):
        if isinstance(item, str):
            last = time.perf_counter()
            first = first or last
        elif item is not None:
            n = item.completion_tokens
    return first - t0, (n - 1) / (last - first) if n > 1 else 0.0, n


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=4, help="model depth (width 64 x depth)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--runs", type=int, default=15, help="measured runs per path (after one warm-up); fewer swing by +-10%% on a shared CPU")
    ap.add_argument("--concurrent", type=int, default=16, help="simultaneous streams to one model")
    args = ap.parse_args()

    from chat_fixtures import LiveServer, add_model, make_chat_app

    from nanochat_studio import accounts, auth

    work = Path(tempfile.mkdtemp(prefix="ncs-bench-chat-"))
    ckpt = build_checkpoint(work / "run", args.depth)
    app = make_chat_app(work / "home", mode="solo")
    server = LiveServer(app, threads=args.concurrent + 8)
    owner = accounts.solo_owner()
    model = add_model(owner, ckpt, name=f"bench depth {args.depth}")
    _, key = auth.create_api_key(owner, "bench")
    pool = app.extensions["model_pool"]
    results: dict = {"depth": args.depth, "tokens": args.tokens, "runs": args.runs,
                     "threads": int(os.environ["OMP_NUM_THREADS"])}
    try:
        sse_body = {"model_id": model.id, "mode": "complete", "prompt": PROMPT, "max_tokens": args.tokens,
                    "temperature": 0, "save": False}
        v1_body = {"model": str(model.id), "messages": [{"role": "user", "content": PROMPT}], "stream": True,
                   "stream_options": {"include_usage": True}, "max_tokens": args.tokens, "temperature": 0}
        bearer = {"Authorization": f"Bearer {key}"}
        t0 = time.perf_counter()
        stream_http(server.port, "/api/chat", sse_body, {})  # loads the model server: cold start
        results["cold_start_s"] = round(time.perf_counter() - t0, 3)
        stream_http(server.port, "/v1/chat/completions", v1_body, bearer)

        rows = {}
        engine = Direct(ckpt)
        for name, mode, path, body, hdr in (("sse", "complete", "/api/chat", sse_body, {}),
                                            ("openai", "chat", "/v1/chat/completions", v1_body, bearer)):
            engine.run(mode, args.tokens)  # warm
            d, p, h = [], [], []
            for _ in range(args.runs):  # interleaved, so a busy machine slows every path alike
                d.append(engine.run(mode, args.tokens))
                p.append(via_pool(pool, model, mode, args.tokens))
                h.append(stream_http(server.port, path, body, hdr))
            row = {
                "direct_ttft_ms": round(statistics.median(x[0] for x in d) * 1000, 2),
                "http_ttft_ms": round(statistics.median(x[0] for x in h) * 1000, 2),
                "direct_tps": round(statistics.median(x[1] for x in d), 1),
                "http_tps": round(statistics.median(x[1] for x in h), 1),
                "direct_tokens": d[0][2], "http_tokens": h[0][2],
                "pool_ttft_ms": round(statistics.median(x[0] for x in p) * 1000, 2),
                "pool_tps": round(statistics.median(x[1] for x in p), 1),
            }
            row["ttft_overhead_ms"] = round(row["http_ttft_ms"] - row["direct_ttft_ms"], 2)
            row["tps_ratio"] = round(row["http_tps"] / row["direct_tps"], 3) if row["direct_tps"] else None
            row["meets_targets"] = row["ttft_overhead_ms"] < 50 and (row["tps_ratio"] or 0) >= 0.9
            rows[name] = row
            print(f"{name:6s} ({mode}): TTFT direct {row['direct_ttft_ms']:.1f} ms, HTTP {row['http_ttft_ms']:.1f} ms "
                  f"(overhead {row['ttft_overhead_ms']:+.1f} ms); tokens/s direct {row['direct_tps']:.0f}, "
                  f"HTTP {row['http_tps']:.0f} ({row['tps_ratio']:.2f}x); tokens {row['direct_tokens']}/"
                  f"{row['http_tokens']} -> {'OK' if row['meets_targets'] else 'MISSES TARGET'}")
            print(f"         of which model server + socket (ModelPool in-process, no HTTP): TTFT "
                  f"{row['pool_ttft_ms']:.1f} ms, {row['pool_tps']:.0f} tokens/s")
        results.update(rows)

        # --- N streams at once ---
        n = args.concurrent
        out: list = [None] * n
        errors: list = []
        barrier = threading.Barrier(n)

        def one(i):
            try:
                barrier.wait()
                started = time.perf_counter()
                ttft, tps, deltas, finish = stream_http(server.port, "/api/chat", sse_body, {})
                out[i] = (ttft, tps, deltas, finish, time.perf_counter() - started)
            except Exception as e:  # reported, not raised: the summary says how many failed
                errors.append(repr(e))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        wall = time.perf_counter() - t0
        done = [o for o in out if o]
        ttfts = [o[0] * 1000 for o in done]
        totals = [o[4] for o in done]
        all_tokens = sum(o[2] for o in done)
        conc = {
            "streams": n, "finished": len(done), "errors": errors[:3],
            "all_full_length": all(o[2] == rows["sse"]["http_tokens"] for o in done),
            "ttft_p50_ms": round(pct(ttfts, 50), 1) if done else None,
            "ttft_p95_ms": round(pct(ttfts, 95), 1) if done else None,
            "ttft_max_ms": round(max(ttfts), 1) if done else None,
            "first_finish_s": round(min(totals), 3) if done else None,
            "wall_s": round(wall, 3), "aggregate_tps": round(all_tokens / wall, 1),
            "per_stream_tps_min": round(min(o[1] for o in done), 1) if done else None,
            "per_stream_tps_max": round(max(o[1] for o in done), 1) if done else None,
        }
        # starving = a stream got its first token only after another had already finished
        conc["none_starved"] = bool(done) and conc["ttft_max_ms"] / 1000 < conc["first_finish_s"]
        results["concurrent"] = conc
        print(f"{n} concurrent /api/chat streams: {len(done)}/{n} finished in {wall:.2f} s "
              f"({conc['aggregate_tps']:.0f} tokens/s together, {conc['per_stream_tps_min']}-"
              f"{conc['per_stream_tps_max']} each); TTFT p50 {conc['ttft_p50_ms']} ms, p95 {conc['ttft_p95_ms']} ms, "
              f"max {conc['ttft_max_ms']} ms; first stream done at {conc['first_finish_s']} s -> "
              f"{'none starved' if conc['none_starved'] else 'SOME STARVED'}")
        results["server_stats"] = pool.server_stats(model)
        print(f"cold start (spawn + load + first answer): {results['cold_start_s']} s")
    finally:
        server.close()
        pool.close()
    print(json.dumps(results, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
