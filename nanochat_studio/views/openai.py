"""OpenAI-compatible API: ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions``
(streaming and not).

Any OpenAI client works: ``OpenAI(base_url="http://127.0.0.1:8765/v1", api_key="ncs_...")``. A bearer
API key is required in every mode, solo included (a machine interface may be exposed). Errors come in
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` (errors.render_error under /v1/).

Chat supports: messages (text content, or a list of text parts), stream, stream_options.include_usage, stop
(a string or up to 4), max_tokens / max_completion_tokens, temperature, top_p, seed, n=1, logprobs and
top_logprobs (0..20), and top_k as an extension. Completions (the legacy API, what evaluation harnesses
call): prompt as a string, a list of strings, token ids or a list of token-id lists (one choice per
prompt), echo, logprobs (0..20), max_tokens (0 with echo scores the prompt), and the same sampling
settings; see nanochat_studio/completions.py. Model ids are the studio's model ids as strings ("7"),
listed by /v1/models.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Iterator

from flask import Blueprint, Response, current_app, jsonify
from flask_login import current_user

from .. import limits, sse
from ..auth import api_key_required
from ..chat import open_stream, parse_messages, parse_sampling, parse_stop
from ..completions import (Choice, chat_logprobs, finish_reason, parse_chat_logprobs, parse_completion_request,
                           parse_stream, refuse_unsupported, run_batch, usage)
from ..errors import AppError, BadRequest, NotFound
from ..inference import Final, InferenceError, get_pool
from ..inputs import json_object
from ..models import Model

bp = Blueprint("openai", __name__)

UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "audio", "prediction", "logit_bias")


def _model_for(name: Any) -> Model:
    if isinstance(name, int) and not isinstance(name, bool):
        name = str(name)  # lm-eval's model_args turn model=7 into the number 7
    if not isinstance(name, str) or not name:
        raise BadRequest("model is required", param="model", code="invalid_value")
    model = Model.get_owned(name.removeprefix("model-"), current_user.id)
    if model is None:
        raise NotFound(f"The model '{name}' does not exist or you do not have access to it.", param="model",
                       code="model_not_found")
    return model


def _model_json(m: Model) -> dict:
    return {"id": str(m.id), "object": "model", "created": int(m.created_at.timestamp()),
            "owned_by": "nanochat-studio", "name": m.name}


@bp.get("/v1/models")
@api_key_required
def list_models():
    models = Model.owned_by(current_user).order_by(Model.created_at.desc())
    return jsonify({"object": "list", "data": [_model_json(m) for m in models]})


@bp.get("/v1/models/<model_id>")
@api_key_required
def get_model(model_id: str):
    return jsonify(_model_json(_model_for(model_id)))


def _text_of(content: Any, i: int) -> Any:
    if isinstance(content, list):  # [{"type": "text", "text": "..."}]
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"messages[{i}].content: only text parts are supported", param="messages")
            texts.append(part["text"])
        return "".join(texts)
    return content


@bp.post("/v1/chat/completions")
@api_key_required
@limits.streaming
def chat_completions():
    body = json_object()
    model = _model_for(body.get("model"))
    refuse_unsupported(body, UNSUPPORTED)
    raw = body.get("messages")
    if isinstance(raw, list):
        raw = [dict(m, content=_text_of(m.get("content"), i), role="system" if m.get("role") == "developer"
                    else m.get("role")) if isinstance(m, dict) else m for i, m in enumerate(raw)]
    messages = parse_messages(raw, need_last_user=False)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is not None:
        sampling = parse_sampling(body, max_tokens_key="max_completion_tokens")
    else:
        sampling = parse_sampling(body)
    stop = parse_stop(body.get("stop"))
    if stop:
        sampling["stop"] = stop
    logprobs = parse_chat_logprobs(body)
    if logprobs is not None:
        sampling["logprobs"] = logprobs
    stream_flag, include_usage = parse_stream(body)

    stream = open_stream(get_pool(current_app), model, "chat", messages, sampling)  # 429 here, before anything is sent
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if stream_flag:
        return _event_stream(_chunks(stream, cid, created, str(model.id), include_usage, logprobs is not None))
    parts: list[str] = []
    entries: list[dict] = []
    final: Final | None = None
    try:
        for item in stream:
            if isinstance(item, Final):
                final = item
            elif item is not None:
                parts.append(item)
                entries.extend(getattr(item, "logprobs", None) or [])
    except InferenceError as e:
        raise _model_error(e) from None
    finally:
        stream.close()
    return jsonify({
        "id": cid, "object": "chat.completion", "created": created, "model": str(model.id),
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts), "refusal": None},
                     "finish_reason": finish_reason(final),
                     "logprobs": None if logprobs is None else {"content": chat_logprobs(entries), "refusal": None}}],
        "usage": usage([final]),
    })


def _model_error(e: InferenceError) -> AppError:
    """A model server's failure, before anything was sent, as the HTTP error to answer with."""
    if e.status == 400:
        return BadRequest(e.message, code="model_rejected_request")
    err = AppError(e.message, code="model_unavailable")
    err.status = 503  # the model server failed or could not load; a retry may work
    return err


