"""OTLP span export from a child process, off the server's GIL.

OpenTelemetry's BatchSpanProcessor encodes spans to protobuf in a thread of the
server's own process; that encoding holds the GIL the event loop needs, and
the finished spans it queues keep their whole object graph alive until then,
which the garbage collector walks again and again. This processor turns each
finished span at once into a plain tuple (atoms the collector skips), and a
sender thread hands batches of them, pickled, to a child process through a
pipe. The child rebuilds the spans and exports them with the OpenTelemetry
OTLP/HTTP exporter itself, so what reaches the collector is the library's own
OTLP, configured by the same OTEL_EXPORTER_OTLP_* variables, and secrets are
redacted there (cqrskit.redaction), off the request path as before.

Hand-written because OpenTelemetry has no out-of-process exporter for Python;
the queue follows the BatchSpanProcessor's rules and settings (OTEL_BSP_*):
bounded, dropping and counting new spans when full, flushed at shutdown.
A child that dies is started again for the next batch (at most once every few
seconds); the spans it had not sent are lost and logged, as a failed export
of the BatchSpanProcessor would lose them.

Run as `python -m cqrskit.span_export`: the child, reading length-prefixed
pickled frames from stdin, answering flush requests on stdout.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle  # nosec B403 # frames between this process and its own child, over a private pipe
import select
import signal
import struct
import subprocess  # nosec B404 # starts this module as the exporting child
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.sdk.environment_variables import (
    OTEL_BSP_MAX_EXPORT_BATCH_SIZE,
    OTEL_BSP_MAX_QUEUE_SIZE,
    OTEL_BSP_SCHEDULE_DELAY,
)
from opentelemetry.sdk.trace import Event, ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.span import TraceFlags, TraceState
from opentelemetry.util.types import Attributes

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
_SPANS, _FLUSH = 0, 1
# A child that dies sooner than this after its start is not started again at once:
# a child that cannot start at all would otherwise be spawned for every batch.
RESTART_INTERVAL = 5.0
# A flat span: name, trace id, span id, trace flags, trace state header, parent
# (span id, remote) or None, kind, start, end, attributes, events, links,
# status code, status description, scope, dropped attributes/events/links.
FlatSpan = tuple[Any, ...]


def _int_setting(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        log.warning("%s=%r is not a number; using %d", name, value, default)
        return default


def flatten(span: ReadableSpan) -> FlatSpan:
    """The span as a tuple of plain values, everything the OTLP encoder reads."""
    context = span.context
    parent = span.parent
    scope = span.instrumentation_scope
    return (
        span.name, context.trace_id, context.span_id, int(context.trace_flags),
        context.trace_state.to_header() if context.trace_state else "",
        (parent.span_id, parent.is_remote) if parent is not None else None,
        span.kind.value, span.start_time, span.end_time,
        dict(span.attributes) if span.attributes else None,
        [(e.name, e.timestamp, dict(e.attributes) if e.attributes else None)
         for e in span.events] or None,
        [(link.context.trace_id, link.context.span_id, int(link.context.trace_flags),
          link.context.is_remote, dict(link.attributes) if link.attributes else None)
         for link in span.links] or None,
        span.status.status_code.value, span.status.description,
        (scope.name, scope.version, scope.schema_url) if scope is not None else None,
        span.dropped_attributes, span.dropped_events, span.dropped_links,
    )


class ProcessSpanProcessor(SpanProcessor):
    """Batches finished spans and sends them to a child process that exports them."""

    def __init__(
        self,
        resource_attributes: Mapping[str, Any],
        resource_schema_url: str = "",
        *,
        schedule_delay: float | None = None,
        max_queue_size: int | None = None,
        max_batch_size: int | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        self._resource = (dict(resource_attributes), resource_schema_url)
        self._delay = (schedule_delay if schedule_delay is not None
                       else _int_setting(OTEL_BSP_SCHEDULE_DELAY, 5000) / 1000)
        self._max_queue = max_queue_size or _int_setting(OTEL_BSP_MAX_QUEUE_SIZE, 2048)
        self._max_batch = min(max_batch_size or _int_setting(OTEL_BSP_MAX_EXPORT_BATCH_SIZE, 512),
                              self._max_queue)
        self._command = list(command or [sys.executable, "-m", "cqrskit.span_export"])
        self.dropped = 0  # spans lost: queue full, or a child that died with them
        self._last_drop_log = 0.0
        self._started_at = 0.0
        self._child: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._start_worker()
        if hasattr(os, "register_at_fork"):
            reinit = weakref.WeakMethod(self._after_fork)

            def after_fork() -> None:
                start = reinit()
                if start is not None:
                    start()

            os.register_at_fork(after_in_child=after_fork)

    def _after_fork(self) -> None:
        # The parent's thread, lock and child are not this process's. Close our copy
        # of the child's pipes, so that the child sees the end of its input when the
        # parent closes its side (nothing is buffered: every frame is flushed).
        child = self._child
        if child is not None:
            for pipe in (child.stdin, child.stdout):
                try:
                    if pipe is not None:
                        pipe.close()
                except OSError:
                    pass
        self._start_worker()

    def _start_worker(self) -> None:
        self._queue: collections.deque[FlatSpan] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._child = None
        self._worker = threading.Thread(target=self._work, name="cqrskit-span-export",
                                        daemon=True)
        self._worker.start()

    # ------------------------------------------------------------- SpanProcessor

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if self._stopping or not span.context.trace_flags.sampled:
            return
        if len(self._queue) >= self._max_queue:
            self._drop(1, "the span queue is full")
            return
        self._queue.append(flatten(span))
        if len(self._queue) >= self._max_batch:
            self._wake.set()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Send every queued span and wait until the child has exported them."""
        deadline = time.monotonic() + timeout_millis / 1000
        with self._lock:
            self._send_queued()
            child = self._child
            if child is None or child.poll() is not None:
                return not self._queue
            try:
                self._write(child, pickle.dumps((_FLUSH, None)))
                return _await_ack(child, deadline)
            except OSError:
                self._lost(child, 0)
                return False

    def shutdown(self) -> None:
        """Send what is queued, let the child export it and exit (up to 30 s)."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        self._worker.join(30)
        with self._lock:
            self._send_queued()
            child, self._child = self._child, None
        if child is None:
            return
        try:
            if child.stdin is not None:
                child.stdin.close()
            child.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            log.warning("span export process did not finish in time; stopping it")
            child.kill()
            child.wait()

    # ------------------------------------------------------------- sending

    def _work(self) -> None:
        while not self._stopping:
            self._wake.wait(self._delay)
            self._wake.clear()
            try:
                with self._lock:
                    self._send_queued()
            except Exception:  # the sender must outlive a bad batch, or spans pile up
                log.exception("could not hand spans to the span export process")

    def _send_queued(self) -> None:
        """Send the queue in batches (the caller holds the lock)."""
        while self._queue:
            count = min(len(self._queue), self._max_batch)
            batch = [self._queue.popleft() for _ in range(count)]
            child = self._running_child()
            if child is None:
                self._drop(count, "the span export process is not running")
                continue
            try:
                self._write(child, pickle.dumps((_SPANS, (self._resource, batch)),
                                                pickle.HIGHEST_PROTOCOL))
            except OSError:
                self._lost(child, count)

    def _running_child(self) -> subprocess.Popen[bytes] | None:
        child = self._child
        if child is not None and child.poll() is None:
            return child
        if child is not None:
            self._lost(child, 0)
        if time.monotonic() - self._started_at < RESTART_INTERVAL and self._started_at:
            return None
        self._started_at = time.monotonic()
        # The child imports this module: make sure it finds the same cqrskit.
        env = dict(os.environ)
        source = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
        try:
            self._child = subprocess.Popen(  # nosec B603 # argv is this python -m cqrskit.span_export: no shell, no outside input
                self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                close_fds=True)
        except OSError:
            log.exception("could not start the span export process %s", self._command)
            return None
        return self._child

    @staticmethod
    def _write(child: subprocess.Popen[bytes], frame: bytes) -> None:
        stdin = child.stdin
        if stdin is None:
            raise BrokenPipeError("the span export process has no input pipe")
        stdin.write(_HEADER.pack(len(frame)))
        stdin.write(frame)
        stdin.flush()

    def _lost(self, child: subprocess.Popen[bytes], count: int) -> None:
        """The child is gone: say so once, count what it took with it."""
        if self._child is child:
            self._child = None
            try:
                code = child.wait(1)
            except subprocess.TimeoutExpired:
                child.kill()
                code = child.wait()
            log.error("the span export process exited (code %s); starting another", code)
        if count:
            self._drop(count, "the span export process exited")

    def _drop(self, count: int, why: str) -> None:
        self.dropped += count
        now = time.monotonic()
        if now - self._last_drop_log > 10:  # a warning per 10 s, not per span
            self._last_drop_log = now
            log.warning("spans dropped (%s): %d so far", why, self.dropped)


def _await_ack(child: subprocess.Popen[bytes], deadline: float) -> bool:
    stdout = child.stdout
    if stdout is None:
        return False
    ready, _, _ = select.select([stdout], [], [], max(0.0, deadline - time.monotonic()))
    return bool(ready) and stdout.readline() == b"\n"


# ------------------------------------------------------------------ the child


def _read_frame(stream: IO[bytes]) -> bytes | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    body = stream.read(size)
    return body if len(body) == size else None


def rebuild(flat: FlatSpan, resource: Any, scopes: dict[Any, Any]) -> ReadableSpan:
    """The ReadableSpan `flatten` made `flat` from, for the OTLP exporter."""
    (name, trace_id, span_id, flags, state, parent, kind, start, end, attributes, events,
     links, code, description, scope, dropped_attributes, dropped_events, dropped_links) = flat
    if scope is not None and scope not in scopes:
        scopes[scope] = InstrumentationScope(scope[0], scope[1], scope[2])

    def attrs(values: dict[str, Any] | None, dropped: int = 0) -> Attributes:
        if not dropped:
            return values
        bounded = BoundedAttributes(attributes=values)
        bounded.dropped = dropped
        return bounded

    event_list: Sequence[Event] = [Event(n, a, timestamp=t) for n, t, a in events or ()]
    link_list: Sequence[Link] = [
        Link(SpanContext(t, s, r, TraceFlags(f)), a) for t, s, f, r, a in links or ()
    ]
    if dropped_events:
        event_list = BoundedList.from_seq(len(event_list), event_list)
        event_list.dropped = dropped_events
    if dropped_links:
        link_list = BoundedList.from_seq(len(link_list), link_list)
        link_list.dropped = dropped_links
    return ReadableSpan(
        name=name,
        context=SpanContext(trace_id, span_id, False, TraceFlags(flags),
                            TraceState.from_header([state]) if state else None),
        parent=SpanContext(trace_id, parent[0], parent[1]) if parent is not None else None,
        resource=resource,
        attributes=attrs(attributes, dropped_attributes),
        events=event_list,
        links=link_list,
        kind=SpanKind(kind),
        status=Status(StatusCode(code), description),
        start_time=start,
        end_time=end,
        instrumentation_scope=scopes.get(scope) if scope is not None else None,
    )


def main() -> None:
    """The child: export every batch read from stdin, until stdin ends."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource

    # The parent decides when to stop (it closes stdin): a Ctrl-C or SIGTERM sent to
    # the whole process group must not kill the child before the last batch is out.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s span export: %(message)s")
    from cqrskit.redaction import RedactingSpanExporter

    # Secrets are redacted here, at export, as the in-process exporters do it.
    exporter = RedactingSpanExporter(OTLPSpanExporter())
    resources: dict[Any, Resource] = {}
    scopes: dict[Any, Any] = {}
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while (frame := _read_frame(stdin)) is not None:
        kind, body = pickle.loads(frame)  # nosec B301 # written by our own parent, through our own pipe
        if kind == _FLUSH:
            stdout.write(b"\n")  # everything before this frame has been exported
            stdout.flush()
            continue
        (attributes, schema_url), batch = body
        key = (tuple(sorted(attributes.items())), schema_url)
        if key not in resources:
            resources[key] = Resource(attributes, schema_url)
        resource = resources[key]
        try:
            exporter.export([rebuild(flat, resource, scopes) for flat in batch])
        except Exception:
            log.exception("could not export %d spans", len(batch))
    exporter.shutdown()


if __name__ == "__main__":
    main()
