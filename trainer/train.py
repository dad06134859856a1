"""Train a small GPT from scratch, speaking the JSON-lines contract of trainer/progress.py.

    python -m trainer.train --depth 2 --max-steps 600                 # the demo corpus, any device
    OMP_NUM_THREADS=2 python -m trainer.train --depth 2 --max-steps 600 --device cpu --out runs/cpu
    python -m trainer.train --config job.json --out runs/job-7 --resume  # how the web app runs it
    torchrun --nproc_per_node=8 -m trainer.train --depth 20 --data /data/corpus.txt --out runs/d20
    torchrun --nproc_per_node=2 -m trainer.train --device cpu --depth 2 --max-steps 50   # DDP on gloo

CPU recipe: one thread per core (OMP_NUM_THREADS; the web app's CPU slots set it), eager
(trainer/cpu_ops.py: oneDNN products, lean hand-written passes; 1.7x faster on two threads than one
at depth 2 here), batch 8 x seq 256; products in bf16 where a probe finds this CPU fast at them
(trainer/precision.py; ``--dtype`` overrides), else float32, with float32 weights either way. CUDA: bf16 autocast and torch.compile, seq 2048 and the largest
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

Layout: :func:`train` plans the run (:func:`plan_run`, :func:`plan_length`), builds the model and
optimizers, restores the newest checkpoint (:func:`resume`) and hands over to the loop in
trainer/loop.py; :func:`run` maps every failure to an error event and exit code.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer import progress, sizing
# Re-exported: calibrate.py and the tests import these from here.
from trainer.config import TrainConfig, UsageError, build_parser, parse_config, validate  # noqa: F401
from trainer.loop import Diverged, Run, evaluate, make_samples, train_loop  # noqa: F401


# --- devices and processes -----------------------------------------------------------------------

# Dense bf16 tensor-core peaks in FLOP/s (NVIDIA datasheet figures, without sparsity), for MFU; the
# first name contained in the device's wins.
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
    dtype: str = "float32"  # what the products run in (trainer/precision.py): "float32" or "bfloat16"
    attention: str = "float32"  # what training's attention runs in (precision.attention_dtype)

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        from trainer import precision
        return precision.autocast(self.device.type, self.dtype)  # float32: no autocast at all

    def all_reduce_sum(self, *values: float) -> list[float]:
        """The sums over all ranks (the values themselves in a single process)."""
        import torch
        import torch.distributed as dist
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)  # SUM: gloo has no AVG
        return t.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist
            dist.barrier()


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
    from trainer import precision
    try:
        dtype = precision.resolve(cfg.dtype, kind)  # on CPU, auto times both dtypes here, once
    except ValueError as e:
        raise UsageError(str(e)) from None
    if world > 1 and cfg.dtype == "auto":
        dtype = precision.rank_zeros(dtype, device)
    attention = precision.attention_dtype(dtype, kind)  # bf16 on CPU: times attention in both, once
    if world > 1 and kind == "cpu" and dtype == "bfloat16":  # each rank timed its own: rank 0's for all
        attention = precision.rank_zeros(attention, device)
    return Runtime(device, rank, local, world, compile_, dtype, attention)


def _log(rt_master: bool, msg: str) -> None:
    if rt_master:
        print(msg, file=sys.stderr, flush=True)


# --- planning: what the run will do, decided before its first step ----------------------------------

def _cuda_rows(shape, rt: Runtime) -> int:
    import torch
    budget = 0.8 * torch.cuda.get_device_properties(rt.device).total_memory
    rows = CUDA_MAX_ROWS
    while rows > 1 and sizing.memory_estimate(shape, rows, "cuda", rt.compile)["total"] > budget:
        rows //= 2
    return rows * rt.world_size


@dataclass
class Plan:
    """Data, shape, batch and length: everything fixed before the first step. A resumed run plans
    again from its flags and data; resume() refuses a checkpoint of another model or tokenizer."""
    out: Path
    cache_dir: Path
    resumed_from: Path | None  # the checkpoint to continue from (None: a fresh run)
    prepared: Any  # data.PreparedData
    shape: sizing.ModelShape
    seq: int
    batch: int  # global rows per step
    micro: int  # rows per process per forward pass
    accum: int  # forward passes per step (gradient accumulation)
    total_steps: int = 0
    budget: str = ""  # which rule set total_steps (see sizing.planned_tokens)

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq


def _prepare_data(cfg: TrainConfig, rt: Runtime, cache_dir: Path, resumed_from: Path | None, seq: int, log):
    """Rank 0 tokenizes into the cache first; the others then find it there. A resumed run must see
    the tokens its checkpoint was trained on: if the cache now holds a different tokenizer (the cache
    was cleared and retrained), tokenize again with the checkpoint's own."""
    from trainer import checkpoint as ckpt
    from trainer import data
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
        rt.barrier()
    return prepared


