"""What every cqrskit server process sets up first: logging and telemetry.

Shared by the command line's roles and the ASGI factory gunicorn imports, so a
process logs and exports the same way however it was started.
"""

from __future__ import annotations

import atexit
import gc
import logging

from cqrskit import telemetry
from cqrskit.config import Settings
from cqrskit.redaction import RedactSecrets


def setup_logging(level: str) -> None:
    """Log lines carry the trace and span ids (to find a line's trace and back), and
    no secret."""
    handler = logging.StreamHandler()
    handler.addFilter(telemetry.TraceIds())
    handler.addFilter(RedactSecrets())
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s [trace %(trace_id)s span %(span_id)s]: %(message)s"
    ))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # httpx logs every request at INFO: one line per forwarded command is noise.
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)


def setup(settings: Settings, role: str) -> None:
    """Logging, and telemetry for a process of `role` (named cqrskit-<role>).

    Raises RuntimeError when the chosen exporter cannot be set up.
    """
    setup_logging(settings.log_level)
    telemetry.configure(settings.telemetry, f"cqrskit-{role}")
    atexit.register(telemetry.shutdown)
    tune_gc(settings.gc_threshold)


def tune_gc(threshold: int) -> None:
    """Collect young objects every `threshold` allocations instead of every 700, and
    leave what the process loaded so far out of every later collection.

    A command allocates a few thousand short-lived objects (the request, pydantic
    models, events, JSON), nearly all freed by reference counting; at Python's 700,
    collections ran several times per command, and each older-generation run walked
    every module, class and route loaded at startup. With 10,000 and the startup
    objects frozen, a server spent about a fifth less CPU per command here
    (docs/benchmarks.md, "Garbage collection"). Cycles are still collected, later.
    """
    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(threshold, second, third)
