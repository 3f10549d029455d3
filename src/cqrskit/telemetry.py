"""Traces and metrics through OpenTelemetry: the reference's Application Insights role.

The rest of cqrskit records spans and measurements through the OpenTelemetry
API only, which costs next to nothing until `configure` installs the SDK. The
exporter is chosen by environment: none, console, OTLP or Azure Monitor; the
metrics are always readable in Prometheus format at /metrics.

A command's trace context travels in its events' metadata (`traceparent`), so
one trace runs from the HTTP request through the stream to the view update,
across processes.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Observation
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span, StatusCode

from cqrskit.errors import CqrskitError
from cqrskit.messages import Envelope
from cqrskit.status import Lag, Status

log = logging.getLogger(__name__)

tracer = trace.get_tracer("cqrskit")
meter = metrics.get_meter("cqrskit")

commands = meter.create_counter(
    "cqrskit.commands", unit="{command}",
    description="Commands handled, by command and outcome",
)
command_duration = meter.create_histogram(
    "cqrskit.command.duration", unit="s", description="Time to handle a command",
)
events_appended = meter.create_counter(
    "cqrskit.events.appended", unit="{event}", description="Events written to the command DB",
)
events_published = meter.create_counter(
    "cqrskit.events.published", unit="{event}", description="Events the relay published",
)
events_projected = meter.create_counter(
    "cqrskit.events.projected", unit="{event}",
    description="Events an update processor committed to the views, by projection",
)
queries = meter.create_counter(
    "cqrskit.queries", unit="{query}", description="Queries answered, by query and outcome",
)
query_duration = meter.create_histogram(
    "cqrskit.query.duration", unit="s", description="Time to answer a query",
)


# ------------------------------------------------------- operations


def outcome_of(error: BaseException) -> str:
    """`ok`, an expected refusal named after its error (`not_found`), or `error`."""
    if isinstance(error, CqrskitError):
        return re.sub(r"(?<!^)(?=[A-Z])", "_", type(error).__name__).lower()
    return "error"


@contextmanager
def operation(
    name: str, counter: Counter, duration: Histogram, attributes: dict[str, Any]
) -> Iterator[Span]:
    """A span around one command or query, counted and timed by outcome.

    A refusal the client caused (a CqrskitError: 4xx) is an outcome, not a
    failure of the service: only unexpected errors mark the span as failed.
    """
    started = time.perf_counter()
    outcome = "ok"
    token = None
    if dropped():
        span = trace.get_current_span()
    else:
        # start_span and attach rather than start_as_current_span: the same, minus two
        # generator-based context managers (a few microseconds on every command).
        span = tracer.start_span(
            name, attributes=attributes, record_exception=False, set_status_on_exception=False
        )
        token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield span
    except BaseException as error:
        outcome = outcome_of(error)
        span.set_attribute("cqrskit.outcome", outcome)
        if outcome == "error":
            span.record_exception(error)
            span.set_status(StatusCode.ERROR, f"{type(error).__name__}: {error}")
        raise
    finally:
        if token is not None:
            otel_context.detach(token)
            span.end()
        measured = {**attributes, "outcome": outcome}
        counter.add(1, measured)
        duration.record(time.perf_counter() - started, measured)


# ------------------------------------------------------- trace context


def trace_headers() -> dict[str, str]:
    """The current trace context as W3C headers, to store in an event's metadata."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def context_of(metadata: Mapping[str, Any]) -> Context:
    """The trace context an event's metadata carries (an empty one if none)."""
    return propagate.extract({k: v for k, v in metadata.items() if isinstance(v, str)})


def tracing() -> bool:
    """Whether spans are recorded at all; without the SDK, skip the work of making them."""
    return isinstance(trace.get_tracer_provider(), TracerProvider)


def dropped() -> bool:
    """Whether a span made now would surely be dropped: the current trace was not
    sampled and the sampler follows the parent's decision.

    Most traces are dropped when a ratio sampler keeps one in ten, and making their
    spans anyway, only to drop them, cost more than a tenth of a command's CPU.
    """
    context = trace.get_current_span().get_span_context()
    return context.is_valid and not context.trace_flags.sampled and _follows_parent()


