"""A fast stand-in for ``python -m trainer.train`` that speaks the same progress contract.

    python -m tests.fake_trainer --config RUN_DIR/job.json --out RUN_DIR [--resume]

It reads max_steps / checkpoint_every / data from the config, resumes from its own latest checkpoint
(RUN_DIR/checkpoints/step_NNNNNNN/manifest.json, written last), checkpoints and exits 75 on SIGTERM,
and records what it did in RUN_DIR/fake_log.jsonl (begin/step/end with its pid and whether it found
RUN_DIR/trainer.lock held) so tests can prove no step ran twice and no two trainers overlapped.

Behaviour knobs (environment): FAKE_STEP_S seconds per step (default 0.05); FAKE_EXIT_AT=step:code
exits with ``code`` before that step; FAKE_IGNORE_TERM=1 ignores SIGTERM; FAKE_DEVICE_ERROR_AT=step:gpu
fails before that step like the real trainer on a broken GPU (an ``error`` event with code ``device``,
exit 1), but only when CUDA_VISIBLE_DEVICES is ``gpu``: the same job succeeds on another GPU. It says
"fake trainer starting" on stderr, which the supervisor relays to the process log.
A dataset path to a missing or empty file fails like the real trainer: an error event and exit 65.

Chat tuning (issue 12's contract): with ``chat_data`` in the config it runs a chat stage of ``chat_steps``
(default FAKE_CHAT_STEPS, 4) after pretraining: global step numbers, a ``stage`` field on step, eval,
sample and checkpoint events, a ``stage`` event when the chat stage begins, and ``"kind": "chat"`` in the
config.json of every checkpoint taken in it. With ``init_from`` (a checkpoint directory) and no ``data``
it runs the chat stage alone, its depth read from that checkpoint's config.json. A conversations file
whose first line has no ``messages`` fails like bad data: an error event naming the line, exit 65.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from trainer import progress


def _record(out: Path, **fields) -> None:
    with open(out / "fake_log.jsonl", "a") as fh:
        fh.write(json.dumps({"pid": os.getpid(), "t": time.time(), **fields}) + "\n")


def _lock_is_held(out: Path) -> bool:
    # Our supervisor passed us its flocked fd; a fresh open file description must fail to lock.
    fd = os.open(out / "trainer.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _latest_checkpoint(out: Path) -> int | None:
    steps = [int(p.parent.name.split("_")[1]) for p in out.glob("checkpoints/step_*/manifest.json")]
    return max(steps) if steps else None


def _checkpoint(out: Path, step: int, loss: float, run_config: dict | None = None) -> Path:
    d = out / "checkpoints" / f"step_{step:07d}"
    d.mkdir(parents=True, exist_ok=True)
    weights = f"fake weights at step {step}".encode()
    (d / "model.bin").write_bytes(weights)
    files = {"model.bin": hashlib.sha256(weights).hexdigest()}
    if run_config is not None:  # as the real trainer saves it: the run's config and its kind
        text = json.dumps(run_config).encode()
        (d / "config.json").write_bytes(text)
        files["config.json"] = hashlib.sha256(text).hexdigest()
    manifest = {"step": step, "loss": loss, "files": files}
    (d / "manifest.json").write_text(json.dumps(manifest))  # written last
    return d


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    cfg = json.loads(Path(args.config).read_text())
    emit = progress.emit
    step_s = float(os.environ.get("FAKE_STEP_S", "0.05"))
    exit_at = os.environ.get("FAKE_EXIT_AT", "")
    device_error_at, _, bad_gpu = os.environ.get("FAKE_DEVICE_ERROR_AT", "").partition(":")
    print(f"fake trainer starting on {os.environ.get('CUDA_VISIBLE_DEVICES') or 'cpu'}", file=sys.stderr, flush=True)
    stop = {"term": False}
    if os.environ.get("FAKE_IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: stop.update(term=True))

    chat_data, init_from = cfg.get("chat_data"), cfg.get("init_from")
    # A run from a checkpoint has no pretraining: its shape is the checkpoint's.
    pre_total = 0 if init_from else int(cfg.get("max_steps", 20))
    chat_total = int(cfg.get("chat_steps") or os.environ.get("FAKE_CHAT_STEPS", "4")) if chat_data else 0
    total = pre_total + chat_total
    every = int(cfg.get("checkpoint_every", 5))
    resumed = _latest_checkpoint(out) if args.resume else None
    first = (resumed or 0) + 1
    _record(out, kind="begin", resumed_from=resumed, lock_held=_lock_is_held(out), env_cuda=os.environ.get("CUDA_VISIBLE_DEVICES"),
            omp=os.environ.get("OMP_NUM_THREADS"), chat_data=chat_data, init_from=init_from, has_data="data" in cfg,
            keys=sorted(cfg))
    data = cfg.get("data", "demo")
    if not init_from and data.startswith("/") and (not os.path.exists(data) or os.path.getsize(data) == 0):
        emit("error", kind="user", code="empty_data", message=f"the dataset {data} is empty")
        _record(out, kind="end", rc=progress.EXIT_DATA)
        return progress.EXIT_DATA
    problem = _conversations_problem(chat_data) if chat_data else ""
    if problem:
        emit("error", kind="user", code="bad_conversations", message=problem)
        _record(out, kind="end", rc=progress.EXIT_DATA)
        return progress.EXIT_DATA
    train = dict(cfg)
    if init_from:
        try:
            train["depth"] = json.loads((Path(init_from) / "config.json").read_text())["train"]["depth"]
        except (OSError, ValueError, KeyError) as exc:
            emit("error", kind="user", code="bad_checkpoint", message=f"cannot read {init_from}: {exc}")
            _record(out, kind="end", rc=progress.EXIT_DATA)
            return progress.EXIT_DATA
    stages = ([{"stage": "pretrain", "steps": pre_total}] if pre_total else []) + (
        [{"stage": "chat", "steps": chat_total}] if chat_total else [])
    emit("start", config=train, params=1234, flops_per_token=6 * 1234, total_steps=total, total_tokens=total * 64,
         device=cfg.get("device", "cpu"), world_size=1, resumed_from_step=resumed, data_sha256="f" * 64,
         stages=stages)
    print("a stray line that is not JSON", flush=True)

    def run_config(step: int) -> dict:
        chat = step > pre_total
        return {"model": {"n_layer": train.get("depth")}, "train": train, "kind": "chat" if chat else "base",
                "chat_tuned": chat}

    def stage_of(step: int) -> str:
        return "chat" if step > pre_total else "pretrain"

    t0 = time.time()
    loss = 4.0
    for step in range(first, total + 1):
        if device_error_at and int(device_error_at) == step and os.environ.get("CUDA_VISIBLE_DEVICES") == bad_gpu:
            message = "CUDA error: an illegal memory access was encountered"
            print(f"RuntimeError: {message}", file=sys.stderr, flush=True)
            emit("error", kind="infrastructure", code=progress.DEVICE_ERROR_CODE, message=message,
                 fault=progress.device_fault("RuntimeError", message), device_index=0)
            _record(out, kind="end", rc=1, step=step)
            return 1
        if exit_at and int(exit_at.split(":")[0]) == step:
            code = int(exit_at.split(":")[1])
            emit("error", kind="user" if code in progress.USER_ERROR_EXITS else "infrastructure",
                 code="fake", message=f"fake exit {code} at step {step}")
            _record(out, kind="end", rc=code)
            return code
        if step == pre_total + 1 and chat_total:
            emit("stage", stage="chat", step=pre_total, steps=chat_total, n_conversations=90, n_val_conversations=10)
        time.sleep(step_s)
        loss = 4.0 / (1 + 0.1 * step)
        _record(out, kind="step", step=step, stage=stage_of(step))
        emit("step", step=step, total_steps=total, loss=loss, lr=1e-3, tokens_per_sec=1000.0, mfu=None,
             elapsed_s=time.time() - t0, eta_s=(total - step) * step_s, stage=stage_of(step))
        if step == pre_total and chat_total:  # pretraining's last word before the chat stage
            emit("eval", step=step, val_loss=loss, val_bpb=loss / 3, stage="pretrain")
        if step % every == 0 and step < total:
            path = _checkpoint(out, step, loss, run_config(step))
            emit("checkpoint", step=step, path=str(path), stage=stage_of(step))
        if stop["term"]:
            path = _checkpoint(out, step, loss, run_config(step))
            emit("checkpoint", step=step, path=str(path), stage=stage_of(step))
            _record(out, kind="end", rc=progress.EXIT_PREEMPTED, step=step)
            return progress.EXIT_PREEMPTED
    path = _checkpoint(out, total, loss, run_config(total))
    last = stage_of(total)
    emit("checkpoint", step=total, path=str(path), stage=last)
    emit("eval", step=total, val_loss=loss * (0.5 if chat_total else 1), val_bpb=loss / 3, stage=last)
    emit("sample", step=total, samples=[{"prompt": "Once", "text": "Once upon a fake time"}], stage=last)
    done = {"chat_tuned": True} if chat_total else {}
    emit("done", step=total, final_loss=loss, final_val_bpb=loss / 3, elapsed_s=time.time() - t0,
         checkpoint=str(path), **done)
    _record(out, kind="end", rc=0)
    return 0


def _conversations_problem(spec: str) -> str:
    """What the real trainer would refuse in the first line of a local conversations file ("" if fine)."""
    if not spec.startswith("/"):
        return ""  # demo, or a URL the fake does not read
    try:
        with open(spec, "rb") as fh:
            first = fh.readline().decode("utf-8", "replace")
        record = json.loads(first)
    except (OSError, ValueError):
        return f"{spec} line 1: not JSON"
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        return f"{spec} line 1: no messages"
    return ""


if __name__ == "__main__":
    sys.exit(main())
