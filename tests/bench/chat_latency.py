"""Chat latency and throughput through the whole HTTP path, from one stream to 32 at once.

    OMP_NUM_THREADS=1 python tests/bench/chat_latency.py [--depth 4] [--tokens 64] [--runs 15]
        [--levels 1,4,16,32] [--rounds 5] [--baseline /work/main]

One run, one model, one prompt. (1) One stream, three ways: direct (trainer.sample in this process), the
model server through ModelPool (no HTTP), and HTTP: POST /api/chat (SSE) and POST /v1/chat/completions
with stream=true. Time to first token from sending the request to the first text; tokens/s over the
tokens after the first. (2) The sweep: N streams of /api/chat at once (N in --levels), from a client
process of their own (as real clients are; not threads sharing the web server's GIL), after one
unmeasured warm-up round (the first batch of a new size pays one-time costs in torch), each level
--rounds times, medians reported: aggregate tokens/s (all tokens / wall time), TTFT p50/p95/max, and
whether any stream starved (got its first token only after another had finished). (3) With
--baseline PATH (a checkout of this project, e.g. main): the same sweep against that checkout's model
server (its trainer/serve.py started from PATH behind a second app), measured in this same run.
(4) The same levels straight to the model server's Unix socket (one connection, no web app, no HTTP),
so the sweep's losses split into the server's and the web path's. (5) The engine alone, in this
process: 16 decode rows against one, and 16 prompts prefilled at once against one, which bound what
the server can reach (see engine_ceiling).
Greedy decoding (temperature 0) with a fixed max_tokens so every path generates the same tokens.
Targets (issue 5): first-token overhead under 50 ms once warm; HTTP tokens/s at least 0.9x direct.
Targets (issue 14): 16 streams reach >= 6x the aggregate tokens/s of one; TTFT p95 with 16 streams
< 4x the single-stream TTFT; one stream alone >= 0.95x the baseline's.
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
        return first - t0, (n - 1) / (last - first) if n > 1 and last > first else 0.0, n


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
    # a reader that fell behind gets the rest as one delta: no rate after the first token then
    return first - t0, (n - 1) / (last - first) if n > 1 and last > first else 0.0, n, finish


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
    return first - t0, (n - 1) / (last - first) if n > 1 and last > first else 0.0, n


def starter(checkout: str, baseline_ckpt: str):
    """A ModelPool start_server: the checkpoint copy ``baseline_ckpt`` is served by ``trainer.serve`` of
    another checkout (its trainer package first on PYTHONPATH; its default --max-active, 16), every
    other checkpoint by ours, as runner.start_model_server starts it."""
    import subprocess

    from nanochat_studio.runner import start_model_server

    def start(checkpoint_dir, socket_path, device, settings, *, stderr=None, max_active=16):
        if os.path.abspath(checkpoint_dir) != os.path.abspath(baseline_ckpt):
            return start_model_server(checkpoint_dir, socket_path, device, settings, stderr=stderr,
                                      max_active=max_active)
        max_active = 16
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.path.abspath(checkout))
        argv = [sys.executable, "-m", "trainer.serve", "--socket", socket_path, "--checkpoint", checkpoint_dir,
                "--device", device or "auto", "--max-active", str(max_active)]
        return subprocess.Popen(argv, env=env, cwd=os.path.abspath(checkout), stdout=subprocess.DEVNULL,
                                stderr=stderr, start_new_session=True)

    return start


def concurrent(port: int, body: dict, n: int) -> dict:
    """``concurrent_here`` in a child process: the clients of a real server are never inside its process,
    and 32 client threads parsing SSE would take the GIL from the web server they measure (it made every
    stream see its first token at the same late moment)."""
    import subprocess

    proc = subprocess.run([sys.executable, __file__, "--client", json.dumps({"port": port, "body": body, "n": n})],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"client process failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def concurrent_here(port: int, body: dict, n: int) -> dict:
    """n /api/chat streams started together; their TTFTs, tokens and the wall time."""
    out: list = [None] * n
    errors: list = []
    barrier = threading.Barrier(n)

    def one(i):
        try:
            barrier.wait()
            started = time.perf_counter()
            ttft, tps, tokens, finish = stream_http(port, "/api/chat", body, {})
            out[i] = (ttft, tps, tokens, finish, time.perf_counter() - started, started + ttft)
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
    return {
        "finished": len(done), "errors": errors[:3], "tokens": sum(o[2] for o in done),
        "ttft_p50_ms": pct(ttfts, 50) if done else None, "ttft_p95_ms": pct(ttfts, 95) if done else None,
        "ttft_max_ms": max(ttfts) if done else None, "first_finish_s": min(o[4] for o in done) if done else None,
        "wall_s": wall, "aggregate_tps": sum(o[2] for o in done) / wall,
        "t0": t0, "first_at": sorted(o[5] for o in done),  # perf_counter is the system's monotonic clock: other processes can place their events
        "per_stream_tps_min": min(o[1] for o in done) if done else None,
    }


def sweep(port: int, body: dict, levels: list[int], rounds: int, label: str) -> dict:
    """Each level ``rounds`` times, levels interleaved (a busy moment hits them all); medians."""
    runs: dict[int, list[dict]] = {n: [] for n in levels}
    warm = {n: concurrent(port, body, n)["ttft_p95_ms"] for n in levels}  # one-time costs, reported apart
    print(f"{label:8s} warm-up round (not in the medians), TTFT p95 ms: {warm}")
    for _ in range(rounds):
        for n in levels:
            runs[n].append(concurrent(port, body, n))
    out = {}
    for n, rs in runs.items():
        med = lambda key: round(statistics.median(r[key] for r in rs), 1)  # noqa: E731
        row = {"streams": n, "finished": min(r["finished"] for r in rs), "errors": sum((r["errors"] for r in rs), [])[:3],
               "aggregate_tps": med("aggregate_tps"), "ttft_p50_ms": med("ttft_p50_ms"), "ttft_p95_ms": med("ttft_p95_ms"),
               "ttft_max_ms": med("ttft_max_ms"), "wall_s": round(statistics.median(r["wall_s"] for r in rs), 3),
               "per_stream_tps_min": med("per_stream_tps_min"),
               # starving = a stream got its first token only after another had already finished
               "none_starved": all(r["finished"] == n and r["ttft_max_ms"] / 1000 < r["first_finish_s"] for r in rs)}
        out[str(n)] = row
        print(f"{label:8s} {n:3d} streams: {row['finished']}/{n} finished, {row['aggregate_tps']:7.0f} tokens/s together, "
              f"TTFT p50 {row['ttft_p50_ms']} ms, p95 {row['ttft_p95_ms']} ms, max {row['ttft_max_ms']} ms, "
              f"slowest stream {row['per_stream_tps_min']} tokens/s -> {'none starved' if row['none_starved'] else 'SOME STARVED'}")
    out["warmup_ttft_p95_ms"] = {str(n): v for n, v in warm.items()}
    return out


def socket_level(path: str, body: dict, n: int) -> dict:
    """n requests at once on one connection to the model server: its own aggregate tokens/s and TTFTs."""
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(300)
    s.connect(path)
    sampling = {"max_tokens": body["max_tokens"], "temperature": body["temperature"]}
    t0 = time.perf_counter()
    s.sendall(b"".join((json.dumps({"id": str(i), "mode": "complete", "prompt": body["prompt"],
                                    "sampling": sampling}) + "\n").encode() for i in range(n)))
    buf, first, done, tokens = b"", {}, 0, 0
    while done < n:
        chunk = s.recv(1 << 20)
        if not chunk:
            raise RuntimeError("the model server closed the connection")
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            msg = json.loads(line)
            if "delta" in msg:
                first.setdefault(msg["id"], time.perf_counter() - t0)
            elif msg.get("done") or "error" in msg:
                done += 1
                tokens += msg.get("completion_tokens", 0)
    wall = time.perf_counter() - t0
    s.close()
    ttfts = [t * 1000 for t in first.values()]
    return {"aggregate_tps": tokens / wall, "ttft_p50_ms": pct(ttfts, 50), "ttft_p95_ms": pct(ttfts, 95)}


def server_sweep(path: str, body: dict, levels: list[int], rounds: int) -> dict:
    """``socket_level`` per level, levels interleaved, after one warm-up round; medians."""
    for n in levels:
        socket_level(path, body, n)
    runs: dict[int, list[dict]] = {n: [] for n in levels}
    for _ in range(rounds):
        for n in levels:
            runs[n].append(socket_level(path, body, n))
    out = {}
    for n, rs in runs.items():
        out[str(n)] = {k: round(statistics.median(r[k] for r in rs), 1) for k in rs[0]}
        print(f"server   {n:3d} streams (socket, no HTTP): {out[str(n)]['aggregate_tps']:7.0f} tokens/s together, "
              f"TTFT p50 {out[str(n)]['ttft_p50_ms']} ms, p95 {out[str(n)]['ttft_p95_ms']} ms")
    return out


def engine_ceiling(ckpt: Path, n: int, runs: int) -> dict:
    """What the model alone allows (trainer.engine.Engine in this process: no server, no socket, no
    HTTP), in blocks of consecutive steps of each kind, blocks interleaved, medians: decode tokens/s with ``n``
    sequences over one (the server's aggregate ratio cannot exceed it), and the time to prefill ``n``
    prompts at once over one prompt (the floor of the TTFT ratio when ``n`` requests arrive together;
    a new request's first token comes out of its prefill step)."""
    import torch

    from trainer import sample
    from trainer.engine import Chunk, Engine

    model, tok, _ = sample.load_for_inference(str(ckpt), "cpu")
    prompt = [tok.bos_id] + list(tok.encode(PROMPT))
    engine = Engine(model, max_slots=n)
    slots = [engine.alloc() for _ in range(n)]
    engine.step([Chunk(s, 0, prompt) for s in slots])
    times: dict[str, list[float]] = {"decode_1": [], f"decode_{n}": [], "prefill_1": [], f"prefill_{n}": []}

    def block(key: str, chunks_at) -> None:
        """Steps in a row (a stream's steps follow each other: one row reads the weights in another
        layout than many, so alternating single steps would find them out of cache), the first unkept."""
        for i in range(17):
            chunks = chunks_at(i)
            t0 = time.perf_counter()
            engine.step(chunks)
            if i:
                times[key].append(time.perf_counter() - t0)

    for _ in range(max(runs, 5)):  # blocks interleaved, so a busy moment hits every kind
        # decode rows continue each cache a little further, as a stream does
        block("decode_1", lambda i: [Chunk(slots[0], len(prompt) + i, [5])])
        block(f"decode_{n}", lambda i: [Chunk(s, len(prompt) + i, [5]) for s in slots])
        block("prefill_1", lambda i: [Chunk(slots[0], 0, prompt)])
        block(f"prefill_{n}", lambda i: [Chunk(s, 0, prompt) for s in slots])
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"rows": n, "prompt_tokens": len(prompt), **{f"{k}_ms": round(v * 1000, 3) for k, v in med.items()},
           f"decode_{n}_vs_1_tps": round(n * med["decode_1"] / med[f"decode_{n}"], 2),
           f"prefill_{n}_vs_1_time": round(med[f"prefill_{n}"] / med["prefill_1"], 2)}
    print(f"engine alone (no server, no HTTP), {torch.get_num_threads()} thread(s): {n} decode rows give "
          f"{out[f'decode_{n}_vs_1_tps']}x one row's tokens/s ({out['decode_1_ms']} vs {out[f'decode_{n}_ms']} ms a step); "
          f"{n} prompts of {len(prompt)} tokens prefill in {out[f'prefill_{n}_vs_1_time']}x one prompt's time "
          f"({out['prefill_1_ms']} vs {out[f'prefill_{n}_ms']} ms)")
    return out


def summarise(results: dict, levels: list[int]) -> None:
    """The issue's ratios, from the sweeps of this run."""
    ours = results["sweep"]
    if "1" not in ours:
        return
    one = ours["1"]
    ratios = {f"aggregate_{n}_vs_1": round(ours[str(n)]["aggregate_tps"] / one["aggregate_tps"], 2)
              for n in levels if n != 1}
    ratios.update({f"ttft_p95_{n}_vs_1": round(ours[str(n)]["ttft_p95_ms"] / one["ttft_p50_ms"], 2)
                   for n in levels if n != 1})
    server = results.get("server_sweep")
    if server and "1" in server:
        ratios.update({f"server_aggregate_{n}_vs_1": round(server[str(n)]["aggregate_tps"] / server["1"]["aggregate_tps"], 2)
                       for n in levels if n != 1})
        ratios.update({f"server_ttft_p95_{n}_vs_1": round(server[str(n)]["ttft_p95_ms"] / server["1"]["ttft_p50_ms"], 2)
                       for n in levels if n != 1})
    ceiling = results.get("engine_ceiling")
    if ceiling:
        ratios["engine_decode_16_vs_1"] = ceiling["decode_16_vs_1_tps"]
        ratios["engine_prefill_16_vs_1_time"] = ceiling["prefill_16_vs_1_time"]
    base = results.get("baseline_sweep")
    if base and "1" in base:
        ratios["one_stream_vs_baseline"] = round(one["aggregate_tps"] / base["1"]["aggregate_tps"], 3)
        ratios.update({f"aggregate_{n}_vs_baseline": round(ours[str(n)]["aggregate_tps"] / base[str(n)]["aggregate_tps"], 2)
                       for n in levels if str(n) in base})
    if "16" in ours:
        ratios["meets_targets"] = (ratios.get("aggregate_16_vs_1", 0) >= 6 and ratios.get("ttft_p95_16_vs_1", 99) < 4
                                   and ratios.get("one_stream_vs_baseline", 1.0) >= 0.95)
    results["ratios"] = ratios
    print("ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))


def bench_app(home: Path, streams: int, pool_kw: dict):
    """make_chat_app's app with its stream caps and API rate limits set for ``streams`` clients of one
    user at once (the defaults, 6 streams a user, would answer most of a 16-stream level with 429)."""
    from nanochat_studio.app import create_app
    from nanochat_studio.inference import ModelPool
    from nanochat_studio.settings import load_settings

    settings = load_settings(environ={
        "NCS_HOME": str(home), "NCS_MAX_STREAMS": str(streams + 4), "NCS_MAX_STREAMS_PER_USER": str(streams + 4),
        "NCS_API_RATE_LIMIT": "100000 per minute", "NCS_API_KEY_RATE_LIMIT": "100000 per minute"}, mode="solo")
    app = create_app(settings)
    app.config.update(TESTING=True, WTF_CSRF_ENABLED=False, NCS_SETTINGS=settings)
    app.extensions["model_pool"] = ModelPool(settings, device="cpu", **pool_kw)
    return app


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--client":  # the client side of one sweep level (see concurrent)
        job = json.loads(sys.argv[2])
        print(json.dumps(concurrent_here(job["port"], job["body"], job["n"])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=4, help="model depth (width 64 x depth)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--runs", type=int, default=15, help="measured runs per path (after one warm-up); fewer swing by +-10%% on a shared CPU")
    ap.add_argument("--levels", default="1,4,16,32", help="numbers of simultaneous streams to one model")
    ap.add_argument("--rounds", type=int, default=5,
                    help="repeats of each level (medians reported; 3 left the one-stream level, the ratios' "
                         "denominator, swinging by 30%% on the shared CPU)")
    ap.add_argument("--max-active", type=int, default=32, help="requests one model server decodes together")
    ap.add_argument("--baseline", metavar="PATH", help="a checkout whose model server to sweep side by side")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    from chat_fixtures import LiveServer, add_model

    from nanochat_studio import accounts, auth

    work = Path(tempfile.mkdtemp(prefix="ncs-bench-chat-"))
    ckpt = build_checkpoint(work / "run", args.depth)
    pool_kw = {"max_active": args.max_active, "queue_limit": max(levels), "max_loaded": 2}
    if args.baseline:  # a copy of the checkpoint whose server is the baseline checkout's (one app, one store)
        import shutil

        base_ckpt = shutil.copytree(ckpt, work / "baseline-ckpt")
        pool_kw["start_server"] = starter(args.baseline, str(base_ckpt))
    app = bench_app(work / "home", max(levels), pool_kw)
    server = LiveServer(app, threads=app.config["NCS_SETTINGS"].threads)
    owner = accounts.solo_owner()
    model = add_model(owner, ckpt, name=f"bench depth {args.depth}")
    _, key = auth.create_api_key(owner, "bench")
    pool = app.extensions["model_pool"]
    results: dict = {"depth": args.depth, "tokens": args.tokens, "runs": args.runs, "rounds": args.rounds,
                     "max_active": args.max_active, "threads": int(os.environ["OMP_NUM_THREADS"]),
                     # the machine is shared: the load says how much of it this run had
                     "cpus": os.cpu_count(), "load_at_start": [round(x, 2) for x in os.getloadavg()]}
    base = None
    if args.baseline:
        base = {"server": server, "body": None, "model": add_model(owner, base_ckpt, name="baseline")}
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
        if base is not None:
            base["body"] = dict(sse_body, model_id=base["model"].id)
            stream_http(base["server"].port, "/api/chat", base["body"], {})  # its cold start

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

        # --- N streams at once: ours, then the baseline's ---
        results["sweep"] = sweep(server.port, sse_body, levels, args.rounds, "ours")
        if base is not None:
            results["baseline_sweep"] = sweep(base["server"].port, base["body"], levels, args.rounds, "baseline")
        results["server_sweep"] = server_sweep(pool._servers[model.id].socket_path, sse_body, levels, args.rounds)
        if 16 in levels:
            results["engine_ceiling"] = engine_ceiling(ckpt, 16, args.runs)
        summarise(results, levels)
        results["server_stats"] = pool.server_stats(model)
        # which kernels the model server's engine timed and kept on this machine (trainer/engine.py)
        ping = pool._servers[model.id].op({"op": "ping"}, 5.0)
        results["server_kernels"] = {k: ping.get(k) for k in ("products", "products_probe_ms", "attention",
                                                             "attention_probe_ms", "decode_one",
                                                             "decode_one_probe_ms", "split_rows", "split_probe_ms")}
        print(f"model server kernels (timed at load): {results['server_kernels']}")
        results["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
        print(f"load average (1, 5, 15 min) at start {results['load_at_start']}, at end {results['load_at_end']} "
              f"on {results['cpus']} CPUs (other work shares them)")
        print(f"cold start (spawn + load + first answer): {results['cold_start_s']} s")
    finally:
        server.close()
        pool.close()

    print(json.dumps(results, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