def step_span(name: str, attributes: dict[str, Any]) -> AbstractContextManager[Any]:
    """A span for a step inside an operation, unless it would surely be dropped."""
    if dropped():
        return nullcontext()
    return tracer.start_as_current_span(name, attributes=attributes)


def _unsampled(metadata: Mapping[str, Any]) -> bool:
    """Whether an event's stored trace context says its trace was not sampled, read
    without parsing the context (the W3C trace flags end the `traceparent`)."""
    value = metadata.get("traceparent")
    return isinstance(value, str) and value.endswith("-00")


def _follows_parent() -> bool:
    """Whether the sampler drops every child of a span that was not sampled, as the
    standard parent-based samplers do (the SDK's default among them)."""
    global _sampler_checked
    sampler = getattr(trace.get_tracer_provider(), "sampler", None)
    if sampler is None:
        return False
    if _sampler_checked[0] is not sampler:
        description = sampler.get_description()
        _sampler_checked = (sampler, (
            description.startswith("ParentBased{")
            and "remoteParentNotSampled:AlwaysOffSampler" in description
            and "localParentNotSampled:AlwaysOffSampler" in description
        ) or description == "AlwaysOffSampler")
    return _sampler_checked[1]


_sampler_checked: tuple[object, bool] = (None, False)


MAX_LINKS = 32


def batch_span(
    name: str, envelopes: Sequence[Envelope], attributes: dict[str, Any]
) -> AbstractContextManager[Any]:
    """A span for work on a batch of events, in the trace of the batch's first event
    and linked to the traces of the next few (spans have one parent, but many links)."""
    if not tracing() or not envelopes:
        return nullcontext()
    if _unsampled(envelopes[0].metadata) and _follows_parent():
        return nullcontext()  # its spans would be dropped
    return _batch_span(name, envelopes, attributes)


@contextmanager
def _batch_span(
    name: str, envelopes: Sequence[Envelope], attributes: dict[str, Any]
) -> Iterator[Span]:
    attributes = {**attributes, "cqrskit.events": len(envelopes),
                  "cqrskit.first_position": envelopes[0].position,
                  "cqrskit.last_position": envelopes[-1].position}
    span = tracer.start_span(name, context=context_of(envelopes[0].metadata),
                             attributes=attributes)
    if span.is_recording():
        _link(span, envelopes[1:])
    # attach and detach rather than use_span: the same, minus a generator-based
    # context manager per batch.
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield span
    except BaseException as error:
        span.record_exception(error)
        span.set_status(StatusCode.ERROR, f"{type(error).__name__}: {error}")
        raise
    finally:
        otel_context.detach(token)
        span.end()


def _link(span: Span, envelopes: Sequence[Envelope]) -> None:
    """Link the span to the traces of up to MAX_LINKS of the events, those that were
    sampled: a trace that was not has no span to link to, and reading each event's
    trace context back from its metadata is the costly part."""
    links = 0
    for envelope in envelopes:
        if _unsampled(envelope.metadata):
            continue
        linked = trace.get_current_span(context_of(envelope.metadata)).get_span_context()
        if linked.is_valid:
            span.add_link(linked)
            links += 1
            if links == MAX_LINKS:
                return


# ------------------------------------------------------- lag, from status snapshots

_latest: Status | None = None


def publish_status(status: Status) -> None:
    """Make this snapshot what the lag gauges report at the next collection."""
    global _latest
    _latest = status


def _gauge(observe: Callable[[Status], Iterable[Observation]]) -> Callable[..., Any]:
    """A gauge callback over the latest snapshot (none before the first read)."""

    def callback(options: CallbackOptions) -> Iterable[Observation]:
        return observe(_latest) if _latest is not None else ()

    return callback


def _per_lag(value: Callable[[Lag], float]) -> Callable[..., Any]:
    return _gauge(lambda status: [
        Observation(value(lag), {"projection": lag.projection, "partition": lag.partition})
        for lag in status.lags
    ])


