"""The training loop: steps, evaluation, samples and checkpoints of a planned run (see train.py).

``train.train`` plans the run, builds the model and optimizers, restores a checkpoint if resuming and
hands a :class:`Run` to :func:`train_loop`, which steps until the plan's end, a signal or
``--stop-at-step`` and returns the contract's exit code (trainer/progress.py).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from trainer import progress

if TYPE_CHECKING:  # annotations only: train.py imports this module
    from trainer.config import TrainConfig
    from trainer.train import Plan, Runtime


class Diverged(Exception):
    pass


# --- evaluation and samples ---------------------------------------------------------------------

def evaluate(model, rt: Runtime, prepared, batch: int, seq: int, max_batches: int, token_bytes):
    """(val_loss, val_bpb) over the first ``max_batches`` validation batches (:func:`val_scores`)."""
    from trainer import data
    return val_scores(model, rt, data.iter_val_batches(prepared.val_path, prepared.dtype, batch, seq, max_batches,
                                                        rt.rank, rt.world_size), token_bytes)


def val_scores(model, rt: Runtime, batches, token_bytes) -> tuple[float, float]:
    """(val_loss in nats per token, val_bpb) over this process's ``batches`` of (x, y), summed over ranks;
    targets below 0 are masked out. Both stages score their held-out data with it.

    Bits per byte divide the summed loss by the bytes the target tokens stand for, so models with
    different tokenizers compare; special tokens (0 bytes) are left out of both sums.
    """
    import torch
    nats = nbytes = loss_sum = ntok = 0.0
    model.eval()
    with torch.no_grad():
        for x, y in batches:
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
    nats, nbytes, loss_sum, ntok = rt.all_reduce_sum(nats, nbytes, loss_sum, ntok)
    val_loss = loss_sum / ntok if ntok else float("nan")
    val_bpb = nats / (math.log(2) * nbytes) if nbytes else float("nan")
    return val_loss, val_bpb


@contextmanager
def sampling(model, rt: Runtime):
    """The model in eval mode under the run's autocast, and the RNG states put back afterwards: sampling
    must not disturb the training RNG, or a resumed run would drift from a straight one."""
    import torch
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None
    model.eval()
    try:
        with rt.autocast():
            yield
    finally:
        model.train()
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, rt.device)


def make_samples(model, rt: Runtime, tokenizer, prompts: list[str], seed: int) -> list[dict] | None:
    """A short generation per prompt, or None when trainer.sample is not available."""
    try:
        from trainer import sample
    except ImportError:
        return None
    out = []
    with sampling(model, rt):
        for prompt in prompts:
            text = "".join(sample.complete(model, tokenizer, prompt, max_tokens=64, temperature=0.8,
                                           top_k=50, seed=seed))
            out.append({"prompt": prompt, "text": text})
    return out


# --- the loop ------------------------------------------------------------------------------------

@dataclass
class Run:
    """A planned, built and possibly resumed run: what the loop reads and moves forward."""
    cfg: TrainConfig
    rt: Runtime
    emit: progress.Emitter
    log: Callable[[str], None]  # human lines to stderr, rank 0 only
    plan: Plan
    model: Any  # the GPT itself: checkpoints, evaluation and samples use it
    train_model: Any  # what the steps call: the model, or its DDP and/or compiled wrapper
    ddp: Any  # the DDP wrapper (for no_sync), or the model
    optimizers: list
    loader: Any
    run_config: dict
    peak: float | None
    step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0  # training seconds before this process (resumed runs)
    last_loss: float | None = None
    last_bpb: float | None = None
    last_ckpt: Path | None = None
    t_start: float = dataclasses.field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def save(self) -> Path | None:
        """Checkpoint the current step on rank 0 (every rank waits for it)."""
        from trainer import checkpoint as ckpt
        self.rt.barrier()
        path = None
        if self.rt.master:
            prepared = self.plan.prepared
            train_state = {"step": self.step, "total_steps": self.plan.total_steps, "tokens_seen": self.tokens_seen,
                           "elapsed_s": self.elapsed(), "loader": self.loader.state(), "last_loss": self.last_loss,
                           "last_val_bpb": self.last_bpb, "data_sha256": prepared.data_sha256}
            path = ckpt.save_checkpoint(self.plan.out, self.step, self.model, self.optimizers, train_state,
                                        prepared.tokenizer_dir, self.run_config, keep=self.cfg.keep_checkpoints)
            self.emit("checkpoint", step=self.step, path=str(path))
        self.rt.barrier()
        self.last_ckpt = path
        return path


def _train_step(run: Run) -> float:
    """One optimizer step over all its micro-batches; this process's loss (the loop averages ranks)."""
    from trainer import optim
    cfg, plan, rt = run.cfg, run.plan, run.rt
    optim.set_lr(run.optimizers, optim.lr_multiplier(run.step, plan.total_steps, cfg.warmup_ratio,
                                                     cfg.warmdown_ratio, cfg.final_lr_frac))
    optim.set_muon_momentum(run.optimizers, optim.muon_momentum(run.step))
    step_loss = 0.0  # summed on the device: one host sync per step, not per micro-step
    for k in range(plan.accum):
        x, y = run.loader.next_batch(rt.device)
        # DDP all-reduces on the last micro-step's backward only.
        sync = run.ddp.no_sync() if run.ddp is not run.model and k < plan.accum - 1 else nullcontext()
        with sync:
            with rt.autocast():
                loss = run.train_model(x, y)
            (loss / plan.accum).backward()
        step_loss = step_loss + loss.detach() / plan.accum
    optim.clip_grad_norm(run.model.parameters(), cfg.grad_clip)
    for opt in run.optimizers:
        opt.step()
    run.model.zero_grad(set_to_none=True)
    return float(step_loss)


