"""telemetry: what tracing and metrics cost in commands per second over HTTP.

`cqrskit serve` runs as a subprocess on SQLite (NORMAL) and 8 keep-alive HTTP
connections send InsertRecord commands to it, each waiting for its 202 before
the next, from the `http` workload's load generator (benchmarks.http_load), a
process of its own on plain asyncio streams: an HTTP library in this process
spent more CPU per command than the server, on the same two cores. Cases:
- telemetry none (the default; the baseline): metrics at /metrics, no spans;
- OTLP exporter on, as configured by default: one trace in ten is kept
  (`parentbased_traceidratio`, 0.1), its request, command, append and
  projections as spans, batched and exported over OTLP/HTTP to a receiver that
  reads and discards them; the metrics count every command anyway. The receiver
  is a process of its own, as a collector would be: in the benchmark's process it
  would take the GIL from the load generator's clients and slow the clients, not
  the server;
- the same keeping every trace (`OTEL_TRACES_SAMPLER=parentbased_always_on`).
Each case gets a fresh server, data directory and telemetry setup per run. The
three servers run side by side and take turns: each case gets SLICES slices of
load (a fifth of the size's lag_seconds each), a slice of every case per turn,
the order rotating, each slice starting once the previous one's views have
caught up (untimed), so that the shared machine's changing load falls on all
cases alike.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx

from benchmarks.common import ROOT, Measurement, Size
from benchmarks.http_route import run_load
from benchmarks.servers import free_port, server_process

NAME = "telemetry"
CLIENTS = 8
SLICES = 10
CATCH_UP_SECONDS = 120.0
BASELINE = f"HTTP insert · {CLIENTS} clients · telemetry none"
OTLP = f"HTTP insert · {CLIENTS} clients · OTLP exporter (default: 10% of traces)"
EVERY = f"HTTP insert · {CLIENTS} clients · OTLP exporter, every trace"


class _Discard(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver that reads each export and answers 200."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def _receiver() -> Iterator[str]:
    """The OTLP receiver, in a process of its own (this module's `_Discard`); yields its URL."""
    script = ("import sys; from http.server import ThreadingHTTPServer; "
              "from benchmarks.telemetry import _Discard; "
              "server = ThreadingHTTPServer(('127.0.0.1', 0), _Discard); "
              "print(server.server_address[1], flush=True); server.serve_forever()")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        port = process.stdout.readline().strip()
        if not port:
            raise RuntimeError(f"the OTLP receiver did not start (exit {process.poll()})")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait()


@contextmanager
def _server(workdir: Path, env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    cqrskit = str(Path(sys.executable).parent / "cqrskit")
    with server_process([cqrskit, "serve", "--port", str(port)], {
        "CQRSKIT_DATA_DIR": str(workdir), "CQRSKIT_SQLITE_SYNCHRONOUS": "NORMAL",
        "CQRSKIT_LOG_LEVEL": "WARNING", "CQRSKIT_STATUS_INTERVAL": "0.1", **env,
    }, port) as url:
        yield url


def _caught_up(url: str, since: datetime) -> None:
    """Wait until the server's status, read after `since`, shows no projection behind:
    the slice's projection work must not spill into the next case's slice. Not timed:
    the measure stays the rate at which commands are accepted."""
    deadline = time.monotonic() + CATCH_UP_SECONDS
    with httpx.Client(base_url=url, timeout=10) as client:
        while time.monotonic() < deadline:
            status = client.get("/api/status")
            if status.status_code == 200:
                body = status.json()
                if (datetime.fromisoformat(body["taken_at"]) > since
                        and all(lag["events"] == 0 for lag in body["lags"])):
                    return
            time.sleep(0.05)
    raise RuntimeError(f"{url}: the views did not catch up within {CATCH_UP_SECONDS} s")


def _drive(urls: dict[str, str], slice_seconds: float) -> dict[str, float]:
    """Commands per second for each server, driven in SLICES turns: every case gets a
    slice in each turn, the order rotating, so that a change in the machine's load
    (other processes) hits all cases alike instead of whichever ran at that time."""
    accepted = dict.fromkeys(urls, 0.0)
    elapsed = dict.fromkeys(urls, 0.0)
    names = list(urls)
    for url in urls.values():  # warm up connections and caches, unmeasured
        run_load(url, slice_seconds, connections=CLIENTS, warmup=slice_seconds)
        _caught_up(url, datetime.now(UTC))
    for turn in range(SLICES):
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            result = run_load(urls[name], slice_seconds, connections=CLIENTS, warmup=0.2)
            accepted[name] += result["requests"]
            elapsed[name] += result["seconds"]
            _caught_up(urls[name], datetime.now(UTC))
    return {name: accepted[name] / elapsed[name] for name in names}


def run(size: Size, workdir: Path) -> list[Measurement]:
    with _receiver() as endpoint, contextlib.ExitStack() as servers:
        otlp_env = {"CQRSKIT_TELEMETRY": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
        cases = {
            BASELINE: {"CQRSKIT_TELEMETRY": "none"},
            OTLP: otlp_env,
            EVERY: {**otlp_env, "OTEL_TRACES_SAMPLER": "parentbased_always_on"},
        }
        urls = {}
        for k, (name, env) in enumerate(cases.items()):
            (workdir / str(k)).mkdir()
            urls[name] = servers.enter_context(_server(workdir / str(k), env))
        rates = _drive(urls, size.lag_seconds / 5)
    return [Measurement(NAME, name, rates[name], "cmd/s",
                        baseline=None if name == BASELINE else BASELINE)
            for name in cases]
