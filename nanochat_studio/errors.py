"""The errors views and services raise, and the one handler that renders them.

Raise ``NotFound("no job 7")`` anywhere under a request; the handler answers in the shape the caller
speaks: an HTML page for pages, ``{"error": {"code", "message"}}`` under ``/api/``, and OpenAI's
``{"error": {"message", "type", "param", "code"}}`` under ``/v1/``. The HTTP status lives on the class.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

API_PREFIX = "/api/"
OPENAI_PREFIX = "/v1/"
API_PREFIXES = (API_PREFIX, OPENAI_PREFIX)  # scripts' paths: JSON errors, no redirects, no form CSRF


class AppError(Exception):
    """Base of every error a user may see. ``message`` is shown as is: write it for the user."""

    status = 500
    code = "internal_error"
    title = "Something went wrong"
    openai_type = "server_error"

    def __init__(self, message: str = "", *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None, details: dict[str, Any] | None = None) -> None:
        super().__init__(message or self.title)
        self.message = message or self.title
        if code:
            self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self.details = dict(details or {})  # more fields of the JSON error (e.g. a 402's numbers)


class BadRequest(AppError):
    status, code, title, openai_type = 400, "bad_request", "Bad request", "invalid_request_error"


class Unauthorized(AppError):
    status, code, title, openai_type = 401, "unauthorized", "Sign-in required", "authentication_error"


class PaymentRequired(AppError):
    status, code, title, openai_type = 402, "payment_required", "Not enough credits", "insufficient_quota"


class Forbidden(AppError):
    status, code, title, openai_type = 403, "forbidden", "Not allowed", "permission_error"


class NotFound(AppError):
    status, code, title, openai_type = 404, "not_found", "Not found", "invalid_request_error"


class MethodNotAllowed(AppError):
    status, code, title, openai_type = 405, "method_not_allowed", "Method not allowed", "invalid_request_error"


class Conflict(AppError):
    status, code, title, openai_type = 409, "conflict", "Conflict", "invalid_request_error"


class TooLarge(AppError):
    status, code, title, openai_type = 413, "too_large", "Too large", "invalid_request_error"


class TooManyRequests(AppError):
    status, code, title, openai_type = 429, "too_many_requests", "Too many requests", "rate_limit_error"


_BY_STATUS = {cls.status: cls for cls in
              (BadRequest, Unauthorized, PaymentRequired, Forbidden, NotFound, MethodNotAllowed, Conflict,
               TooLarge, TooManyRequests)}


def from_http_exception(exc: HTTPException) -> AppError:
    """Werkzeug's exceptions (unknown route, wrong method, CSRF failure) as our own, keeping the status."""
    cls = _BY_STATUS.get(exc.code or 500, AppError)
    message = {404: "There is nothing at this address.",
               405: f"This address does not accept {request.method} requests."}.get(exc.code or 0)
    err = cls(message or exc.description or "")
    if cls is AppError:
        err.status = exc.code or 500
    headers = dict(exc.get_headers()) if exc.code == 405 else {}
    if "Allow" in headers:
        err.headers["Allow"] = headers["Allow"]
    return err


def render_error(err: AppError) -> Any:
    """The response for ``err`` in the caller's language (path prefix decides)."""
    path = request.path
    if path.startswith(OPENAI_PREFIX):
        body = {"error": {"message": err.message, "type": err.openai_type, "param": err.param, "code": err.code}}
        response = jsonify(body)
    elif path.startswith(API_PREFIX):
        param = {"param": err.param} if err.param else {}  # the field that is wrong, when one is
        response = jsonify({"error": {**err.details, "code": err.code, "message": err.message, **param}})
    else:
        try:
            html = render_template("errors/error.html", error=err)
        except Exception:  # a broken template must not hide the original error
            html = f"<!doctype html><title>{err.status}</title><h1>{err.title}</h1>"
        response = Flask.response_class(html, mimetype="text/html")
    response.status_code = err.status
    for name, value in err.headers.items():
        response.headers[name] = value
    return response


def init_app(app: Flask) -> None:
    """Route every error through ``render_error``; unexpected exceptions are logged and shown as 500."""

    @app.errorhandler(AppError)
    def _app_error(err: AppError) -> Any:
        return render_error(err)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        if exc.code and exc.code < 400:  # redirects raised as exceptions pass through
            return exc
        return render_error(from_http_exception(exc))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        if app.testing:  # let the test see the real traceback
            raise exc
        app.logger.exception("unhandled error on %s %s", request.method, request.path)
        return render_error(AppError("An unexpected error happened. It has been logged."))
