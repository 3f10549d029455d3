"""Span export through a child process: what crosses the pipe, and the bounded queue."""

import pickle
import sys

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from cqrskit.span_export import ProcessSpanProcessor, flatten, rebuild

RESOURCE = Resource({"service.name": "cqrskit-test", "service.instance.id": "h-1"}, "https://s")


def finished_spans() -> list[ReadableSpan]:
    """Spans with every part the OTLP encoder reads: a remote parent with trace
    state, sequence attributes, events, links, an error status, dropped counts."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=RESOURCE,
                              span_limits=SpanLimits(max_span_attributes=3, max_events=2))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("cqrskit", "1.2", schema_url="https://scope")
    remote = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED),
                         trace_state=TraceState([("vendor", "value")]))
    linked = SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(1))
    with tracer.start_as_current_span(
        "POST /api/command/insert", context=set_span_in_context(NonRecordingSpan(remote)),
        kind=SpanKind.SERVER, links=[Link(linked, {"why": "batch"})],
        attributes={"http.route": "/x", "tags": ("a", "b"), "n": 3, "ok": True, "x": 1.5},
    ) as server:
        server.add_event("one", {"k": "v"})
        server.add_event("two")
        server.add_event("three")
        with tracer.start_as_current_span("append") as child:
            child.set_status(StatusCode.ERROR, "disk full")
    return list(exporter.get_finished_spans())


def through_the_pipe(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    flat = pickle.loads(pickle.dumps([flatten(s) for s in spans]))
    return [rebuild(f, RESOURCE, {}) for f in flat]


def test_a_span_rebuilt_in_the_child_encodes_to_the_same_otlp() -> None:
    spans = finished_spans()
    assert spans[1].dropped_attributes == 2 and spans[1].dropped_events == 1

    assert encode_spans(through_the_pipe(spans)) == encode_spans(spans)


def test_a_rebuilt_span_keeps_its_parent_and_trace_state() -> None:
    append, server = through_the_pipe(finished_spans())

    assert server.parent is not None and server.parent.is_remote
    assert server.parent.span_id == 0x00F067AA0BA902B7
    assert append.parent is not None and append.parent.span_id == server.context.span_id
    assert server.context.trace_state == TraceState([("vendor", "value")])
    assert append.status.status_code is StatusCode.ERROR


def test_a_full_queue_drops_new_spans_and_counts_them() -> None:
    processor = ProcessSpanProcessor({}, max_queue_size=2, schedule_delay=60,
                                     command=[sys.executable, "-c", ""])
    try:
        span = finished_spans()[0]
        with processor._lock:  # the sender waits: nothing leaves the queue meanwhile
            for _ in range(5):
                processor.on_end(span)
            assert processor.dropped == 3
            assert len(processor._queue) == 2
            processor._queue.clear()
    finally:
        processor._queue.clear()
        processor.shutdown()


def test_unsampled_spans_are_not_queued() -> None:
    processor = ProcessSpanProcessor({}, schedule_delay=60, command=[sys.executable, "-c", ""])
    try:
        span = finished_spans()[0]
        unsampled = ReadableSpan(
            name="x", context=SpanContext(1, 2, False, TraceFlags(TraceFlags.DEFAULT)))
        processor.on_end(unsampled)
        processor.on_end(span)
        assert [f[0] for f in processor._queue] == [span.name]
    finally:
        processor._queue.clear()
        processor.shutdown()
