"""The chat stage's share of a plan: its steps, tokens and time, beside pretraining's (estimate.py).

The trainer's rule for the stage's length (trainer/chat_stage.py, ``--chat-steps`` unset): ``chat_epochs``
(trainer/config.py DEFAULT_CHAT_EPOCHS) passes over the training conversations packed whole into rows of
``seq_len + 1`` tokens, ``batch`` rows a step: ``ceil(epochs * rows / batch)``. The trainer counts the rows
after tokenizing; before a run the app does not tokenize conversations, so the plan works them out:

- the built-in demo set: its conversations are generated here exactly as the trainer generates them
  (trainer/demo_chat.py, seed 42), each message's tokens are its bytes over DEMO_CHAT_BYTES_PER_TOKEN
  plus its two turn tokens, and the trainer's packing is replayed (every 20th conversation held out,
  a conversation with a turn longer than the context left out, whole conversations a row). That holds
  at any ``seq_len``: how full rows are depends on it (at 128 nearly one conversation a row, at 256 about 1.5);
- a JSONL file: JSONL_CONTENT_SHARE of its bytes is text (the rest is JSON syntax and role names), at
  the demo corpus' bytes per token (sizing.DEMO_FACTS), FRAMING_SHARE more tokens for the turns' special
  tokens, rows PACKING_EFFICIENCY full (as the demo set packs at 256), VAL_SHARE held out; the plan says
  so in ``chat.assumes``;
- a chat step costs what a pretraining step of the same shape and batch costs (same rows of tokens),
  evaluations a forward pass over the held-out conversations every ``sizing.EVAL_EVERY`` steps.

A dataset whose size is not known before the run (a URL, s3) gets UNKNOWN_DATA_STEPS and the plan says so.
``chat_steps`` given: exactly that.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Any, Mapping

from trainer import sizing
from trainer.config import DEFAULT_CHAT_EPOCHS

from . import chattune, datasets, formats
from .errors import BadRequest
from .models import Model, User

# The built-in set (trainer/demo_chat.py, N_CONVERSATIONS of them, seed 42): its message texts total this
# many bytes (tests/test_chat_runs.py checks it against the generator).
DEMO_CHAT_CONTENT_BYTES = 4_382_756
# Bytes per token of the demo set's messages under the demo tokenizer, fitted to the trainer's own count
# when its vocabulary was 978 (at seq_len 256 7,524 rows, this replay 7,573; at 128 11,116 and 10,980).
# Re-checked with the corpus of vocabulary 977: the trainer plans 2,857 steps of 8 rows for 3 passes at
# 256 (~7,617 rows), this replay 2,873 (7,660); tests/test_chat_runs.py holds it within 5% at 128 and 256.
DEMO_CHAT_BYTES_PER_TOKEN = 3.4
DEMO_SEED = 42  # trainer/config.py's default seed: the set a default run reads
JSONL_CONTENT_SHARE = 0.71  # the demo set written as JSONL is this share message text
BYTES_PER_TOKEN = sizing.DEMO_FACTS["raw_bytes"] / (sizing.DEMO_FACTS["n_train_tokens"] + sizing.DEMO_FACTS["n_val_tokens"])
FRAMING_SHARE = 0.10  # <|bos|> and each turn's start and end tokens: ~13 per demo conversation of ~100
# How full packed rows are for a JSONL set (unknown conversation lengths): measured on the demo set at
# seq_len 256 before its answers were lengthened (4,937 rows); a rough figure for other sets, said as such.
PACKING_EFFICIENCY = 0.663
VAL_SHARE = 1 / 20  # trainer/chat_data.py VAL_EVERY
CHAT_EPOCHS = DEFAULT_CHAT_EPOCHS
UNKNOWN_DATA_STEPS = 300


@dataclass(frozen=True)
class ChatAsk:
    """The chat stage an estimate request (or a job config) asks for."""

    spec: str  # the conversations' dataset spec ("demo", "ds:<id>", a URL...)
    steps: int | None  # chat_steps, when given
    model: Model | None  # the model a run from a model starts from (no pretraining)


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in ("1", "true", "on", "yes"))


def parse(args: Mapping[str, Any], user: User) -> ChatAsk | None:
    """The chat stage in ``args`` (a query string or a job config: ``chat``, ``chat_data``, ``chat_steps``,
    ``init_from_model``), or None without one. BadRequest names the argument; NotFound for a model
    that is not ``user``'s."""
    spec = args.get("chat_data")
    if spec in (None, "") and not _truthy(args.get("chat")):
        return None
    spec = "demo" if spec in (None, "") else datasets.describe_spec(spec)
    steps = args.get("chat_steps")
    if steps not in (None, ""):
        try:
            steps = int(steps)
        except (TypeError, ValueError):
            raise BadRequest(f"'chat_steps' must be an integer, got {steps!r}", param="chat_steps") from None
        lo, hi = chattune.CHAT_STEPS_BOUNDS
        if not lo <= steps <= hi:
            raise BadRequest(f"'chat_steps' must be between {lo} and {hi}, got {steps}", param="chat_steps")
    else:
        steps = None
    model = None
    if args.get("init_from_model") not in (None, ""):
        model = chattune.source_model(args["init_from_model"], user)
    return ChatAsk(spec=spec, steps=steps, model=model)


