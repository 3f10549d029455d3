"""telemetry: what tracing and metrics cost in commands per second over HTTP.

`cqrskit serve` runs as a subprocess on SQLite (NORMAL) and 8 HTTP clients send
InsertRecord commands to it, each waiting for its 202 before the next. Cases:
- telemetry none (the default; the baseline): metrics at /metrics, no spans;
- OTLP exporter on: every request, command, append and projection is a span,
  batched and exported over OTLP/HTTP to a receiver that reads and discards
  them. The receiver is a process of its own, as a collector would be: in the
  benchmark's process it would take the GIL from the load generator's clients
  and slow the clients, not the server;
- the same with one trace in ten kept (`parentbased_traceidratio`, 0.1): the
  usual production setting, since the metrics count every command anyway.
Each case gets a fresh server, data directory and telemetry setup per run. The
three servers run side by side and take turns: each case's commands are sent
in SLICES slices, a slice of every case per turn, the order rotating, each
the next slice starting once the views have caught up (untimed), so that the
shared machine's changing load falls on all cases alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import ROOT, Measurement, Size, payload
from benchmarks.servers import free_port, server_process

NAME = "telemetry"
CLIENTS = 8
SLICES = 10
_BODIES = [{"data": payload(i)} for i in range(256)]
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
        "CQRSKIT_LOG_LEVEL": "WARNING", **env,
    }, port) as url:
        yield url


async def _slice(client: httpx.AsyncClient, commands: int) -> list[dict[str, Any]]:
    """`commands` InsertRecords from CLIENTS clients, each one at a time; the answer
    to each client's last command."""
    shares = [commands // CLIENTS + (k < commands % CLIENTS) for k in range(CLIENTS)]

    async def one_client(share: int, offset: int) -> dict[str, Any]:
        written: dict[str, Any] = {}
        for i in range(share):
            answer = await client.post("/api/command/insert",
                                       json=_BODIES[(offset + i) % len(_BODIES)])
            if answer.status_code != 202:
                raise RuntimeError(f"{answer.status_code}: {answer.text}")
            written = answer.json()
        return written

    return await asyncio.gather(*(one_client(share, 37 * k) for k, share in enumerate(shares)))


async def _caught_up(client: httpx.AsyncClient, last: list[dict[str, Any]]) -> None:
    """Wait until the views hold the slice's last commands (a read with their
    consistency tokens), so that no server's projection work spills into the next
    case's slice. Not timed: the views lag behind the commands in every case, and
    the measure is, as before, the rate at which commands are accepted."""
    for written in last:
        if written:
            read = await client.get("/api/query/get", params={"id": written["id"]},
                                    headers={"X-Consistency-Token": written["consistency_token"]})
            if read.status_code != 200:
                raise RuntimeError(f"{read.status_code}: {read.text}")


async def _drive(urls: dict[str, str], commands: int) -> dict[str, float]:
    """Commands per second for each server, driven in SLICES turns: every case gets a
    slice in each turn, the order rotating, so that a change in the machine's load
    (other processes) hits all cases alike instead of whichever ran at that time."""
    # Idle while the other cases run, a connection would be closed by the server
    # (uvicorn keeps one 5 s) just as it is reused: the client lets it go first.
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS,
                          keepalive_expiry=1)
    clients = {name: httpx.AsyncClient(base_url=url, limits=limits, timeout=30)
               for name, url in urls.items()}
    elapsed = dict.fromkeys(urls, 0.0)
    names = list(urls)
    try:
        for client in clients.values():  # warm up connections and caches, unmeasured
            await _caught_up(client, await _slice(client, 8 * CLIENTS))
        for turn in range(SLICES):
            for name in names[turn % len(names):] + names[:turn % len(names)]:
                started = time.perf_counter()
                last = await _slice(clients[name], commands // SLICES)
                elapsed[name] += time.perf_counter() - started
                await _caught_up(clients[name], last)
    finally:
        for client in clients.values():
            await client.aclose()
    return {name: commands // SLICES * SLICES / elapsed[name] for name in names}


def run(size: Size, workdir: Path) -> list[Measurement]:
    commands = size.append_commands
    with _receiver() as endpoint, contextlib.ExitStack() as servers:
        otlp_env = {"CQRSKIT_TELEMETRY": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
        cases = {
            BASELINE: {"CQRSKIT_TELEMETRY": "none"},
            OTLP: otlp_env,
            SAMPLED: {**otlp_env, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                      "OTEL_TRACES_SAMPLER_ARG": "0.1"},
        }
        urls = {}
        for k, (name, env) in enumerate(cases.items()):
            (workdir / str(k)).mkdir()
            urls[name] = servers.enter_context(_server(workdir / str(k), env))
        rates = asyncio.run(_drive(urls, commands))
    return [Measurement(NAME, name, rates[name], "cmd/s",
                        baseline=None if name == BASELINE else BASELINE)
            for name in cases]
