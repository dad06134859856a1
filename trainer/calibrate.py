"""Time a few real training steps at a shape on this machine's device, for the plan page's estimate.

    python -m trainer.calibrate --probe                       # what device would train, and its memory
    python -m trainer.calibrate --depth 4 --seq-len 256 --batch-size 8 --vocab-size 8192
    OMP_NUM_THREADS=1 python -m trainer.calibrate --depth 2 --device cpu --steps 3

Prints one ``calibration`` event of trainer/progress.py on stdout (device, device_name, memory_bytes
and, when a shape was timed, tokens_per_sec, step_s, flops_per_step, flops_per_sec and
peak_memory_bytes). The steps are the trainer's own: the same model, optimizers, autocast and
compile decision as ``trainer.train``, on random tokens, so no data is needed. The first steps
(warm-up, and compilation where it applies) are not timed.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

from trainer import progress


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def describe(device) -> dict:
    """device, device_name, memory_bytes for a torch.device."""
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"device": "cuda", "device_name": props.name, "memory_bytes": int(props.total_memory),
                "count": torch.cuda.device_count()}
    if device.type == "mps":
        return {"device": "mps", "device_name": "Apple GPU (MPS)", "memory_bytes": _ram_bytes()}
    threads = torch.get_num_threads()
    return {"device": "cpu", "device_name": f"{_cpu_name()} ({threads} threads)", "memory_bytes": _ram_bytes()}


def time_steps(rt, depth: int, vocab_size: int, seq_len: int, batch_size: int, steps: int,
               warmup: int) -> dict:
    import torch

    from trainer import optim, sizing
    from trainer.model import GPT, GPTConfig

    shape = sizing.shape_for(depth, vocab_size, seq_len)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_shape(shape)).to(rt.device)
    optimizers = optim.build_optimizers(model.param_groups(), shape.n_embd, device_type=rt.device.type)
    train_model = torch.compile(model) if rt.compile else model
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen).to(rt.device)
    y = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen).to(rt.device)

    def one_step():
        with rt.autocast():
            loss = train_model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return loss

    def sync():
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)

    for _ in range(warmup):
        one_step()
    sync()
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    sync()
    step_s = (time.perf_counter() - t0) / steps
    tokens = batch_size * seq_len
    flops_per_step = sizing.flops_per_token(shape) * tokens
    if rt.device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(rt.device))
    elif sys.platform == "linux":
        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # whole process, KiB on Linux
    else:
        peak = None
    return {"shape": shape.to_dict(), "batch_size": batch_size, "tokens_per_sec": tokens / step_s,
            "step_s": step_s, "flops_per_step": flops_per_step, "flops_per_sec": flops_per_step / step_s,
            "peak_memory_bytes": peak, "compiled": bool(rt.compile), "steps": steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", action="store_true", help="only describe the device")
    # shape
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    # timing
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    parser.add_argument("--compile", default="auto", choices=("auto", "true", "false"))
    args = parser.parse_args(argv)
    for name in ("depth", "vocab_size", "seq_len", "batch_size", "steps"):
        if getattr(args, name) < 1:
            progress.emit("error", kind="user", code="usage", message=f"--{name.replace('_', '-')} must be >= 1")
            return progress.EXIT_USAGE

    from trainer.train import TrainConfig, UsageError, setup_runtime

    try:
        compile_ = {"auto": "auto", "true": True, "false": False}[args.compile]
        rt = setup_runtime(TrainConfig(device=args.device, compile=compile_))
    except UsageError as exc:
        progress.emit("error", kind="user", code="usage", message=str(exc))
        return progress.EXIT_USAGE
    info = describe(rt.device)
    if args.probe:
        progress.emit("calibration", **info)
        return progress.EXIT_OK
    try:
        timed = time_steps(rt, args.depth, args.vocab_size, args.seq_len, args.batch_size, args.steps,
                           args.warmup if not rt.compile else max(args.warmup, 2))
    except ValueError as exc:
        progress.emit("error", kind="user", code="usage", message=str(exc))
        return progress.EXIT_USAGE
    except RuntimeError as exc:  # out of memory and friends: the shape does not run here
        progress.emit("error", kind="infrastructure", code="calibration_failed", message=str(exc)[:500])
        return 1
    progress.emit("calibration", **info, **timed)
    return progress.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
