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

import time
from typing import Any, Iterator

from flask import Blueprint, current_app, redirect, render_template, request, url_for
from flask_login import current_user

from .. import chat, limits, sse
from ..auth import login_required
from ..checkpoints import snapshot_model
from ..errors import BadRequest, Conflict, NotFound
from ..inference import Final, InferenceError, get_pool
from ..inputs import json_object
from ..models import ChatMessage, ChatSession, Model, TrainingJob, utcnow
from . import current_settings, own

bp = Blueprint("chat", __name__)


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
    model = own(Model, model_id)
    session = None
    if request.args.get("session"):
        session = own(ChatSession, request.args["session"])
        if session.model_id != model.id:
            raise NotFound(f"no chat session {session.id} for this model")
    sessions = list(ChatSession.owned_by(current_user.id).where(ChatSession.model == model.id)
                    .order_by(ChatSession.updated_at.desc()).limit(100))
    tuned = chat.is_chat_tuned(model)
    mode = session.mode if session else chat.default_mode(model)
    boot = {
        "model_id": model.id, "chat_tuned": tuned, "mode": mode, "defaults": chat.DEFAULTS,
        "session": session_json(session) if session else None,
        "page_url": url_for("chat.page", model_id=model.id),
    }
    return render_template("chat/chat.html", model=model, sessions=sessions, session=session, tuned=tuned,
                           mode=mode, boot=boot)


@bp.get("/chat/compare")
@login_required
def compare():
    models = list(Model.owned_by(current_user).order_by(Model.created_at.desc()))
    a = own(Model, request.args["a"]) if request.args.get("a") else None
    b = own(Model, request.args["b"]) if request.args.get("b") else None
    boot = {"a": a.id if a else None, "b": b.id if b else None, "defaults": chat.DEFAULTS,
            "tuned": {str(m.id): chat.is_chat_tuned(m) for m in (a, b) if m}}
    return render_template("chat/compare.html", models=models, a=a, b=b, boot=boot)


# --- POST /api/chat ------------------------------------------------------------------------------------


@bp.post("/api/chat")
@login_required
@limits.streaming
def api_chat():
    body = json_object()
    model = own(Model, body.get("model_id"))
    req = chat.parse_chat_request(body)
    session = None
    if req.session_id is not None:
        session = own(ChatSession, req.session_id)
        if session.model_id != model.id:
            raise Conflict("that chat session belongs to another model")
    # 429 here, before any byte of the stream
    stream = chat.open_stream(get_pool(current_app), model, req.mode, req.payload, req.sampling)
    if req.save:
        try:
            session = chat.save_history(session, current_user.id, model, req.mode, req.sampling, req.history)
        except Exception:
            stream.close()
            raise
    session_id = session.id if session is not None and req.save else None
    return sse.response(_chat_events(stream, session_id, len(req.history)))


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
        done["message_id"] = chat.save_answer(session_id, position, parts, done, error) if session_id else None
        seq += 1
        yield sse.format_event(done, event="done", id=seq)
    finally:
        stream.close()  # the client went away mid-stream: this cancels generation in the model server
        if final is None and error is None and session_id is not None and parts:
            # stopped by the user (or a dropped connection): keep what was said, marked as such
            chat.save_answer(session_id, position, parts, {"finish_reason": "cancelled",
                                                          "completion_tokens": len(parts)}, None)


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
    q = ChatSession.owned_by(current_user.id)
    if request.args.get("model_id"):
        q = q.where(ChatSession.model == own(Model, request.args["model_id"]).id)
    return {"sessions": [session_json(s, False) for s in q.order_by(ChatSession.updated_at.desc()).limit(500)]}


@bp.post("/api/chat/sessions")
@login_required
def create_session():
    body = json_object()
    model = own(Model, body.get("model_id"))
    title = body.get("title") or "New chat"
    if not isinstance(title, str) or len(title) > 200:
        raise BadRequest("title must be a string of at most 200 characters", param="title")
    mode = chat.parse_mode(body.get("mode"), chat.default_mode(model))
    s = ChatSession.create(user=current_user.id, model=model.id, title=title, mode=mode, settings={})
    return session_json(s), 201


@bp.get("/api/chat/sessions/<int:session_id>")
@login_required
def get_session(session_id: int):
    return session_json(own(ChatSession, session_id))


@bp.patch("/api/chat/sessions/<int:session_id>")
@login_required
def rename_session(session_id: int):
    s = own(ChatSession, session_id)
    body = json_object()
    title = body.get("title")
    if not isinstance(title, str) or not title.strip() or len(title) > 200:
        raise BadRequest("title must be a non-empty string of at most 200 characters", param="title")
    s.title, s.updated_at = title.strip(), utcnow()
    s.save()
    return session_json(s, False)


@bp.delete("/api/chat/sessions/<int:session_id>")
@login_required
def delete_session(session_id: int):
    s = own(ChatSession, session_id)
    s.delete_instance(recursive=True)
    return "", 204


# --- snapshots of a running job ------------------------------------------------------------------------


@bp.post("/api/jobs/<int:job_id>/snapshot")
@login_required
def snapshot(job_id: int):
    model = snapshot_model(own(TrainingJob, job_id), current_settings())
    return {"model_id": model.id, "step": model.step, "chat_url": url_for("chat.page", model_id=model.id)}, 201


@bp.post("/chat/snapshot/<int:job_id>")
@login_required
def snapshot_and_chat(job_id: int):
    """For a plain form on the job page (CSRF token included): snapshot, then open the chat."""
    model = snapshot_model(own(TrainingJob, job_id), current_settings())
    return redirect(url_for("chat.page", model_id=model.id), code=303)
