"""kill -9 under load: nothing acknowledged is lost, nothing is applied twice.

Eight clients insert records with client-chosen ids and Idempotency-Keys; the
server is SIGKILLed mid-load and restarted on the same files. Every command
answered 202 must be in the views exactly once, anything else there must have
been in flight at the kill, and re-sending the unanswered commands with the same
keys must converge on exactly one event per command, with the views equal to a
replay of the event log.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from .harness import Server, ServerPool, insert, load_until_killed, query_sqlite

pytestmark = pytest.mark.e2e

CLIENTS = 8
PER_CLIENT = 250
KILL_AFTER_ACKS = 1000


def record_id(client: int, seq: int) -> str:
    return f"crash-{client}-{seq:04d}"


def key_of(rid: str) -> str:
    return f"key-{rid}"


def data_of(rid: str) -> dict[str, Any]:
    _, client, seq = rid.split("-")
    return {"client": int(client), "seq": int(seq), "payload": f"payload of {rid}"}


PLANNED = [record_id(c, s) for c in range(CLIENTS) for s in range(PER_CLIENT)]


async def _send(client: httpx.AsyncClient, rid: str) -> httpx.Response:
    return await client.post(
        "/api/command/insert", json={"id": rid, "data": data_of(rid)},
        headers={"Idempotency-Key": key_of(rid)},
    )


async def _resend(server: Server, ids: list[str]) -> dict[str, httpx.Response]:
    answers: dict[str, httpx.Response] = {}
    queue: asyncio.Queue[str] = asyncio.Queue()
    for rid in ids:
        queue.put_nowait(rid)

    async def worker() -> None:
        async with server.async_client(timeout=30) as client:
            while not queue.empty():
                rid = queue.get_nowait()
                answers[rid] = await _send(client, rid)

    await asyncio.gather(*(worker() for _ in range(CLIENTS)))
    return answers


def _wait_fresh(server: Server, marker_id: str) -> None:
    with server.client() as client:
        marker = insert(client, {"marker": True}, record_id=marker_id)
        token = {"X-Consistency-Token": marker["consistency_token"]}
        for path, params in (("/api/query/stats", {}), ("/api/query/list", {"limit": 1})):
            response = client.get(path, headers=token, params=params)
            assert response.status_code == 200, response.text
            assert response.headers["X-Consistency"] == "fresh", path


def _api_records(server: Server) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    with server.client() as client:
        while True:
            params: dict[str, Any] = {"limit": 500}
            if cursor:
                params["cursor"] = cursor
            page = client.get("/api/query/list", params=params)
            assert page.status_code == 200, page.text
            items.extend(page.json()["items"])
            cursor = page.json()["next_cursor"]
            if cursor is None:
                return items


def _view_counts(server: Server) -> dict[str, int]:
    rows = query_sqlite(
        server.query_db,
        "SELECT json_extract(doc, '$.id'), count(*) FROM view_records GROUP BY 1",
    )
    return {rid: count for rid, count in rows}


def _event_counts(server: Server) -> dict[str, int]:
    rows = query_sqlite(server.command_db,
                        "SELECT stream_id, count(*) FROM events GROUP BY stream_id")
    return {rid: count for rid, count in rows}


def _check_records(items: list[dict[str, Any]], markers: set[str]) -> set[str]:
    ids = [item["id"] for item in items]
    assert len(ids) == len(set(ids)), "a record is listed more than once"
    for item in items:
        if item["id"] in markers:
            continue
        assert item["version"] == 1, item
        assert item["data"] == data_of(item["id"]), item
    return set(ids) - markers


def test_kill_9_mid_load_loses_no_acknowledged_command_and_duplicates_none(
    servers: ServerPool,
) -> None:
    server = servers.new(name="crash")
    per_client = [[record_id(c, s) for s in range(PER_CLIENT)] for c in range(CLIENTS)]
    load = asyncio.run(load_until_killed(server, per_client, _send, KILL_AFTER_ACKS))
    server.kill()  # reap the SIGKILLed process
    assert load.killed
    acked = set(load.acked)
    assert len(acked) >= KILL_AFTER_ACKS
    assert len(acked) < len(PLANNED), "the kill came after the load had finished"
    assert acked <= load.sent
    in_flight = load.sent - acked
    assert in_flight == load.unanswered
    assert 1 <= len(in_flight) <= CLIENTS

    # ---- restart on the same files and let the views catch up
    server.start()
    _wait_fresh(server, "marker-after-crash")
    markers = {"marker-after-crash"}

    listed = _check_records(_api_records(server), markers)
    assert acked <= listed, f"acknowledged but lost: {sorted(acked - listed)[:10]}"
    assert listed - acked <= in_flight, f"never sent yet stored: {sorted(listed - acked)[:10]}"

    view = _view_counts(server)
    assert set(view) - markers == listed
    assert all(count == 1 for count in view.values())
    events = _event_counts(server)
    assert set(events) - markers == listed, "the views are not the log"
    assert all(count == 1 for count in events.values())

    # ---- re-send every unacknowledged command with its original key
    persisted_in_flight = listed - acked
    unacked = [rid for rid in PLANNED if rid not in acked]
    answers = asyncio.run(_resend(server, unacked))
    for rid, response in answers.items():
        assert response.status_code == 202, (rid, response.text)
        body = response.json()
        assert body["id"] == rid
        assert body["command_id"] == key_of(rid)
        assert body["version"] == 1
        replayed = response.headers.get("Idempotent-Replayed") == "true"
        assert replayed == (rid in persisted_in_flight), rid

    # Acknowledged commands sent again replay their first answer, across the crash.
    sample = sorted(acked)[:: max(1, len(acked) // 40)]
    replays = asyncio.run(_resend(server, sample))
    for rid, response in replays.items():
        assert response.status_code == 202
        assert response.headers.get("Idempotent-Replayed") == "true"
        assert response.json() == load.acked[rid]

    _wait_fresh(server, "marker-final")
    markers.add("marker-final")

    # ---- the final state is exactly the commands sent, each once, version 1
    final = _check_records(_api_records(server), markers)
    assert final == set(PLANNED)
    total = len(PLANNED) + len(markers)

    rows = query_sqlite(
        server.command_db,
        "SELECT position, stream_id, version, type, data, recorded_at FROM events "
        "ORDER BY position",
    )
    assert [row[0] for row in rows] == list(range(1, total + 1)), "positions are not 1..N"
    assert sorted(row[1] for row in rows) == sorted(set(PLANNED) | markers)
    assert {row[2] for row in rows} == {1}
    assert {row[3] for row in rows} == {"RecordInserted"}
    commands = dict(query_sqlite(server.command_db, "SELECT command_id, stream_id FROM commands"))
    assert all(commands[key_of(rid)] == rid for rid in PLANNED)
    assert len(commands) == total

    # The views equal a replay of the log.
    replayed_view = {
        stream_id: {
            "id": stream_id, "data": json.loads(data)["data"], "version": version,
            "created_at": recorded_at, "updated_at": recorded_at,
        }
        for _, stream_id, version, _, data, recorded_at in rows
    }
    stored_view = {
        rid: json.loads(doc)
        for rid, doc in query_sqlite(server.query_db, "SELECT id, doc FROM view_records")
    }
    assert stored_view == replayed_view

    checkpoints = dict(query_sqlite(
        server.query_db, "SELECT projection, position FROM checkpoints WHERE partition = 0"
    ))
    assert checkpoints == {"records": total, "statistics": total}
    with server.client() as client:
        stats = client.get("/api/query/stats").json()
    assert stats["total"] == total
    assert stats["by_type"] == {"RecordInserted": total}
    totals_doc = json.loads(
        query_sqlite(server.query_db, "SELECT doc FROM view_stats_totals WHERE id = 'all'")[0][0]
    )
    assert totals_doc["total"] == total
    assert query_sqlite(server.query_db, "SELECT count(*) FROM dead_letters") == [(0,)]
