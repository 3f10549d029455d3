"""Keep secrets out of logs, telemetry and printed settings.

Secrets reach text in a few known shapes: a password in a URL
(`postgresql://user:pass@host`), a key in a connection string
(`AccountKey=...;`, `SharedAccessKey=...`), a key or signature in a query string
(`?key=...`, `&sig=...`), a bearer token or JWT, and a cqrskit API key
(`cqk_<id>_<secret>`). `redact` replaces each secret with `***` and leaves the
rest (host, user, key id) readable, so a log line still says what it was about.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import Status

MASK = "***"

# Each pattern's group `p` is kept; the rest of its match is the secret.
_PATTERNS: list[re.Pattern[str]] = [
    # scheme://user:password@host, scheme://token@host (NATS tokens, Kafka SASL)
    re.compile(r"(?P<p>[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*:)[^@\s/]+(?=@)"),
    re.compile(r"(?P<p>[A-Za-z][A-Za-z0-9+.-]*://)[^:/?#@\s]+(?=@)"),
    # key=value secrets in connection strings (;) and query strings (? &)
    re.compile(
        r"(?P<p>(?<![A-Za-z0-9_])(?:AccountKey|SharedAccessKey|SharedAccessSignature|"
        r"password|pwd|passwd|secret|client_secret|token|access_token|api_key|apikey|"
        r"key|sig|signature|code)=)[^;&\s\"']+", re.IGNORECASE),
    re.compile(r"(?P<p>\bBearer\s+)[A-Za-z0-9\-._~+/]+=*", re.IGNORECASE),
    # A JWT anywhere (header.payload.signature, the first two base64url JSON).
    re.compile(r"(?P<p>)\beyJ[A-Za-z0-9_-]*\.eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*"),
    # cqrskit API keys: the id stays (it names the key), the secret goes.
    re.compile(r"(?P<p>\bcqk_[A-Za-z0-9]+_)[A-Za-z0-9_-]+"),
]


# Every pattern above needs one of these: most text (span names, ids, positions) has
# none, and one scan for them is cheaper than a pass of each pattern.
_ANY_SECRET = re.compile(r"://|=|bearer|eyJ|cqk_", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with every secret of a known shape replaced by ***."""
    if not _ANY_SECRET.search(text):
        return text
    for pattern in _PATTERNS:
        text = pattern.sub(_mask, text)
    return text


def _mask(match: re.Match[str]) -> str:
    return match.group("p") + MASK


def redact_value(value: Any) -> Any:
    """A value as it may be shown: strings redacted, containers walked."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(v) for v in value]
    return value


class RedactSecrets(logging.Filter):
    """Redact each log record's message and traceback before any handler writes it.

    On a handler (not a logger), so that it sees the records of every logger
    that reaches that handler, uvicorn's and libraries' included. The message is
    formatted here once and its arguments dropped, as a formatter would have
    used them; a traceback is rendered here too, so the redacted text is what
    the formatter prints.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def protect(*loggers: logging.Logger) -> None:
    """Add RedactSecrets to every handler of `loggers` (default: the root and every
    logger that has handlers of its own), once each."""
    chosen = list(loggers) or [logging.getLogger(), *(
        logger for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger) and logger.handlers
    )]
    for logger in chosen:
        for handler in logger.handlers:
            if not any(isinstance(f, RedactSecrets) for f in handler.filters):
                handler.addFilter(RedactSecrets())


class RedactingSpanExporter(SpanExporter):
    """Hand spans on to `exporter` with secrets redacted from their attributes, event
    attributes (an exception's message and stack trace) and status description.

    Spans are redacted at export, off the request path: a span is immutable once
    ended, so each one is copied with the redacted values.
    """

    def __init__(self, exporter: SpanExporter) -> None:
        self.exporter = exporter

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.exporter.export([_redacted_span(span) for span in spans])

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


class RedactSpans(SpanProcessor):
    """Redact each ended span in place, for the processors registered after it.

    For the exporter cqrskit cannot wrap: Azure Monitor's, which
    `configure_azure_monitor` sets up behind the span processors it is given. It
    writes the span's own fields (`_attributes`, `_events`, `_status`), as a
    processor running before export is the only place left to change them.
    """

    def on_end(self, span: ReadableSpan) -> None:
        redacted = _redacted_span(span)
        span._attributes = redacted.attributes
        span._events = redacted.events
        span._status = redacted.status


def _redacted_span(span: ReadableSpan) -> ReadableSpan:
    status = span.status
    if status.description:
        status = Status(status.status_code, redact(status.description))
    return ReadableSpan(
        name=span.name, context=span.context, parent=span.parent, resource=span.resource,
        attributes=redact_value(dict(span.attributes or {})),
        events=[Event(e.name, redact_value(dict(e.attributes or {})), e.timestamp)
                for e in span.events],
        links=span.links, kind=span.kind, status=status, start_time=span.start_time,
        end_time=span.end_time, instrumentation_scope=span.instrumentation_scope,
    )
