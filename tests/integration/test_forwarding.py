"""`cqrskit api` forwarding to real command-handler and query-handler servers over HTTP.

Every service is a real uvicorn server on a socket of its own (in this test's
event loop), on shared SQLite files, with an update processor runtime between
them, exactly the roles `cqrskit up --distributed` starts as processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI
from live_server import LiveServer

from cqrskit.api.app import create_app
from cqrskit.bootstrap import open_runtime
from cqrskit.config import Settings
from cqrskit.domains import records
from cqrskit.registry import Registry


def _settings(tmp_path: Path, **values: Any) -> Settings:
    return Settings(
        data_dir=tmp_path, stream="embedded",
        command_db=f"sqlite:///{tmp_path / 'command.db'}",
        query_db=f"sqlite:///{tmp_path / 'query.db'}",
        lease_ttl=2, lease_heartbeat=0.2, consistency_timeout=5, **values,
    )


def _dead_url() -> str:
    """A URL on which nothing listens (the port was free a moment ago)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@dataclass
class Topology:
    api: httpx.AsyncClient
    api_server: LiveServer
    commands: LiveServer
    queries: LiveServer
    command_db: Path
    servers: contextlib.AsyncExitStack

    async def serve(self, app: FastAPI) -> LiveServer:
        server = await LiveServer(app).start()
        self.servers.push_async_callback(server.stop)
        return server

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        conn = sqlite3.connect(self.command_db)
        try:
            rows = conn.execute("SELECT type, metadata FROM events ORDER BY position").fetchall()
        finally:
            conn.close()
        return [(kind, orjson.loads(metadata)) for kind, metadata in rows]


@pytest.fixture
async def topology(tmp_path: Path) -> AsyncIterator[Topology]:
    """command-handler, query-handler, an update processor, and the api forwarding to both."""
    registry = Registry([records.domain])
    base = _settings(tmp_path)
    async with contextlib.AsyncExitStack() as stack:
        # Servers stop in reverse order: each restores the signal handlers it replaced.
        commands = await LiveServer(create_app(base, registry, role="command-handler")).start()
        stack.push_async_callback(commands.stop)
        queries = await LiveServer(create_app(base, registry, role="query-handler")).start()
        stack.push_async_callback(queries.stop)
        processor = await open_runtime(base, registry, role="update-processor")
        stack.push_async_callback(processor.close)
        processor.start()
        forwarding = _settings(
            tmp_path, command_handler_url=commands.url, query_handler_url=queries.url
        )
        api_server = await LiveServer(create_app(forwarding, registry, role="api")).start()
        stack.push_async_callback(api_server.stop)
        api = await stack.enter_async_context(
            httpx.AsyncClient(base_url=api_server.url, timeout=10)
        )
        yield Topology(api, api_server, commands, queries, tmp_path / "command.db", stack)


async def test_a_command_through_the_api_is_read_back_through_the_api(
    topology: Topology,
) -> None:
    api = topology.api
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    answer = await api.post(
        "/api/command/insert", json={"id": "r1", "data": {"color": "red"}},
        headers={"X-Correlation-Id": "corr-1", "traceparent": traceparent},
    )
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["id"] == "r1" and body["version"] == 1
    assert answer.headers["Location"] == f"/api/commands/{body['command_id']}"
    assert answer.headers["Content-Type"] == "application/json"

    got = await api.get(
        "/api/query/get", params={"id": "r1"},
        headers={"X-Consistency-Token": body["consistency_token"]},
    )
    assert got.status_code == 200, got.text
    assert got.headers["X-Consistency"] == "fresh"
    assert got.json()["data"] == {"color": "red"}

    status = await api.get(answer.headers["Location"])
    assert status.status_code == 200 and status.json()["status"] == "projected"
    # The request headers reached the command handler: they are in the event's metadata.
    [(kind, metadata)] = topology.events()
    assert kind == "RecordInserted"
    # The trace continues: same trace id (the span id is the caller's, or the command
    # span's when a tracing SDK is set up in this process by an earlier test).
    assert metadata["correlation_id"] == "corr-1"
    assert metadata["traceparent"].split("-")[1] == traceparent.split("-")[1]

    missing = await api.get("/api/query/get", params={"id": "nobody"})
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"