def plan_run(cfg: TrainConfig, rt: Runtime, log) -> Plan:
    """Prepare the data and fix the shape and batch; raises UsageError or data.DataError."""
    from trainer import checkpoint as ckpt
    from trainer import data
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = rt.device.type
    defaults = sizing.device_defaults(kind)
    seq = cfg.seq_len or defaults["seq_len"]
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    resumed_from = ckpt.latest_checkpoint(out) if cfg.resume else None
    prepared = _prepare_data(cfg, rt, cache_dir, resumed_from, seq, log)
    try:
        shape = sizing.shape_for(cfg.depth, prepared.tokenizer.vocab_size, seq, cfg.head_dim, cfg.n_kv_head)
    except ValueError as e:
        raise UsageError(str(e)) from None
    batch = cfg.batch_size or (_cuda_rows(shape, rt) if kind == "cuda" else defaults["batch_size"])
    if batch % rt.world_size:
        raise UsageError(f"batch_size {batch} must be divisible by the {rt.world_size} processes")
    if prepared.n_train_tokens < batch * seq + 1:
        raise data.DataError("too_small", f"the training split holds {prepared.n_train_tokens} tokens, "
                             f"fewer than one batch of {batch} x {seq}; add text or lower batch_size/seq_len")
    # Gradient accumulation: `accum` consecutive micro-batches of `micro` rows per process cover
    # exactly the rows one big batch would (the loader's windows are consecutive), so the mean
    # gradient is the same; only the summation order differs.
    micro = cfg.device_batch_size or batch // rt.world_size
    if (batch // rt.world_size) % micro:
        raise UsageError(f"device_batch_size {micro} must divide the {batch // rt.world_size} rows per process")
    accum = batch // rt.world_size // micro
    return Plan(out=out, cache_dir=cache_dir, resumed_from=resumed_from, prepared=prepared, shape=shape,
                seq=seq, batch=batch, micro=micro, accum=accum)


def plan_length(cfg: TrainConfig, plan: Plan, params: int, log) -> None:
    """Set ``plan.total_steps`` and ``plan.budget``: --max-steps, else --target-tokens, else tokens
    per parameter (``params``: sizing.scaling_params, all but the input embedding) capped at
    --max-epochs passes over the data."""
    # The length rule lives in sizing.run_length, which the web app's estimates call with the same facts.
    n_train = plan.prepared.n_train_tokens
    plan.total_steps, plan.budget = sizing.run_length(
        params, plan.tokens_per_step, n_train, max_steps=cfg.max_steps, target_tokens=cfg.target_tokens,
        tokens_per_param=cfg.tokens_per_param, max_epochs=cfg.max_epochs)
    if plan.budget == "data":
        log(f"data-limited: {cfg.max_epochs:g} epochs of {n_train:,} tokens")


def describe_run(cfg: TrainConfig, rt: Runtime, plan: Plan, model_config: dict, params: int) -> tuple[dict, dict]:
    """(the resolved train config for the start event, the run config every checkpoint carries)."""
    prepared = plan.prepared
    # storage_options may hold cloud credentials: the start event and config.json (which ships with
    # the model) name the keys only.
    redacted = {k: "<redacted>" for k in cfg.storage_options} if cfg.storage_options else cfg.storage_options
    resolved = dataclasses.asdict(cfg) | {"batch_size": plan.batch, "seq_len": plan.seq, "compile": rt.compile,
                                          "device": str(rt.device), "cache_dir": str(plan.cache_dir), "dtype": rt.dtype,
                                          "attention_dtype": rt.attention,
                                          "storage_options": redacted}
    run_config = {"model": model_config, "shape": plan.shape.to_dict(), "train": resolved,
                  "data": {"source": prepared.source, "sha256": prepared.data_sha256,
                           "n_train_tokens": prepared.n_train_tokens, "n_val_tokens": prepared.n_val_tokens},
                  "tokenizer_fingerprint": prepared.tokenizer.fingerprint(), "params": params,
                  "kind": "base", "chat_tuned": False}  # the chat stage saves "chat" (trainer/chat_loop.py)
    return resolved, run_config


# --- resuming ------------------------------------------------------------------------------------

def resume(plan: Plan, model, optimizers, loader, rt: Runtime, log) -> dict:
    """Everything that moves during training, back from the newest valid checkpoint ({} for a fresh
    run): weights and optimizer states in place, the loader's position, and the train state."""
    from trainer import checkpoint as ckpt
    if plan.resumed_from is None:
        return {}
    saved = ckpt.read_config(plan.resumed_from)
    model_config = model.config.to_dict()
    if saved.get("model") != model_config:
        raise UsageError(f"{plan.resumed_from} holds a different model ({saved.get('model')}); "
                         "resume with the same depth, vocab and sequence length, or use a new --out")
    if saved.get("tokenizer_fingerprint") != plan.prepared.tokenizer.fingerprint():
        raise UsageError(f"{plan.resumed_from} was trained with a different tokenizer")
    state = ckpt.load_checkpoint(plan.resumed_from, model, optimizers, rt.device)
    loader.load_state(state["loader"])
    log(f"resumed from {plan.resumed_from} at step {state['step']}")
    return state


def train(cfg: TrainConfig, rt: Runtime, emit: progress.Emitter) -> int:
    """Plan, build, resume, then run the loop; the contract's exit code (errors are raised)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from trainer import chat_stage, data, optim, precision
    from trainer.checkpoint import read_config
    from trainer.model import GPT, GPTConfig

    log = lambda msg: _log(rt.master, msg)  # noqa: E731
    chat = None
    if cfg.init_from is not None:  # the chat stage alone (trainer/chat_stage.py)
        return chat_stage.from_checkpoint(cfg, rt, emit)
    plan = plan_run(cfg, rt, log)
    if plan.resumed_from is not None:  # a resumed run keeps its checkpoint's arithmetic
        saved = read_config(plan.resumed_from)
        if cfg.dtype == "auto":
            rt.dtype = precision.kept(rt.dtype, saved.get("train", {}).get("dtype"), rt.device.type, log)
        rt.attention = precision.kept_attention(rt, saved, log)
    if cfg.chat_data is not None:  # the chat stage's data is checked before any step
        chat = chat_stage.prepare(cfg, rt, plan.prepared.tokenizer, plan.seq, plan.batch, plan.micro, log)
    torch.manual_seed(cfg.seed)
    gpt_config = GPTConfig.from_shape(plan.shape)
    model = GPT(gpt_config).to(rt.device)  # built (and initialised) on the CPU: the same on every device
    model.set_attention_dtype(rt.attention)
    params = model.num_params()
    optimizers = optim.build_optimizers(
        model.param_groups(), plan.shape.n_embd, matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr,
        unembedding_lr=cfg.unembedding_lr, weight_decay=cfg.weight_decay, device_type=rt.device.type,
        dtype=rt.dtype)
    plan_length(cfg, plan, sizing.scaling_params(plan.shape), log)
    resolved, run_config = describe_run(cfg, rt, plan, gpt_config.to_dict(), params)

    loader = data.TokenLoader(plan.prepared.train_path, plan.prepared.dtype, plan.micro * rt.world_size,
                              plan.seq, rank=rt.rank, world_size=rt.world_size)
    state = resume(plan, model, optimizers, loader, rt, log)
    start_step = int(state.get("step", 0))

    train_model = ddp = model
    if rt.world_size > 1:
        device_ids = [rt.local_rank] if rt.device.type == "cuda" else None
        train_model = ddp = DistributedDataParallel(model, device_ids=device_ids)
    if rt.compile:
        train_model = torch.compile(train_model)

    peak = peak_flops(rt.device)
    tokenizer = plan.prepared.tokenizer
    emit = chat_stage.StageEmitter(emit, chat, plan.total_steps, plan.tokens_per_step)  # adds "stage"
    emit("start", config=resolved, params=params, flops_per_token=model.flops_per_token(),
         total_steps=plan.total_steps, total_tokens=plan.total_steps * plan.tokens_per_step, device=str(rt.device),
         world_size=rt.world_size, resumed_from_step=start_step if plan.resumed_from is not None else None,
         shape=plan.shape.to_dict(), tokens_per_step=plan.tokens_per_step, vocab_size=tokenizer.vocab_size,
         peak_flops=peak, grad_accum_steps=plan.accum, budget=plan.budget, data_source=plan.prepared.source,
         data_sha256=plan.prepared.data_sha256, n_train_tokens=plan.prepared.n_train_tokens,
         n_val_tokens=plan.prepared.n_val_tokens, data_bytes=plan.prepared.n_bytes, dtype=rt.dtype)
    log(f"depth {cfg.depth}: {params:,} params, {plan.total_steps} steps of {plan.batch}x{plan.seq} tokens on "
        f"{rt.device} x{rt.world_size}{' (compiled)' if rt.compile else ''}")

    run = Run(cfg=cfg, rt=rt, emit=emit, log=log, plan=plan, model=model, train_model=train_model, ddp=ddp,
              optimizers=optimizers, loader=loader, run_config=run_config, peak=peak, step=start_step,
              tokens_seen=int(state.get("tokens_seen", 0)), elapsed_before=float(state.get("elapsed_s", 0.0)),
              last_loss=state.get("last_loss"), last_bpb=state.get("last_val_bpb"), last_ckpt=plan.resumed_from)
    if chat is not None:
        return chat_stage.after_pretraining(run, chat, emit, state)
    return train_loop(run)


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
