"""`cqrskit serve` with both databases on Cosmos DB (the local stand-in), over HTTP.

Reads see their writes; a kill -9 under load loses no acknowledged command and
stores none twice; re-sent commands replay; and the views equal a replay of the
log, read back from Cosmos by the test itself.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from replays import (
    records_view,
    replay_records,
    replay_statistics,
    statistics_view,
    whole_log,
)

from .harness import ServerPool, insert, load_until_killed

pytestmark = pytest.mark.e2e

CLIENTS = 4
PER_CLIENT = 40
KILL_AFTER_ACKS = 60


def _env(standin: Any, url: str) -> dict[str, str]:
    # The harness passes no CQRSKIT_* variable of ours on: the key goes explicitly.
    return {"CQRSKIT_COMMAND_DB": url, "CQRSKIT_QUERY_DB": url, **standin.key_env()}


def _rid(client: int, seq: int) -> str:
    return f"c-{client}-{seq:03d}"


PLANNED = [_rid(c, s) for c in range(CLIENTS) for s in range(PER_CLIENT)]


async def _send(client: httpx.AsyncClient, rid: str) -> httpx.Response:
    return await client.post("/api/command/insert", json={"id": rid, "data": {"rid": rid}},
                             headers={"Idempotency-Key": f"key-{rid}"})


async def _stored_state(url: str) -> tuple[list[Any], dict[str, Any], dict[str, Any],
                                            dict[tuple[str, int], int]]:
    from cqrskit.ports import Collection
    from cqrskit.stores.cosmos_events import CosmosEventStore
    from cqrskit.stores.cosmos_views import CosmosViewStore

    store = await CosmosEventStore.open(url)
    views = await CosmosViewStore.open(url)
    try:
        await views.setup([Collection("records"), Collection("stats_totals"),
                           Collection("stats_by_day")])
        log = await whole_log(store)
        return log, await records_view(views), await statistics_view(views), (
            await views.checkpoints()
        )
    finally:
        await store.close()
        await views.close()


def test_serve_on_cosmos_reads_its_writes_and_survives_kill_9(
    servers: ServerPool, cosmos_standin: Any
) -> None:
    url = cosmos_standin.new_url()
    server = servers.new(_env(cosmos_standin, url), name="cosmos")

    # ---- read your writes, over HTTP
    with server.client() as client:
        first = insert(client, {"color": "red"}, record_id="ryw")
        token = {"X-Consistency-Token": first["consistency_token"]}
        got = client.get("/api/query/get", params={"id": "ryw"}, headers=token)
        assert got.status_code == 200 and got.headers["X-Consistency"] == "fresh"
        assert got.json()["data"] == {"color": "red"}
        updated = client.post("/api/command/update", json={"id": "ryw", "data": {"n": 2}})
        assert updated.status_code == 202, updated.text
        token = {"X-Consistency-Token": updated.json()["consistency_token"]}
        listed = client.get("/api/query/list", params={"filter": "n:2"}, headers=token)
        assert listed.headers["X-Consistency"] == "fresh"
        assert [r["id"] for r in listed.json()["items"]] == ["ryw"]
        again = client.post("/api/command/insert", json={"id": "ryw", "data": {}},
                            headers={"Idempotency-Key": "once"})
        assert again.status_code == 409  # the record exists: refused, nothing stored

    # ---- kill -9 under load, restart on the same account
    per_client = [[_rid(c, s) for s in range(PER_CLIENT)] for c in range(CLIENTS)]
    load = asyncio.run(load_until_killed(server, per_client, _send, KILL_AFTER_ACKS))
    acked, unanswered = load.acked, load.unanswered
    server.kill()
    assert len(acked) >= KILL_AFTER_ACKS and len(acked) < len(PLANNED)
    server.start()

    # Every command not acknowledged is sent again with its key: each is stored once,
    # and the acknowledged ones replay their first answer.
    async def resend(ids: list[str]) -> dict[str, httpx.Response]:
        async with server.async_client(timeout=60) as client:
            answers = await asyncio.gather(*(_send(client, rid) for rid in ids))
        return dict(zip(ids, answers, strict=True))

    unacked = [rid for rid in PLANNED if rid not in acked]
    for rid, response in asyncio.run(resend(unacked)).items():
        assert response.status_code == 202, (rid, response.text)
        assert response.json()["id"] == rid and response.json()["version"] == 1
    sample = sorted(acked)[::7]
    for rid, response in asyncio.run(resend(sample)).items():
        assert response.status_code == 202
        assert response.headers.get("Idempotent-Replayed") == "true"
        assert response.json() == acked[rid]

    with server.client() as client:
        marker = insert(client, {"marker": True}, record_id="marker")
        token = {"X-Consistency-Token": marker["consistency_token"]}
        stats = client.get("/api/query/stats", headers=token)
        assert stats.headers["X-Consistency"] == "fresh"

    # ---- the stored state, read from Cosmos: the log once, the views its replay
    log, records, statistics, checkpoints = asyncio.run(_stored_state(url))
    assert [e.position for e in log] == list(range(1, len(log) + 1))
    inserted = sorted(e.stream_id for e in log if e.type == "RecordInserted")
    assert inserted == sorted([*PLANNED, "ryw", "marker"]), "a command is missing or doubled"
    assert records == replay_records(log)
    assert statistics == replay_statistics(log)
    assert checkpoints == {("records", 0): len(log), ("statistics", 0): len(log)}
    assert stats.json()["total"] == len(log)
    assert unanswered <= set(PLANNED)