@dataclass
class Stage:
    """What a stage of training brings to :func:`run_steps`, the one step loop both stages share
    (pretraining here, chat tuning in trainer/chat_loop.py): its step function, evaluation, samples and
    checkpoint, and how its events and log lines are labelled."""
    total_steps: int  # the global step the stage ends at
    tokens_per_step: int
    train_step: Callable[[], float]  # one optimizer step; this process's loss
    evaluate: Callable[[], tuple[float, float]]  # (val_loss, val_bpb)
    samples: Callable[[], list[dict] | None] | None  # None: the stage emits no samples
    save: Callable[[], Path | None]
    vocab_size: int  # sets the loss beyond which the run has diverged
    diverged_hint: str  # the Diverged message's advice
    name: str | None = None  # the events' "stage" field and the log lines' prefix (pretraining has none)
    loss_name: str = "loss"  # as the Diverged message names it
    mfu: Callable[[float], float | None] = lambda tokens_per_sec: None
    eval_note: str | None = None  # the eval log line's tail; None: the val_bpb figure


def run_steps(run, stage: Stage) -> int | None:
    """Step until ``stage.total_steps``, a SIGTERM/SIGINT or --stop-at-step, logging, evaluating,
    sampling and checkpointing on the config's cadence. The contract's exit code when it stopped early,
    None when it reached the stage's end (the caller emits "done")."""
    cfg, rt, emit, log = run.cfg, run.rt, run.emit, run.log
    start_step, total = run.step, stage.total_steps
    label = f"{stage.name} " if stage.name else ""
    tag = {"stage": stage.name} if stage.name else {}
    diverge_limit = 3 * math.log(stage.vocab_size) + 5  # well above the loss of a uniform guess

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum  # finish the step in flight, then checkpoint and leave
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    run.t_start = t_window = time.perf_counter()
    tokens_window = 0
    while run.step < total:
        step_loss = stage.train_step()
        run.step += 1
        step = run.step
        run.tokens_seen += stage.tokens_per_step
        tokens_window += stage.tokens_per_step
        # One collective per step: the mean loss over ranks and whether any rank was told to stop.
        loss_sum, stop_votes = rt.all_reduce_sum(step_loss, float(stop["signal"] is not None))
        run.last_loss = last_loss = loss_sum / rt.world_size
        if not math.isfinite(last_loss) or last_loss > diverge_limit:
            raise Diverged(f"the {stage.loss_name} reached {last_loss:.4g} at step {step}; {stage.diverged_hint}")

        if step % cfg.log_every == 0 or step == total or step == start_step + 1:
            now = time.perf_counter()
            tps = tokens_window / max(now - t_window, 1e-9)
            t_window, tokens_window = now, 0
            mfu = stage.mfu(tps)
            eta = (now - run.t_start) / (step - start_step) * (total - step)
            lr = run.optimizers[-1].param_groups[0]["lr"]
            emit("step", step=step, total_steps=total, loss=last_loss, lr=lr, tokens_per_sec=tps, mfu=mfu,
                 elapsed_s=run.elapsed(), eta_s=eta, tokens_seen=run.tokens_seen, **tag)
            if step % max(cfg.log_every, 10) == 0 or step == total:
                log(f"{label}step {step:6d}/{total} loss {last_loss:.4f} lr {lr:.4g} {tps:,.0f} tok/s"
                    + (f" mfu {100 * mfu:.1f}%" if mfu is not None else "") + f" eta {eta:.0f}s")
        if step % cfg.eval_every == 0 or step == total:
            val_loss, run.last_bpb = stage.evaluate()
            emit("eval", step=step, val_loss=val_loss, val_bpb=run.last_bpb, **tag)
            tail = f"val_bpb {run.last_bpb:.4f}" if stage.eval_note is None else stage.eval_note
            log(f"{label}step {step:6d} val_loss {val_loss:.4f} {tail}")
        if rt.master and stage.samples is not None and (step % cfg.sample_every == 0 or step == total):
            samples = stage.samples()
            if samples is not None:
                emit("sample", step=step, samples=samples, **tag)
        stopping = stop_votes > 0 or step == cfg.stop_at_step
        if step % cfg.checkpoint_every == 0 or step == total or stopping:
            stage.save()
        if stop_votes > 0:
            log(f"stopped by a signal at step {step}; --resume continues from {run.last_ckpt}")
            return progress.EXIT_PREEMPTED
        if step == cfg.stop_at_step:
            log(f"stopped at step {step} as asked; --resume continues from {run.last_ckpt}")
            return progress.EXIT_OK
    return None


