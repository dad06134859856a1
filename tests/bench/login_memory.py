"""Memory of the web process under parallel password guesses (issue 10, point 4), with production scrypt.

    .venv/bin/python tests/bench/login_memory.py [--guesses 16] [--baseline /work/main/.venv/bin/python]

Starts the real ``serve`` (lab mode, throttling loosened so every guess is hashed) with an account made
by the CLI, fires ``--guesses`` wrong-password sign-ins at once and samples the server's RSS every 20 ms.
With ``--baseline`` the same is done, in the same run, with another interpreter (another checkout's
venv), and the ratio of peak growth is printed. Each scrypt hash takes ~32 MiB: unbounded, 16 parallel
guesses grew the process by ~500 MiB; bounded by ``password_hash_concurrency`` (2) they add ~64 MiB.

Human lines first; the LAST line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

import requests

SERVING = re.compile(r"Serving on (http://\S+?)/?$")


def rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return int(fh.read().split("VmRSS:")[1].split()[0]) // 1024


def measure(python: str, guesses: int) -> dict:
    home = tempfile.mkdtemp(prefix="ncs-login-mem-")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("NCS_")}, "NCS_HOME": home,
           "NCS_MODE": "lab", "NCS_WORKER": "false", "NCS_LOGIN_LIMIT_PER_ADDRESS": "100000 per minute",
           "NCS_LOGIN_LIMIT_PER_ACCOUNT": "100000 per minute"}
    subprocess.run([python, "-m", "nanochat_studio", "users", "create", "a@example.com", "--password",
                    "correct horse battery"], env=env, check=True, capture_output=True, cwd=home)
    # cwd: the data directory, so `-m nanochat_studio` imports the interpreter's own install, not a
    # checkout that happens to be the current directory.
    proc = subprocess.Popen([python, "-m", "nanochat_studio", "serve", "--port", "0"], env=env, cwd=home,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = None
    for line in proc.stdout:  # type: ignore[union-attr]
        found = SERVING.search(line.strip())
        if found:
            url = found.group(1)
            break
    assert url, "serve did not start"
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        requests.get(url + "/healthz", timeout=30)
        before = rss_mib(proc.pid)
        peak, done = [before], threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_mib(proc.pid))
                time.sleep(0.02)

        answers: list[int] = []

        def guess(i: int) -> None:
            s = requests.Session()
            page = s.get(url + "/account/login", timeout=60).text
            token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page).group(1)
            answers.append(s.post(url + "/account/login", allow_redirects=False, timeout=120, data={
                "csrf_token": token, "email": "a@example.com", "password": f"guess {i}"}).status_code)

        threading.Thread(target=watch, daemon=True).start()
        t0 = time.monotonic()
        threads = [threading.Thread(target=guess, args=(i,)) for i in range(guesses)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - t0
        done.set()
        return {"rss_before_mib": before, "rss_peak_mib": peak[0], "growth_mib": peak[0] - before,
                "seconds": round(seconds, 2), "answers": {str(c): answers.count(c) for c in sorted(set(answers))}}
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guesses", type=int, default=16)
    parser.add_argument("--baseline", help="another interpreter to compare in the same run")
    args = parser.parse_args()
    result = {"guesses": args.guesses, "this": measure(sys.executable, args.guesses)}
    print(f"this checkout: {result['this']}")
    if args.baseline:
        result["baseline"] = measure(args.baseline, args.guesses)
        print(f"baseline:      {result['baseline']}")
        result["growth_ratio_baseline_over_this"] = round(
            result["baseline"]["growth_mib"] / max(1, result["this"]["growth_mib"]), 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
