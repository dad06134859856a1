"""Chat requests: what a chat or completion may ask for, how it reaches a model server, and the saved
conversations. The chat views (``/api/chat``, the pages) and the OpenAI-compatible API both parse their
requests here; neither imports the other.

Errors: ``BadRequest`` (400) naming the field for bad input; :func:`open_stream` turns the pool's
admission failures into ``TooManyRequests`` (429, with Retry-After) and ``BadRequest``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator

from .db import database
from .errors import BadRequest, TooManyRequests
from .inference import MODES, InferenceError, ModelPool, TooBusy
from .models import ChatMessage, ChatSession, Model, utcnow

log = logging.getLogger(__name__)

# Limits: generous for real use, small enough that one request cannot occupy a model for long.
MAX_MESSAGES = 200
MAX_MESSAGE_CHARS = 32_000
MAX_TOTAL_CHARS = 200_000
MAX_TOKENS_LIMIT = 4096
DEFAULTS = {"temperature": 0.8, "top_k": 50, "top_p": 1.0, "max_tokens": 256, "seed": None}
ROLES = ("system", "user", "assistant")


# --- parsing ------------------------------------------------------------------------------------------------


def number(body: dict, name: str, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False,
            nullable: bool = True, param: str | None = None) -> Any:
    """``body[name]`` checked to lie in [lo, hi] (``lo`` excluded with ``lo_open``); None when absent and
    ``nullable``. BadRequest names the field."""
    value = body.get(name)
    if value is None:
        if nullable:
            return None
        raise BadRequest(f"{name} is required", param=param or name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise BadRequest(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}", param=param or name)
    if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
        low = f"above {lo:g}" if lo_open else f"at least {lo:g}"
        raise BadRequest(f"{name} must be {low} and at most {hi:g}, got {value!r}", param=param or name)
    return int(value) if integer else float(value)


def parse_sampling(body: dict, max_tokens_key: str = "max_tokens") -> dict:
    """temperature, top_k, top_p, max_tokens, seed from a request body; BadRequest names the field."""
    s = {
        "temperature": number(body, "temperature", 0, 2),
        "top_k": number(body, "top_k", 1, 100_000, integer=True),
        "top_p": number(body, "top_p", 0, 1, lo_open=True),
        "max_tokens": number(body, max_tokens_key, 1, MAX_TOKENS_LIMIT, integer=True),
        "seed": number(body, "seed", -(2**63), 2**63 - 1, integer=True),
    }
    out = {k: (DEFAULTS[k] if v is None else v) for k, v in s.items()}
    if out["top_p"] is not None and out["top_p"] >= 1:
        out["top_p"] = None  # 1 means no nucleus cut
    return out


MAX_STOP_CHARS = 256  # a stop string is matched against every decoded piece: keep it short


def parse_stop(raw: Any) -> list[str]:
    """``stop``: a string or a list of up to 4 non-empty strings (OpenAI's bound) of at most
    MAX_STOP_CHARS characters; [] when absent."""
    if raw is None:
        return []
    stops = [raw] if isinstance(raw, str) else raw
    if not isinstance(stops, list) or len(stops) > 4 or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise BadRequest(f"stop must be a string or a list of up to 4 non-empty strings of at most "
                         f"{MAX_STOP_CHARS} characters", param="stop")
    return stops


def parse_messages(raw: Any, *, need_last_user: bool = True) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages must be a non-empty list of {role, content}", param="messages")
    if len(raw) > MAX_MESSAGES:
        raise BadRequest(f"too many messages: {len(raw)} (at most {MAX_MESSAGES})", param="messages")
    out, total = [], 0
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object with role and content", param="messages")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}", param="messages")
        if role == "system" and i != 0:
            raise BadRequest(f"messages[{i}]: a system message can only come first", param="messages")
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", param="messages")
        if len(content) > MAX_MESSAGE_CHARS:
            raise BadRequest(f"messages[{i}] is {len(content)} characters long (at most {MAX_MESSAGE_CHARS})",
                             param="messages")
        total += len(content)
        out.append({"role": role, "content": content})
    if total > MAX_TOTAL_CHARS:
        raise BadRequest(f"the conversation is {total} characters long (at most {MAX_TOTAL_CHARS})", param="messages")
    if need_last_user and out[-1]["role"] != "user":
        raise BadRequest("the last message must be the user's", param="messages")
    return out


def parse_prompt(raw: Any) -> str:
    if not isinstance(raw, str):
        raise BadRequest("prompt must be a string", param="prompt")
    if len(raw) > MAX_TOTAL_CHARS:
        raise BadRequest(f"prompt is {len(raw)} characters long (at most {MAX_TOTAL_CHARS})", param="prompt")
    return raw


def parse_mode(raw: Any, default: str) -> str:
    """A chat mode (inference.MODES) from a request, ``default`` when it names none."""
    mode = raw or default
    if mode not in MODES:
        raise BadRequest("mode must be " + " or ".join(f"'{m}'" for m in MODES), param="mode")
    return mode


@dataclass(frozen=True)
class ChatRequest:
    """A ``POST /api/chat`` body, checked: the model and the session are the caller's to look up."""

    model_id: Any
    mode: str
    payload: Any  # the messages (chat) or the prompt (complete), as the model server takes them
    history: list[dict]  # what a saved session holds before the answer
    sampling: dict
    save: bool
    session_id: Any


def parse_chat_request(body: Any) -> ChatRequest:
    """The ``POST /api/chat`` body (see views/chat.py); BadRequest names the field that is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("send a JSON object")
    mode = parse_mode(body.get("mode"), "chat")
    if mode == "chat":
        history = parse_messages(body.get("messages"))
        payload: Any = history
    else:
        payload = parse_prompt(body.get("prompt"))
        history = [{"role": "user", "content": payload}]
    return ChatRequest(model_id=body.get("model_id"), mode=mode, payload=payload, history=history,
                       sampling=parse_sampling(body), save=body.get("save", True) is not False,
                       session_id=body.get("session_id"))


# --- models and their servers -------------------------------------------------------------------------------


def is_chat_tuned(model: Model) -> bool:
    """Whether the model learned the chat format (its kind is "chat"). Pretraining alone does not teach
    it. A row whose kind was never set (made outside a run) may still say so in its config."""
    if getattr(model, "kind", "base") == "chat":
        return True
    cfg, metrics = model.config or {}, model.metrics or {}
    return bool(cfg.get("chat_tuned") or cfg.get("sft") or metrics.get("chat_tuned"))


def default_mode(model: Model) -> str:
    """Chat for a model that learned the chat format, else plain completion."""
    return "chat" if is_chat_tuned(model) else "complete"


def open_stream(pool: ModelPool, model: Model, mode: str, payload: Any, sampling: dict) -> Iterator[Any]:
    """The pool's stream, with admission failures as the app's errors (429, 400, 503)."""
    try:
        return pool.stream(model, mode, payload, sampling)
    except TooBusy as e:
        raise TooManyRequests(e.message, headers={"Retry-After": "2"}) from None
    except InferenceError as e:
        if e.status == 400:
            raise BadRequest(e.message) from None
        raise


# --- saved conversations ------------------------------------------------------------------------------------


def save_history(session: ChatSession | None, user_id: int, model: Model, mode: str, sampling: dict,
                 history: list[dict]) -> ChatSession:
    """Create or update ``user_id``'s session so it holds exactly ``history`` (the answer comes later)."""
    with database.atomic():
        if session is None:
            first = next((m["content"] for m in history if m["role"] == "user"), "") or "New chat"
            title = " ".join(first.split())[:80] or "New chat"
            session = ChatSession.create(user=user_id, model=model.id, title=title, mode=mode,
                                         settings=sampling)
        else:
            session.mode, session.settings, session.updated_at = mode, sampling, utcnow()
            session.save()
        ChatMessage.delete().where(ChatMessage.session == session.id).execute()
        if history:
            ChatMessage.insert_many([
                {"session": session.id, "position": i, "role": m["role"], "content": m["content"]}
                for i, m in enumerate(history)
            ]).execute()
    return session


def save_answer(session_id: int, position: int, parts: list[str], stats: dict,
                error: InferenceError | None) -> int | None:
    """Append the model's answer (what arrived of it) at ``position``; its message id, or None when there
    is nothing to keep or the session went away meanwhile. Runs outside any request (its own connection)."""
    if not parts and error is not None:
        return None
    stats = dict(stats)
    if error is not None:
        stats["error"] = error.message
    try:
        with database.connection_context():
            msg = ChatMessage.create(session=session_id, position=position, role="assistant",
                                     content="".join(parts), stats=stats)
            ChatSession.update(updated_at=utcnow()).where(ChatSession.id == session_id).execute()
            return msg.id
    except Exception:  # the session was deleted meanwhile, or the position is taken by a newer request
        log.warning("could not save the answer to chat session %s", session_id, exc_info=True)
        return None