def train_loop(run: Run) -> int:
    """Pretraining: step until the plan's end, a SIGTERM/SIGINT or --stop-at-step; the contract's exit code."""
    import torch
    cfg, rt, plan = run.cfg, run.rt, run.plan
    tokenizer = plan.prepared.tokenizer
    start_step, total_steps, tokens_per_step = run.step, plan.total_steps, plan.tokens_per_step
    flops_per_token = run.model.flops_per_token()
    token_bytes = torch.as_tensor(tokenizer.token_byte_lengths(), dtype=torch.float32, device=rt.device)
    eval_batches = max(1, (cfg.eval_tokens or 8 * tokens_per_step) // tokens_per_step)
    stage = Stage(
        total_steps=total_steps, tokens_per_step=tokens_per_step, train_step=lambda: _train_step(run),
        evaluate=lambda: evaluate(run.model, rt, plan.prepared, plan.batch, plan.seq, eval_batches, token_bytes),
        samples=(lambda: make_samples(run.model, rt, tokenizer, cfg.sample_prompts, cfg.seed))
        if cfg.sample_prompts else None,
        save=run.save, vocab_size=tokenizer.vocab_size,
        diverged_hint="try a lower learning rate (--matrix-lr, --embedding-lr) or a smaller --grad-clip",
        mfu=lambda tps: flops_per_token * tps / (run.peak * rt.world_size) if run.peak else None)
    code = run_steps(run, stage)
    if code is not None:
        return code
    if rt.master and run.last_ckpt is None and start_step >= total_steps:
        run.last_ckpt = plan.resumed_from
    run.emit("done", step=run.step, final_loss=run.last_loss, final_val_bpb=run.last_bpb,
             elapsed_s=run.elapsed(), checkpoint=str(run.last_ckpt) if run.last_ckpt else None,
             tokens_seen=run.tokens_seen)
    return progress.EXIT_OK
