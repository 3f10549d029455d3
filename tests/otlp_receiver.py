"""An OTLP/HTTP receiver on a free port, for tests: keeps every request, and decodes
every trace export (the OTLP protobuf definitions) into spans with their service's name."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    span: ProtoSpan

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_span_id(self) -> str:
        return self.span.parent_span_id.hex()


class OtlpReceiver:
    """Keeps every POST's path and (unzipped) body in `received`, and decodes the trace
    exports into `spans`. It answers as an OTLP collector does, or with `answer` (JSON)
    when standing in for another ingestion endpoint, such as Application Insights'."""

    def __init__(self, answer: bytes | None = None) -> None:
        self._spans: list[ReceivedSpan] = []
        self.received: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        receiver = self
        content_type = "application/x-protobuf" if answer is None else "application/json"
        if answer is None:
            answer = ExportTraceServiceResponse().SerializeToString()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                with receiver._lock:
                    receiver.received.append((self.path, body))
                if self.path == "/v1/traces" and content_type == "application/x-protobuf":
                    receiver._take(ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _take(self, request: ExportTraceServiceRequest) -> None:
        received = []
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            service = attributes.get("service.name", "?")
            for scope_spans in resource_spans.scope_spans:
                received += [ReceivedSpan(service, s) for s in scope_spans.spans]
        with self._lock:
            self._spans += received

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def names(self) -> list[str]:
        return [s.name for s in self.spans]

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]


@contextmanager
def otlp_receiver(answer: bytes | None = None) -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver(answer)
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
