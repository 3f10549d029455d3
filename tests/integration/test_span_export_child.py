"""Spans exported by a real child process, over OTLP/HTTP, to a receiver on a socket."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from cqrskit import span_export
from cqrskit.span_export import ProcessSpanProcessor
from otlp_receiver import OtlpReceiver, otlp_receiver


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    with otlp_receiver() as otlp:
        # The child inherits the environment: the standard variable points it here.
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url)
        yield otlp


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
    receiver: OtlpReceiver, provider: tuple[TracerProvider, ProcessSpanProcessor]
) -> None:
    tracer_provider, processor = provider
    tracer = tracer_provider.get_tracer("cqrskit")
    with (tracer.start_as_current_span("command insert") as command,
          tracer.start_as_current_span("append", attributes={"cqrskit.events": 2})):
        pass

    assert processor.force_flush(10_000)
    spans = {s.name: (s.service, s.span) for s in receiver.spans}
    assert set(spans) == {"command insert", "append"}
    service, append = spans["append"]
    assert service == "cqrskit-test"
    assert append.parent_span_id == command.get_span_context().span_id.to_bytes(8, "big")
    assert append.trace_id == command.get_span_context().trace_id.to_bytes(16, "big")
    assert [(a.key, a.value.int_value) for a in append.attributes] == [("cqrskit.events", 2)]


def test_secrets_are_redacted_before_they_leave(
    receiver: OtlpReceiver, provider: tuple[TracerProvider, ProcessSpanProcessor]
) -> None:
    tracer_provider, processor = provider
    with tracer_provider.get_tracer("cqrskit").start_as_current_span(
        "connect", attributes={"db.url": "postgresql://app:hunter2@db/cqrs"}
    ):
        pass

    assert processor.force_flush(10_000)
    [received] = receiver.spans
    assert received.span.attributes[0].value.string_value == "postgresql://app:***@db/cqrs"


def test_shutdown_exports_what_is_still_queued_and_ends_the_child(receiver: OtlpReceiver) -> None:
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
    receiver: OtlpReceiver, provider: tuple[TracerProvider, ProcessSpanProcessor],
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
