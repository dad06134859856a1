"""Chat tuning, the app's side: the chat keys of a job config, the light check of a conversation
dataset, and what the supervisor hands the trainer for them (trainer/config.py's ``chat_data``,
``init_from`` and ``chat_steps``; the trainer owns the stage itself).

A job config may ask for a chat stage in three ways (``POST /api/jobs``, the plan page, a model page):

- ``"chat": true``: after pretraining, chat-tune on the built-in demo conversations (``--chat-data demo``);
- ``"chat_data": SPEC``: the same on the caller's conversations, a dataset spec as ``dataset`` takes it
  (``ds:<id>``, https, s3, a server path; validated the same way, owned by the caller);
- ``"init_from_model": ID`` with one of the above: chat-tune the caller's finished model ID, with no
  pretraining (``--init-from`` its checkpoint). Its shape comes from the checkpoint, so ``dataset``,
  ``depth``, ``vocab_size`` and ``max_steps`` (pretraining's) are refused; the job keeps the model's
  depth for the pages.

``chat_steps`` sets the chat stage's length (default: the trainer's rule, see chatplan.py).

Errors: ``JobConfigError`` (400, with ``param``), datasets' errors for the spec (400, 403, 404, with
``param="chat_data"``), ``NotFound`` (404, ``param="init_from_model"``) for a model that is not the caller's.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from . import datasets
from .errors import AppError, NotFound
from .models import Model, User
from .settings import Settings
from .storage import Storage

KEYS = ("chat", "chat_data", "init_from_model", "chat_steps")
CHAT_STEPS_BOUNDS = (1, 10_000_000)
# What a chat stage from a model cannot take: the checkpoint fixes the shape, and there is no pretraining.
FROM_MODEL_REFUSED = ("dataset", "depth", "vocab_size", "max_steps")
DEMO_SPEC = {"kind": "demo", "source": "demo"}
CHAT_EXTENSIONS = (".jsonl", ".jsonl.gz")
PEEK_BYTES = 256 << 10  # enough for the first few conversations of any sane file
PEEK_LINES = 5


def _error(message: str, param: str) -> AppError:
    from .jobconfig import JobConfigError  # jobconfig imports this module

    return JobConfigError(message, param=param)


def split(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the config without its chat keys, the chat keys)."""
    return ({k: v for k, v in config.items() if k not in KEYS}, {k: v for k, v in config.items() if k in KEYS})


def is_from_model(part: dict[str, Any]) -> bool:
    return part.get("init_from_model") is not None


def validate(part: dict[str, Any], rest: dict[str, Any], user: User, settings: Settings) -> dict[str, Any]:
    """The clean chat keys of a job config (``part``: its chat keys; ``rest``: the others, as sent):
    ``chat_data`` (a normalised dataset spec), ``chat_steps``, ``init_from_model`` (the model's id) and,
    for a run from a model, its ``depth``. {} when the job asks for no chat stage."""
    chat = part.get("chat", False)
    if not isinstance(chat, bool):
        raise _error(f"'chat' must be true or false, got {type(chat).__name__}", "chat")
    spec = part.get("chat_data")
    if chat and spec is not None:
        raise _error("give either 'chat': true (the demo conversations) or 'chat_data', not both", "chat_data")
    clean: dict[str, Any] = {}
    if chat:
        clean["chat_data"] = dict(DEMO_SPEC)
    elif spec is not None:
        if all(isinstance(x, dict) and x.get("credentials") for x in (spec, rest.get("dataset"))):
            # the trainer reads both with one set of storage options (--storage-options)
            raise _error("the data and the conversations cannot each bring their own S3 credentials: put them "
                         "where one set reaches both, or upload the conversations", "chat_data")
        clean["chat_data"] = conversation_spec(spec, user, settings)
    if "chat_steps" in part:
        steps, (lo, hi) = part["chat_steps"], CHAT_STEPS_BOUNDS
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise _error(f"'chat_steps' must be an integer, got {type(steps).__name__}", "chat_steps")
        if not lo <= steps <= hi:
            raise _error(f"'chat_steps' must be between {lo} and {hi}, got {steps}", "chat_steps")
        if "chat_data" not in clean:
            raise _error("'chat_steps' needs a chat stage: add 'chat': true or 'chat_data'", "chat_steps")
        clean["chat_steps"] = steps
    if is_from_model(part):
        if "chat_data" not in clean:
            raise _error("'init_from_model' chat-tunes a model: add 'chat': true (the demo conversations) or "
                         "'chat_data' (yours)", "init_from_model")
        for key in FROM_MODEL_REFUSED:
            if key in rest:
                raise _error(f"'{key}' does not apply when chat-tuning a model: the run starts from the model's "
                             "checkpoint (its shape, no pretraining)" + ("; use 'chat_steps' for the length"
                                                                         if key == "max_steps" else ""), key)
        model = source_model(part["init_from_model"], user)
        clean["init_from_model"] = model.id
        depth = model_depth(model)
        if depth is None:  # every run records it; without it no plan, memory check or page can size the run
            raise _error(f"model {model.id} does not record the depth it was trained at, so it cannot be "
                         "chat-tuned here", "init_from_model")
        clean["depth"] = depth  # the checkpoint's, for plans and pages (the trainer takes the checkpoint's)
    return clean


