"""Train a small GPT from scratch, speaking the JSON-lines contract of trainer/progress.py.

    python -m trainer.train --depth 2 --max-steps 600                 # the demo corpus, any device
    OMP_NUM_THREADS=2 python -m trainer.train --depth 2 --max-steps 600 --device cpu --out runs/cpu
    python -m trainer.train --config job.json --out runs/job-7 --resume  # how the web app runs it
    torchrun --nproc_per_node=8 -m trainer.train --depth 20 --data /data/corpus.txt --out runs/d20
    torchrun --nproc_per_node=2 -m trainer.train --device cpu --depth 2 --max-steps 50   # DDP on gloo

CPU recipe: one thread per core (OMP_NUM_THREADS; the web app's CPU slots set it), float32, eager
(trainer/cpu_ops.py: oneDNN products, lean hand-written passes; 1.7x faster on two threads than one
at depth 2 here), batch 8 x seq 256. CUDA: bf16 autocast and torch.compile, seq 2048 and the largest
batch (<= 32 rows per GPU) that sizing.memory_estimate fits in 80% of the GPU's memory; a bigger
global --batch-size with --device-batch-size accumulates gradients. MPS: float32, eager.

Length: --max-steps, else --target-tokens, else 20 tokens per parameter, capped at --max-epochs
(default 4) passes over the training split so a small corpus is not memorised for hours; the start
event's ``budget`` says which of the four set it (sizing.planned_tokens holds the rule).

stdout carries only contract events (start, step, eval, sample, checkpoint, done, error); human
logs go to stderr. Exit codes: 0 done, 2 bad flags/config, 65 bad data, 66 diverged, 75 stopped by
SIGTERM after a checkpoint (run again with --resume), anything else an infrastructure failure.

Resuming is exact: the LR schedule depends only on (step, total_steps), and a checkpoint holds the
weights, both optimizers' states, the data position and the RNG states. To stop early on purpose and
continue later with the same plan, use ``--stop-at-step N`` (it checkpoints and exits 0); stopping by
SIGTERM behaves the same. Changing ``--max-steps`` on resume re-plans the remaining schedule.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer import progress, sizing
# Re-exported: calibrate.py and the tests import these from here.
from trainer.config import TrainConfig, UsageError, build_parser, parse_config, validate  # noqa: F401


class Diverged(Exception):
    pass


# --- devices and processes -----------------------------------------------------------------------

# Dense bf16 tensor-core peaks in FLOP/s, for MFU; the first name contained in the device's wins.
GPU_BF16_PEAK = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200", 989e12), ("GH200", 989e12),
                 ("H100", 989e12), ("H800", 989e12), ("B200", 2250e12), ("A100", 312e12),
                 ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("RTX 4090", 165e12),
                 ("RTX 3090", 71e12))
# Batch and sequence defaults per device come from sizing.DEVICE_DEFAULTS, which the web app's
# estimates read too; on CUDA that batch is only the ceiling: _cuda_rows halves it until it fits.
CUDA_MAX_ROWS = sizing.DEVICE_DEFAULTS["cuda"]["batch_size"]


def peak_flops(device) -> float | None:
    import torch
    if device.type != "cuda":
        return None  # no trustworthy peak for CPUs and Apple GPUs: tests/bench measures one instead
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_BF16_PEAK if key in name), None)


@dataclass
class Runtime:
    device: Any
    rank: int
    local_rank: int
    world_size: int
    compile: bool

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        import torch
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()  # float32 on CPU (bf16 matmuls are ~100x slower there) and MPS


def setup_runtime(cfg: TrainConfig) -> Runtime:
    import torch
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    kind = cfg.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        if os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() not in ("", "-1"):
            # A supervisor gave us a GPU that CUDA cannot see now: the card is gone, not the config wrong.
            raise RuntimeError(f"the assigned GPU is gone: CUDA_VISIBLE_DEVICES="
                               f"{os.environ['CUDA_VISIBLE_DEVICES']} but CUDA finds no device")
        raise UsageError("device cuda was asked for, but no CUDA device is available")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device mps was asked for, but MPS is not available")
    if kind == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device(kind)
    if kind == "cpu":
        from trainer import cpu_ops
        cpu_ops.keep_freed_memory()  # ~12% of a CPU step went to page faults on freshly mapped tensors
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo")
    compile_ = (kind == "cuda") if cfg.compile == "auto" else bool(cfg.compile)
    return Runtime(device, rank, local, world, compile_)


def _all_reduce_sum(rt: Runtime, *values: float) -> list[float]:
    import torch
    import torch.distributed as dist
    if rt.world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)  # SUM: gloo has no AVG
    return t.tolist()


def _barrier(rt: Runtime) -> None:
    if rt.world_size > 1:
        import torch.distributed as dist
        dist.barrier()


# --- evaluation and samples ----------------------------------------------------------------------

def evaluate(model, rt: Runtime, prepared, batch: int, seq: int, max_batches: int, token_bytes):
    """(val_loss in nats per token, val_bpb) over the first ``max_batches`` validation batches.

    Bits per byte divide the summed loss by the bytes the target tokens stand for, so models with
    different tokenizers compare; special tokens (0 bytes) are left out of both sums.
    """
    import torch
    from trainer import data
    nats = nbytes = loss_sum = ntok = 0.0
    model.eval()
    with torch.no_grad():
        for x, y in data.iter_val_batches(prepared.val_path, prepared.dtype, batch, seq, max_batches,
                                          rt.rank, rt.world_size):
            x, y = x.to(rt.device), y.to(rt.device)
            with rt.autocast():
                losses = model(x, y, loss_reduction="none").float().view(-1)
            y = y.reshape(-1)
            valid = y >= 0
            b = token_bytes[y.clamp(min=0)] * valid
            nats += float((losses * (b > 0)).sum())
            nbytes += float(b.sum())
            loss_sum += float((losses * valid).sum())
            ntok += float(valid.sum())
    model.train()
    nats, nbytes, loss_sum, ntok = _all_reduce_sum(rt, nats, nbytes, loss_sum, ntok)
    val_loss = loss_sum / ntok if ntok else float("nan")
    val_bpb = nats / (math.log(2) * nbytes) if nbytes else float("nan")
    return val_loss, val_bpb


def make_samples(model, rt: Runtime, tokenizer, prompts: list[str], seed: int) -> list[dict] | None:
    """A short generation per prompt, or None when trainer.sample is not available."""
    import torch
    try:
        from trainer import sample
    except ImportError:
        return None
    # Sampling must not disturb the training RNG, or a resumed run would drift from a straight one.
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None
    model.eval()
    out = []
    try:
        with rt.autocast():
            for prompt in prompts:
                text = "".join(sample.complete(model, tokenizer, prompt, max_tokens=64, temperature=0.8,
                                               top_k=50, seed=seed))
                out.append({"prompt": prompt, "text": text})
    finally:
        model.train()
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, rt.device)
    return out


# --- the run -------------------------------------------------------------------------------------

def _log(rt_master: bool, msg: str) -> None:
    if rt_master:
        print(msg, file=sys.stderr, flush=True)


def _cuda_rows(shape, rt: Runtime) -> int:
    import torch
    budget = 0.8 * torch.cuda.get_device_properties(rt.device).total_memory
    rows = CUDA_MAX_ROWS
    while rows > 1 and sizing.memory_estimate(shape, rows, "cuda", rt.compile)["total"] > budget:
        rows //= 2
    return rows * rt.world_size


def train(cfg: TrainConfig, rt: Runtime, emit: progress.Emitter) -> int:
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from trainer import checkpoint as ckpt
    from trainer import data, optim
    from trainer.model import GPT, GPTConfig

    log = lambda msg: _log(rt.master, msg)  # noqa: E731
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = rt.device.type
    defaults = sizing.device_defaults(kind)
    seq = cfg.seq_len or defaults["seq_len"]

    # Data: rank 0 tokenizes into the cache first; the others then find it there. A resumed run
    # must see the tokens its checkpoint was trained on: if the cache now holds a different
    # tokenizer (the cache was cleared and retrained), tokenize again with the checkpoint's own.
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    resumed_from = ckpt.latest_checkpoint(out) if cfg.resume else None
    saved_fingerprint = ckpt.read_config(resumed_from).get("tokenizer_fingerprint") if resumed_from else None

    def prepare():
        kwargs = dict(vocab_size=cfg.vocab_size, storage_options=cfg.storage_options, min_tokens=seq + 1, log=log)
        got = data.prepare_dataset(cfg.data, cache_dir, **kwargs)
        if saved_fingerprint and got.tokenizer.fingerprint() != saved_fingerprint:
            log("the cached tokenizer differs from the checkpoint's; tokenizing with the checkpoint's")
            got = data.prepare_dataset(cfg.data, cache_dir, tokenizer_dir=resumed_from / "tokenizer", **kwargs)
        return got

    prepared = None
    for turn in (0, 1):
        if rt.master == (turn == 0):
            prepared = prepare()
        _barrier(rt)
    tokenizer = prepared.tokenizer
    try:
        shape = sizing.shape_for(cfg.depth, tokenizer.vocab_size, seq, cfg.head_dim, cfg.n_kv_head)
    except ValueError as e:
        raise UsageError(str(e)) from None
    batch = cfg.batch_size or (_cuda_rows(shape, rt) if kind == "cuda" else defaults["batch_size"])
    if batch % rt.world_size:
        raise UsageError(f"batch_size {batch} must be divisible by the {rt.world_size} processes")
    tokens_per_step = batch * seq
    if prepared.n_train_tokens < tokens_per_step + 1:
        raise data.DataError("too_small", f"the training split holds {prepared.n_train_tokens} tokens, "
                             f"fewer than one batch of {batch} x {seq}; add text or lower batch_size/seq_len")

    torch.manual_seed(cfg.seed)
    gpt_config = GPTConfig.from_shape(shape)
    model = GPT(gpt_config).to(rt.device)  # built (and initialised) on the CPU: the same on every device
    params = model.num_params()
    flops_per_token = model.flops_per_token()
    optimizers = optim.build_optimizers(
        model.param_groups(), shape.n_embd, matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr,
        unembedding_lr=cfg.unembedding_lr, weight_decay=cfg.weight_decay, device_type=kind)

    # The length rule lives in sizing.run_length, which the web app's estimates call with the same facts.
    total_steps, budget = sizing.run_length(params, tokens_per_step, prepared.n_train_tokens,
                                            max_steps=cfg.max_steps, target_tokens=cfg.target_tokens,
                                            tokens_per_param=cfg.tokens_per_param, max_epochs=cfg.max_epochs)
    if budget == "data":
        log(f"data-limited: {cfg.max_epochs:g} epochs of {prepared.n_train_tokens:,} tokens")
    # storage_options may hold cloud credentials: the start event and config.json (which ships with
    # the model) name the keys only.
    redacted = {k: "<redacted>" for k in cfg.storage_options} if cfg.storage_options else cfg.storage_options
    resolved = dataclasses.asdict(cfg) | {"batch_size": batch, "seq_len": seq, "compile": rt.compile,
                                          "device": str(rt.device), "cache_dir": str(cache_dir),
                                          "storage_options": redacted}
    run_config = {"model": gpt_config.to_dict(), "shape": shape.to_dict(), "train": resolved,
                  "data": {"source": prepared.source, "sha256": prepared.data_sha256,
                           "n_train_tokens": prepared.n_train_tokens, "n_val_tokens": prepared.n_val_tokens},
                  "tokenizer_fingerprint": tokenizer.fingerprint(), "params": params}

    # Resume: everything that moves during training comes back from the newest valid checkpoint.
    state: dict[str, Any] = {}
    # Gradient accumulation: `accum` consecutive micro-batches of `micro` rows per process cover
    # exactly the rows one big batch would (the loader's windows are consecutive), so the mean
    # gradient is the same; only the summation order differs.
    micro = cfg.device_batch_size or batch // rt.world_size
    if (batch // rt.world_size) % micro:
        raise UsageError(f"device_batch_size {micro} must divide the {batch // rt.world_size} rows per process")
    accum = batch // rt.world_size // micro
    loader = data.TokenLoader(prepared.train_path, prepared.dtype, micro * rt.world_size, seq, rank=rt.rank,
                              world_size=rt.world_size)
    if resumed_from is not None:
        saved = ckpt.read_config(resumed_from)
        if saved.get("model") != gpt_config.to_dict():
            raise UsageError(f"{resumed_from} holds a different model ({saved.get('model')}); "
                             "resume with the same depth, vocab and sequence length, or use a new --out")
        if saved.get("tokenizer_fingerprint") != tokenizer.fingerprint():
            raise UsageError(f"{resumed_from} was trained with a different tokenizer")
        state = ckpt.load_checkpoint(resumed_from, model, optimizers, rt.device)
        loader.load_state(state["loader"])
        log(f"resumed from {resumed_from} at step {state['step']}")
    start_step = int(state.get("step", 0))

    train_model = ddp = model
    if rt.world_size > 1:
        train_model = ddp = DistributedDataParallel(model, device_ids=[rt.local_rank] if kind == "cuda" else None)
    if rt.compile:
        train_model = torch.compile(train_model)

    peak = peak_flops(rt.device)
    emit("start", config=resolved, params=params, flops_per_token=flops_per_token, total_steps=total_steps,
         total_tokens=total_steps * tokens_per_step, device=str(rt.device), world_size=rt.world_size,
         resumed_from_step=start_step if resumed_from is not None else None, shape=shape.to_dict(),
         tokens_per_step=tokens_per_step, vocab_size=tokenizer.vocab_size, peak_flops=peak,
         grad_accum_steps=accum, budget=budget, data_source=prepared.source, data_sha256=prepared.data_sha256,
         n_train_tokens=prepared.n_train_tokens, n_val_tokens=prepared.n_val_tokens, data_bytes=prepared.n_bytes)
    log(f"depth {cfg.depth}: {params:,} params, {total_steps} steps of {batch}x{seq} tokens on "
        f"{rt.device} x{rt.world_size}{' (compiled)' if rt.compile else ''}")

    token_bytes = torch.as_tensor(tokenizer.token_byte_lengths(), dtype=torch.float32, device=rt.device)
    eval_batches = max(1, (cfg.eval_tokens or 8 * tokens_per_step) // tokens_per_step)
    diverge_limit = 3 * math.log(tokenizer.vocab_size) + 5  # well above the loss of a uniform guess
    tokens_seen = int(state.get("tokens_seen", 0))
    elapsed_before = float(state.get("elapsed_s", 0.0))
    last_loss = state.get("last_loss")
    last_bpb = state.get("last_val_bpb")
    last_ckpt: Path | None = resumed_from

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum  # finish the step in flight, then checkpoint and leave
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def save(step: int) -> Path | None:
        _barrier(rt)
        path = None
        if rt.master:
            train_state = {"step": step, "total_steps": total_steps, "tokens_seen": tokens_seen,
                           "elapsed_s": elapsed(), "loader": loader.state(), "last_loss": last_loss,
                           "last_val_bpb": last_bpb, "data_sha256": prepared.data_sha256}
            path = ckpt.save_checkpoint(out, step, model, optimizers, train_state, prepared.tokenizer_dir,
                                        run_config, keep=cfg.keep_checkpoints)
            emit("checkpoint", step=step, path=str(path))
        _barrier(rt)
        return path

    t_start = time.perf_counter()
    elapsed = lambda: elapsed_before + time.perf_counter() - t_start  # noqa: E731
    t_window, tokens_window = time.perf_counter(), 0
    step = start_step
    while step < total_steps:
        optim.set_lr(optimizers, optim.lr_multiplier(step, total_steps, cfg.warmup_ratio,
                                                     cfg.warmdown_ratio, cfg.final_lr_frac))
        optim.set_muon_momentum(optimizers, optim.muon_momentum(step))
        step_loss = 0.0  # summed on the device: one host sync per step, not per micro-step
        for k in range(accum):
            x, y = loader.next_batch(rt.device)
            # DDP all-reduces on the last micro-step's backward only.
            sync = ddp.no_sync() if ddp is not model and k < accum - 1 else nullcontext()
            with sync:
                with rt.autocast():
                    loss = train_model(x, y)
                (loss / accum).backward()
            step_loss = step_loss + loss.detach() / accum
        optim.clip_grad_norm(model.parameters(), cfg.grad_clip)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        tokens_window += tokens_per_step
        # One collective per step: the mean loss over ranks and whether any rank was told to stop.
        last_loss, stop_votes = _all_reduce_sum(rt, float(step_loss), float(stop["signal"] is not None))
        last_loss /= rt.world_size
        if not math.isfinite(last_loss) or last_loss > diverge_limit:
            raise Diverged(f"the loss reached {last_loss:.4g} at step {step}; try a lower learning rate "
                           "(--matrix-lr, --embedding-lr) or a smaller --grad-clip")

        if step % cfg.log_every == 0 or step == total_steps or step == start_step + 1:
            now = time.perf_counter()
            tps = tokens_window / max(now - t_window, 1e-9)
            t_window, tokens_window = now, 0
            mfu = flops_per_token * tps / (peak * rt.world_size) if peak else None
            run_s = now - t_start
            eta = run_s / (step - start_step) * (total_steps - step)
            lr = optimizers[-1].param_groups[0]["lr"]
            emit("step", step=step, total_steps=total_steps, loss=last_loss, lr=lr, tokens_per_sec=tps,
                 mfu=mfu, elapsed_s=elapsed(), eta_s=eta, tokens_seen=tokens_seen)
            if step % max(cfg.log_every, 10) == 0 or step == total_steps:
                log(f"step {step:6d}/{total_steps} loss {last_loss:.4f} lr {lr:.4g} {tps:,.0f} tok/s"
                    + (f" mfu {100 * mfu:.1f}%" if mfu is not None else "") + f" eta {eta:.0f}s")
        if step % cfg.eval_every == 0 or step == total_steps:
            val_loss, last_bpb = evaluate(model, rt, prepared, batch, seq, eval_batches, token_bytes)
            emit("eval", step=step, val_loss=val_loss, val_bpb=last_bpb)
            log(f"step {step:6d} val_loss {val_loss:.4f} val_bpb {last_bpb:.4f}")
        if rt.master and cfg.sample_prompts and (step % cfg.sample_every == 0 or step == total_steps):
            samples = make_samples(model, rt, tokenizer, cfg.sample_prompts, cfg.seed)
            if samples is not None:
                emit("sample", step=step, samples=samples)
        stopping = stop_votes > 0 or step == cfg.stop_at_step
        if step % cfg.checkpoint_every == 0 or step == total_steps or stopping:
            last_ckpt = save(step)
        if stop_votes > 0:
            log(f"stopped by a signal at step {step}; --resume continues from {last_ckpt}")
            return progress.EXIT_PREEMPTED
        if step == cfg.stop_at_step:
            log(f"stopped at step {step} as asked; --resume continues from {last_ckpt}")
            return progress.EXIT_OK
    if rt.master and last_ckpt is None and start_step >= total_steps:
        last_ckpt = resumed_from
    emit("done", step=step, final_loss=last_loss, final_val_bpb=last_bpb, elapsed_s=elapsed(),
         checkpoint=str(last_ckpt) if last_ckpt else None, tokens_seen=tokens_seen)
    return progress.EXIT_OK


def run(cfg: TrainConfig) -> int:
    """Train, mapping every failure to an error event and the contract's exit code."""
    rank = int(os.environ.get("RANK", "0"))
    emit = progress.Emitter(enabled=rank == 0)
    rt = None
    try:
        from trainer import data
        data_error = data.DataError
    except ImportError:
        data_error = ()
    try:
        rt = setup_runtime(cfg)
        return train(cfg, rt, emit)
    except UsageError as e:
        emit("error", kind="user", code="bad_config", message=str(e))
        _log(rank == 0, f"error: {e}")
        return progress.EXIT_USAGE
    except Diverged as e:
        emit("error", kind="user", code="diverged", message=str(e))
        _log(rank == 0, f"error: {e}")
        return progress.EXIT_DIVERGED
    except Exception as e:
        if data_error and isinstance(e, data_error):
            emit("error", kind="user", code=getattr(e, "code", "bad_data"), message=getattr(e, "message", str(e)))
            _log(rank == 0, f"data error: {e}")
            return progress.EXIT_DATA
        import traceback
        traceback.print_exc(file=sys.stderr)
        message = str(e) or type(e).__name__
        fault = progress.device_fault(type(e).__name__, message)
        if fault is None:
            emit("error", kind="infrastructure", code=type(e).__name__, message=message)
        else:  # the device's fault, not ours: the supervisor quarantines the GPU and retries elsewhere
            where = {"device_index": rt.device.index} if rt is not None and rt.device.type == "cuda" \
                and rt.world_size == 1 and rt.device.index is not None else {}
            emit("error", kind="infrastructure", code=progress.DEVICE_ERROR_CODE, message=message[:2000],
                 fault=fault, **where)
        return 1
    finally:
        if rt is not None and rt.world_size > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
    except UsageError as e:
        progress.emit("error", kind="user", code="bad_config", message=str(e))
        print(f"error: {e}", file=sys.stderr)
        return progress.EXIT_USAGE
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