def model_args(ask: ChatAsk, args: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of the pretraining-shaped plan of a run from ``ask.model``: the model's depth, its
    data (for its vocabulary: exact for the demo), one nominal step (removed by :func:`add_stage`)."""
    assert ask.model is not None
    cfg = ask.model.config or {}
    out: dict[str, Any] = {"depth": chattune.model_depth(ask.model) or 1, "max_steps": 1}
    # The trainer's rows: the model's context unless asked, and the device's default batch unless asked
    # (trainer/chat_stage.py from_checkpoint); the vocabulary is the model's tokenizer's.
    for key, value in (("seq_len", args.get("seq_len") or cfg.get("seq_len")), ("batch_size", args.get("batch_size")),
                       ("vocab_size", cfg.get("vocab_size"))):
        if value:
            out[key] = value
    out["dataset"] = "demo" if ask.model.data_source == "demo" else FROM_MODEL_DATA
    return out


FROM_MODEL_DATA = "model:"  # the model's own data, not read again: no facts, no size (estimate.py)


def conversation_bytes(spec: str, user: User) -> int | None:
    """The text bytes of the conversations ``spec`` names, as far as they are known before a run."""
    if spec == "demo":
        return DEMO_CHAT_CONTENT_BYTES
    if spec.startswith("ds:") and spec[3:].isdigit():
        try:
            ds = datasets.get_dataset(user, spec[3:])
        except Exception:  # validated elsewhere (404 there); the plan just knows nothing
            return None
        return int(ds.counted_bytes * JSONL_CONTENT_SHARE)
    return None


def default_steps(content_bytes: int, batch: int, seq_len: int) -> int:
    """The trainer's default chat length for a JSONL set with ``content_bytes`` bytes of text (see the
    module docstring for what is assumed)."""
    tokens = content_bytes / BYTES_PER_TOKEN * (1 + FRAMING_SHARE) * (1 - VAL_SHARE)
    rows = math.ceil(tokens / (seq_len + 1) / PACKING_EFFICIENCY)
    return max(1, math.ceil(CHAT_EPOCHS * rows / batch))


@functools.lru_cache(maxsize=1)
def _demo_message_bytes() -> tuple[tuple[int, ...], ...]:
    """Each demo conversation's message lengths in bytes, in the trainer's order (~0.4 s, once)."""
    from trainer import demo_chat
    return tuple(tuple(len(m["content"].encode()) for m in c)
                 for c in demo_chat.conversations(DEMO_SEED, demo_chat.N_CONVERSATIONS))


@functools.lru_cache(maxsize=64)
def demo_rows(seq_len: int) -> int:
    """The rows of ``seq_len + 1`` tokens the trainer packs the demo set's training conversations into
    (trainer/chat_data.py prepare_chat and ChatData.rows, replayed on estimated token counts)."""
    from trainer.chat_data import VAL_EVERY, pack
    kept = []
    for message_bytes in _demo_message_bytes():
        turns = [round(b / DEMO_CHAT_BYTES_PER_TOKEN) + 2 for b in message_bytes]
        if max(turns) > seq_len:  # drop_long: the trainer leaves such a demo conversation out
            continue
        kept.append(1 + sum(turns))  # <|bos|>, then each turn with its start and end tokens
    train = [n for i, n in enumerate(kept) if i % VAL_EVERY != VAL_EVERY - 1]  # the held-out ones go
    random.Random(0).shuffle(train)  # the trainer packs in a shuffled order; any order packs alike
    return len(pack(train, seq_len + 1))


def demo_steps(batch: int, seq_len: int) -> int:
    """The trainer's default chat length for the built-in set."""
    return max(1, math.ceil(CHAT_EPOCHS * demo_rows(seq_len) / batch))


