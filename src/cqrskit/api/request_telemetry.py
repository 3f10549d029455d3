"""Telemetry of each HTTP request: a server span continuing the caller's trace, the
request duration histogram and the count of requests in flight.

FastAPI has all of this built in; it is turned off because of what it costs: 25
to 30 µs a request for its metrics and 20 to 25 µs more for its span even in a
trace the sampler drops (it parses the headers twice and builds a dozen
attributes and a context manager before the sampler decides), on a command path
of about 300 µs (docs/benchmarks.md, "Telemetry"). Here the span's attributes are
set only when the span is kept, and requests in flight are a plain count read
when metrics are collected. Names and attributes follow OpenTelemetry's HTTP
semantic conventions, as FastAPI's do.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cqrskit import telemetry

# Probes, scrapes, the status stream and the dashboard's files: no span, no metrics.
UNTRACED = ("/healthz", "/readyz", "/metrics", "/api/status", "/dashboard")
_CONTEXT_HEADERS = (b"traceparent", b"tracestate", b"baggage")
# Any other method a client sends is `_OTHER`, as the conventions say: metric
# attributes must not take values a client makes up.
KNOWN_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)
# FastAPI's boundaries (seconds), which the HTTP semantic conventions advise.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0)

request_duration = telemetry.meter.create_histogram(
    "http.server.request.duration", unit="s", description="Duration of HTTP server requests.",
    explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
)
_in_flight: Counter[tuple[str, str]] = Counter()


def _observe_in_flight(options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(count, {"http.request.method": method, "url.scheme": scheme})
            for (method, scheme), count in list(_in_flight.items())]


telemetry.meter.create_observable_up_down_counter(
    "http.server.active_requests", [_observe_in_flight], unit="{request}",
    description="Number of active HTTP server requests.",
)


def untraced(scope: MutableMapping[str, Any]) -> bool:
    path: str = scope.get("path", "")
    return path == "/" or path.startswith(UNTRACED)


class RequestTelemetry:
    """Wraps the app: per HTTP request, a SERVER span named `METHOD /route` and metrics."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or untraced(scope):
            await self.app(scope, receive, send)
            return
        method = scope["method"] if scope["method"] in KNOWN_METHODS else "_OTHER"
        scheme = scope.get("scheme", "http")
        span = token = None
        if telemetry.tracing():
            span = telemetry.tracer.start_span(
                _span_method(method), context=_remote_parent(scope), kind=SpanKind.SERVER,
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

        started = time.perf_counter()
        _in_flight[method, scheme] += 1
        try:
            await self.app(scope, receive, send_and_note)
        except BaseException as error:
            failure = error
            raise
        finally:
            _in_flight[method, scheme] -= 1
            attributes = _attributes(scope, method, status, failure)
            request_duration.record(time.perf_counter() - started, attributes)
            if token is not None:
                otel_context.detach(token)
            if span is not None:
                if span.is_recording():
                    _describe(span, scope, attributes, failure)
                span.end()


def _span_method(method: str) -> str:
    return "HTTP" if method == "_OTHER" else method


def _remote_parent(scope: Scope) -> Any:
    """The caller's trace context when its headers carry one; else None (a new trace).
    Most requests have none, so the propagators run only when one is there."""
    found = {name.decode("latin-1"): value.decode("latin-1")
             for name, value in scope["headers"] if name in _CONTEXT_HEADERS}
    return telemetry.context_of(found) if found else None


def _attributes(
    scope: Scope, method: str, status: int, failure: BaseException | None
) -> dict[str, Any]:
    """The attributes the duration is recorded with, as FastAPI's: a 5xx, an exception
    or no answer at all is an `error.type`."""
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "url.scheme": scope.get("scheme", "http"),
        "network.protocol.version": scope.get("http_version", "1.1"),
    }
    route = getattr(scope.get("route"), "path", None)
    if route is not None:
        attributes["http.route"] = route
    if status:
        attributes["http.response.status_code"] = status
    if failure is not None:
        attributes["error.type"] = type(failure).__qualname__
    elif not status or status >= 500:
        attributes["error.type"] = str(status or "incomplete_response")
    return attributes


def _describe(
    span: Any, scope: Scope, attributes: dict[str, Any], failure: BaseException | None
) -> None:
    """The rest of the HTTP semantic-convention attributes, on a span that is kept."""
    route = attributes.get("http.route")
    if route is not None:
        span.update_name(f"{_span_method(attributes['http.request.method'])} {route}")
    extra: dict[str, Any] = {}
    if attributes["http.request.method"] != scope["method"]:
        extra["http.request.method_original"] = scope["method"]
    if scope.get("query_string"):
        extra["url.query"] = scope["query_string"].decode("latin-1")
    server = scope.get("server")
    if server:
        extra["server.address"], extra["server.port"] = server[0], server[1]
    span.set_attributes({**attributes, **extra})
    if failure is not None:
        span.record_exception(failure)
    if "error.type" in attributes:
        span.set_status(StatusCode.ERROR)
