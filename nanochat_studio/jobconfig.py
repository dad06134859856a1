"""What a job config may hold: the keys the trainer accepts, their types and bounds, and the one
function that turns a submitted config into the config the trainer gets.

jobs.submit calls :func:`validate_config` before it queues a job; estimates (estimate.py) ask within
the same :data:`INT_BOUNDS`. The chat stage's keys belong to chattune.py and a dataset spec to
datasets.py: this module hands those parts to them.

Errors: :class:`JobConfigError` (400, with ``param`` when one key is at fault), and datasets' own
errors for the dataset (DatasetError 400, Forbidden 403, NotFound 404).
"""

from __future__ import annotations

from typing import Any

from trainer import sizing

from . import chattune, datasets
from .errors import BadRequest
from .models import User
from .settings import Settings


class JobConfigError(BadRequest, ValueError):
    """A job config the trainer must not see (400)."""

    code = "bad_config"


# key -> (minimum, maximum) of the integer settings of a job config (the trainer's config names); estimates
# are asked within the same bounds.
INT_BOUNDS = {
    "depth": (1, 32),
    "max_steps": (1, 10_000_000),
    "checkpoint_every": (1, 10_000_000),
    "seq_len": (8, 65_536),
    "batch_size": (1, 65_536),
    "seed": (0, 2**31 - 1),
    "gpus": (1, 64),
    "vocab_size": (sizing.MIN_VOCAB_SIZE, 1 << 20),
}
# Learning rates: > 0 and below what any run could survive (the trainer also stops a diverging run).
_FLOAT_KEYS = {"matrix_lr": (0.0, 10.0), "embedding_lr": (0.0, 10.0), "unembedding_lr": (0.0, 10.0)}
_STR_KEYS = {"name": 120}
_REQUIRED = ("depth", "dataset")


def validate_config(config: Any, user: User, settings: Settings) -> dict[str, Any]:
    """The config as the trainer will get it, or :class:`JobConfigError` saying what is wrong (the
    dataset's own errors come from datasets.validate_spec: 400, 403 for a server path, 404)."""
    if not isinstance(config, dict):
        raise JobConfigError("the job config must be a JSON object")
    config, chat_part = chattune.split(config)  # chattune.py owns the chat stage's keys
    unknown = sorted(set(config) - set(INT_BOUNDS) - set(_FLOAT_KEYS) - set(_STR_KEYS) - {"dataset"})
    if unknown:
        allowed = ", ".join(sorted([*INT_BOUNDS, *_FLOAT_KEYS, *_STR_KEYS, "dataset", *chattune.KEYS]))
        raise JobConfigError(f"unknown config key(s): {', '.join(unknown)} (allowed: {allowed})")
    chat = chattune.validate(chat_part, config, user, settings)
    for key in (() if chattune.is_from_model(chat_part) else _REQUIRED):  # a model's checkpoint is its shape
        if key not in config:
            raise JobConfigError(f"'{key}' is required", param=key)
    clean: dict[str, Any] = {}
    for key, value in config.items():
        if key == "dataset":
            continue
        if key in INT_BOUNDS:
            lo, hi = INT_BOUNDS[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise JobConfigError(f"'{key}' must be an integer, got {type(value).__name__}")
            if not lo <= value <= hi:
                raise JobConfigError(f"'{key}' must be between {lo} and {hi}, got {value}")
        elif key in _FLOAT_KEYS:
            lo, hi = _FLOAT_KEYS[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise JobConfigError(f"'{key}' must be a number, got {type(value).__name__}")
            if not (lo < value <= hi) or value != value:
                raise JobConfigError(f"'{key}' must be above {lo:g} and at most {hi:g}, got {value}")
            value = float(value)
        else:
            if not isinstance(value, str):
                raise JobConfigError(f"'{key}' must be a string, got {type(value).__name__}")
            value = value.strip()
            if len(value) > _STR_KEYS[key]:
                raise JobConfigError(f"'{key}' is longer than {_STR_KEYS[key]} characters")
        clean[key] = value
    if "checkpoint_every" in clean and "max_steps" in clean and clean["checkpoint_every"] > clean["max_steps"]:
        raise JobConfigError("'checkpoint_every' cannot exceed 'max_steps'")
    # datasets.py owns what a dataset may be (and the URL guard); it answers a normalised spec dict.
    if "dataset" in config:
        clean["dataset"] = datasets.validate_spec(config["dataset"], user, settings)
    clean.update(chat)
    return clean