async def test_an_idempotent_replay_passes_through(topology: Topology) -> None:
    api = topology.api
    command = {"id": "r2", "data": {"n": 1}}
    first = await api.post("/api/command/insert", json=command, headers={"Idempotency-Key": "k-2"})
    again = await api.post("/api/command/insert", json=command, headers={"Idempotency-Key": "k-2"})
    assert first.status_code == again.status_code == 202
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert len(topology.events()) == 1

    reused = await api.post(
        "/api/command/insert", json={"id": "r3", "data": {}}, headers={"Idempotency-Key": "k-2"}
    )
    assert reused.status_code == 409 and reused.json()["error"] == "idempotency_key_reused"


async def test_a_409_from_the_handler_passes_through_with_its_body(topology: Topology) -> None:
    api = topology.api
    assert (await api.post("/api/command/insert", json={"id": "r4", "data": {}})).is_success
    stale = await api.post(
        "/api/command/update", json={"id": "r4", "data": {"n": 2}, "expected_version": 7}
    )
    assert stale.status_code == 409
    assert stale.json() == {
        "error": "conflict",
        "message": "stream 'r4' is at version 1, not the expected 7",
        "current_version": 1,
        "expected_version": 7,
    }


BAD_REQUESTS: list[tuple[str, str, dict[str, Any], int]] = [
    ("POST", "/api/command/insert", {"content": b"{not json", "headers": {
        "Content-Type": "application/json"}}, 400),
    ("POST", "/api/command/insert", {"json": {"data": {}, "surprise": 1}}, 422),
    ("POST", "/api/command/insert", {"json": {"data": {}, "id": "../etc"}}, 422),
    ("POST", "/api/command/insert", {"content": b"data=1", "headers": {
        "Content-Type": "application/x-www-form-urlencoded"}}, 415),
    ("POST", "/api/command/insert", {"json": {"data": {"x": "y" * 2_000_000}}}, 413),
    ("POST", "/api/command/insert", {"json": {"data": {}}, "headers": {
        "Idempotency-Key": "not a valid key!"}}, 422),
    ("GET", "/api/query/get", {}, 422),
    ("GET", "/api/query/list", {"params": {"limit": "0"}}, 422),
    ("GET", "/api/query/get", {"params": {"id": "r1"}, "headers": {
        "X-Consistency-Token": "x" * 41}}, 422),
    ("GET", "/api/commands/bad%20id", {}, 422),
]


async def test_bad_input_is_refused_by_the_api_without_reaching_a_handler(
    tmp_path: Path,
) -> None:
    """The API forwards to URLs where nothing listens: every bad request still gets its
    4xx (not the 503 of an unreachable handler), so none was forwarded."""
    dead_commands, dead_queries = _dead_url(), _dead_url()
    settings = _settings(
        tmp_path, command_handler_url=dead_commands, query_handler_url=dead_queries
    )
    server = await LiveServer(create_app(settings, Registry([records.domain]), role="api")).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as api:
            for method, path, kwargs, status in BAD_REQUESTS:
                answer = await api.request(method, path, **kwargs)
                assert answer.status_code == status, (path, kwargs, answer.text)
                assert set(answer.json()) >= {"error", "message"}

            # A good request is forwarded, and the dead handler is a 503 naming its URL.
            down = await api.post("/api/command/insert", json={"data": {}})
            assert down.status_code == 503
            assert down.json()["error"] == "unavailable"
            assert f"the command handler at {dead_commands} cannot be reached" in (
                down.json()["message"])
            assert down.headers["Retry-After"] == "1"
            down = await api.get("/api/query/get", params={"id": "r1"})
            assert down.status_code == 503 and dead_queries in down.json()["message"]

            ready = await api.get("/readyz")
            assert ready.status_code == 503
            # An API that forwards everything opens no store: only the handlers are checked.
            assert set(ready.json()["checks"]) == {"command_handler", "query_handler"}
    finally:
        await server.stop()
    assert not (tmp_path / "command.db").exists() and not (tmp_path / "query.db").exists()


