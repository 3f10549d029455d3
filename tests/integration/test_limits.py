"""Limits over real HTTP: per-caller rate limits (429 + Retry-After), the request time
limit (504, and what it means for a command), filter and page limits, security
headers and CORS. Every server is uvicorn on a socket, on real SQLite files."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from live_server import LiveServer

from cqrskit.api.app import create_app
from cqrskit.api.auth import ApiKeys
from cqrskit.api.headers import DOCS_POLICY
from cqrskit.api.limits import TokenBuckets
from cqrskit.config import Settings
from cqrskit.domains import records
from cqrskit.ports import ViewReader
from cqrskit.registry import Domain, Query, Registry

failing = Domain("failing")


@failing.query
class Boom(Query):
    """Fails unexpectedly: the server answers 500 (written by Starlette's outermost layer)."""

    name: ClassVar[str] = "boom"
    reads: ClassVar[tuple[str, ...]] = ()
    result: ClassVar[Any] = dict

    async def run(self, views: ViewReader) -> Any:
        raise RuntimeError("boom")


def _settings(tmp_path: Path, **values: Any) -> Settings:
    return Settings(
        data_dir=tmp_path, stream="embedded",
        command_db=f"sqlite:///{tmp_path / 'command.db'}",
        query_db=f"sqlite:///{tmp_path / 'query.db'}", status_interval=0.2, **values,
    )


@contextlib.asynccontextmanager
async def _serving(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    registry = Registry([records.domain, failing])
    server = await LiveServer(create_app(settings, registry)).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            yield client
    finally:
        await server.stop()


@contextlib.contextmanager
def _write_locked(path: Path) -> Iterator[None]:
    """Hold the SQLite file's write lock, as a stuck writer would."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def _assert_error(answer: httpx.Response, status: int, code: str, *phrases: str) -> None:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["error"] == code, body
    for phrase in phrases:
        assert phrase in body["message"], (phrase, body)


# ----------------------------------------------------------------- rate limits


async def test_each_caller_has_a_rate_limit_per_scope_answered_429_with_retry_after(
    tmp_path: Path,
) -> None:
    keys = ApiKeys(tmp_path / "keys.json")
    _, first = keys.create("first", ["commands:write", "queries:read"])
    _, second = keys.create("second", ["queries:read"])
    settings = _settings(tmp_path, auth="keys", api_keys_file=tmp_path / "keys.json",
                         rate_limit=0.5, rate_burst=2)
    async with _serving(settings) as client:
        a, b = {"X-API-Key": first}, {"X-API-Key": second}
        for _ in range(2):
            assert (await client.get("/api/query/list", headers=a)).status_code == 200
        limited = await client.get("/api/query/list", headers=a)
        _assert_error(limited, 429, "rate_limited", "0.5 a second", "bursts of 2")
        # At 0.5 a second the next token is 2 s away (whole seconds, rounded up).
        assert limited.headers["Retry-After"] == "2"
        # Another caller, and the same caller's commands, have buckets of their own.
        assert (await client.get("/api/query/list", headers=b)).status_code == 200
        for n in range(2):
            sent = await client.post("/api/command/insert", headers=a,
                                     json={"id": f"r{n}", "data": {}})
            assert sent.status_code == 202, sent.text
        refused = await client.post("/api/command/insert", headers=a,
                                    json={"id": "refused", "data": {}})
        _assert_error(refused, 429, "rate_limited")
        # Probes are never limited.
        for _ in range(10):
            assert (await client.get("/healthz")).status_code == 200
        # A refused request is not counted, so waiting Retry-After is enough.
        await asyncio.sleep(int(limited.headers["Retry-After"]))
        listed = await client.get("/api/query/list", headers={
            **a, "X-Consistency-Token": sent.json()["consistency_token"]})
        assert listed.status_code == 200, listed.text
        # The refused command changed nothing.
        assert [r["id"] for r in listed.json()["items"]] == ["r0", "r1"]


async def test_without_authentication_the_client_address_is_limited(tmp_path: Path) -> None:
    async with _serving(_settings(tmp_path, rate_limit=1, rate_burst=1)) as client:
        assert (await client.get("/api/query/list")).status_code == 200
        limited = await client.get("/api/query/list")
        _assert_error(limited, 429, "rate_limited")
        assert limited.headers["Retry-After"] == "1"


async def test_rate_limits_are_off_by_default(tmp_path: Path) -> None:
    async with _serving(_settings(tmp_path)) as client:
        answers = await asyncio.gather(*(client.get("/api/query/list") for _ in range(60)))
        assert {a.status_code for a in answers} == {200}


def test_idle_buckets_are_dropped_and_the_table_is_bounded() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=2, burst=2, max_keys=3, clock=lambda: now[0])
    assert buckets.take("a") == 0 and buckets.take("a") == 0
    assert buckets.take("a") == pytest.approx(0.5)  # the next token in half a second
    for key in "bcde":
        buckets.take(key)
    assert len(buckets) == 3  # bounded: the least recently used went
    now[0] = 1.0  # every bucket has refilled: the same as no bucket, so dropped
    buckets.take("f")
    assert len(buckets) == 1


# ----------------------------------------------------------------- time limit


async def test_a_request_over_the_time_limit_is_504_and_the_command_outcome_unknown(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path, request_timeout=0.5)
    async with _serving(settings) as client:
        headers = {"Idempotency-Key": "slow-1"}
        with _write_locked(tmp_path / "command.db"):
            started = time.monotonic()
            answer = await client.post("/api/command/insert", headers=headers,
                                       json={"id": "slow", "data": {"n": 1}})
            assert time.monotonic() - started < 5
        _assert_error(answer, 504, "timeout", "within 0.5 s", "may or may not have been applied",
                      "GET /api/commands/slow-1", "same Idempotency-Key")
        assert answer.json()["outcome"] == "unknown"
        assert answer.json()["command_id"] == "slow-1"
        # As the answer says: sending it again with the key applies it at most once.
        again = await client.post("/api/command/insert", headers=headers,
                                  json={"id": "slow", "data": {"n": 1}})
        assert again.status_code == 202, again.text
        status = await client.get("/api/commands/slow-1")
        assert status.status_code == 200, status.text
        listed = await client.get("/api/query/list", headers={
            "X-Consistency-Token": again.json()["consistency_token"]})
        assert [r["id"] for r in listed.json()["items"]] == ["slow"]


async def test_consistency_waits_and_the_status_stream_are_not_cut_by_the_time_limit(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path, request_timeout=0.5, consistency_timeout=1.5)
    async with _serving(settings) as client:
        with _write_locked(tmp_path / "query.db"):
            # The views cannot catch up: the query waits its full 1.5 s, then answers stale.
            sent = await client.post("/api/command/insert", json={"id": "w", "data": {}})
            started = time.monotonic()
            answer = await client.get("/api/query/list", headers={
                "X-Consistency-Token": sent.json()["consistency_token"]})
            waited = time.monotonic() - started
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Consistency"] == "stale"
        assert waited >= 1.4
        # The server-sent status stream runs as long as the client listens.
        events = 0
        started = time.monotonic()
        async with client.stream("GET", "/api/status/stream") as stream:
            async for line in stream.aiter_lines():
                events += line.startswith("data: ")
                if time.monotonic() - started > 1.5:
                    break
        assert events >= 3


# ----------------------------------------------------------------- filters and pages


@pytest.mark.parametrize(("params", "status", "phrase"), [
    pytest.param({"filter": "color:" + "x" * 300}, 400, "at most 256 are allowed", id="long"),
    pytest.param({"filter": "a.b.c.d.e:1"}, 400, "nested too deep", id="deep"),
    pytest.param({"filter": ["color:red", "color:blue"]}, 400, "filtered on once", id="twice"),
    pytest.param({"filter": [f"f{i}:1" for i in range(9)]}, 422, "query.filter", id="nine"),
    pytest.param({"limit": 501}, 422, "less than or equal to 500", id="page-501"),
])
async def test_list_filters_and_page_size_are_bounded(
    tmp_path: Path, params: dict[str, Any], status: int, phrase: str
) -> None:
    async with _serving(_settings(tmp_path)) as client:
        answer = await client.get("/api/query/list", params=params)
        assert answer.status_code == status, answer.text
        assert phrase in answer.json()["message"]
        ok = await client.get("/api/query/list", params={
            "filter": ["a.b.c.d:1", "color:" + "x" * 200], "limit": 500})
        assert ok.status_code == 200, ok.text


# ----------------------------------------------------------------- headers and CORS

SECURITY = {
    "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
    "x-frame-options": "DENY", "cache-control": "no-store",
}


async def test_security_headers_by_default_and_no_cors(tmp_path: Path) -> None:
    settings = _settings(tmp_path, max_body_bytes=1024)
    async with _serving(settings) as client:
        origin = {"Origin": "https://elsewhere.example"}
        answers = {
            "query": await client.get("/api/query/list", headers=origin),
            "dashboard": await client.get("/"),
            "404": await client.get("/nowhere"),
            "413": await client.post("/api/command/insert", content=b"x" * 2048,
                                     headers={"Content-Type": "application/json"}),
            "500": await client.get("/api/failing/query/boom"),
        }
        assert answers["413"].status_code == 413
        assert answers["500"].status_code == 500
        for what, answer in answers.items():
            for name, value in SECURITY.items():
                assert answer.headers.get(name) == value, (what, name, answer.headers)
            assert answer.headers["content-security-policy"] == settings.content_security_policy
            assert "strict-transport-security" not in answer.headers, what
            assert "access-control-allow-origin" not in answer.headers, what
        assert "frame-ancestors 'none'" in settings.content_security_policy
        docs = await client.get("/docs")
        assert docs.headers["content-security-policy"] == DOCS_POLICY
        preflight = await client.options("/api/command/insert", headers={
            **origin, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers


async def test_cors_hsts_and_headers_are_configurable(tmp_path: Path) -> None:
    settings = _settings(tmp_path, cors_origins="https://app.example, https://ops.example",
                         hsts_max_age=31536000, content_security_policy="default-src 'none'")
    async with _serving(settings) as client:
        preflight = await client.options("/api/command/insert", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, x-api-key, idempotency-key, "
                                              "content-type, x-consistency-token"})
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        allowed = preflight.headers["access-control-allow-headers"].lower()
        for header in ("authorization", "x-api-key", "idempotency-key", "x-consistency-token"):
            assert header in allowed
        refused = await client.options("/api/command/insert", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert refused.status_code == 400
        assert "access-control-allow-origin" not in refused.headers
        answer = await client.get("/api/query/list", headers={"Origin": "https://ops.example"})
        assert answer.headers["access-control-allow-origin"] == "https://ops.example"
        exposed = answer.headers["access-control-expose-headers"].lower()
        assert "retry-after" in exposed and "x-consistency" in exposed
        assert answer.headers["strict-transport-security"] == (
            "max-age=31536000; includeSubDomains")
        assert answer.headers["content-security-policy"] == "default-src 'none'"
    async with _serving(_settings(tmp_path, security_headers=False)) as client:
        answer = await client.get("/api/query/list")
        for name in (*SECURITY, "content-security-policy"):
            assert name not in answer.headers, name
