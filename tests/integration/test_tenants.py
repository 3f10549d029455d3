"""Tenants over real HTTP: two tenants' API keys (and OIDC tokens with a tenant
claim) against one `serve`; neither sees, touches nor collides with the other's
records, idempotency keys, commands or dead letters. docs/security.md#tenants."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from integration_helpers import OpenRuntime, make_ledger
from live_server import LiveServer
from test_auth import AUDIENCE, IdentityProvider

from cqrskit.api.app import create_app
from cqrskit.api.auth import ApiKeys
from cqrskit.bootstrap import open_runtime
from cqrskit.config import Settings
from cqrskit.domains import records
from cqrskit.domains.records import GetStatistics, InsertRecord, ListRecords
from cqrskit.registry import Registry
from cqrskit.tenancy import DEFAULT
from cqrskit.update_processor import rebuild

EVERYTHING = ["commands:write", "queries:read", "admin"]


def _settings(data: Path, **values: Any) -> Settings:
    return Settings(
        data_dir=data, stream="embedded", api_keys_file=data / "keys.json",
        command_db=f"sqlite:///{data / 'command.db'}", query_db=f"sqlite:///{data / 'query.db'}",
        consistency_timeout=5, retry_attempts=1, retry_backoff=0.01, **values,
    )


@dataclass
class Caller:
    """An HTTP client of one tenant; every request waits for its own last write."""

    client: httpx.AsyncClient
    headers: dict[str, str]
    token: str = ""

    async def command(self, name: str, body: dict[str, Any], *, prefix: str = "/api",
                      **headers: str) -> httpx.Response:
        answer = await self.client.post(f"{prefix}/command/{name}", json=body,
                                        headers={**self.headers, **headers})
        if answer.status_code == 202:
            self.token = answer.json()["consistency_token"]
        return answer

    async def query(self, name: str, **params: Any) -> httpx.Response:
        headers = {**self.headers, "X-Consistency-Token": self.token} if self.token else (
            self.headers)
        return await self.client.get(f"/api/query/{name}", params=params, headers=headers)

    async def get(self, path: str) -> httpx.Response:
        return await self.client.get(path, headers=self.headers)

    async def post(self, path: str) -> httpx.Response:
        return await self.client.post(path, headers=self.headers)


@dataclass
class Tenants:
    a: Caller
    b: Caller
    default: Caller  # a key created without --tenant
    idp: IdentityProvider
    ledger: Any
    data: Path

    def caller(self, headers: dict[str, str]) -> Caller:
        return Caller(self.a.client, headers)


async def _serve(stack: contextlib.AsyncExitStack, settings: Settings,
                 registry: Registry) -> LiveServer:
    server = await LiveServer(create_app(settings, registry)).start()
    stack.push_async_callback(server.stop)
    return server


@pytest.fixture
async def tenants(tmp_path: Path) -> AsyncIterator[Tenants]:
    """`serve` with CQRSKIT_AUTH=keys,oidc over the records domain and a ledger domain
    whose projection fails on demand; keys of tenants A and B and of the default one."""
    idp = IdentityProvider()
    ledger = make_ledger()
    registry = Registry([records.domain, *ledger.registry.domains])
    keys = ApiKeys(tmp_path / "keys.json")
    async with contextlib.AsyncExitStack() as stack:
        idp_server = await LiveServer(idp.app()).start()
        stack.push_async_callback(idp_server.stop)
        idp.url = idp_server.url
        settings = _settings(tmp_path, auth="keys,oidc", oidc_issuer=idp.url,
                             oidc_audience=AUDIENCE)
        server = await _serve(stack, settings, registry)
        client = await stack.enter_async_context(
            httpx.AsyncClient(base_url=server.url, timeout=10))
        callers = {}
        for tenant in ("A", "B", None):
            _, key = keys.create(f"key-{tenant}", EVERYTHING, tenant)
            callers[tenant] = Caller(client, {"X-API-Key": key})
        yield Tenants(callers["A"], callers["B"], callers[None], idp, ledger, tmp_path)


async def _ids(caller: Caller, **params: Any) -> list[str]:
    answer = await caller.query("list", **params)
    assert answer.status_code == 200, answer.text
    return [item["id"] for item in answer.json()["items"]]


async def test_a_tenant_sees_none_of_another_tenants_records(tenants: Tenants) -> None:
    a, b, default = tenants.a, tenants.b, tenants.default
    for n in range(3):
        sent = await a.command("insert", {"id": f"a{n}", "data": {"color": "red", "n": n}})
        assert sent.status_code == 202, sent.text
        # The answer names the ids A sent, never a stored (prefixed) one.
        assert sent.json()["id"] == f"a{n}"
        assert "~" not in sent.json()["command_id"] + sent.headers["Location"]
    assert (await b.command("insert", {"id": "b0", "data": {"color": "red"}})).status_code == 202
    assert (await default.command("insert", {"id": "d0", "data": {}})).status_code == 202

    assert await _ids(a) == ["a0", "a1", "a2"]
    assert await _ids(b) == ["b0"]
    assert await _ids(default) == ["d0"]
    # Filters, paging and cursors stay inside the tenant.
    assert await _ids(b, filter="color:red") == ["b0"]
    assert await _ids(b, filter="n:1") == []
    first = await a.query("list", limit=2)
    cursor = first.json()["next_cursor"]
    assert [i["id"] for i in first.json()["items"]] == ["a0", "a1"] and cursor
    assert await _ids(a, limit=2, cursor=cursor) == ["a2"]
    assert await _ids(b, cursor=cursor) == ["b0"]  # A's cursor gives B only B's own
    assert await _ids(default, cursor=cursor) == []  # d0 sorts before a1
    # Another tenant's id is simply not found: 404, as if it did not exist.
    for caller in (b, default):
        missing = await caller.query("get", id="a1")
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    got = await a.query("get", id="a1")
    assert got.status_code == 200 and got.json()["id"] == "a1"
    # Statistics count each tenant's events only.
    for caller, total in ((a, 3), (b, 1), (default, 1)):
        stats = await caller.query("stats")
        assert stats.status_code == 200 and stats.json()["total"] == total
        assert sum(day["total"] for day in stats.json()["by_day"]) == total


async def test_the_same_id_in_two_tenants_is_two_independent_records(
    tenants: Tenants,
) -> None:
    a, b = tenants.a, tenants.b
    assert (await a.command("insert", {"id": "same", "data": {"owner": "A"}})).status_code == 202
    # No conflict: B's "same" is another stream.
    assert (await b.command("insert", {"id": "same", "data": {"owner": "B"}})).status_code == 202
    updated = await b.command("update", {"id": "same", "data": {"owner": "B2"},
                                         "expected_version": 1})
    assert updated.status_code == 202 and updated.json()["version"] == 2
    mine = (await a.query("get", id="same")).json()
    assert mine["data"] == {"owner": "A"} and mine["version"] == 1
    assert (await b.query("get", id="same")).json()["data"] == {"owner": "B2"}
    # B cannot update or delete what only A has: 404, and A's record is untouched.
    assert (await a.command("insert", {"id": "only-a", "data": {"v": 1}})).status_code == 202
    for name, body in (("update", {"id": "only-a", "data": {"v": 2}}),
                       ("delete", {"id": "only-a"})):
        refused = await b.command(name, body)
        assert refused.status_code == 404, refused.text
        assert "only-a" in refused.json()["message"] and "~" not in refused.json()["message"]
    assert (await a.query("get", id="only-a")).json()["data"] == {"v": 1}
    # A conflict names the tenant's own id.
    stale = await b.command("update", {"id": "same", "data": {}, "expected_version": 1})
    assert stale.status_code == 409 and "'same'" in stale.json()["message"]


async def test_idempotency_keys_and_command_ids_are_per_tenant(tenants: Tenants) -> None:
    a, b, default = tenants.a, tenants.b, tenants.default
    first = await a.command("insert", {"data": {"by": "A"}}, **{"Idempotency-Key": "k1"})
    assert first.status_code == 202 and first.json()["command_id"] == "k1"
    # The same key from B, with another body: B's own command, not a 409, not A's answer.
    other = await b.command("insert", {"data": {"by": "B"}}, **{"Idempotency-Key": "k1"})
    assert other.status_code == 202, other.text
    assert "Idempotent-Replayed" not in other.headers
    assert other.json()["id"] != first.json()["id"]
    # ... and with the very same body: still B's own, not a replay of A's.
    same = await default.command("insert", {"data": {"by": "A"}}, **{"Idempotency-Key": "k1"})
    assert same.status_code == 202 and "Idempotent-Replayed" not in same.headers
    assert same.json()["id"] not in (first.json()["id"], other.json()["id"])
    again = await a.command("insert", {"data": {"by": "A"}}, **{"Idempotency-Key": "k1"})
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.json() == first.json()
    reused = await a.command("insert", {"data": {"by": "X"}}, **{"Idempotency-Key": "k1"})
    assert reused.status_code == 409 and "'k1'" in reused.json()["message"]
    # Command status: each tenant finds its own k1; another tenant's id is a 404.
    for caller, answer in ((a, first), (b, other), (default, same)):
        status = await caller.get("/api/commands/k1")
        assert status.status_code == 200 and status.json()["id"] == answer.json()["id"]
    generated = (await a.command("insert", {"data": {}})).headers["Location"]
    assert (await a.get(generated)).status_code == 200
    for caller in (b, default):
        status = await caller.get(generated)
        assert status.status_code == 404 and status.json()["error"] == "not_found"


async def test_dead_letters_are_seen_and_handled_only_by_their_tenant(
    tenants: Tenants,
) -> None:
    a, b, default = tenants.a, tenants.b, tenants.default
    sent = await a.command("add", {"id": "e1", "value": 1, "fail": True}, prefix="/api/ledger")
    assert sent.status_code == 202, sent.text
    status: dict[str, Any] = {}
    for _ in range(200):  # until the projection has parked it
        status = (await a.get(sent.headers["Location"])).json()
        if status["projections"]["entries"] == "parked":
            break
        await asyncio.sleep(0.05)
    assert status["projections"]["entries"] == "parked", status
    items = (await a.get("/api/dead-letters")).json()["items"]
    assert [(d["stream_id"], d["tenant"]) for d in items] == [("e1", "A")]
    parked = items[0]["id"]
    for caller in (b, default):
        assert (await caller.get("/api/dead-letters")).json() == {"items": []}
        for action in ("retry", "skip"):
            refused = await caller.post(f"/api/dead-letters/{parked}/{action}")
            assert refused.status_code == 404, refused.text
    assert len((await a.get("/api/dead-letters")).json()["items"]) == 1  # still parked
    await _status_shows_each_tenant_its_own(a, b, default)
    tenants.ledger.projection.broken = False
    retried = await a.post(f"/api/dead-letters/{parked}/retry")
    assert retried.status_code == 200 and retried.json() == {"applied": 1, "remaining": 0}
    assert (await a.get("/api/dead-letters")).json() == {"items": []}


async def _status_shows_each_tenant_its_own(a: Caller, b: Caller, default: Caller) -> None:
    """/api/status: A sees its dead letter and its event by its own id, B neither;
    the default tenant's admin (the operator) sees everything, stored ids and all."""
    assert (await b.command("insert", {"id": "b1", "data": {}})).status_code == 202
    seen: dict[str, Any] = {}
    for _ in range(100):  # the status is sampled every second
        seen = {name: (await caller.get("/api/status")).json()
                for name, caller in (("a", a), ("b", b), ("operator", default))}
        if all(status["last_position"] == 2 for status in seen.values()):
            break
        await asyncio.sleep(0.1)
    streams = {name: [e["stream_id"] for e in status["recent"]] for name, status in seen.items()}
    assert streams["a"] == ["e1"] and streams["b"] == ["b1"], streams
    assert set(streams["operator"]) == {"~A~e1", "~B~b1"}
    assert seen["a"]["dead_letters"]["entries"] == 1
    assert seen["b"]["dead_letters"]["entries"] == 0
    assert set(seen["b"]["dead_letters_by_tenant"]) <= {"B"}
    assert seen["operator"]["dead_letters_by_tenant"] == {"A": {"entries": 1}}