meter.create_observable_gauge(
    "cqrskit.projection.lag.events", [_per_lag(lambda lag: lag.events)], unit="{event}",
    description="Events in the log a projection has not applied yet, per partition",
)
meter.create_observable_gauge(
    "cqrskit.projection.lag.seconds", [_per_lag(lambda lag: lag.seconds)], unit="s",
    description="Age of the oldest event a projection has not applied yet, per partition",
)
meter.create_observable_gauge(
    "cqrskit.dead_letters",
    [_gauge(lambda status: [Observation(count, {"projection": projection})
                            for projection, count in status.dead_letters.items()])],
    unit="{event}", description="Events parked in the dead-letter queue, by projection",
)
meter.create_observable_gauge(
    "cqrskit.log.position", [_gauge(lambda status: [Observation(status.last_position)])],
    unit="{event}", description="The last position in the event log",
)


# ------------------------------------------------------- setup

EXPORTERS = ("auto", "none", "console", "otlp", "azure")
_shutdown: list[Callable[[], None]] = []


def choose_exporter(setting: str, environ: Mapping[str, str] = os.environ) -> str:
    """`auto` picks Azure Monitor or OTLP when their standard variables are set."""
    if setting != "auto":
        return setting
    if environ.get("APPLICATIONINSIGHTS_CONNECTION_STRING"):
        return "azure"
    if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        return "otlp"
    return "none"


def configure(exporter: str, service_name: str) -> None:
    """Install the SDK once per process: tracing to `exporter`, metrics for /metrics.

    `service_name` (e.g. cqrskit-api) names the process in the application map,
    unless OTEL_SERVICE_NAME does. A second call does nothing: OpenTelemetry's
    providers are global and can be set only once.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown telemetry exporter {exporter!r}; use one of {EXPORTERS}")
    if _shutdown:
        return
    from opentelemetry.sdk.resources import Resource
    chosen = choose_exporter(exporter)
    attributes = {"service.instance.id": f"{socket.gethostname()}-{os.getpid()}"}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = service_name
    resource = Resource.create(attributes)
    if chosen == "azure":
        _configure_azure(resource)
    else:
        _configure_sdk(chosen, resource)
    sampler = getattr(trace.get_tracer_provider(), "sampler", None)
    log.info("telemetry: %s exporter, service %s, sampler %s", chosen,
             resource.attributes.get("service.name"),
             sampler.get_description() if sampler is not None else "none")


def _configure_sdk(chosen: str, resource: Any) -> None:
    from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    from cqrskit.redaction import RedactingSpanExporter

    span_exporter: SpanExporter | None = None
    span_processor: SpanProcessor | None = None
    if chosen == "otlp":
        from cqrskit.span_export import ProcessSpanProcessor

        # Encoded and sent by a child process, off this process's GIL (span_export.py).
        span_processor = ProcessSpanProcessor(resource.attributes, resource.schema_url)
    elif chosen == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        span_exporter = ConsoleSpanExporter()
    # No exemplars: they would tie each measurement to the current span, a cost on
    # every command that neither /metrics (Prometheus text) nor OTLP users here read.
    meter_provider = MeterProvider(
        metric_readers=_metric_readers(chosen), resource=resource,
        exemplar_filter=AlwaysOffExemplarFilter(),
    )
    metrics.set_meter_provider(meter_provider)
    _shutdown.append(meter_provider.shutdown)
    if span_exporter is not None:
        span_processor = BatchSpanProcessor(RedactingSpanExporter(span_exporter))
    if span_processor is None:
        return  # no tracing SDK at all: spans stay no-ops and cost nothing
    tracer_provider = trace.get_tracer_provider()
    if not isinstance(tracer_provider, TracerProvider):
        tracer_provider = TracerProvider(resource=resource, sampler=default_sampler(chosen))
        trace.set_tracer_provider(tracer_provider)
        _shutdown.append(tracer_provider.shutdown)
    tracer_provider.add_span_processor(span_processor)


# With OTLP and no OTEL_TRACES_SAMPLER, one trace in ten is kept (and a caller's
# sampled trace always): keeping every trace costs about 40% of the commands/s here,
# one in ten about 7% (docs/benchmarks.md, "Telemetry"). The metrics count every
# command either way. Azure Monitor's distro samples by default too.
DEFAULT_SAMPLE_RATIO = 0.1


def default_sampler(chosen: str, environ: Mapping[str, str] = os.environ) -> Any:
    """The sampler cqrskit sets, or None to leave it to OTEL_TRACES_SAMPLER (whose own
    default, for the console exporter, keeps every trace)."""
    if chosen != "otlp" or environ.get("OTEL_TRACES_SAMPLER"):
        return None
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    return ParentBased(TraceIdRatioBased(DEFAULT_SAMPLE_RATIO))


def _metric_readers(chosen: str) -> list[Any]:
    """The Prometheus reader behind /metrics; with OTLP, the same reader exporting its
    aggregation (metric_export.py), unless OTEL_METRICS_EXPORTER=none (the standard
    variable) keeps metrics at /metrics only or the OTLP settings ask for a
    temporality or histogram of their own, which takes a second reader."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    exported = os.environ.get("OTEL_METRICS_EXPORTER", "otlp").strip().lower() != "none"
    if chosen != "otlp" or not exported:
        return [PrometheusMetricReader()]
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    from cqrskit import metric_export

    if not metric_export.shareable():
        return [PrometheusMetricReader(), PeriodicExportingMetricReader(OTLPMetricExporter())]
    interval = float(os.environ.get("OTEL_METRIC_EXPORT_INTERVAL", "60000")) / 1000
    timeout = float(os.environ.get("OTEL_METRIC_EXPORT_TIMEOUT", "30000")) / 1000
    return [metric_export.PrometheusAndOtlpReader(OTLPMetricExporter(), interval, timeout)]


