"""One trace from the HTTP request to the view update, in the embedded runtime, and
/metrics that move with the commands and the lag (real HTTP over a socket).

The tracer provider is OpenTelemetry's global one, which a process can set only
once: the `spans` fixture installs it with an in-memory exporter for the session.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import LiveServer
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from cqrskit import telemetry
from cqrskit.api.app import create_app
from cqrskit.bootstrap import open_runtime
from cqrskit.config import Settings
from cqrskit.domains import records
from cqrskit.messages import Envelope
from cqrskit.registry import Registry


@pytest.fixture(scope="session")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.configure("none", "cqrskit-test")  # the meter provider, for /metrics
    return exporter


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path, stream="embedded", status_interval=0.1, lease_heartbeat=0.2,
        command_db=f"sqlite:///{tmp_path / 'command.db'}",
        query_db=f"sqlite:///{tmp_path / 'query.db'}",
    )


async def _serve(tmp_path: Path, role: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(_settings(tmp_path), Registry([records.domain]), role=role)
    server = await LiveServer(app).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            yield client
    finally:
        await server.stop()


@pytest.fixture
async def serve(tmp_path: Path, spans: InMemorySpanExporter) -> AsyncIterator[httpx.AsyncClient]:
    """`cqrskit serve`: everything in one process."""
    async for client in _serve(tmp_path, "serve"):
        yield client


@pytest.fixture
async def api(tmp_path: Path, spans: InMemorySpanExporter) -> AsyncIterator[httpx.AsyncClient]:
    """`cqrskit api` handling commands and queries in process, with no update processor."""
    async for client in _serve(tmp_path, "api"):
        yield client


async def _until(condition: Callable[[], Any], what: str, timeout: float = 10) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := condition()):
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return value


async def test_one_trace_from_request_to_view_update(
    serve: httpx.AsyncClient, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    accepted = await serve.post("/api/command/insert", json={"data": {"a": 1}})
    assert accepted.status_code == 202
    stream_id = accepted.json()["id"]

    def of_this_command() -> list[ReadableSpan]:
        found = [s for s in spans.get_finished_spans() if s.name == "command insert"
                 and s.attributes and s.attributes.get("cqrskit.stream_id") == stream_id]
        if not found:
            return []
        trace_id = found[0].context.trace_id
        mine = [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]
        names = {s.name for s in mine}
        wanted = {"update views records", "update views statistics"}
        return mine if wanted <= names else []

    mine = await _until(of_this_command, "the projection spans of the command's trace")
    by_name = {s.name: s for s in mine}
    request = next(s for s in mine if s.name.startswith("POST /api/command/insert")
                   and s.parent is None)
    command, append = by_name["command insert"], by_name["append"]
    assert command.parent is not None and append.parent is not None
    # request -> command -> append; the projections continue from the command's span
    assert command.parent.span_id == request.context.span_id
    assert append.parent.span_id == command.context.span_id
    projected = [s for s in mine if s.name.startswith("update views ")]
    assert {s.attributes["cqrskit.projection"] for s in projected if s.attributes} == {
        "records", "statistics"
    }
    for span in projected:
        assert span.parent is not None and span.parent.span_id == command.context.span_id
        assert span.attributes and span.attributes["cqrskit.partition"] == 0

    # A refusal is an outcome of the command, not a failure of the service.
    spans.clear()
    refused = await serve.post("/api/command/update", json={"id": "nobody", "data": {}})
    assert refused.status_code == 404
    failed = await _until(lambda: [s for s in spans.get_finished_spans()
                                   if s.name == "command update"], "the refused command's span")
    assert failed[0].attributes["cqrskit.outcome"] == "not_found"  # type: ignore[index]
    assert failed[0].status.is_ok


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                labels = tuple(sorted((k, v) for k, v in sample.labels.items()
                                      if not k.startswith("otel_")))
                found[labels] = sample.value
    return found


async def test_metrics_move_with_commands_and_lag(api: httpx.AsyncClient, tmp_path: Path) -> None:
    async def metric(name: str) -> dict[tuple[tuple[str, str], ...], float]:
        answer = await api.get("/metrics")
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/plain")
        return _samples(answer.text, name)

    async def until(name: str, test: Callable[[dict[Any, float]], bool], what: str) -> None:
        deadline = asyncio.get_running_loop().time() + 10
        while not test(await metric(name)):
            assert asyncio.get_running_loop().time() < deadline, f"timed out: {what}"
            await asyncio.sleep(0.05)

    def requests(route: str, status: str) -> tuple[tuple[str, str], ...]:
        return (("http_request_method", "POST"), ("http_response_status_code", status),
                ("http_route", route), ("network_protocol_version", "1.1"),
                ("url_scheme", "http"))

    ok = (("command", "insert"), ("outcome", "ok"))
    inserts = requests("/api/command/insert", "202")
    before = (await metric("cqrskit_commands_total")).get(ok, 0)
    requests_before = (await metric("http_server_request_duration_seconds_count")).get(inserts, 0)
    for i in range(3):
        assert (await api.post("/api/command/insert", json={"data": {"i": i}})).status_code == 202
    assert (await metric("cqrskit_commands_total"))[ok] == before + 3
    refused = (("command", "update"), ("outcome", "not_found"))
    await api.post("/api/command/update", json={"id": "nobody", "data": {}})
    assert (await metric("cqrskit_commands_total"))[refused] >= 1
    # Each request is timed by its route and status, a refusal with no error.type;
    # none is in flight once answered, and the scrapes themselves are not counted.
    timed = await metric("http_server_request_duration_seconds_count")
    assert timed[inserts] == requests_before + 3
    assert timed[requests("/api/command/update", "404")] >= 1
    assert not [labels for labels in timed if ("http_route", "/metrics") in labels]
    assert (await metric("http_server_active_requests"))[
        (("http_request_method", "POST"), ("url_scheme", "http"))] == 0
    # A method the client made up is recorded as _OTHER, not as a new label value.
    assert (await api.request("PROPFIND", "/api/command/insert")).status_code == 405
    methods = {dict(labels)["http_request_method"]
               for labels in await metric("http_server_request_duration_seconds_count")}
    assert "_OTHER" in methods and "PROPFIND" not in methods
    assert sum((await metric("cqrskit_command_duration_seconds_count")).values()) >= 4

    # No update processor runs: the lag builds up to the 3 events, for each projection.
    lag = (("partition", "0"), ("projection", "records"))
    await until("cqrskit_projection_lag_events", lambda m: m.get(lag) == 3, "lag of 3")
    assert (await metric("cqrskit_projection_lag_seconds"))[lag] > 0

    # An update processor starts: the lag drains to 0.
    processor = await open_runtime(_settings(tmp_path), Registry([records.domain]),
                                   role="update-processor")
    processor.start()
    try:
        await until("cqrskit_projection_lag_events",
                    lambda m: len(m) == 2 and not any(m.values()), "lag drained")
    finally:
        await processor.close()
    projected = await metric("cqrskit_events_projected_total")
    assert projected[(("projection", "records"),)] >= 3


def test_a_batch_span_continues_its_first_event_and_links_the_others(
    spans: InMemorySpanExporter,
) -> None:
    """Three events of three traces in one batch: the batch span is a child of the first
    event's span and links the other two; a batch whose first trace was not sampled
    records nothing (nor reads the others' trace contexts)."""
    tracer = trace.get_tracer("test")
    metadata = []
    for n in range(3):
        with tracer.start_as_current_span(f"command {n}") as command:
            metadata.append((command.get_span_context(), telemetry.trace_headers()))
    batch = [Envelope(f"e{n}", f"s{n}", "record", 1, n + 1, "RecordInserted", 1, {},
                      headers, "2026-11-29T00:00:00+00:00")
             for n, (_, headers) in enumerate(metadata)]
    spans.clear()
    with telemetry.batch_span("update views test", batch, {}):
        pass
    [recorded] = [s for s in spans.get_finished_spans() if s.name == "update views test"]
    first, *others = (context for context, _ in metadata)
    assert recorded.parent is not None and recorded.parent.span_id == first.span_id
    assert [link.context.span_id for link in recorded.links] == [c.span_id for c in others]

    # An event whose trace was not sampled gets no link: there is no span to link to.
    unsampled = {"traceparent": f"00-{first.trace_id:032x}-{first.span_id:016x}-00"}
    spans.clear()
    with telemetry.batch_span("update views test",
                              [batch[0], replace(batch[1], metadata=unsampled), batch[2]], {}):
        pass
    [recorded] = [s for s in spans.get_finished_spans() if s.name == "update views test"]
    assert [link.context.span_id for link in recorded.links] == [others[1].span_id]

    spans.clear()
    with telemetry.batch_span("update views test", [replace(batch[0], metadata=unsampled),
                                                   *batch[1:]], {}):
        pass
    assert [s for s in spans.get_finished_spans() if s.name == "update views test"] == []


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def _of_trace(spans: InMemorySpanExporter, trace_id: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if f"{s.context.trace_id:032x}" == trace_id]


async def test_the_request_span_continues_the_callers_trace_and_names_its_route(
    serve: httpx.AsyncClient, spans: InMemorySpanExporter
) -> None:
    accepted = await serve.post("/api/command/insert?why=test", json={"data": {"a": 1}},
                                headers={"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"})
    assert accepted.status_code == 202
    [request] = [s for s in _of_trace(spans, TRACE_ID) if s.kind == SpanKind.SERVER]
    assert request.name == "POST /api/command/insert"
    assert request.parent is not None and f"{request.parent.span_id:016x}" == CALLER_SPAN
    assert request.attributes is not None
    assert request.attributes["http.route"] == "/api/command/insert"
    assert request.attributes["http.response.status_code"] == 202
    assert request.attributes["url.query"] == "why=test"
    assert request.status.is_unset

    # A refusal is the client's error, not a failed request; a probe makes no span.
    spans.clear()
    assert (await serve.post("/api/command/insert", json={"nope": 1})).status_code == 422
    assert (await serve.get("/readyz")).status_code == 200
    [refused] = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert refused.attributes and refused.attributes["http.response.status_code"] == 422
    assert refused.status.is_unset


async def test_a_trace_the_caller_did_not_sample_makes_no_spans_but_carries_on(
    serve: httpx.AsyncClient, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    """Under a parent-based sampler (the default), a request whose caller did not sample
    its trace makes no span in any step, and its events still carry the trace, unsampled
    (tests/e2e/test_tracing_distributed.py has a sampler that ignores the parent)."""
    spans.clear()
    unsampled = {"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-00"}
    accepted = await serve.post("/api/command/insert", json={"data": {"a": 1}},
                                headers=unsampled)
    assert accepted.status_code == 202
    body = accepted.json()
    record = await serve.get("/api/query/get", params={"id": body["id"]},
                             headers={"X-Consistency-Token": body["consistency_token"]})
    assert record.status_code == 200  # projected, through a batch that made no span
    assert _of_trace(spans, TRACE_ID) == []
    runtime = await open_runtime(_settings(tmp_path), Registry([records.domain]),
                                 role="command-handler")
    try:
        assert runtime.store is not None
        [event] = [e for e in await runtime.store.read_all(0, 100)
                   if e.stream_id == body["id"]]
    finally:
        await runtime.close()
    assert event.metadata["traceparent"].startswith(f"00-{TRACE_ID}-")
    assert event.metadata["traceparent"].endswith("-00")