async def test_an_oidc_token_takes_its_tenant_from_the_claim(
    tenants: Tenants, tmp_path: Path
) -> None:
    idp = tenants.idp
    assert (await tenants.a.command("insert", {"id": "a1", "data": {}})).status_code == 202
    assert (await tenants.default.command("insert", {"id": "d1", "data": {}})).status_code == 202
    scopes = "commands:write queries:read"
    in_a = tenants.caller({"Authorization": f"Bearer {idp.token(tid='A', scp=scopes)}"})
    assert await _ids(in_a) == ["a1"]  # tenant A, whether by API key or by token
    no_claim = tenants.caller({"Authorization": f"Bearer {idp.token(scp=scopes)}"})
    assert await _ids(no_claim) == ["d1"]  # not required here: the default tenant
    bad = tenants.caller({"Authorization": f"Bearer {idp.token(tid='x~y', scp=scopes)}"})
    refused = await bad.query("list")
    assert refused.status_code == 403 and "'tid' claim" in refused.json()["message"]
    # Where a tenant is required, a token without the claim is refused, saying why.
    strict = _settings(tmp_path / "strict", auth="oidc", oidc_issuer=idp.url,
                       oidc_audience=AUDIENCE, oidc_tenant_required=True)
    async with contextlib.AsyncExitStack() as stack:
        server = await _serve(stack, strict, Registry([records.domain]))
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            answer = await client.post("/api/command/insert", json={"data": {}},
                                       headers={"Authorization": f"Bearer {idp.token()}"})
            assert answer.status_code == 403, answer.text
            assert answer.json()["error"] == "forbidden"
            assert "no 'tid' claim" in answer.json()["message"]
            listed = await client.get("/api/query/list", headers={
                "Authorization": f"Bearer {idp.token(tid='A', scp=scopes)}"})
            assert listed.status_code == 200 and listed.json()["items"] == []


