"""Benchmark: the default demo job (pretraining on the demo stories, then the demo chat stage) per depth,
then fresh-seed questions about new stories, answered greedily through the trainer's own sampling.

    OMP_NUM_THREADS=2 python tests/bench/demo_chat.py                   # depth 2 (the issue's target)
    python tests/bench/demo_chat.py --depth 2 3 4 --questions 200
    python tests/bench/demo_chat.py --checkpoint runs/x/checkpoints/step_0007000   # score a checkpoint only
    python tests/bench/demo_chat.py --base runs/d2/checkpoints/step_0005062  # chat stage after a finished pretraining

For each depth it runs ``python -m trainer.train --depth D --device cpu --chat-data demo`` (the trainer's
defaults for everything else, as the default demo job), times the training (the sum of both stages'
``elapsed_s``, and the wall time of the process), then asks ``--questions`` questions from
``trainer.demo_chat.qa_items(n, seed)`` with a seed the conversation set never used, and scores each
greedy reply with ``demo_chat.score``: correct (the right fact) and grammatical (every sentence one
the demo checker accepts). Targets (issue 12): at depth 2, >= 80% correct, >= 90% grammatical, <= 10
minutes of training. Human lines first; the last line is one JSON object. The machine may be shared:
the load average at the start and the end is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

FRESH_SEED = 90_210  # questions from a seed no training conversation used (those use --seed, 42 by default)


def ask(checkpoint: str, n: int, seed: int, show: int = 3) -> dict:
    """Accuracy and grammaticality of greedy replies to ``n`` fresh questions."""
    import torch

    from trainer import checkpoint as ckpt
    from trainer import demo_chat, sample
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, tokenizer, _ = ckpt.load_model(checkpoint)
    correct = grammatical = 0
    by_kind: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    for i, item in enumerate(demo_chat.qa_items(n, seed)):
        msgs = [{"role": "user", "content": demo_chat.prompt(item.story, item.question)}]
        reply = "".join(sample.chat(model, tokenizer, msgs, max_tokens=48, temperature=0.0))
        ok, gram = demo_chat.score(reply, item)
        correct += ok
        grammatical += gram
        by_kind.setdefault(item.kind, [0, 0])
        by_kind[item.kind][0] += ok
        by_kind[item.kind][1] += 1
        if i < show:
            print(f"  Q: {item.question}  A: {reply!r}  (fact {item.answer}: {'right' if ok else 'wrong'})", flush=True)
    return {"questions": n, "accuracy": correct / n, "grammatical": grammatical / n,
            "by_kind": {k: round(a / b, 3) for k, (a, b) in sorted(by_kind.items())},
            "ask_s": round(time.perf_counter() - t0, 1)}


def train(depth: int, out: Path, extra: list[str], base: str | None = None) -> dict:
    argv = [sys.executable, "-m", "trainer.train", "--depth", str(depth), "--device", "cpu", "--chat-data", "demo",
            "--out", str(out), *extra]
    if base:  # the chat stage alone, after this run's pretraining (the same steps as one two-stage run)
        argv += ["--init-from", base]
    print(f"depth {depth}: {' '.join(argv[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"the trainer exited {proc.returncode}")
    start, done = events[0], events[-1]
    stage = next(e for e in events if e["event"] == "stage")
    if base:
        saved = json.loads((Path(base) / "state.json").read_text())
        pre_elapsed = float(saved["elapsed_s"])
        stage = dict(stage, step=saved["step"])
        done = dict(done, elapsed_s=done["elapsed_s"] + pre_elapsed)
    else:
        pre_elapsed = max(e["elapsed_s"] for e in events if e["event"] == "step" and e.get("stage") == "pretrain")
    return {"depth": depth, "checkpoint": done["checkpoint"], "pretrain_steps": stage["step"],
            "chat_steps": stage["steps"], "params": start["params"],
            "train_minutes": round(done["elapsed_s"] / 60, 2), "pretrain_minutes": round(pre_elapsed / 60, 2),
            "chat_minutes": round((done["elapsed_s"] - pre_elapsed) / 60, 2), "wall_minutes": round(wall / 60, 2),
            "final_chat_val_loss": [e for e in events if e["event"] == "eval"][-1]["val_loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, nargs="+", default=[2], help="depths to run (2-4)")
    p.add_argument("--questions", type=int, default=200)
    p.add_argument("--seed", type=int, default=FRESH_SEED, help="the questions' seed")
    p.add_argument("--out", default="/tmp/ncs-bench-demo-chat")
    p.add_argument("--checkpoint", help="score this checkpoint only (no training)")
    p.add_argument("--trainer-args", default="", help="extra trainer flags, e.g. '--chat-steps 800'")
    p.add_argument("--base", help="a pretraining checkpoint of the default demo job at this depth: run only the "
                   "chat stage from it (--init-from) and count its pretraining time from its state.json")
    args = p.parse_args()
    load0 = os.getloadavg()
    print(f"load average at start: {load0[0]:.2f} on {os.cpu_count()} CPUs; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    results = []
    if args.checkpoint:
        r = {"checkpoint": args.checkpoint} | ask(args.checkpoint, args.questions, args.seed)
        results.append(r)
        print(f"  accuracy {r['accuracy']:.1%}, grammatical {r['grammatical']:.1%}  {r['by_kind']}", flush=True)
    for depth in ([] if args.checkpoint else args.depth):
        r = train(depth, Path(args.out) / f"d{depth}", args.trainer_args.split(), args.base)
        r |= ask(r["checkpoint"], args.questions, args.seed)
        results.append(r)
        print(f"depth {depth}: {r['train_minutes']} min of training ({r['pretrain_minutes']} pretraining "
              f"{r['pretrain_steps']} steps + {r['chat_minutes']} chat {r['chat_steps']} steps; wall "
              f"{r['wall_minutes']} min); accuracy {r['accuracy']:.1%}, grammatical {r['grammatical']:.1%}; "
              f"{r['by_kind']}", flush=True)
    load1 = os.getloadavg()
    print(f"load average at the end: {load1[0]:.2f} (1 min), {load1[2]:.2f} (15 min)", flush=True)
    print(json.dumps({"bench": "demo_chat", "question_seed": args.seed, "load_start": round(load0[0], 2),
                      "load_end_15min": round(load1[2], 2), "results": results}))


if __name__ == "__main__":
    main()
