"""Malformed requests get a 4xx that says what is wrong, never a 500.

- **ids** in URLs are 64-bit: ``<int:...>`` routes match only 1..2^63-1 (a larger number is a 404, not an
  overflow in the database driver); ids in JSON bodies go through ``models.parse_id``.
- **JSON** nested deeper than ``MAX_JSON_DEPTH`` is refused before parsing (the parser would recurse
  until Python's stack limit); :func:`json_object` is the body of an endpoint that wants an object,
  with the reason when it is not one.
- **Bodies**: everything but a dataset upload is limited to ``json_max_bytes`` (uploads to
  ``upload_max_bytes``); past it, 413 before the body is read.
- **Last-Event-ID** and ``?since=``: a non-negative 64-bit integer, else 400.
"""

from __future__ import annotations

import re
from itertools import accumulate
from typing import Any

from flask import Flask, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.routing import IntegerConverter

from .errors import BadRequest
from .models import MAX_ID
from .settings import Settings

MAX_JSON_DEPTH = 64
UPLOAD_ENDPOINTS = frozenset({"api.upload_dataset"})


class IdConverter(IntegerConverter):
    """``<int:x>``: a positive id that fits in 64 bits (a longer number matches nothing: 404)."""

    def __init__(self, map: Any, fixed_digits: int = 0, min: int | None = None, max: int | None = None,
                 signed: bool = False) -> None:
        super().__init__(map, fixed_digits=fixed_digits, min=min, max=MAX_ID if max is None else max,
                         signed=signed)

    def to_python(self, value: str) -> Any:
        if len(value) > 19:  # before int(): a 5,000-digit path segment is refused, not converted
            from werkzeug.routing import ValidationError

            raise ValidationError()
        return super().to_python(value)


# A JSON string as json_depth skips it: from its quote, past escaped characters, to its closing quote
# or the end of the text. What is left outside strings, bar the brackets, does not count either.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\[\s\S][^"\\]*)*"?')
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]+")
_NESTING = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str | bytes, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings do not count);
    past ``limit``, ``limit + 1``."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    # The regular expressions and the running sums go through the text in C: a Python loop over its
    # characters cost ~25 us a kilobyte, 12 times what json.loads takes, on every chat turn's history.
    brackets = _NOT_A_BRACKET.sub("", _JSON_STRING.sub("", text))
    depth = deepest = 0
    for start in range(0, len(brackets), 4096):  # a block at a time, to stop soon in a deep text
        sums = list(accumulate(map(_NESTING.__getitem__, brackets[start:start + 4096]), initial=depth))
        depth, deepest = sums[-1], max(deepest, max(sums))
        if deepest > limit:
            return limit + 1
    return deepest


class BoundedJSONProvider(DefaultJSONProvider):
    """Flask's JSON, refusing (ValueError, which get_json turns into "not JSON") texts nested deeper than
    MAX_JSON_DEPTH."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        if json_depth(s) > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels is not accepted")
        return super().loads(s, **kwargs)


def json_object(*, required: bool = True) -> dict:
    """The request's JSON body as an object. BadRequest saying why when it is not JSON, not an object,
    or (``required``) missing; ``{}`` when missing and not required."""
    # Read here, outside the parse below, so that a body past json_max_bytes is werkzeug's 413; and
    # get_data, not request.data: the property also runs werkzeug's form parser (~0.3 ms a request).
    if not request.get_data(cache=True) and not required:
        return {}
    if request.mimetype != "application/json":
        raise BadRequest("send a JSON object with Content-Type: application/json", code="invalid_json")
    try:
        body = request.get_json(silent=False)
    except Exception as exc:  # werkzeug's BadRequest from on_json_loading_failed, with the parser's reason
        reason = getattr(exc, "description", None) or str(exc)
        raise BadRequest(f"the body is not valid JSON: {reason}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, not {_json_kind(body)}", code="invalid_json")
    return body


def _json_kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def event_id(raw: str | None) -> int:
    """A Last-Event-ID (or ``?since=``) as an int; 0 when absent. BadRequest when it is not a
    non-negative integer that fits in 64 bits."""
    text = (raw or "").strip()
    if not text:
        return 0
    if len(text) > 19 or not text.isdigit() or not text.isascii() or int(text) > MAX_ID:
        raise BadRequest("Last-Event-ID (or since) must be a non-negative integer below 2^63",
                         code="bad_event_id")
    return int(text)


def init_app(app: Flask, settings: Settings) -> None:
    app.url_map.converters["int"] = IdConverter
    app.json = BoundedJSONProvider(app)

    @app.before_request
    def _body_limit() -> None:
        # Everything but an upload is small: refuse a large body before anything reads it.
        if request.endpoint not in UPLOAD_ENDPOINTS:
            request.max_content_length = settings.json_max_bytes