async def test_without_authentication_everything_is_the_default_tenant_as_before(
    tmp_path: Path,
) -> None:
    """Auth none stores plain ids and no tenant, as before tenants existed; a server
    with keys on the same files later shows those records to default-tenant keys only."""
    registry = Registry([records.domain])
    async with contextlib.AsyncExitStack() as stack:
        server = await _serve(stack, _settings(tmp_path), registry)
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            sent = await client.post("/api/command/insert", json={"id": "r1", "data": {}},
                                     headers={"Idempotency-Key": "k1"})
            assert sent.status_code == 202 and sent.json()["command_id"] == "k1"
            got = await client.get("/api/query/get", params={"id": "r1"}, headers={
                "X-Consistency-Token": sent.json()["consistency_token"]})
            assert got.status_code == 200
    with contextlib.closing(sqlite3.connect(tmp_path / "command.db")) as db:
        stream_id, metadata = db.execute("SELECT stream_id, metadata FROM events").fetchone()
        assert stream_id == "r1" and "tenant" not in orjson.loads(metadata)
        assert db.execute("SELECT command_id FROM commands").fetchall() == [("k1",)]
    with contextlib.closing(sqlite3.connect(tmp_path / "query.db")) as db:
        assert db.execute("SELECT id FROM view_records").fetchall() == [("r1",)]
        assert db.execute("SELECT id FROM view_stats_totals").fetchall() == [("all",)]

    keys = ApiKeys(tmp_path / "keys.json")
    _, default_key = keys.create("old", EVERYTHING)
    _, tenant_key = keys.create("new", EVERYTHING, "A")
    async with contextlib.AsyncExitStack() as stack:
        server = await _serve(stack, _settings(tmp_path, auth="keys"), registry)
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            default = Caller(client, {"X-API-Key": default_key})
            assert await _ids(default) == ["r1"]
            assert (await default.get("/api/commands/k1")).status_code == 200
            tenant = Caller(client, {"X-API-Key": tenant_key})
            assert await _ids(tenant) == []
            assert (await tenant.get("/api/commands/k1")).status_code == 404


