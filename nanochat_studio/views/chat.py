"""Chat: the pages (/chat, /chat/<model_id>, /chat/compare), POST /api/chat (SSE), saved sessions, and
snapshots of a running job's newest checkpoint.

``POST /api/chat`` body: ``{model_id, mode: "chat"|"complete", messages: [{role, content}] | prompt,
temperature, top_k, top_p, max_tokens, seed, session_id?, save?}``. The answer is ``text/event-stream``:

    event: session  data: {"session_id": 3}                  first, when the chat is saved
    event: delta    data: {"text": "Hel"}                    whole characters, in order
    event: error    data: {"message": "...", "permanent": false}   only on failure
    event: done     data: {"finish_reason", "prompt_tokens", "completion_tokens", "ttft_ms",
                           "tokens_per_sec", "elapsed_ms", "message_id"}   always last

Bad input answers 400 with the reason before any stream starts; a model with too many waiting requests
429. A saved session holds exactly the conversation the client sent plus the answer, so regenerate and
"edit a message and continue" are the client sending a shorter history to the same session.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Iterator

from flask import Blueprint, current_app, redirect, render_template, request, url_for
from flask_login import current_user

from .. import sse
from ..auth import login_required
from ..checkpoints import snapshot_model
from ..db import database
from ..errors import BadRequest, Conflict, NotFound, TooManyRequests
from ..inference import Final, InferenceError, TooBusy, get_pool
from ..models import ChatMessage, ChatSession, Model, utcnow
from . import current_settings
from .api import own_job, own_model

bp = Blueprint("chat", __name__)
log = logging.getLogger(__name__)

# Limits: generous for real use, small enough that one request cannot occupy a model for long.
MAX_MESSAGES = 200
MAX_MESSAGE_CHARS = 32_000
MAX_TOTAL_CHARS = 200_000
MAX_TOKENS_LIMIT = 4096
DEFAULTS = {"temperature": 0.8, "top_k": 50, "top_p": 1.0, "max_tokens": 256, "seed": None}
ROLES = ("system", "user", "assistant")


# --- validation shared with the OpenAI view ---------------------------------------------------------


def _number(body: dict, name: str, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False,
            nullable: bool = True, param: str | None = None) -> Any:
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
        "temperature": _number(body, "temperature", 0, 2),
        "top_k": _number(body, "top_k", 1, 100_000, integer=True),
        "top_p": _number(body, "top_p", 0, 1, lo_open=True),
        "max_tokens": _number(body, max_tokens_key, 1, MAX_TOKENS_LIMIT, integer=True),
        "seed": _number(body, "seed", -(2**63), 2**63 - 1, integer=True),
    }
    out = {k: (DEFAULTS[k] if v is None else v) for k, v in s.items()}
    if out["top_p"] is not None and out["top_p"] >= 1:
        out["top_p"] = None  # 1 means no nucleus cut
    return out


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


def own_session(session_id: Any) -> ChatSession:
    try:
        sid = int(session_id)
    except (TypeError, ValueError):
        raise NotFound(f"no chat session {session_id!r}") from None
    session = ChatSession.get_or_none((ChatSession.id == sid) & (ChatSession.user == current_user.id))
    if session is None:
        raise NotFound(f"no chat session {session_id}")
    return session


def is_chat_tuned(model: Model) -> bool:
    """Whether the model learned the chat format. Pretraining alone does not teach it."""
    cfg, metrics = model.config or {}, model.metrics or {}
    return bool(cfg.get("chat_tuned") or cfg.get("sft") or metrics.get("chat_tuned"))


def open_stream(model: Model, mode: str, payload: Any, sampling: dict) -> Iterator[Any]:
    """The pool's stream, with admission failures as the app's errors (429, 400, 503)."""
    try:
        return get_pool(current_app).stream(model, mode, payload, sampling)
    except TooBusy as e:
        raise TooManyRequests(e.message, headers={"Retry-After": "2"}) from None
    except InferenceError as e:
        if e.status == 400:
            raise BadRequest(e.message) from None
        raise


# --- pages -----------------------------------------------------------------------------------------


@bp.get("/chat")
@login_required
def index():
    models = list(Model.owned_by(current_user).order_by(Model.created_at.desc()))
    sessions = list(ChatSession.select(ChatSession, Model).join(Model)
                    .where(ChatSession.user == current_user.id).order_by(ChatSession.updated_at.desc()).limit(200))
    return render_template("chat/index.html", models=models, sessions=sessions)


@bp.get("/chat/<int:model_id>")
@login_required
def page(model_id: int):
    model = own_model(model_id)
    session = None
    if request.args.get("session"):
        session = own_session(request.args["session"])
        if session.model_id != model.id:
            raise NotFound(f"no chat session {session.id} for this model")
    sessions = list(ChatSession.select().where((ChatSession.user == current_user.id) & (ChatSession.model == model.id))
                    .order_by(ChatSession.updated_at.desc()).limit(100))
    tuned = is_chat_tuned(model)
    mode = session.mode if session else ("chat" if tuned else "complete")
    boot = {
        "model_id": model.id, "chat_tuned": tuned, "mode": mode, "defaults": DEFAULTS,
        "session": session_json(session) if session else None,
        "page_url": url_for("chat.page", model_id=model.id),
    }
    return render_template("chat/chat.html", model=model, sessions=sessions, session=session, tuned=tuned,
                           mode=mode, boot=boot)


@bp.get("/chat/compare")
@login_required
def compare():
    models = list(Model.owned_by(current_user).order_by(Model.created_at.desc()))
    a = own_model(request.args["a"]) if request.args.get("a") else None
    b = own_model(request.args["b"]) if request.args.get("b") else None
    boot = {"a": a.id if a else None, "b": b.id if b else None, "defaults": DEFAULTS,
            "tuned": {str(m.id): is_chat_tuned(m) for m in (a, b) if m}}
    return render_template("chat/compare.html", models=models, a=a, b=b, boot=boot)


# --- POST /api/chat ------------------------------------------------------------------------------------


@bp.post("/api/chat")
@login_required
def api_chat():
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("send a JSON object")
    model = own_model(body.get("model_id"))
    mode = body.get("mode") or "chat"
    if mode not in ("chat", "complete"):
        raise BadRequest("mode must be 'chat' or 'complete'", param="mode")
    if mode == "chat":
        history = parse_messages(body.get("messages"))
        payload: Any = history
    else:
        payload = parse_prompt(body.get("prompt"))
        history = [{"role": "user", "content": payload}]
    sampling = parse_sampling(body)
    save = body.get("save", True) is not False
    session = None
    if body.get("session_id") is not None:
        session = own_session(body["session_id"])
        if session.model_id != model.id:
            raise Conflict("that chat session belongs to another model")
    stream = open_stream(model, mode, payload, sampling)  # 429 here, before any byte of the stream
    if save:
        try:
            session = _save_history(session, model, mode, sampling, history)
        except Exception:
            stream.close()
            raise
    session_id = session.id if session is not None and save else None
    return sse.response(_chat_events(stream, session_id, len(history)))


def _save_history(session: ChatSession | None, model: Model, mode: str, sampling: dict,
                  history: list[dict]) -> ChatSession:
    with database.atomic():
        if session is None:
            first = next((m["content"] for m in history if m["role"] == "user"), "") or "New chat"
            title = " ".join(first.split())[:80] or "New chat"
            session = ChatSession.create(user=current_user.id, model=model.id, title=title, mode=mode,
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


def _chat_events(stream: Iterator[Any], session_id: int | None, position: int) -> Iterator[str]:
    # Runs after the view returned: no flask session or current_user here, only what was passed in.
    seq = 0
    parts: list[str] = []
    final: Final | None = None
    error: InferenceError | None = None
    t0 = time.monotonic()
    try:
        if session_id is not None:
            seq += 1
            yield sse.format_event({"session_id": session_id}, event="session", id=seq)
        try:
            for item in stream:
                if item is None:
                    yield sse.heartbeat()
                elif isinstance(item, Final):
                    final = item
                else:
                    parts.append(item)
                    seq += 1
                    yield sse.format_event({"text": item}, event="delta", id=seq)
        except InferenceError as e:
            error = e
            seq += 1
            yield sse.format_event({"message": e.message, "permanent": e.permanent}, event="error", id=seq)
        done = final.as_dict() if final else {
            "finish_reason": "error", "prompt_tokens": 0, "completion_tokens": len(parts), "ttft_ms": None,
            "tokens_per_sec": None, "elapsed_ms": round((time.monotonic() - t0) * 1000, 1)}
        done["message_id"] = _save_answer(session_id, position, parts, done, error) if session_id else None
        seq += 1
        yield sse.format_event(done, event="done", id=seq)
    finally:
        stream.close()  # the client went away mid-stream: this cancels generation in the model server
        if final is None and error is None and session_id is not None and parts:
            # stopped by the user (or a dropped connection): keep what was said, marked as such
            _save_answer(session_id, position, parts, {"finish_reason": "cancelled",
                                                      "completion_tokens": len(parts)}, None)


def _save_answer(session_id: int, position: int, parts: list[str], stats: dict, error: InferenceError | None) -> int | None:
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


# --- sessions ------------------------------------------------------------------------------------------


def session_json(s: ChatSession, with_messages: bool = True) -> dict:
    out = {"id": s.id, "model_id": s.model_id, "title": s.title, "mode": s.mode, "settings": s.settings,
           "created_at": s.created_at.isoformat() + "Z", "updated_at": s.updated_at.isoformat() + "Z"}
    if with_messages:
        out["messages"] = [{"id": m.id, "position": m.position, "role": m.role, "content": m.content,
                            "stats": m.stats}
                           for m in s.messages.order_by(ChatMessage.position)]
    return out


@bp.get("/api/chat/sessions")
@login_required
def list_sessions():
    q = ChatSession.select().where(ChatSession.user == current_user.id)
    if request.args.get("model_id"):
        q = q.where(ChatSession.model == own_model(request.args["model_id"]).id)
    return {"sessions": [session_json(s, False) for s in q.order_by(ChatSession.updated_at.desc()).limit(500)]}


@bp.post("/api/chat/sessions")
@login_required
def create_session():
    body = request.get_json(silent=True) or {}
    model = own_model(body.get("model_id"))
    title = body.get("title") or "New chat"
    if not isinstance(title, str) or len(title) > 200:
        raise BadRequest("title must be a string of at most 200 characters", param="title")
    mode = body.get("mode") or ("chat" if is_chat_tuned(model) else "complete")
    if mode not in ("chat", "complete"):
        raise BadRequest("mode must be 'chat' or 'complete'", param="mode")
    s = ChatSession.create(user=current_user.id, model=model.id, title=title, mode=mode, settings={})
    return session_json(s), 201


@bp.get("/api/chat/sessions/<int:session_id>")
@login_required
def get_session(session_id: int):
    return session_json(own_session(session_id))


@bp.patch("/api/chat/sessions/<int:session_id>")
@login_required
def rename_session(session_id: int):
    s = own_session(session_id)
    body = request.get_json(silent=True) or {}
    title = body.get("title")
    if not isinstance(title, str) or not title.strip() or len(title) > 200:
        raise BadRequest("title must be a non-empty string of at most 200 characters", param="title")
    s.title, s.updated_at = title.strip(), utcnow()
    s.save()
    return session_json(s, False)


@bp.delete("/api/chat/sessions/<int:session_id>")
@login_required
def delete_session(session_id: int):
    s = own_session(session_id)
    s.delete_instance(recursive=True)
    return "", 204


# --- snapshots of a running job ------------------------------------------------------------------------


@bp.post("/api/jobs/<int:job_id>/snapshot")
@login_required
def snapshot(job_id: int):
    model = snapshot_model(own_job(job_id), current_settings())
    return {"model_id": model.id, "step": model.step, "chat_url": url_for("chat.page", model_id=model.id)}, 201


@bp.post("/chat/snapshot/<int:job_id>")
@login_required
def snapshot_and_chat(job_id: int):
    """For a plain form on the job page (CSRF token included): snapshot, then open the chat."""
    model = snapshot_model(own_job(job_id), current_settings())
    return redirect(url_for("chat.page", model_id=model.id), code=303)