def source_model(ident: Any, user: User) -> Model:
    """``user``'s finished model ``ident`` (a snapshot is finished too: a read-only checkpoint); NotFound for
    anyone else's, a missing one and a malformed id alike."""
    model = Model.get_owned(ident, user.id)
    if model is None or not model.checkpoint_key:
        shown = str(ident) if isinstance(ident, (int, str)) and not isinstance(ident, bool) else repr(ident)
        raise NotFound(f"no model {shown[:40]}", param="init_from_model")
    return model


def model_depth(model: Model) -> int | None:
    """The depth a model was trained at (its run config), for the pages and estimates."""
    cfg = model.config or {}
    for key in ("depth", "n_layer"):
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


# --- conversation datasets --------------------------------------------------------------------------------


def conversation_spec(spec: Any, user: User, settings: Settings) -> dict[str, Any]:
    """``spec`` checked as a dataset (datasets.validate_spec: ownership, the URL guard, server paths) and,
    where its bytes are here already (an upload), as conversations: JSONL whose first lines hold
    ``messages``. The trainer checks every line before training (bad data exits 65 naming the line)."""
    try:
        clean = datasets.validate_spec(spec, user, settings)
    except AppError as exc:
        exc.param = "chat_data"
        raise
    if clean["kind"] == "upload":
        ds = datasets.get_dataset(user, clean["dataset_id"])
        check_conversations(ds.name, lambda: Storage.from_settings(settings).open(ds.storage_key))
    return clean


def check_conversations(name: str, opener: Any) -> None:
    """Refuse (400, ``param="chat_data"``) a file that is not conversations: not .jsonl, or whose first
    lines are not JSON objects with a ``messages`` list of {role, content}."""
    lower = name.lower()
    if not lower.endswith(CHAT_EXTENSIONS):
        raise _error(f"{name}: conversations are a .jsonl file (optionally .gz) of lines like "
                     '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
                     "chat_data")
    with opener() as fh:
        head = fh.read(PEEK_BYTES)
    if lower.endswith(".gz"):
        try:  # the first block only: a partial gzip stream decodes as far as it goes
            head = zlib.decompressobj(zlib.MAX_WBITS | 16).decompress(head, PEEK_BYTES)
        except zlib.error:
            raise _error(f"{name} is not a readable gzip file", "chat_data") from None
    lines = [ln for ln in head.decode("utf-8", "replace").splitlines()[:PEEK_LINES + 1] if ln.strip()]
    if len(head) >= PEEK_BYTES and lines:
        lines = lines[:-1]  # the last line may be cut
    if not lines:
        raise _error(f"{name} holds no conversations", "chat_data")
    for number, line in enumerate(lines[:PEEK_LINES], start=1):
        problem = _conversation_problem(line)
        if problem:
            raise _error(f"{name} line {number}: {problem}; a conversation line looks like "
                         '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
                         "chat_data")


def _conversation_problem(line: str) -> str:
    try:
        record = json.loads(line)
    except ValueError:
        return "not JSON"
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        return "no \"messages\" list"
    for m in record["messages"]:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return "every message needs a string role and content"
    return ""


# --- what the trainer gets --------------------------------------------------------------------------------


def prepare(job: Any, settings: Settings, run_dir: Any) -> tuple[dict[str, Any], dict | None]:
    """The trainer's chat-stage fields for ``job`` (``chat_data``: what its spec resolves to here, as
    datasets.resolve_for_training does for ``--data``; ``chat_steps``; ``init_from``: the local checkpoint
    directory of the model it starts from, fetched from storage when it is remote) and the conversations'
    storage options (None unless s3). {} for a job without a chat stage. Re-checked for the job's owner
    now: a model deleted since is NotFound (404, the user's to fix); datasets' errors as for ``--data``."""
    from .checkpoints import local_checkpoint_dir  # checkpoints imports datasets; keep this module light

    config = job.config or {}
    if config.get("chat_data") is None:
        return {}, None
    fields: dict[str, Any] = {}
    chat_data, options = datasets.resolve_for_training(job, settings, run_dir, key="chat_data")
    fields["chat_data"] = chat_data
    if "chat_steps" in config:
        fields["chat_steps"] = int(config["chat_steps"])
    if config.get("init_from_model") is not None:
        model = Model.get_owned(config["init_from_model"], job.user_id)
        if model is None:
            raise NotFound(f"the model {config['init_from_model']} this job chat-tunes no longer exists")
        fields["init_from"] = local_checkpoint_dir(model, settings)
    return fields, options


# A run from a model trains no pretraining stage and takes its shape from the checkpoint.
DROPPED_FOR_MODEL_RUNS = ("data", "depth", "vocab_size")


def trainer_config(config: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """The trainer's config file (``config``: the job's, made by the supervisor) with the chat stage's
    ``fields`` from :func:`prepare` in place of the job's chat keys."""
    out = {k: v for k, v in config.items() if k not in KEYS}
    if "init_from" in fields:
        for key in DROPPED_FOR_MODEL_RUNS:
            out.pop(key, None)
    out.update(fields)
    return out

