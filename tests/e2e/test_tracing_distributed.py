"""One trace across the processes of `cqrskit up --distributed`, received over OTLP;
and the last spans of a stopped server.

Every role exports its spans with the OTLP/HTTP exporter to a receiver in this
test, which decodes them with the OTLP protobuf definitions. A command sent with
the client's own `traceparent` must show up in that one trace in every process
it passes: the API, the command handler, the relay and an update processor.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from otlp_receiver import OtlpReceiver, ReceivedSpan, otlp_receiver

from .harness import ServerPool, wait_until
from .topology import Topology

pytestmark = pytest.mark.e2e


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with otlp_receiver() as otlp:
        yield otlp


def test_a_command_is_one_trace_across_every_process(
    topology: Topology, receiver: OtlpReceiver
) -> None:
    topology.env.update({
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export spans within 0.1 s, not 5 s
        "OTEL_METRIC_EXPORT_INTERVAL": "60000",
    })
    topology.start("up", "--distributed", "--port", str(topology.port))
    topology.wait_ready()
    trace_id = os.urandom(16).hex()
    with topology.client() as client:
        answer = client.post(
            "/api/command/insert", json={"id": "traced-1", "data": {"n": 1}},
            headers={"traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-01"},
        )
        assert answer.status_code == 202, answer.text

    wanted = {
        ("cqrskit-api", "POST /api/command/insert"),
        ("cqrskit-command-handler", "command insert"),
        ("cqrskit-relay", "relay publish"),
        ("cqrskit-update-processor", "update views records"),
        ("cqrskit-update-processor", "update views statistics"),
    }

    def complete() -> list[ReceivedSpan] | None:
        spans = receiver.of_trace(trace_id)
        return spans if wanted <= {(s.service, s.name) for s in spans} else None

    with topology.explained():
        spans = wait_until(complete, timeout=30, interval=0.2,
                           what=f"spans of every role in trace {trace_id}")
    by_id = {s.span_id: s for s in spans}
    command = next(s for s in spans if s.name == "command insert")
    # The command handler's request span continued the API's, received over HTTP.
    handler_request = by_id[command.parent_span_id]
    assert handler_request.service == "cqrskit-command-handler"
    assert by_id[handler_request.parent_span_id].service == "cqrskit-api"
    # The projections continued the command's span, received through the event's metadata.
    projected = [s for s in spans if s.name.startswith("update views ")]
    assert {s.name for s in projected} == {"update views records", "update views statistics"}
    assert {s.parent_span_id for s in projected} == {command.span_id}


def test_the_last_spans_are_sent_when_the_server_is_stopped(
    servers: ServerPool, receiver: OtlpReceiver
) -> None:
    """SIGTERM ends `cqrskit serve` before the batch exporter's next send (every 5 s by
    default): its last spans must still reach the receiver."""
    server = servers.new({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
                          "OTEL_METRIC_EXPORT_INTERVAL": "60000",
                          "OTEL_TRACES_SAMPLER": "parentbased_always_on"})
    with server.client() as client:
        for n in range(20):
            answer = client.post("/api/command/insert", json={"id": f"last-{n}", "data": {}})
            assert answer.status_code == 202, answer.text
    assert server.stop() is not None
    commands = [s for s in receiver.spans if s.name == "command insert"]
    assert len(commands) == 20, server.log_tail()


@pytest.mark.parametrize("sampler", ["parentbased_always_on", "always_on"])
def test_a_trace_the_caller_did_not_sample_is_recorded_only_if_the_sampler_ignores_it(
    servers: ServerPool, receiver: OtlpReceiver, sampler: str
) -> None:
    """cqrskit skips making the spans of a trace its sampler would drop: that must
    not change which spans arrive, whatever the sampler."""
    server = servers.new({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
                          "OTEL_METRIC_EXPORT_INTERVAL": "60000",
                          "OTEL_TRACES_SAMPLER": sampler})
    wanted = {"POST /api/command/insert", "command insert", "append",
              "update views records", "update views statistics"}
    sampled, unsampled = os.urandom(16).hex(), os.urandom(16).hex()
    with server.client() as client:
        # One after the other: a view-update batch belongs to its first event's trace.
        for trace_id, flags in ((sampled, "01"), (unsampled, "00")):
            answer = client.post(
                "/api/command/insert", json={"data": {}},
                headers={"traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-{flags}"})
            assert answer.status_code == 202, answer.text
            token = {"X-Consistency-Token": answer.json()["consistency_token"]}
            for query in ("/api/query/stats", f"/api/query/get?id={answer.json()['id']}"):
                assert client.get(query, headers=token).status_code == 200
    assert server.stop() is not None  # sends whatever is left
    assert wanted <= {s.name for s in receiver.of_trace(sampled)}, receiver.names()
    recorded = {s.name for s in receiver.of_trace(unsampled)}
    assert recorded == (wanted if sampler == "always_on" else set()), recorded
