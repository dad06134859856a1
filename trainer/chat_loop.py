"""The chat stage's loop: steps on masked conversation batches, validation on held-out conversations,
chat samples and checkpoints, under the same stop rules as pretraining (trainer/loop.py).

``chat_stage.py`` builds a :class:`~trainer.chat_stage.ChatRun` and calls :func:`chat_loop`, which
returns the contract's exit code.
"""

from __future__ import annotations

from contextlib import nullcontext

from trainer import progress
from trainer.loop import Stage, run_steps, sampling, val_scores


def _lr_and_momentum(run) -> None:
    from trainer import optim
    cfg, k = run.cfg, run.step - run.first_step  # k: chat steps taken so far
    optim.set_lr(run.optimizers, optim.lr_multiplier(k, run.steps, cfg.chat_warmup_ratio, cfg.chat_warmdown_ratio, 0.0))
    optim.set_muon_momentum(run.optimizers, optim.muon_momentum(k))


def _train_step(run) -> float:
    """One optimizer step: the mean loss over every assistant token of this process's rows."""
    from trainer import optim
    rt = run.rt
    _lr_and_momentum(run)
    batches = [run.loader.next_batch(rt.device) for _ in range(run.accum)]
    # Each micro-batch's summed loss over the step's count of assistant tokens: the step's mean, whatever
    # the split (a micro-batch may hold none, where a per-micro-batch mean would be 0/0).
    n_targets = max(1, sum(int((y >= 0).sum()) for _, y in batches))
    step_loss = 0.0
    for k, (x, y) in enumerate(batches):
        sync = run.ddp.no_sync() if run.ddp is not run.model and k < run.accum - 1 else nullcontext()
        with sync:
            with rt.autocast():
                loss = run.train_model(x, y, loss_reduction="sum") / n_targets
            loss.backward()
        step_loss = step_loss + loss.detach()
    optim.clip_grad_norm(run.model.parameters(), run.cfg.grad_clip)
    for opt in run.optimizers:
        opt.step()
    run.model.zero_grad(set_to_none=True)
    return float(step_loss)


def evaluate(run, max_rows: int) -> tuple[float, float]:
    """(val_loss, val_bpb) on the assistant tokens of the held-out conversations (at most ``max_rows``
    packed rows, split between ranks); bits per byte leave out <|assistant_end|> (it is 0 bytes)."""
    import torch
    rt = run.rt
    x_all, y_all = run.data.rows(None)
    x_all, y_all = x_all[:max_rows], y_all[:max_rows]
    token_bytes = torch.as_tensor(run.tokenizer.token_byte_lengths(), dtype=torch.float32, device=rt.device)
    batches = ((torch.from_numpy(x_all[lo:lo + run.micro]), torch.from_numpy(y_all[lo:lo + run.micro]))
               for lo in range(rt.rank * run.micro, len(x_all), run.micro * rt.world_size))
    return val_scores(run.model, rt, batches, token_bytes)


def make_samples(run, n: int = 2) -> list[dict]:
    """Greedy replies to the first user turns of held-out conversations, without disturbing the RNG."""
    from trainer import sample
    out = []
    with sampling(run.model, run.rt):
        for prompt in run.val_prompts[:n]:
            text = "".join(sample.chat(run.model, run.tokenizer, [{"role": "user", "content": prompt}],
                                       max_tokens=64, temperature=0.0))
            out.append({"prompt": prompt, "text": text})
    return out


def save(run):
    """Checkpoint the current step (rank 0 writes; every rank waits)."""
    from trainer import checkpoint as ckpt
    run.rt.barrier()
    path = None
    if run.rt.master:
        state = {"step": run.step, "total_steps": run.total_steps, "tokens_seen": run.tokens_seen,
                 "elapsed_s": run.elapsed(), "loader": run.pre_loader_state, "chat_loader": run.loader.state(),
                 "stage": "chat", "chat_step": run.step - run.first_step, "chat_steps": run.steps,
                 "last_loss": run.last_loss, "last_val_bpb": run.last_bpb, "data_sha256": run.data_sha256}
        config = dict(run.run_config, kind="chat", chat_tuned=True,
                      chat={"data": run.cfg.chat_data, "steps": run.steps, "first_step": run.first_step,
                            "n_conversations": run.n_conversations, "n_val_conversations": run.n_val_conversations})
        path = ckpt.save_checkpoint(run.out, run.step, run.model, run.optimizers, state, run.tokenizer_dir,
                                    config, keep=run.cfg.keep_checkpoints)
        run.emit("checkpoint", step=run.step, path=str(path), stage="chat")
    run.rt.barrier()
    run.last_ckpt = path
    return path


def chat_loop(run) -> int:
    """Step through the chat stage until its end, a SIGTERM/SIGINT or --stop-at-step (trainer/loop.py's
    run_steps with this stage's step, evaluation, samples and checkpoint); the contract's exit code."""
    cfg = run.cfg
    tokens_per_step = run.batch * run.data.seq_len
    eval_rows = max(1, (cfg.eval_tokens or 8 * tokens_per_step) // run.data.seq_len)
    run.emit("stage", stage="chat", step=run.first_step, steps=run.steps, n_conversations=run.n_conversations,
             n_val_conversations=run.n_val_conversations)
    stage = Stage(
        total_steps=run.total_steps, tokens_per_step=tokens_per_step, train_step=lambda: _train_step(run),
        evaluate=lambda: evaluate(run, eval_rows),
        samples=(lambda: make_samples(run)) if run.val_prompts else None,
        save=lambda: save(run), vocab_size=run.tokenizer.vocab_size,
        diverged_hint="try a lower --chat-lr-scale or a smaller --grad-clip",
        name="chat", loss_name="chat-stage loss", eval_note="(assistant tokens)")
    code = run_steps(run, stage)
    if code is not None:
        return code
    run.emit("done", step=run.step, final_loss=run.last_loss, final_val_bpb=run.last_bpb,
             elapsed_s=run.elapsed(), checkpoint=str(run.last_ckpt) if run.last_ckpt else None,
             tokens_seen=run.tokens_seen, chat_tuned=True)
    return progress.EXIT_OK
