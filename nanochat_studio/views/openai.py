"""OpenAI-compatible API: ``GET /v1/models`` and ``POST /v1/chat/completions`` (streaming and not).

Any OpenAI client works: ``OpenAI(base_url="http://127.0.0.1:8765/v1", api_key="ncs_...")``. A bearer
API key is required in every mode, solo included (a machine interface may be exposed). Errors come in
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` (errors.render_error under /v1/).

Supported: messages (text content, or a list of text parts), stream, stream_options.include_usage, stop
(a string or up to 4), max_tokens / max_completion_tokens, temperature, top_p, seed, n=1, and top_k as an
extension. Model ids are the studio's model ids as strings ("7"), listed by /v1/models.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Iterator

from flask import Blueprint, Response, current_app, jsonify
from flask_login import current_user

from .. import limits, sse
from ..auth import api_key_required
from ..chat import open_stream, parse_messages, parse_sampling
from ..errors import AppError, BadRequest, NotFound
from ..inference import Final, InferenceError, get_pool
from ..inputs import json_object
from ..models import Model

bp = Blueprint("openai", __name__)

MAX_STOP_CHARS = 256  # a stop string is matched against every decoded piece: keep it short
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logprobs", "top_logprobs", "audio",
               "prediction", "logit_bias")


def _model_for(name: Any) -> Model:
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
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise BadRequest("Only n=1 is supported: this server generates one choice per request.", param="n",
                         code="unsupported_value")
    for key in UNSUPPORTED:
        if body.get(key):
            raise BadRequest(f"'{key}' is not supported by this server.", param=key, code="unsupported_parameter")
    raw = body.get("messages")
    if isinstance(raw, list):
        raw = [dict(m, content=_text_of(m.get("content"), i), role="system" if m.get("role") == "developer"
                    else m.get("role")) if isinstance(m, dict) else m for i, m in enumerate(raw)]
    messages = parse_messages(raw, need_last_user=False)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is not None:
        sampling = parse_sampling(body, max_tokens_key="max_completion_tokens")
    else:
        sampling = parse_sampling(body)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):
        raise BadRequest(f"stop must be a string or a list of up to 4 non-empty strings of at most "
                         f"{MAX_STOP_CHARS} characters", param="stop")
    if stop:
        sampling["stop"] = stop
    stream_flag = body.get("stream") or False
    if not isinstance(stream_flag, bool):
        raise BadRequest("stream must be true or false", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise BadRequest("stream_options must be an object", param="stream_options")
    include_usage = bool(opts.get("include_usage"))

    stream = open_stream(get_pool(current_app), model, "chat", messages, sampling)  # 429 here, before anything is sent
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if stream_flag:
        return _event_stream(_chunks(stream, cid, created, str(model.id), include_usage))
    parts: list[str] = []
    final: Final | None = None
    try:
        for item in stream:
            if isinstance(item, Final):
                final = item
            elif item is not None:
                parts.append(item)
    except InferenceError as e:
        if e.status == 400:
            raise BadRequest(e.message, code="model_rejected_request") from None
        err = AppError(e.message, code="model_unavailable")
        err.status = 503  # the model server failed or could not load; a retry may work
        raise err from None
    finally:
        stream.close()
    return jsonify({
        "id": cid, "object": "chat.completion", "created": created, "model": str(model.id),
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts), "refusal": None},
                     "finish_reason": _reason(final), "logprobs": None}],
        "usage": _usage(final),
    })


def _event_stream(frames: Iterator[str]) -> Response:
    # Not sse.response: its leading "retry:" frame is an event with empty data to OpenAI's client, which
    # then fails to parse it as JSON. OpenAI streams carry data lines and comments only.
    resp = Response((f.encode("utf-8") for f in frames), mimetype="text/event-stream")
    resp.headers["Cache-Control"] = "no-cache, no-transform"
    resp.headers["X-Accel-Buffering"] = "no"
    return resp


def _reason(final: Final | None) -> str:
    return "length" if final is not None and final.finish_reason == "length" else "stop"


def _usage(final: Final | None) -> dict:
    p, c = (final.prompt_tokens, final.completion_tokens) if final else (0, 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _chunks(stream: Iterator[Any], cid: str, created: int, model: str, include_usage: bool) -> Iterator[str]:
    def chunk(delta: dict, finish: str | None = None) -> str:
        data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
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
                else:
                    yield chunk({"content": item})
        except InferenceError as e:
            kind = "invalid_request_error" if e.permanent else "server_error"
            yield sse.format_event({"error": {"message": e.message, "type": kind, "param": None,
                                              "code": "model_error"}})
            yield sse.format_event("[DONE]")
            return
        yield chunk({}, _reason(final))
        if include_usage:
            yield sse.format_event({"id": cid, "object": "chat.completion.chunk", "created": created,
                                    "model": model, "system_fingerprint": None, "choices": [],
                                    "usage": _usage(final)})
        yield sse.format_event("[DONE]")
    finally:
        stream.close()  # a client that hung up stops the generation