def _stream_error(e: InferenceError) -> str:
    kind = "invalid_request_error" if e.permanent else "server_error"
    return sse.format_event({"error": {"message": e.message, "type": kind, "param": None, "code": "model_error"}})


def _event_stream(frames: Iterator[str]) -> Response:
    # Not sse.response: its leading "retry:" frame is an event with empty data to OpenAI's client, which
    # then fails to parse it as JSON. OpenAI streams carry data lines and comments only.
    resp = Response((f.encode("utf-8") for f in frames), mimetype="text/event-stream")
    resp.headers["Cache-Control"] = "no-cache, no-transform"
    resp.headers["X-Accel-Buffering"] = "no"
    return resp


def _chunks(stream: Iterator[Any], cid: str, created: int, model: str, include_usage: bool,
            logprobs: bool) -> Iterator[str]:
    def chunk(delta: dict, finish: str | None = None, entries: list | None = None) -> str:
        data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                             "logprobs": {"content": chat_logprobs(entries), "refusal": None}
                             if logprobs and entries is not None else None}]}
        if include_usage:
            data["usage"] = None
        return sse.format_event(data)

    final: Final | None = None
    try:
        yield chunk({"role": "assistant", "content": ""})
        try:
            for item in stream:
                if item is None:
                    yield sse.heartbeat()
                elif isinstance(item, Final):
                    final = item
                elif item or getattr(item, "logprobs", None):
                    yield chunk({"content": str(item)}, entries=getattr(item, "logprobs", None) or [])
        except InferenceError as e:
            yield _stream_error(e)
            yield sse.format_event("[DONE]")
            return
        yield chunk({}, finish_reason(final))
        if include_usage:
            yield sse.format_event({"id": cid, "object": "chat.completion.chunk", "created": created,
                                    "model": model, "system_fingerprint": None, "choices": [],
                                    "usage": usage([final])})
        yield sse.format_event("[DONE]")
    finally:
        stream.close()  # a client that hung up stops the generation


# --- legacy completions ----------------------------------------------------------------------------------

@bp.post("/v1/completions")
@api_key_required
@limits.streaming
def completions():
    body = json_object()
    model = _model_for(body.get("model"))
    req = parse_completion_request(body)
    pool = get_pool(current_app)

    def open_one(i: int) -> Iterator[Any]:
        return pool.stream(model, "complete", req.prompts[i], req.server_sampling(req.prompts[i]))

    # the first prompt is admitted here, so a busy server answers 429 before anything is sent
    first = open_stream(pool, model, "complete", req.prompts[0], req.server_sampling(req.prompts[0]))
    items = run_batch(first, open_one, len(req.prompts))
    choices = [Choice(i, p, req.echo, req.logprobs is not None) for i, p in enumerate(req.prompts)]
    cid = f"cmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if req.stream:
        return _event_stream(_completion_chunks(items, choices, cid, created, str(model.id), req.include_usage))
    try:
        for i, item in items:
            if isinstance(item, InferenceError):
                raise _model_error(item)
            if isinstance(item, Final):
                choices[i].final = item
            elif item is not None:
                choices[i].add(item)
    finally:
        items.close()
    return jsonify({
        "id": cid, "object": "text_completion", "created": created, "model": str(model.id),
        "system_fingerprint": None,
        "choices": [{"index": c.index, "text": "".join(c.text), "logprobs": c.logprobs_json(),
                     "finish_reason": finish_reason(c.final)} for c in choices],
        "usage": usage([c.final for c in choices]),
    })


def _completion_chunks(items: Iterator[tuple[int, Any]], choices: list[Choice], cid: str, created: int,
                       model: str, include_usage: bool) -> Iterator[str]:
    def chunk(i: int, text: str, logprobs: dict | None, finish: str | None) -> str:
        data = {"id": cid, "object": "text_completion", "created": created, "model": model,
                "system_fingerprint": None,
                "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
        if include_usage:
            data["usage"] = None
        return sse.format_event(data)

    try:
        for i, item in items:
            if item is None:
                yield sse.heartbeat()
            elif isinstance(item, InferenceError):
                yield _stream_error(item)
                yield sse.format_event("[DONE]")
                return
            elif isinstance(item, Final):
                choices[i].final = item
                yield chunk(i, "", None, finish_reason(item))
            else:
                text, entries = choices[i].add(item)
                if text or entries:
                    yield chunk(i, text, choices[i].logprobs_json(entries), None)
        if include_usage:
            yield sse.format_event({"id": cid, "object": "text_completion", "created": created, "model": model,
                                    "system_fingerprint": None, "choices": [],
                                    "usage": usage([c.final for c in choices])})
        yield sse.format_event("[DONE]")
    finally:
        items.close()  # a client that hung up stops every prompt's generation
