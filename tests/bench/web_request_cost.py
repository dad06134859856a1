"""The web process's CPU per request, by kind: what one request costs the single Python process that
every chat stream enters through (its intake is what N streams arriving together wait for).

    OMP_NUM_THREADS=1 python tests/bench/web_request_cost.py [--requests 300] [--rounds 3]

The app (solo mode, a depth-4 model behind a real model server) is served by waitress in this process;
the requests come one at a time from a client process of its own, so this process's CPU time (user +
system) over a batch, divided by its requests, is the web side's cost of one. Kinds: GET /healthz (the
floor: waitress, Flask and the request hooks), POST /api/chat naming a model that does not exist (404:
plus sign-in, limits and the body), and POST /api/chat answering 1 and 64 tokens (plus the model pool,
the socket and one SSE event per token). Each kind runs --rounds times, kinds interleaved; medians.
Human lines first, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "bench"))


def client(port: int, n: int, method: str, path: str, body: dict | None) -> None:
    """``n`` requests one after another, each on its own connection (as a browser's fetch would), read
    to the end."""
    import http.client

    for _ in range(n):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        if resp.status not in (200, 404):
            raise SystemExit(f"{method} {path}: HTTP {resp.status}")
        conn.close()


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--client":
        client(*json.loads(sys.argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300, help="requests of each kind per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, kinds interleaved (medians reported)")
    args = ap.parse_args()

    from chat_fixtures import LiveServer, add_model
    from chat_latency import PROMPT, bench_app, build_checkpoint

    from nanochat_studio import accounts

    work = Path(tempfile.mkdtemp(prefix="ncs-bench-web-"))
    ckpt = build_checkpoint(work / "run", 4)
    app = bench_app(work / "home", 8, {"max_active": 16, "queue_limit": 16, "max_loaded": 1})
    server = LiveServer(app, threads=app.config["NCS_SETTINGS"].threads)
    model = add_model(accounts.solo_owner(), ckpt, name="bench")

    def chat(tokens: int, model_id: int = model.id) -> dict:
        return {"model_id": model_id, "mode": "complete", "prompt": PROMPT, "max_tokens": tokens,
                "temperature": 0, "save": False}

    kinds = {"healthz": ("GET", "/healthz", None), "chat_404": ("POST", "/api/chat", chat(1, 10**9)),
             "chat_1_token": ("POST", "/api/chat", chat(1)), "chat_64_tokens": ("POST", "/api/chat", chat(64))}
    per_request: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        for rnd in range(args.rounds + 1):  # round 0 warms up (the model server starts), unkept
            for name, (method, path, body) in kinds.items():
                n = args.requests if rnd else 20
                c0 = cpu_seconds()
                subprocess.run([sys.executable, __file__, "--client", json.dumps([server.port, n, method, path, body])],
                               check=True)
                if rnd:
                    per_request[name].append((cpu_seconds() - c0) / n * 1000)
    finally:
        server.close()
        app.extensions["model_pool"].close()

    results = {"requests": args.requests, "rounds": args.rounds, "cpus": os.cpu_count(),
               "load_average": [round(x, 2) for x in os.getloadavg()],
               "web_cpu_ms_per_request": {k: round(statistics.median(v), 3) for k, v in per_request.items()},
               "web_cpu_ms_per_request_all": {k: [round(x, 3) for x in v] for k, v in per_request.items()}}
    for name, ms in results["web_cpu_ms_per_request"].items():
        print(f"{name:15s}: {ms:6.3f} ms of the web process's CPU a request (rounds: {results['web_cpu_ms_per_request_all'][name]})")
    print(json.dumps(results, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