def _configure_azure(resource: Any) -> None:
    try:
        from azure.monitor.opentelemetry import configure_azure_monitor
    except ImportError:
        raise RuntimeError(
            "APPLICATIONINSIGHTS_CONNECTION_STRING is set but Azure Monitor support is not "
            "installed: pip install 'cqrskit[azure]'"
        ) from None
    from cqrskit.redaction import RedactSpans

    configure_azure_monitor(
        resource=resource,
        metric_readers=_metric_readers("azure"),
        # Before Azure Monitor's exporting processor: no secret leaves in a span.
        span_processors=[RedactSpans()],
        # cqrskit instruments its own FastAPI app; live metrics would open a
        # connection of their own that nothing here needs.
        instrumentation_options={"fastapi": {"enabled": False}},
        enable_live_metrics=False,
    )

    def shutdown() -> None:
        for provider in (trace.get_tracer_provider(), metrics.get_meter_provider()):
            stop = getattr(provider, "shutdown", None)
            if stop is not None:
                stop()

    _shutdown.append(shutdown)


def flush() -> None:
    """Send the spans and metrics buffered so far.

    Called when a server's lifespan ends: uvicorn then raises the signal that
    stopped it again, with its default action, so the process ends without running
    `atexit` handlers and `shutdown` would never send the last seconds of spans.
    """
    for provider in (trace.get_tracer_provider(), metrics.get_meter_provider()):
        force_flush = getattr(provider, "force_flush", None)
        if force_flush is not None:
            try:
                force_flush()
            except Exception:
                log.exception("telemetry could not flush")


def shutdown() -> None:
    """Flush what is buffered and stop the exporters (at process exit)."""
    while _shutdown:
        try:
            _shutdown.pop()()
        except Exception:
            log.exception("telemetry did not shut down cleanly")


class TraceIds(logging.Filter):
    """Put the current trace and span ids on every log record.

    A filter on the handler rather than opentelemetry-instrumentation-logging,
    which replaces the process's log record factory for the same two fields.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        record.trace_id = format(context.trace_id, "032x") if context.is_valid else "-"
        record.span_id = format(context.span_id, "016x") if context.is_valid else "-"
        return True
