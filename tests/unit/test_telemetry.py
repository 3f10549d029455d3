"""Telemetry logic: exporter choice, outcomes, trace context in event metadata."""

import json
import subprocess
import sys
import textwrap

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import get_current_span

from cqrskit import metric_export, telemetry
from cqrskit.errors import CommandRejected, ConcurrencyConflict, NotFound
from otlp_receiver import otlp_receiver


def test_auto_picks_the_exporter_from_the_standard_variables() -> None:
    assert telemetry.choose_exporter("auto", {}) == "none"
    assert telemetry.choose_exporter("auto", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}) == "otlp"
    both = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x",
            "APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=k"}
    assert telemetry.choose_exporter("auto", both) == "azure"
    assert telemetry.choose_exporter("console", both) == "console"


def test_outcomes_name_the_refusal() -> None:
    assert telemetry.outcome_of(NotFound("x")) == "not_found"
    assert telemetry.outcome_of(CommandRejected("x")) == "command_rejected"
    assert telemetry.outcome_of(ConcurrencyConflict("s", 1, 2)) == "concurrency_conflict"
    assert telemetry.outcome_of(RuntimeError("x")) == "error"


def test_trace_context_round_trips_through_event_metadata() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("request") as request:
        metadata = {"command_id": "c1", **telemetry.trace_headers()}
    assert metadata["traceparent"].startswith("00-")
    with tracer.start_as_current_span("project", context=telemetry.context_of(metadata)):
        child = get_current_span().get_span_context()
    assert child.trace_id == request.get_span_context().trace_id
    _, project = exporter.get_finished_spans()
    assert project.parent is not None
    assert project.parent.span_id == request.get_span_context().span_id


def test_metadata_without_a_trace_gives_an_empty_context() -> None:
    assert not get_current_span(telemetry.context_of({"command_id": "c1"})).is_recording()


def test_unknown_exporter_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown telemetry exporter"):
        telemetry.configure("zipkin", "cqrskit-test")


def test_azure_monitor_starts_and_stops_without_network(tmp_path: object) -> None:
    """A dummy connection string: configure, record a span, shut down; no error, no hang."""
    script = textwrap.dedent("""
        import logging, sys
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        from cqrskit import metric_export, telemetry
        telemetry.configure("auto", "cqrskit-test")
        with telemetry.tracer.start_as_current_span("probe"):
            telemetry.commands.add(1, {"command": "probe", "outcome": "ok"})
        telemetry.shutdown()
        print("clean")
    """)
    env = {
        "PATH": "/usr/bin:/bin",
        "APPLICATIONINSIGHTS_CONNECTION_STRING": (
            "InstrumentationKey=00000000-0000-0000-0000-000000000000;"
            "IngestionEndpoint=http://127.0.0.1:9/;LiveEndpoint=http://127.0.0.1:9/"
        ),
        "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true",
        "TMPDIR": str(tmp_path),
    }
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "clean"
    assert "Traceback" not in done.stderr, done.stderr


def _run(script: str, env: dict[str, str], tmp_path: object) -> None:
    """Run `script` in a fresh interpreter (telemetry is set up once per process)."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env={"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path), **env},
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_azure_monitor_sends_spans_with_their_secrets_redacted(tmp_path: object) -> None:
    """Spans go to an ingestion endpoint served here, as Application Insights would get
    them: a secret in an attribute or an exception message arrives as ***."""
    accepted = b'{"itemsReceived": 1, "itemsAccepted": 1, "errors": []}'
    with otlp_receiver(accepted) as receiver:
        endpoint, received = receiver.url, receiver.received
        _run("""
            from cqrskit import metric_export, telemetry
            telemetry.configure("azure", "cqrskit-test")
            try:
                with telemetry.tracer.start_as_current_span(
                    "connect", attributes={"cqrskit.store": "postgresql://app:Hunter2Secret@db/x"}
                ):
                    raise RuntimeError("refused: AccountKey=AzureKeySecret==;")
            except RuntimeError:
                pass
            telemetry.shutdown()
        """, {
            "APPLICATIONINSIGHTS_CONNECTION_STRING": (
                "InstrumentationKey=00000000-0000-0000-0000-000000000000;"
                f"IngestionEndpoint={endpoint}/;LiveEndpoint={endpoint}/"
            ),
            "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true",
            # The distro's default sampler keeps a few traces a second, at random: this
            # test's one span must be kept.
            "OTEL_TRACES_SAMPLER": "always_on",
        }, tmp_path)
    sent = b"".join(body for _, body in received).decode()
    assert '"connect"' in sent, sent  # the span arrived
    assert "Hunter2Secret" not in sent and "AzureKeySecret" not in sent, sent
    assert "postgresql://app:***@db/x" in sent and "AccountKey=***" in sent, sent


@pytest.mark.parametrize(("setting", "exported"), [("none", False), ("otlp", True)])
def test_otel_metrics_exporter_none_keeps_metrics_at_the_prometheus_endpoint_only(
    setting: str, exported: bool, tmp_path: object
) -> None:
    with otlp_receiver() as receiver:
        endpoint, received = receiver.url, receiver.received
        _run("""
            from cqrskit import metric_export, telemetry
            telemetry.configure("otlp", "cqrskit-test")
            telemetry.commands.add(1, {"command": "probe", "outcome": "ok"})
            telemetry.shutdown()
        """, {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_METRICS_EXPORTER": setting},
            tmp_path)
    assert ("/v1/metrics" in [path for path, _ in received]) is exported, received


# ------------------------------------------------------- one metrics aggregation

METRICS_SCRIPT = """
    import json, time
    from prometheus_client import REGISTRY, generate_latest
    from opentelemetry import metrics
    from cqrskit import telemetry

    def scraped():
        return [line.rsplit(" ", 1)[1] for line in generate_latest(REGISTRY).decode().splitlines()
                if line.startswith("cqrskit_commands_total")]

    telemetry.configure("otlp", "cqrskit-test")
    readers = metrics.get_meter_provider()._metric_readers
    for _ in range(3):
        telemetry.commands.add(1, {"command": "probe", "outcome": "ok"})
    first = scraped()
    time.sleep(0.7)  # a few exports, no scrape
    telemetry.commands.add(2, {"command": "probe", "outcome": "ok"})
    second = scraped()
    telemetry.shutdown()
    print(json.dumps({"readers": [type(r).__name__ for r in readers],
                      "first": first, "second": second}))
