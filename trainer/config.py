"""The trainer's configuration: TrainConfig, its validation and the command line that fills it.

    python -m trainer.train --help                  # every flag; the module that runs them is train.py
    python -m trainer.train --config job.json --depth 4   # a JSON file of fields, flags override it

Torch-free, so parsing and validating a config (and the web app's tests of it) stay cheap.
``UsageError`` is what every bad flag or value raises; train.py maps it to EXIT_USAGE.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "bfloat16")  # trainer/precision.py says what each means
# Passes over the training conversations when --chat-steps is unset (the app plans with it: chatplan.py).
# Depth-2 demo bench (tests/bench/demo_chat.py, 2-core AMD EPYC): after the default pretraining, 3 passes
# answered 85% of fresh story questions (97% after 6,283 pretraining steps) with the whole demo job in
# 8.8 minutes; 5 passes cost ~2 minutes more, past the demo's 10-minute budget on such a machine.
DEFAULT_CHAT_EPOCHS = 3.0

# The --help headline: train.py's own, which is what the user ran.
DESCRIPTION = "Train a small GPT from scratch, speaking the JSON-lines contract of trainer/progress.py."


@dataclass
class TrainConfig:
    # model
    depth: int = 4
    head_dim: int | None = None
    n_kv_head: int | None = None
    # data
    data: str = "demo"
    vocab_size: int | None = None  # None: the data module's default for a new tokenizer
    storage_options: dict | None = None
    cache_dir: str | None = None  # None: <out>/cache
    # length of training: max_steps, else target_tokens, else tokens_per_param * params capped at
    # max_epochs passes over the training split (sizing.planned_tokens; 0 or None: no cap)
    max_steps: int | None = None
    target_tokens: int | None = None
    tokens_per_param: int = 20
    max_epochs: float | None = 4.0
    stop_at_step: int | None = None  # checkpoint and exit 0 here, keeping the planned schedule
    # batch (global, across ranks; None: the device's default)
    batch_size: int | None = None
    device_batch_size: int | None = None  # rows per process per micro-step (gradient accumulation)
    seq_len: int | None = None
    # optimization
    matrix_lr: float = 0.02
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    grad_clip: float = 1.0
    # evaluation, samples, checkpoints
    log_every: int = 1
    eval_every: int = 250
    eval_tokens: int | None = None  # None: 8 batches
    sample_every: int = 500
    sample_prompts: list[str] = field(default_factory=lambda: ["Once upon a time,", "There once was"])
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    # runtime
    out: str = "runs/latest"
    device: str = "auto"
    compile: Any = "auto"  # "auto" | True | False
    dtype: str = "auto"  # products in "float32" or "bfloat16"; auto measures (trainer/precision.py)
    seed: int = 42
    resume: bool = False
    # chat stage (trainer/chat_stage.py): after pretraining in the same run, or alone from --init-from
    chat_data: str | None = None  # "demo", a JSONL file/directory (.gz too) or fsspec URL of conversations
    init_from: str | None = None  # a checkpoint directory: chat-tune it (no pretraining)
    chat_steps: int | None = None  # None: chat_epochs passes over the training conversations
    chat_epochs: float = DEFAULT_CHAT_EPOCHS
    chat_lr_scale: float = 0.5  # the chat stage's learning rates, as a fraction of pretraining's
    chat_warmup_ratio: float = 0.0
    chat_warmdown_ratio: float = 0.5
    # bookkeeping from the web app, echoed in the start event
    name: str = ""
    job_id: int | None = None


class UsageError(Exception):
    """A bad flag or config value; exits EXIT_USAGE."""


_POSITIVE_INTS = ("depth", "tokens_per_param", "log_every", "eval_every", "sample_every",
                  "checkpoint_every", "keep_checkpoints", "max_steps", "target_tokens", "stop_at_step",
                  "batch_size", "device_batch_size", "seq_len", "vocab_size", "eval_tokens", "head_dim", "n_kv_head")
_NONNEG_FLOATS = ("matrix_lr", "embedding_lr", "unembedding_lr", "weight_decay", "grad_clip")
_RATIOS = ("warmup_ratio", "warmdown_ratio", "final_lr_frac")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Type- and range-check every field; raise UsageError naming the field."""
    hints = {f.name: f.type for f in dataclasses.fields(cfg)}
    for name in _POSITIVE_INTS:
        v = getattr(cfg, name)
        if v is None and "None" in str(hints[name]):
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UsageError(f"{name} must be a positive integer, got {v!r}")
    for name in _NONNEG_FLOATS + _RATIOS:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise UsageError(f"{name} must be a non-negative number, got {v!r}")
        setattr(cfg, name, float(v))
    for name in _RATIOS:
        if getattr(cfg, name) > 1:
            raise UsageError(f"{name} must be between 0 and 1, got {getattr(cfg, name)}")
    if cfg.max_epochs is not None:
        v = cfg.max_epochs
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise UsageError(f"max_epochs must be a non-negative number (0: no cap), got {v!r}")
        cfg.max_epochs = float(v)
    if cfg.warmup_ratio + cfg.warmdown_ratio > 1:
        raise UsageError("warmup_ratio + warmdown_ratio must not exceed 1")
    if cfg.seed is None or isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {cfg.seed!r}")
    if cfg.device not in ("auto", "cpu", "cuda", "mps") and not str(cfg.device).startswith("cuda:"):
        raise UsageError(f"device must be auto, cpu, cuda or mps, got {cfg.device!r}")
    if cfg.compile not in ("auto", True, False):
        raise UsageError(f"compile must be auto, true or false, got {cfg.compile!r}")
    if cfg.dtype not in DTYPES:
        raise UsageError(f"dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    for name in ("data", "out", "name"):
        if not isinstance(getattr(cfg, name), str) or (name != "name" and not getattr(cfg, name)):
            raise UsageError(f"{name} must be a non-empty string")
    if not isinstance(cfg.sample_prompts, list) or not all(isinstance(p, str) for p in cfg.sample_prompts):
        raise UsageError("sample_prompts must be a list of strings")
    if cfg.storage_options is not None and not isinstance(cfg.storage_options, dict):
        raise UsageError("storage_options must be a JSON object")
    if not isinstance(cfg.resume, bool):
        raise UsageError("resume must be true or false")
    _validate_chat(cfg)
    return cfg


def _validate_chat(cfg: TrainConfig) -> None:
    for name in ("chat_data", "init_from"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, str) or not v):
            raise UsageError(f"{name} must be a non-empty string")
    if cfg.init_from is not None and cfg.chat_data is None:
        raise UsageError("init_from needs chat_data: --init-from chat-tunes a checkpoint on conversations")
    v = cfg.chat_steps
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise UsageError(f"chat_steps must be a positive integer, got {v!r}")
    for name in ("chat_epochs", "chat_lr_scale", "chat_warmup_ratio", "chat_warmdown_ratio"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                or (name != "chat_lr_scale" and name != "chat_epochs" and v > 1):
            raise UsageError(f"{name} must be a number {'between 0 and 1' if 'ratio' in name else '>= 0'}, got {v!r}")
        setattr(cfg, name, float(v))
    if cfg.chat_epochs <= 0:
        raise UsageError("chat_epochs must be positive")
    if cfg.chat_warmup_ratio + cfg.chat_warmdown_ratio > 1:
        raise UsageError("chat_warmup_ratio + chat_warmdown_ratio must not exceed 1")


# --- command line --------------------------------------------------------------------------------

def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _compile_flag(text: str):
    return "auto" if text == "auto" else _bool(text)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print and exit 2 without an event
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    # default=SUPPRESS: only flags actually given appear, so they can override --config.
    p = _Parser(prog="python -m trainer.train", description=DESCRIPTION,
                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="a JSON file of TrainConfig fields; explicit flags override it")
    # model
    p.add_argument("--depth", type=int, help="transformer layers; width is 64 * depth")
    p.add_argument("--head-dim", type=int)
    p.add_argument("--n-kv-head", type=int, help="key/value heads (grouped-query attention)")
    # data
    p.add_argument("--data", help='"demo", a text/JSONL file or directory, or an fsspec URL')
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--storage-options", type=json.loads, help="JSON object for fsspec")
    p.add_argument("--cache-dir", help="prepared-data cache (default OUT/cache)")
    # length of training
    p.add_argument("--max-steps", type=int)
    p.add_argument("--target-tokens", type=int)
    p.add_argument("--tokens-per-param", type=int)
    p.add_argument("--max-epochs", type=float,
                   help="cap the default length at this many passes over the data (0: no cap)")
    p.add_argument("--stop-at-step", type=int, help="checkpoint and stop here; --resume continues")
    # batch
    p.add_argument("--batch-size", type=int, help="global rows per step")
    p.add_argument("--device-batch-size", type=int,
                   help="rows per process per forward; accumulates gradients up to --batch-size")
    p.add_argument("--seq-len", type=int)
    # optimization
    p.add_argument("--matrix-lr", type=float)
    p.add_argument("--embedding-lr", type=float)
    p.add_argument("--unembedding-lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-ratio", type=float)
    p.add_argument("--warmdown-ratio", type=float)
    p.add_argument("--final-lr-frac", type=float)
    p.add_argument("--grad-clip", type=float, help="0 disables clipping")
    # evaluation, samples, checkpoints
    p.add_argument("--log-every", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-tokens", type=int)
    p.add_argument("--sample-every", type=int)
    p.add_argument("--sample-prompts", type=json.loads, help='JSON list, e.g. \'["Once upon"]\'')
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--keep-checkpoints", type=int)
    # chat stage
    p.add_argument("--chat-data", help='conversations to chat-tune on after pretraining: "demo" (the built-in '
                   'set), a JSONL file of {"messages": [...]} lines (.gz too), a directory of them or an fsspec URL')
    p.add_argument("--init-from", help="chat-tune this checkpoint directory (with --chat-data; no pretraining: "
                   "the shape and tokenizer are the checkpoint's)")
    p.add_argument("--chat-steps", type=int, help="steps of the chat stage (default: --chat-epochs passes over "
                   "the training conversations, packed into rows of --seq-len)")
    p.add_argument("--chat-epochs", type=float, help=f"default length of the chat stage in passes (default {DEFAULT_CHAT_EPOCHS:g})")
    p.add_argument("--chat-lr-scale", type=float,
                   help="chat-stage learning rates as a fraction of the pretraining ones (default 0.5)")
    p.add_argument("--chat-warmup-ratio", type=float)
    p.add_argument("--chat-warmdown-ratio", type=float, help="linear decay to 0 over this last share (default 0.5)")
    # runtime
    p.add_argument("--out", help="run directory: checkpoints/, cache/")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--compile", type=_compile_flag, help="auto, true or false")
    p.add_argument("--dtype", choices=DTYPES,
                   help="products in float32 or bfloat16 (float32 weights either way); auto: bf16 on "
                        "CUDA, and on a CPU where a measured bf16 product is much faster")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", nargs="?", const=True, type=_bool, help="continue from the latest checkpoint")
    p.add_argument("--name")
    p.add_argument("--job-id", type=int)
    return p


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from flags and an optional --config JSON file; raise UsageError."""
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if "config" in args:
        try:
            loaded = json.loads(Path(args.pop("config")).read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read the --config file: {e}") from None
        if not isinstance(loaded, dict):
            raise UsageError("the --config file must hold a JSON object")
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise UsageError(f"unknown config key(s): {', '.join(unknown)}")
        values.update(loaded)
    values.update(args)
    try:
        cfg = TrainConfig(**values)
    except TypeError as e:
        raise UsageError(str(e)) from None
    return validate(cfg)
