"""Every error answers JSON of one shape: {"error": code, "message": text, ...}."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cqrskit.errors import (
    CommandRejected,
    ConcurrencyConflict,
    CqrskitError,
    IdempotencyKeyReused,
    InvalidRequest,
    NotFound,
    Unavailable,
)

log = logging.getLogger(__name__)

_STATUS: list[tuple[type[CqrskitError], int, str]] = [
    (ConcurrencyConflict, 409, "conflict"),
    (IdempotencyKeyReused, 409, "idempotency_key_reused"),
    (CommandRejected, 409, "rejected"),
    (NotFound, 404, "not_found"),
    (InvalidRequest, 400, "invalid_request"),
    (Unavailable, 503, "unavailable"),
]

_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 406: "not_acceptable", 413: "payload_too_large",
    415: "unsupported_media_type",
}


class ErrorBody(BaseModel):
    """Every error answer: a stable code to branch on and a message for a person."""

    model_config = ConfigDict(extra="allow")

    error: str
    message: str


def error_responses(**described: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error statuses, e.g. error_responses(_404="not found")."""
    return {
        int(status.lstrip("_")): {"model": ErrorBody, "description": description}
        for status, description in described.items()
    }


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    body = {"error": code, "message": message, **extra}
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def is_json(content_type: str) -> bool:
    """The rule FastAPI itself uses to decide whether to parse a body as JSON."""
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


async def _validation(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, RequestValidationError):  # registered for this type only
        raise exc
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (detail.get("ctx") or {}).get("error", "malformed JSON")
        return error_response(
            400, "malformed_json", f"the request body is not valid JSON: {reason}"
        )
    content_type = request.headers.get("content-type", "")
    body_error = any(e["loc"][:1] == ("body",) for e in errors)
    if body_error and not is_json(content_type):
        sent = f"not {content_type}" if content_type else "and none was sent"
        return error_response(
            415, "unsupported_media_type",
            f"the body must be JSON sent with Content-Type: application/json, {sent}",
        )
    details = [
        {"location": _location(e["loc"]), "problem": e["msg"], "type": e["type"]} for e in errors
    ]
    summary = "; ".join(f"{d['location']}: {d['problem']}" for d in details[:5])
    return error_response(422, "validation_failed", summary, details=details)


async def _http(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, HTTPException):  # registered for this type only
        raise exc
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}; the API is described at /docs"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    return error_response(exc.status_code, code, message, headers=dict(exc.headers or {}))


async def _domain(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, CqrskitError):  # registered for this type only
        raise exc
    # A deliberate error of no more specific kind is still the caller's to fix: 400.
    status, code = next(
        ((status, code) for kind, status, code in _STATUS if isinstance(exc, kind)),
        (400, "invalid_request"),
    )
    extra: dict[str, Any] = {}
    if isinstance(exc, ConcurrencyConflict):
        extra = {"current_version": exc.current, "expected_version": exc.expected}
    headers = dict(exc.headers or {})
    if status == 503:
        headers["Retry-After"] = "1"
    return error_response(status, code, str(exc), headers=headers, **extra)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "unexpected error; it was logged on the server")


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(CqrskitError, _domain)
    app.add_exception_handler(Exception, _unexpected)


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.limit:
                    await self._refuse(scope, receive, send)
                    return
                declared = True
            elif name == b"transfer-encoding":
                chunked = True
        if declared and not chunked:
            # The server reads exactly the declared length (HTTP framing): it is
            # within the limit, so there is nothing to count.
            await self.app(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # FastAPI passes HTTPException through body parsing untouched,
                    # so this reaches the JSON error handler as a 413.
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counting_receive, send)

    def _message(self) -> str:
        return f"the request body is larger than the limit of {self.limit} bytes"

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, "payload_too_large", self._message())
        await response(scope, receive, send)
