"""Spans exported by a real child process, over OTLP/HTTP, to a receiver on a socket."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from cqrskit import span_export
from cqrskit.span_export import ProcessSpanProcessor


class Receiver:
    """An OTLP/HTTP endpoint that decodes every trace export and keeps the spans."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, ProtoSpan]] = []  # (service.name, span)
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/v1/traces":
                    receiver.take(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def take(self, request: ExportTraceServiceRequest) -> None:
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next(a.value.string_value for a in resource_spans.resource.attributes
                               if a.key == "service.name")
                for scope_spans in resource_spans.scope_spans:
                    self.spans += [(service, s) for s in scope_spans.spans]

    def names(self) -> list[str]:
        with self.lock:
            return [s.name for _, s in self.spans]


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    otlp = Receiver()
    thread = threading.Thread(target=otlp.server.serve_forever, daemon=True)
    thread.start()
    # The child inherits the environment: the standard variable points it here.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url)
    try:
        yield otlp
    finally:
        otlp.server.shutdown()
        otlp.server.server_close()


@pytest.fixture
def provider() -> Iterator[tuple[TracerProvider, ProcessSpanProcessor]]:
    resource = Resource({"service.name": "cqrskit-test"})
    provider = TracerProvider(resource=resource)
    processor = ProcessSpanProcessor(resource.attributes, resource.schema_url,
                                     schedule_delay=60)
    provider.add_span_processor(processor)
    try:
        yield provider, processor
    finally:
        provider.shutdown()


def test_spans_reach_the_receiver_as_otlp_with_their_parents(
    receiver: Receiver, provider: tuple[TracerProvider, ProcessSpanProcessor]
) -> None:
    tracer_provider, processor = provider
    tracer = tracer_provider.get_tracer("cqrskit")
    with (tracer.start_as_current_span("command insert") as command,
          tracer.start_as_current_span("append", attributes={"cqrskit.events": 2})):
        pass

    assert processor.force_flush(10_000)
    with receiver.lock:
        spans = {s.name: (service, s) for service, s in receiver.spans}
    assert set(spans) == {"command insert", "append"}
    service, append = spans["append"]
    assert service == "cqrskit-test"
    assert append.parent_span_id == command.get_span_context().span_id.to_bytes(8, "big")
    assert append.trace_id == command.get_span_context().trace_id.to_bytes(16, "big")
    assert [(a.key, a.value.int_value) for a in append.attributes] == [("cqrskit.events", 2)]


def test_secrets_are_redacted_before_they_leave(
    receiver: Receiver, provider: tuple[TracerProvider, ProcessSpanProcessor]
) -> None:
    tracer_provider, processor = provider
    with tracer_provider.get_tracer("cqrskit").start_as_current_span(
        "connect", attributes={"db.url": "postgresql://app:hunter2@db/cqrs"}
    ):
        pass

    assert processor.force_flush(10_000)
    [(_, span)] = receiver.spans
    assert span.attributes[0].value.string_value == "postgresql://app:***@db/cqrs"


def test_shutdown_exports_what_is_still_queued_and_ends_the_child(receiver: Receiver) -> None:
    processor = ProcessSpanProcessor({"service.name": "cqrskit-test"}, schedule_delay=60)
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(processor)
    tracer = tracer_provider.get_tracer("cqrskit")
    with tracer.start_as_current_span("first"):
        pass
    assert processor.force_flush(10_000)  # starts the child
    child = processor._child
    assert child is not None
    with tracer.start_as_current_span("last"):
        pass

    tracer_provider.shutdown()

    assert receiver.names() == ["first", "last"]
    assert child.returncode == 0


def test_a_child_that_dies_is_replaced_and_reported(
    receiver: Receiver, provider: tuple[TracerProvider, ProcessSpanProcessor],
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(span_export, "RESTART_INTERVAL", 0.0)
    tracer_provider, processor = provider
    tracer = tracer_provider.get_tracer("cqrskit")
    with tracer.start_as_current_span("before"):
        pass
    assert processor.force_flush(10_000)
    first = processor._child
    assert first is not None
    first.send_signal(signal.SIGKILL)
    first.wait(10)

    with caplog.at_level(logging.ERROR, logger="cqrskit.span_export"):
        with tracer.start_as_current_span("after"):
            pass
        assert processor.force_flush(10_000)

    assert receiver.names() == ["before", "after"]
    assert processor._child is not None and processor._child is not first
    assert "the span export process exited (code -9)" in caplog.text
