"""One aggregation of the metrics for both /metrics and OTLP.

OpenTelemetry's SDK aggregates every measurement once per metric reader. With the
Prometheus reader behind /metrics and a periodic OTLP reader beside it, each
counter increment and histogram record on the command path was done twice, about
a twelfth of a command's CPU here (docs/benchmarks.md, "Telemetry"). This reader
is the Prometheus reader, and every export interval it also hands the same
cumulative aggregation to the OTLP exporter, from a thread of its own as the
SDK's periodic reader does.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, attach, detach, set_value
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics.export import MetricExporter, MetricsData

log = logging.getLogger(__name__)


def shareable(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether OTLP can take the Prometheus reader's aggregation: cumulative sums and
    explicit-bucket histograms, OTLP's defaults. A user asking for delta temporality
    or exponential histograms gets a reader of its own, and pays for it."""
    temporality = environ.get("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "")
    histogram = environ.get("OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION", "")
    return (temporality.strip().lower() in ("", "cumulative")
            and histogram.strip().lower() in ("", "explicit_bucket_histogram"))


class PrometheusAndOtlpReader(PrometheusMetricReader):
    """Serves /metrics on each scrape and exports to `exporter` every `interval` s."""

    def __init__(self, exporter: MetricExporter, interval: float, timeout: float) -> None:
        super().__init__()
        self._exporter = exporter
        self._interval = interval
        self._timeout_millis = timeout * 1000
        # collect() calls _receive_metrics in the calling thread: the flag tells an
        # export's collection from a scrape's, which would otherwise queue it for
        # the next scrape.
        self._exporting = threading.local()
        self._export_lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="cqrskit-otlp-metrics",
                                        daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        while not self._stopped.wait(self._interval):
            self.export()

    def export(self) -> None:
        """Collect now and send the result to the exporter (not to /metrics)."""
        self._exporting.active = True
        try:
            self.collect(timeout_millis=self._timeout_millis)
        except Exception:
            log.exception("metrics could not be collected for OTLP")
        finally:
            self._exporting.active = False

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        if not getattr(self._exporting, "active", False):
            super()._receive_metrics(metrics_data, timeout_millis, **kwargs)
            return
        # The exporter's own HTTP requests are not telemetry to record.
        token = attach(set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        try:
            with self._export_lock:
                self._exporter.export(metrics_data, timeout_millis=timeout_millis)
        except Exception:
            log.exception("metrics could not be exported over OTLP")
        finally:
            detach(token)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        self.export()
        return self._exporter.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._thread.join(timeout_millis / 1000)
        self.export()  # the last interval's measurements
        self._exporter.shutdown(timeout_millis=timeout_millis)
        super().shutdown(timeout_millis, **kwargs)
