"""Time the work of a training run at a shape on this machine's device, for the plan page's estimate.

    python -m trainer.calibrate --probe                       # what device would train, and its memory
    python -m trainer.calibrate --depth 4 --seq-len 256 --batch-size 8 --vocab-size 8192
    OMP_NUM_THREADS=1 python -m trainer.calibrate --depth 2 --device cpu --steps 3

Prints one ``calibration`` event of trainer/progress.py on stdout: device, device_name, memory_bytes,
dtype (what the products run in: the trainer's ``--dtype`` choice here, measured on CPUs), base_rss_bytes and startup_s (process start, imports and device set-up, what every run pays first)
and, when a shape was timed, step_s and tokens_per_sec, first_step_extra_s, build_s, eval_batch_s,
sample_s, checkpoint_s, flops_per_step, flops_per_sec, peak_memory_bytes and peak_rss_bytes. The
steps are the trainer's own: the same model, optimizers, learning-rate and clipping work, autocast
and compile decision as ``trainer.train``, on random tokens, so no data is needed; the first steps
(warm-up, and compilation where it applies) are timed apart. The web app turns these into a run's
wall time and peak memory (nanochat_studio/estimate.py).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

from trainer import progress


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform says, else "cpu". Torch-free: the
    web app's worker registry names CPU slots with it too."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def ram_bytes() -> int:
    """Physical memory in bytes (0 when the OS will not say). Torch-free, as cpu_name."""
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
        return {"device": "mps", "device_name": "Apple GPU (MPS)", "memory_bytes": ram_bytes()}
    threads = torch.get_num_threads()
    return {"device": "cpu", "device_name": f"{cpu_name()} ({threads} threads)", "memory_bytes": ram_bytes()}


def _process_age_s() -> float | None:
    """Seconds since this process started (fork), from /proc; None where that is not available."""
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))  # field 22: starttime
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _peak_rss_bytes() -> int | None:
    if sys.platform != "linux":
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # whole process, KiB on Linux


def time_steps(rt, depth: int, vocab_size: int, seq_len: int, batch_size: int, steps: int,
               warmup: int, min_seconds: float = 0.0, max_steps: int = 200) -> dict:
    """Time the work of a training run at this shape: steps as the trainer's loop makes them (learning
    rate, forward, backward, clipping, both optimizers, one host sync), the first step's extra cost
    (allocation; compilation where it applies), one validation batch, one sample, one checkpoint.
    At least ``steps`` steps are timed, more until ``min_seconds`` have passed (at most ``max_steps``):
    a few steps of a tiny model are too short to time on a busy machine."""
    import tempfile

    import torch

    from trainer import checkpoint, optim, sample, sizing
    from trainer.model import GPT, GPTConfig

    shape = sizing.shape_for(depth, vocab_size, seq_len)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_shape(shape)).to(rt.device)
    optimizers = optim.build_optimizers(model.param_groups(), shape.n_embd, device_type=rt.device.type,
                                        dtype=rt.dtype)
    train_model = torch.compile(model) if rt.compile else model
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen).to(rt.device)
    y = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen).to(rt.device)

    def sync():
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)

    def one_step(step: int) -> float:
        optim.set_lr(optimizers, optim.lr_multiplier(step, 1000, 0.0, 0.2, 0.0))
        optim.set_muon_momentum(optimizers, optim.muon_momentum(step))
        with rt.autocast():
            loss = train_model(x, y)
        loss.backward()
        optim.clip_grad_norm(model.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())  # the trainer's one host sync per step

    t0 = time.perf_counter()
    one_step(0)
    sync()
    first_s = time.perf_counter() - t0
    for i in range(1, warmup):
        one_step(i)
    sync()
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    t0 = time.perf_counter()
    done = 0
    while done < steps or (time.perf_counter() - t0 < min_seconds and done < max_steps):
        one_step(warmup + done)
        done += 1
    sync()
    step_s = (time.perf_counter() - t0) / done

    # One validation batch as train.evaluate runs it: the plain model, no gradients, per-token losses.
    model.eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(2):
            with rt.autocast():
                float(model(x, y, loss_reduction="none").float().sum())
        eval_batch_s = (time.perf_counter() - t0) / 2
    model.train()
    # One sample as train.make_samples makes it: SAMPLE_TOKENS tokens after a short prompt.
    t0 = time.perf_counter()
    with rt.autocast():
        for _ in sample.generate_tokens(model, [1, 2, 3, 4, 5], max_tokens=sizing.SAMPLE_TOKENS,
                                        temperature=0.8, top_k=50, seed=0):
            pass
    sample_s = time.perf_counter() - t0
    model.train()
    with tempfile.TemporaryDirectory(prefix="calibrate-") as tmp:
        t0 = time.perf_counter()
        checkpoint.save_checkpoint(tmp, 1, model, optimizers, {"step": 1}, None, {"shape": shape.to_dict()})
        checkpoint_s = time.perf_counter() - t0

    tokens = batch_size * seq_len
    flops_per_step = sizing.flops_per_token(shape) * tokens
    peak = int(torch.cuda.max_memory_allocated(rt.device)) if rt.device.type == "cuda" else _peak_rss_bytes()
    return {"shape": shape.to_dict(), "batch_size": batch_size, "tokens_per_sec": tokens / step_s,
            "step_s": step_s, "first_step_extra_s": max(0.0, first_s - step_s), "build_s": build_s,
            "eval_batch_s": eval_batch_s, "sample_s": sample_s, "checkpoint_s": checkpoint_s,
            "flops_per_step": flops_per_step, "flops_per_sec": flops_per_step / step_s,
            "peak_memory_bytes": peak, "peak_rss_bytes": _peak_rss_bytes(), "compiled": bool(rt.compile),
            "steps": done}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", action="store_true", help="only describe the device")
    # shape
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    # timing
    parser.add_argument("--steps", type=int, default=5, help="timed steps, at least")
    parser.add_argument("--min-seconds", type=float, default=4.0, help="keep timing steps this long (at most 200)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    parser.add_argument("--compile", default="auto", choices=("auto", "true", "false"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="as the trainer's --dtype; the event's dtype says which was timed")
    args = parser.parse_args(argv)
    for name in ("depth", "vocab_size", "seq_len", "batch_size", "steps", "warmup"):
        if getattr(args, name) < 1:
            progress.emit("error", kind="user", code="usage", message=f"--{name.replace('_', '-')} must be >= 1")
            return progress.EXIT_USAGE

    # The modules a training run imports before its first step, so start-up costs what a run's does.
    from trainer import checkpoint, data, model, optim, sample  # noqa: F401
    from trainer.train import TrainConfig, UsageError, setup_runtime

    try:
        compile_ = {"auto": "auto", "true": True, "false": False}[args.compile]
        rt = setup_runtime(TrainConfig(device=args.device, compile=compile_, dtype=args.dtype))
    except UsageError as exc:
        progress.emit("error", kind="user", code="usage", message=str(exc))
        return progress.EXIT_USAGE
    # dtype: what a run here with the same --dtype trains in, which is what the steps below time
    info = describe(rt.device) | {"base_rss_bytes": _peak_rss_bytes(), "startup_s": _process_age_s(),
                                  "dtype": rt.dtype}
    if args.probe:
        progress.emit("calibration", **info)
        return progress.EXIT_OK
    try:
        timed = time_steps(rt, args.depth, args.vocab_size, args.seq_len, args.batch_size, args.steps,
                           args.warmup if not rt.compile else max(args.warmup, 2), args.min_seconds)
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
