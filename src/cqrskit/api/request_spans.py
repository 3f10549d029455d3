"""A server span for each HTTP request, continuing the caller's trace.

FastAPI's own telemetry makes this span too, and still records the request
metrics here (http.server.request.duration and active requests). Its span is
turned off because of what it costs in a trace the sampler drops: it parses the
headers twice, builds a dozen attributes and a context manager before the
sampler decides, 20 to 25 µs per request against 10 here (docs/benchmarks.md,
"Telemetry"), on a path of 450 µs. Here the attributes a dropped span never
shows are set only when the span is recorded.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from fastapi import FastAPI
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cqrskit import telemetry

# Probes, scrapes, the status stream and the dashboard's files: no span, no metrics.
UNTRACED = ("/healthz", "/readyz", "/metrics", "/api/status", "/dashboard")
_CONTEXT_HEADERS = (b"traceparent", b"tracestate", b"baggage")


def untraced(scope: MutableMapping[str, Any]) -> bool:
    path: str = scope.get("path", "")
    return path == "/" or path.startswith(UNTRACED)


class RequestSpans:
    """Wraps the app: one SERVER span per HTTP request, named `METHOD /route`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or untraced(scope) or not telemetry.tracing():
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        span = telemetry.tracer.start_span(
            method, context=_remote_parent(scope), kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        status = 0
        failure: BaseException | None = None

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except BaseException as error:
            failure = error
            raise
        finally:
            otel_context.detach(token)
            if span.is_recording():
                _describe(span, scope, status, failure)
            span.end()


def _remote_parent(scope: Scope) -> Any:
    """The caller's trace context when its headers carry one; else None (a new trace).
    Most requests have none, so the propagators run only when one is there."""
    found = {name.decode("latin-1"): value.decode("latin-1")
             for name, value in scope["headers"] if name in _CONTEXT_HEADERS}
    return propagate.extract(found) if found else None


def _describe(span: Any, scope: Scope, status: int, failure: BaseException | None) -> None:
    """The HTTP semantic-convention attributes of a span that is kept."""
    route = getattr(scope.get("route"), "path", None)
    attributes: dict[str, Any] = {
        "url.scheme": scope.get("scheme", "http"),
        "network.protocol.version": scope.get("http_version", "1.1"),
    }
    if route is not None:
        attributes["http.route"] = route
        span.update_name(f"{scope['method']} {route}")
    if scope.get("query_string"):
        attributes["url.query"] = scope["query_string"].decode("latin-1")
    server = scope.get("server")
    if server:
        attributes["server.address"], attributes["server.port"] = server[0], server[1]
    if status:
        attributes["http.response.status_code"] = status
    if failure is not None:
        span.record_exception(failure)
        attributes["error.type"] = type(failure).__qualname__
    elif not status or status >= 500:
        attributes["error.type"] = str(status or "incomplete_response")
    if "error.type" in attributes:
        span.set_status(StatusCode.ERROR)
    span.set_attributes(attributes)


def install(app: FastAPI) -> None:
    """Put RequestSpans outside every other layer, so that the span covers the 500s
    Starlette's outermost error handler writes, and the other layers' work."""
    build = app.build_middleware_stack

    def build_with_spans() -> ASGIApp:
        return RequestSpans(build())

    setattr(app, "build_middleware_stack", build_with_spans)  # noqa: B010 (mypy: method)