async def test_handler_services_take_the_tenant_from_the_forwarded_credentials(
    tmp_path: Path,
) -> None:
    """`cqrskit api` forwarding to a command and a query handler: each handler decides
    the tenant from the key it is passed, so isolation holds across the hop."""
    registry = Registry([records.domain])
    keys = ApiKeys(tmp_path / "keys.json")
    _, key_a = keys.create("a", EVERYTHING, "A")
    _, key_b = keys.create("b", EVERYTHING, "B")
    base = _settings(tmp_path, auth="keys")
    async with contextlib.AsyncExitStack() as stack:
        commands = await LiveServer(create_app(base, registry, role="command-handler")).start()
        stack.push_async_callback(commands.stop)
        queries = await LiveServer(create_app(base, registry, role="query-handler")).start()
        stack.push_async_callback(queries.stop)
        api_settings = _settings(tmp_path, auth="keys", command_handler_url=commands.url,
                                 query_handler_url=queries.url, handler_api_key=key_a)
        api = await LiveServer(create_app(api_settings, registry, role="api")).start()
        stack.push_async_callback(api.stop)
        processor = await open_runtime(base, registry, role="update-processor")
        stack.push_async_callback(processor.close)
        processor.start()
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
            a = Caller(client, {"X-API-Key": key_a})
            b = Caller(client, {"X-API-Key": key_b})
            sent = await a.command("insert", {"id": "x", "data": {}},
                                   **{"Idempotency-Key": "k"})
            assert sent.status_code == 202 and sent.json()["id"] == "x"
            assert sent.headers["Location"] == "/api/commands/k"
            assert await _ids(a) == ["x"]
            assert await _ids(b) == []
            assert (await b.get("/api/commands/k")).status_code == 404


async def test_a_rebuild_keeps_every_tenants_documents_apart(open_rt: OpenRuntime) -> None:
    """A rebuild replays the log through the same tenant scoping as live processing."""
    runtime = await open_rt()
    assert runtime.commands and runtime.queries and runtime.views and runtime.stream
    for tenant in ("A", "B", None):
        for n in range(2):
            data = {"tenant": tenant or "default"}
            await runtime.commands.handle(InsertRecord(id=f"r{n}", data=data), tenant=tenant)
    last = await runtime.store.last_position()
    for name in ("records", "statistics"):
        projection = runtime.registry.projection(name)
        await rebuild(projection, runtime.registry, runtime.views, runtime.stream, last)
    for tenant in ("A", "B", DEFAULT):
        page = (await runtime.queries.handle(ListRecords(), tenant=tenant)).result
        assert [(d.id, d.data["tenant"]) for d in page.items] == [
            ("r0", tenant), ("r1", tenant)]
        stats = (await runtime.queries.handle(GetStatistics(), tenant=tenant)).result
        assert stats.total == 2