async def test_bad_input_never_reaches_a_live_handler(topology: Topology) -> None:
    for method, path, kwargs, status in BAD_REQUESTS:
        answer = await topology.api.request(method, path, **kwargs)
        assert answer.status_code == status, (path, answer.text)
    assert topology.events() == []


async def test_a_stopped_handler_is_a_503_and_the_api_is_not_ready(topology: Topology) -> None:
    api = topology.api
    ready = await api.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"command_handler": "ok", "query_handler": "ok"}

    await topology.commands.stop()
    down = await api.post("/api/command/insert", json={"data": {}})
    assert down.status_code == 503
    assert topology.commands.url in down.json()["message"]
    ready = await api.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["command_handler"].startswith("failing:")
    assert ready.json()["checks"]["query_handler"] == "ok"
    # Queries go on without the command handler.
    missing = await api.get("/api/query/get", params={"id": "nobody"})
    assert missing.status_code == 404


async def _silent_server(answer: bytes | None) -> tuple[asyncio.Server, str]:
    """A TCP server that reads a request and then sends `answer`, or nothing at all."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if answer is None:
            await reader.read()  # until the client gives up and hangs up
        else:
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def test_a_handler_that_does_not_answer_in_time_is_a_503(tmp_path: Path) -> None:
    hanging, hanging_url = await _silent_server(None)
    html = (b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: 10\r\n"
            b"Connection: close\r\n\r\n<h1>x</h1>")
    proxy, proxy_url = await _silent_server(html)
    settings = _settings(
        tmp_path, command_handler_url=proxy_url, query_handler_url=hanging_url,
        handler_timeout=0.3,
    )
    server = await LiveServer(create_app(settings, Registry([records.domain]), role="api")).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as api:
            slow = await api.get("/api/query/get", params={"id": "r1"})
            assert slow.status_code == 503
            assert slow.json()["message"] == (
                f"the query handler at {hanging_url} did not answer within 0.3s; retry later")
            # Not a cqrskit handler (a proxy's error page): 502 in the usual shape.
            odd = await api.post("/api/command/insert", json={"data": {}})
            assert odd.status_code == 502 and odd.json()["error"] == "bad_gateway"
            assert proxy_url in odd.json()["message"]
    finally:
        await server.stop()
        for silent in (hanging, proxy):
            silent.close()


async def test_each_handler_serves_only_its_routes(topology: Topology) -> None:
    async with httpx.AsyncClient(base_url=topology.commands.url) as commands:
        assert (await commands.post("/api/command/insert", json={"data": {}})).status_code == 202
        assert (await commands.get("/api/query/get", params={"id": "x"})).status_code == 404
        assert (await commands.get("/api/commands/x")).status_code == 404
        assert (await commands.get("/readyz")).json()["checks"] == {"command_db": "ok"}
    async with httpx.AsyncClient(base_url=topology.queries.url) as queries:
        assert (await queries.post("/api/command/insert", json={"data": {}})).status_code == 404
        assert (await queries.get("/api/dead-letters")).status_code == 404
        assert (await queries.get("/api/query/stats")).status_code == 200
        assert set((await queries.get("/readyz")).json()["checks"]) == {"command_db", "query_db"}
    # The forwarding API has no query DB: dead letters are managed with the CLI.
    elsewhere = await topology.api.get("/api/dead-letters")
    assert elsewhere.status_code == 404 and elsewhere.json()["error"] == "not_served_here"
    assert "cqrskit dead-letters" in elsewhere.json()["message"]


def test_the_forwarding_api_publishes_the_same_schema(tmp_path: Path) -> None:
    registry = Registry([records.domain])
    served = create_app(_settings(tmp_path), registry).openapi()
    forwarding = create_app(
        _settings(tmp_path, command_handler_url="http://127.0.0.1:1",
                  query_handler_url="http://127.0.0.1:2"),
        registry, role="api",
    ).openapi()
    dead_letters = {path for path in served["paths"] if path.startswith("/api/dead-letters")}
    assert dead_letters and not dead_letters & set(forwarding["paths"])
    assert {p: v for p, v in served["paths"].items() if p not in dead_letters} == (
        forwarding["paths"])
    assert served["components"] == forwarding["components"]