"""


def _command_sums(bodies: list[bytes]) -> list[float]:
    """The cqrskit.commands value of each OTLP metrics export, in order."""
    sums = []
    for body in bodies:
        for resource in ExportMetricsServiceRequest.FromString(body).resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == "cqrskit.commands":
                        sums.append(sum(p.as_int or p.as_double for p in metric.sum.data_points))
    return sums


def _run_metrics(env: dict[str, str], tmp_path: object) -> tuple[dict[str, list[str]], list[float]]:
    with otlp_receiver() as receiver:
        endpoint, received = receiver.url, receiver.received
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(METRICS_SCRIPT)],
            env={"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path),
                 "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_METRIC_EXPORT_INTERVAL": "150",
                 **env},
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        sums = _command_sums([body for path, body in received if path == "/v1/metrics"])
    return json.loads(done.stdout), sums


def test_one_reader_serves_metrics_and_exports_the_same_counts_over_otlp(
    tmp_path: object,
) -> None:
    seen, sums = _run_metrics({}, tmp_path)
    assert seen["readers"] == ["PrometheusAndOtlpReader"]
    # /metrics is current at each scrape, and the exports in between left no copies
    # behind for the next scrape to show.
    assert seen["first"] == ["3.0"]
    assert seen["second"] == ["5.0"]
    # Cumulative, as OTLP's default: exports during the sleep saw 3, the last one 5.
    assert len(sums) >= 3, sums
    assert 3 in sums and sums[-1] == 5, sums
    assert sums == sorted(sums), sums


def test_a_delta_temporality_gets_an_otlp_reader_of_its_own(tmp_path: object) -> None:
    delta = {"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "delta"}
    seen, sums = _run_metrics(delta, tmp_path)
    assert seen["readers"] == ["PrometheusMetricReader", "PeriodicExportingMetricReader"]
    assert seen["second"] == ["5.0"]
    assert sum(sums) == 5 and 3 in sums and 2 in sums, sums  # deltas: 3, then 2


def test_only_otlp_defaults_can_share_the_aggregation() -> None:
    assert metric_export.shareable({})
    assert metric_export.shareable({"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE":
                                    "CUMULATIVE"})
    assert not metric_export.shareable({"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE":
                                        "lowmemory"})
    assert not metric_export.shareable({
        "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION":
            "base2_exponential_bucket_histogram"})


def test_otlp_keeps_one_trace_in_ten_unless_a_sampler_is_chosen() -> None:
    ratio = "ParentBased{root:TraceIdRatioBased{0.1},"
    assert telemetry.default_sampler("otlp", {}).get_description().startswith(ratio)
    assert telemetry.default_sampler("otlp", {"OTEL_TRACES_SAMPLER": "always_on"}) is None
    assert telemetry.default_sampler("console", {}) is None


@pytest.mark.parametrize(("environ", "kept"), [
    ({}, 0.1), ({"OTEL_TRACES_SAMPLER": "parentbased_always_on"}, 1.0),
])
def test_the_sampler_set_up_keeps_that_share_of_new_traces(
    environ: dict[str, str], kept: float, tmp_path: object
) -> None:
    """Configured as a server would be: of 2,000 new traces, about 10% (binomial: within
    5 standard deviations, so that the test fails by chance about once in 3 million runs) or
    all of them are recorded."""
    with otlp_receiver() as receiver:
        endpoint = receiver.url
        _run("""
            import sys
            from opentelemetry import trace
            from cqrskit import telemetry
            telemetry.configure("otlp", "cqrskit-test")
            recorded = 0
            for _ in range(2000):
                with telemetry.tracer.start_as_current_span("probe") as span:
                    recorded += span.is_recording()
            telemetry.shutdown()
            sys.exit(0 if abs(recorded - 2000 * KEPT) < 5 * (2000 * KEPT * (1 - KEPT)) ** 0.5
                     + 1 else f"recorded {recorded} of 2000")
        """.replace("KEPT", str(kept)), {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                                          "OTEL_METRICS_EXPORTER": "none", **environ}, tmp_path)
