"""telemetry: what tracing and metrics cost in commands per second over HTTP.

`cqrskit serve` runs as a subprocess on SQLite (NORMAL) and 8 HTTP clients send
InsertRecord commands to it, each waiting for its 202 before the next. Cases:
- telemetry none (the default; the baseline): metrics at /metrics, no spans;
- OTLP exporter on: every request, command, append and projection is a span,
  batched and exported over OTLP/HTTP to a receiver that discards them (in this
  benchmark's process, so the export's network cost is paid here too);
- the same with one trace in ten kept (`parentbased_traceidratio`, 0.1): the
  usual production setting, since the metrics count every command anyway.
Each case gets a fresh server, data directory and telemetry setup, interleaved
per run so both share the machine's state.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from benchmarks.common import Measurement, Size, payload
from benchmarks.servers import free_port, server_process

NAME = "telemetry"
CLIENTS = 8
BASELINE = f"HTTP insert · {CLIENTS} clients · telemetry none"
OTLP = f"HTTP insert · {CLIENTS} clients · OTLP exporter"
SAMPLED = f"HTTP insert · {CLIENTS} clients · OTLP exporter, 10% of traces"


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
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Discard)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def _server(workdir: Path, env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    cqrskit = str(Path(sys.executable).parent / "cqrskit")
    with server_process([cqrskit, "serve", "--port", str(port)], {
        "CQRSKIT_DATA_DIR": str(workdir), "CQRSKIT_SQLITE_SYNCHRONOUS": "NORMAL",
        "CQRSKIT_LOG_LEVEL": "WARNING", **env,
    }, port) as url:
        yield url


async def _drive(url: str, commands: int) -> float:
    """Commands per second from CLIENTS clients, each one command at a time."""
    bodies = [{"data": payload(i)} for i in range(256)]
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def one_client(share: int) -> None:
            for i in range(share):
                answer = await client.post("/api/command/insert", json=bodies[i % len(bodies)])
                if answer.status_code != 202:
                    raise RuntimeError(f"{answer.status_code}: {answer.text}")

        await one_client(50)  # warm up connections and caches, unmeasured
        shares = [commands // CLIENTS + (k < commands % CLIENTS) for k in range(CLIENTS)]
        started = time.perf_counter()
        await asyncio.gather(*(one_client(share) for share in shares))
        return commands / (time.perf_counter() - started)


def _case(name: str, workdir: Path, commands: int, env: dict[str, str]) -> Measurement:
    workdir.mkdir()
    with _server(workdir, env) as url:
        rate = asyncio.run(_drive(url, commands))
    baseline = None if name == BASELINE else BASELINE
    return Measurement(NAME, name, rate, "cmd/s", baseline=baseline)


def run(size: Size, workdir: Path) -> list[Measurement]:
    commands = size.append_commands
    with _receiver() as endpoint:
        otlp_env = {"CQRSKIT_TELEMETRY": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
        return [
            _case(BASELINE, workdir / "none", commands, {"CQRSKIT_TELEMETRY": "none"}),
            _case(OTLP, workdir / "otlp", commands, otlp_env),
            _case(SAMPLED, workdir / "sampled", commands, {
                **otlp_env, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0.1",
            }),
        ]
