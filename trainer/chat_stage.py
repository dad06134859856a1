"""The chat stage: supervised fine-tuning on conversations, after pretraining or from a checkpoint.

    python -m trainer.train --depth 2 --chat-data demo --out runs/chat      # pretraining, then chat
    python -m trainer.train --init-from runs/base/checkpoints/step_0006285 --chat-data chats.jsonl --out runs/c

It follows pretraining's rules (train.py): the same events, now with ``stage`` ("pretrain" or "chat");
global step numbers (the chat stage's first step is pretraining's last + 1); checkpoints every
--checkpoint-every, at --stop-at-step and on SIGTERM (exit 75), resumed exactly by --resume (weights,
the chat optimizers' states, the loader's (epoch, row), the RNG). The data is read and checked
before the first step of either stage, so bad conversations fail fast with EXIT_DATA.

Fine-tuning: fresh optimizers (the same kinds as pretraining) at --chat-lr-scale times the pretraining
learning rates, a linear warmdown over the last --chat-warmdown-ratio of the stage; the loss is the
mean over the assistant's tokens of each step (trainer/chat_data.py builds the mask).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trainer.chat_data import ChatData, ChatLoader, prepare_chat, read_conversations
from trainer.chat_loop import chat_loop


@dataclass
class ChatRun:
    """Everything the chat loop reads and moves forward."""
    cfg: Any
    rt: Any
    emit: Callable
    log: Callable[[str], None]
    data: ChatData
    loader: ChatLoader
    tokenizer: Any
    tokenizer_dir: Path
    out: Path
    batch: int
    micro: int
    accum: int
    steps: int  # chat steps
    first_step: int  # the global step before the chat stage's first (0 after --init-from)
    n_conversations: int
    n_val_conversations: int
    model: Any = None
    train_model: Any = None
    ddp: Any = None
    optimizers: list = field(default_factory=list)
    run_config: dict = field(default_factory=dict)
    pre_loader_state: dict | None = None  # pretraining's loader, kept in chat checkpoints for resume()
    data_sha256: str | None = None
    step: int = 0  # global
    tokens_seen: int = 0
    elapsed_before: float = 0.0
    last_loss: float | None = None
    last_bpb: float | None = None
    last_ckpt: Path | None = None
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def val_prompts(self) -> list[str]:
        return self.data.val_prompts

    @property
    def total_steps(self) -> int:
        return self.first_step + self.steps

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start


def prepare(cfg, rt, tokenizer, seq: int, batch: int, micro: int, log) -> ChatRun:
    """Read, check and tokenize the conversations and fix the stage's length (no model yet).
    Raises DataError (bad conversations) and UsageError."""
    convs = read_conversations(cfg.chat_data, cfg.storage_options, cfg.seed)
    data = prepare_chat(convs, tokenizer, seq, cfg.seed, drop_long=cfg.chat_data == "demo")
    loader = ChatLoader(data, micro * rt.world_size, rank=rt.rank, world_size=rt.world_size)
    rows = loader.rows_per_epoch()
    steps = cfg.chat_steps or max(1, math.ceil(cfg.chat_epochs * rows / batch))
    log(f"chat stage: {len(data.train):,} conversations ({rows:,} rows of {seq}, {data.n_train_tokens:,} "
        f"assistant tokens) + {len(data.val):,} held out; {steps} steps")
    return ChatRun(cfg=cfg, rt=rt, emit=None, log=log, data=data, loader=loader, tokenizer=tokenizer,
                   tokenizer_dir=Path(), out=Path(cfg.out), batch=batch, micro=micro,
                   accum=batch // rt.world_size // micro, steps=steps, first_step=0,
                   n_conversations=len(data.train), n_val_conversations=len(data.val))


def build_optimizers(cfg, model, rt):
    """The stage's optimizers: pretraining's kinds at ``chat_lr_scale`` of its rates, in the run's dtype
    (a bf16 run orthogonalises in bf16, as pretraining does: a quarter of float32's time on a CPU)."""
    from trainer import optim
    s = cfg.chat_lr_scale
    return optim.build_optimizers(model.param_groups(), model.config.n_embd, matrix_lr=cfg.matrix_lr * s,
                                  embedding_lr=cfg.embedding_lr * s, unembedding_lr=cfg.unembedding_lr * s,
                                  weight_decay=cfg.weight_decay, device_type=rt.device.type, dtype=rt.dtype)


class StageEmitter:
    """Pretraining's events with ``stage`` ("pretrain"), and, with a chat stage, as the two-stage run tells them: ``stage`` on every step, eval, sample and
    checkpoint; the start event's totals and ``stages`` cover both stages; pretraining's own ``done``
    is held back (the run goes on), and kept to tell a finished pretraining from a stop."""

    def __init__(self, emit, chat: ChatRun | None, pre_steps: int, tokens_per_step: int):
        self.emit, self.chat, self.pre_steps, self.tokens_per_step = emit, chat, pre_steps, tokens_per_step
        self.stage = "pretrain"
        self.pre_done: dict | None = None

    def __call__(self, event: str, **fields) -> None:
        if self.chat is None:  # a run without a chat stage: its events only say which stage they are
            if event in ("step", "eval", "sample", "checkpoint"):
                fields.setdefault("stage", self.stage)
            self.emit(event, **fields)
            return
        if event == "start":
            fields["total_steps"] = self.pre_steps + self.chat.steps
            fields["total_tokens"] = fields["total_tokens"] + self.chat.steps * self.tokens_per_step
            fields["stages"] = [{"stage": "pretrain", "steps": self.pre_steps},
                                {"stage": "chat", "steps": self.chat.steps}]
        if event in ("step", "eval", "sample", "checkpoint"):
            fields.setdefault("stage", self.stage)
        if event == "step" and self.stage == "pretrain":
            fields["total_steps"] = self.pre_steps + self.chat.steps
            done = max(fields["step"], 1)
            fields["eta_s"] = fields["eta_s"] + self.chat.steps * fields["elapsed_s"] / done
        if event == "done" and self.stage == "pretrain":
            self.pre_done = fields
            return
        self.emit(event, **fields)


def after_pretraining(run, chat: ChatRun, emitter: StageEmitter, state: dict) -> int:
    """Finish (or skip, when resuming inside the chat stage) pretraining, then run the chat stage."""
    from trainer import checkpoint as ckpt
    from trainer.loop import train_loop
    resumed_in_chat = state.get("stage") == "chat"
    if not resumed_in_chat:
        code = train_loop(run)
        if emitter.pre_done is None:  # stopped (signal, --stop-at-step) or failed inside pretraining
            return code
    emitter.stage = "chat"
    chat.emit, chat.model, chat.train_model, chat.ddp = emitter, run.model, run.train_model, run.ddp
    chat.tokenizer_dir = run.plan.prepared.tokenizer_dir
    chat.first_step = run.plan.total_steps
    chat.pre_loader_state = run.loader.state()
    chat.data_sha256 = run.plan.prepared.data_sha256
    chat.run_config = dict(run.run_config)
    chat.optimizers = build_optimizers(run.cfg, run.model, run.rt)
    chat.step, chat.tokens_seen, chat.elapsed_before = run.step, run.tokens_seen, run.elapsed()
    chat.last_loss, chat.last_bpb, chat.last_ckpt = run.last_loss, run.last_bpb, run.last_ckpt
    if resumed_in_chat:  # the chat optimizers' states and the loader's place, from the same checkpoint
        ckpt.load_checkpoint(run.plan.resumed_from, run.model, chat.optimizers, run.rt.device)
        chat.loader.load_state(state["chat_loader"])
        chat.pre_loader_state = state.get("loader")
        chat.elapsed_before = float(state.get("elapsed_s", 0.0))
    return chat_loop(chat)


def from_checkpoint(cfg, rt, emit) -> int:
    """--init-from DIR: the chat stage alone, from that checkpoint's weights and tokenizer (its shape
    wins over --depth and --vocab-size). Raises UsageError for a directory that is not a checkpoint."""
    import dataclasses

    import torch
    from torch.nn.parallel import DistributedDataParallel

    from trainer import checkpoint as ckpt
    from trainer import precision, sizing
    from trainer.config import UsageError
    from trainer.model import GPT, GPTConfig
    from trainer.tokenizer import Tokenizer
    from trainer.train import _cuda_rows, _log, peak_flops

    log = lambda msg: _log(rt.master, msg)  # noqa: E731
    base = Path(cfg.init_from)
    try:
        if (base / ckpt.MANIFEST).exists():  # a trainer checkpoint: check it whole; a copy without one
            ckpt.verify(base)               # (config.json, weights, tokenizer/) is taken as it is
        elif not (base / "model.safetensors").is_file():
            raise OSError("no model.safetensors in it")
        base_config = ckpt.read_config(base)
        fields = {f.name for f in dataclasses.fields(GPTConfig)}
        model_config = GPTConfig(**{k: v for k, v in base_config["model"].items() if k in fields})
        tokenizer = Tokenizer.load(base / "tokenizer")
    except (ckpt.CheckpointError, OSError, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"--init-from {base} is not a usable checkpoint directory: {e}") from None
    if cfg.seq_len and cfg.seq_len > model_config.sequence_len:
        raise UsageError(f"seq_len {cfg.seq_len} exceeds the checkpoint's context of {model_config.sequence_len}")
    seq = cfg.seq_len or model_config.sequence_len
    shape = model_config.to_shape()
    batch = cfg.batch_size or (_cuda_rows(shape, rt) if rt.device.type == "cuda"
                               else sizing.device_defaults(rt.device.type)["batch_size"])
    micro = cfg.device_batch_size or batch // rt.world_size
    if batch % rt.world_size or (batch // rt.world_size) % micro:
        raise UsageError(f"batch_size {batch} must split evenly into {rt.world_size} processes x device_batch_size")
    chat = prepare(cfg, rt, tokenizer, seq, batch, micro, log)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    resumed_from = ckpt.latest_checkpoint(out) if cfg.resume else None

    torch.manual_seed(cfg.seed)
    model = GPT(model_config).to(rt.device)
    optimizers = build_optimizers(cfg, model, rt)
    state: dict = {}
    if resumed_from is not None:
        saved = ckpt.read_config(resumed_from)
        rt.attention = precision.kept_attention(rt, saved, log)
        if saved.get("model") != model_config.to_dict():
            raise UsageError(f"{resumed_from} holds a different model than {base}; use a new --out")
        state = ckpt.load_checkpoint(resumed_from, model, optimizers, rt.device)
        chat.loader.load_state(state["chat_loader"])
        log(f"resumed from {resumed_from} at step {state['step']}")
    else:
        from safetensors.torch import load_file
        try:
            model.load_state_dict(load_file(str(base / "model.safetensors"), device=str(rt.device)), strict=True)
        except (OSError, RuntimeError) as e:
            raise UsageError(f"--init-from {base}: its weights do not load: {e}") from None
    model.set_attention_dtype(rt.attention)
    model.train()
    train_model = ddp = model
    if rt.world_size > 1:
        train_model = ddp = DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    if rt.compile:
        train_model = torch.compile(train_model)

    params = model.num_params()
    redacted = {k: "<redacted>" for k in cfg.storage_options} if cfg.storage_options else cfg.storage_options
    resolved = dataclasses.asdict(cfg) | {"batch_size": batch, "seq_len": seq, "compile": rt.compile,
                                          "device": str(rt.device), "storage_options": redacted,
                                          "dtype": rt.dtype, "attention_dtype": rt.attention,
                                          "depth": model_config.n_layer, "vocab_size": model_config.vocab_size}
    chat.run_config = {"model": model_config.to_dict(), "shape": shape.to_dict(), "train": resolved,
                       "data": base_config.get("data"), "tokenizer_fingerprint": tokenizer.fingerprint(),
                       "params": params, "init_from": str(base)}
    chat.emit, chat.model, chat.train_model, chat.ddp, chat.optimizers = emit, model, train_model, ddp, optimizers
    chat.tokenizer_dir, chat.out = base / "tokenizer", out
    chat.data_sha256 = (base_config.get("data") or {}).get("sha256")
    chat.step, chat.tokens_seen = int(state.get("step", 0)), int(state.get("tokens_seen", 0))
    chat.elapsed_before, chat.last_ckpt = float(state.get("elapsed_s", 0.0)), resumed_from
    chat.last_loss, chat.last_bpb = state.get("last_loss"), state.get("last_val_bpb")
    emit("start", config=resolved, params=params, flops_per_token=model.flops_per_token(), total_steps=chat.steps,
         total_tokens=chat.steps * batch * seq, device=str(rt.device), world_size=rt.world_size,
         resumed_from_step=chat.step if resumed_from is not None else None, shape=shape.to_dict(),
         tokens_per_step=batch * seq, vocab_size=tokenizer.vocab_size, peak_flops=peak_flops(rt.device),
         grad_accum_steps=chat.accum, budget="chat", stages=[{"stage": "chat", "steps": chat.steps}],
         init_from=str(base))
    log(f"chat-tuning {base}: {params:,} params, {chat.steps} steps of {batch}x{seq} tokens on {rt.device}")
    return chat_loop(chat)