def add_stage(plan: dict[str, Any], ask: ChatAsk, user: User) -> dict[str, Any]:
    """``plan`` (estimate.estimate's, for pretraining or, for a run from a model, its shape) with the chat
    stage added: ``stages``, ``chat``, and steps, tokens and time covering both (what the trainer's start
    event reports: total_steps = pretraining + chat)."""
    batch, seq_len, per_step = plan["batch_size"], plan["seq_len"], plan["tokens_per_step"]
    content = conversation_bytes(ask.spec, user)
    if ask.steps is not None:
        steps, how = ask.steps, "chat_steps"
    elif ask.spec == "demo":
        steps, how = demo_steps(batch, seq_len), "demo"
    elif content is not None:
        steps, how = default_steps(content, batch, seq_len), "data"
    else:
        steps, how = UNKNOWN_DATA_STEPS, "unknown"
    step_s = per_step / plan["time"]["tokens_per_sec"]
    evals = sizing.run_events(steps)["evals"]
    val_tokens = (content or 0) / BYTES_PER_TOKEN * VAL_SHARE
    eval_s = evals * max(1.0, val_tokens / per_step) * step_s / 3  # a forward pass ~ a third of a step
    breakdown = dict(plan["time"]["breakdown"])
    if ask.model is not None:  # no pretraining: only the start-up, the exit and a checkpoint's load
        for key in ("data", "steps", "evals", "samples", "checkpoints"):
            breakdown[key] = 0.0
        pre_steps = 0
    else:
        pre_steps = plan["steps"]
    breakdown["chat"] = round(steps * step_s + eval_s, 3)
    chat = {"stage": "chat", "steps": steps, "tokens": steps * per_step, "seconds": breakdown["chat"],
            "data": ask.spec, "length_from": how, "assumes": _assumes(how)}
    stages = [] if ask.model is not None else [
        {"stage": "pretrain", "steps": pre_steps, "tokens": pre_steps * per_step,
         "seconds": round(sum(v for k, v in breakdown.items() if k != "chat"), 3)}]
    stages.append(chat)
    plan.update(steps=pre_steps + steps, tokens=(pre_steps + steps) * per_step, stages=stages, chat=chat)
    plan["tokens_human"] = formats.count(plan["tokens"])
    plan["time"] = {**plan["time"], "seconds": sum(breakdown.values()), "breakdown": breakdown}
    if ask.model is not None:
        plan["budget"] = "chat"
        plan["from_model"] = {"id": ask.model.id, "name": ask.model.name, "params": ask.model.params}
    if how == "unknown":
        plan["warnings"].append(f"The conversations' size is not known before the run: the plan assumes "
                                f"{UNKNOWN_DATA_STEPS} chat steps (the trainer counts them when it starts).")
    return plan


def _assumes(how: str) -> str:
    if how == "chat_steps":
        return "the steps you asked for, each costing a pretraining step of the same shape"
    if how == "demo":
        return (f"{CHAT_EPOCHS:g} passes over the built-in conversations, packed as the trainer packs them "
                f"(about {DEMO_CHAT_BYTES_PER_TOKEN:.1f} bytes a token); a step costs a pretraining step")
    if how == "unknown":
        return f"{UNKNOWN_DATA_STEPS} steps: the conversations' size is only known once the run reads them"
    return (f"{CHAT_EPOCHS:g} passes over the conversations, about {BYTES_PER_TOKEN:.1f} bytes a token, rows "
            f"{PACKING_EFFICIENCY:.0%} full, every 20th conversation held out; a step costs a pretraining step")

