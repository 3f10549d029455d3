"""The EventStore port: what every adapter (SQLite, PostgreSQL) must do, one suite for all."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import pytest

from cqrskit.command_handler import CommandHandler
from cqrskit.domains import records
from cqrskit.domains.records import DeleteRecord, InsertRecord, UpdateRecord
from cqrskit.errors import ConcurrencyConflict, IdempotencyKeyReused, Unavailable
from cqrskit.messages import CommandResult
from cqrskit.registry import Registry

from .conftest import Backend
from .helpers import request, whole_log


async def test_append_then_read_stream_and_read_all_in_order(backend: Backend) -> None:
    store = await backend.event_store()
    first = await store.append(request("a", 0, "Created", "Named", command_id="c-first"))
    second = await store.append(request("b", 0, "Created"))
    third = await store.append(request("a", 2, "Renamed"))
    assert first == CommandResult("c-first", "a", 2, 2)
    assert (second.stream_id, second.version, second.position) == ("b", 1, 3)
    assert (third.version, third.position, third.replayed) == (3, 4, False)

    stream = await store.read_stream("a")
    assert [(e.version, e.position, e.type) for e in stream] == [
        (1, 1, "Created"), (2, 2, "Named"), (3, 4, "Renamed"),
    ]
    envelope = stream[0]
    assert (envelope.stream_id, envelope.stream_type, envelope.schema_version) == (
        "a", "thing", 1
    )
    assert envelope.data == {"type": "Created", "stream": "a"}
    assert envelope.metadata == {"command_id": "c-first"}
    assert len({e.event_id for e in stream}) == 3
    # recorded_at is an ISO timestamp in UTC (the server here runs in UTC; see
    # test_postgres.py for a session in another time zone).
    assert datetime.fromisoformat(envelope.recorded_at).utcoffset() == timedelta(0)
    # Events of one command are recorded together.
    assert stream[0].recorded_at == stream[1].recorded_at

    everything = await store.read_all(0, 100)
    assert [(e.position, e.stream_id, e.version) for e in everything] == [
        (1, "a", 1), (2, "a", 2), (3, "b", 1), (4, "a", 3),
    ]
    assert everything[0] == envelope
    assert [e.position for e in await store.read_all(1, 2)] == [2, 3]
    assert await store.read_all(4, 10) == []
    assert await store.read_all(99, 10) == []
    assert await store.read_stream("nope") == []
    assert await store.last_position() == 4


async def test_an_empty_store(backend: Backend) -> None:
    store = await backend.event_store()
    assert await store.last_position() == 0
    assert await store.read_all(0, 10) == []
    assert await store.get_command("nope") is None
    await store.check()


async def test_event_data_round_trips(backend: Backend) -> None:
    store = await backend.event_store()
    data: dict[str, Any] = {
        "text": "héllo 😀 \"quoted\" \\ back\nslash", "int": 2**63 - 1, "neg": -7,
        "float": 2.5, "tiny": 1e-7, "big": 1e20, "whole": 1.0, "yes": True, "no": False,
        "nothing": None, "list": [1, "two", [3], {"four": 4}], "empty": {}, "nested": {
            "deeper": {"deepest": ["x"]},
        },
    }
    await store.append(request("a", 0, "Created", data=data))
    [event] = await store.read_stream("a")
    assert event.data == data
    assert type(event.data["whole"]) is float and type(event.data["int"]) is int


async def test_positions_are_contiguous_under_hundreds_of_concurrent_commands(
    backend: Backend,
) -> None:
    store = await backend.event_store()
    handler = CommandHandler(store, Registry([records.domain]))
    handle = handler.handle
    ids = [f"r-{i}" for i in range(100)]
    inserts = await asyncio.gather(
        *(handle(InsertRecord(id=i, data={"n": 0}), command_id=f"ins-{i}") for i in ids)
    )
    # Two concurrent updates of every record (they conflict and are retried), deletes,
    # and new records without an id, all at once.
    mixed = await asyncio.gather(
        *(handle(UpdateRecord(id=i, data={"n": k}), command_id=f"upd-{i}-{k}")
          for k in (1, 2) for i in ids),
        *(handle(InsertRecord(data={"fresh": j}), command_id=f"new-{j}") for j in range(60)),
    )
    deletes = await asyncio.gather(*(handle(DeleteRecord(id=i)) for i in ids[::4]))
    results = [*inserts, *mixed, *deletes]
    assert len(results) == 385

    log = await whole_log(store)
    assert [e.position for e in log] == list(range(1, 386))
    assert await store.last_position() == 385
    by_command = {e.metadata["command_id"]: e for e in log}
    assert len(by_command) == 385
    for result in results:
        assert not result.replayed
        event = by_command[result.command_id]
        assert (event.stream_id, event.version, event.position) == (
            result.stream_id, result.version, result.position
        )
    for i in ids:
        stream = await store.read_stream(i)
        assert [e.version for e in stream] == list(range(1, len(stream) + 1))
        assert len(stream) == (4 if i in ids[::4] else 3)


async def test_a_conflict_refuses_only_its_own_command(backend: Backend) -> None:
    store = await backend.event_store()
    await store.append(request("old", 0, "Created"))
    outcomes = await asyncio.gather(
        store.append(request("s1", 0, "Created")),
        store.append(request("old", 0, "Created")),  # conflict: "old" is at version 1
        store.append(request("s2", 0, "Created", "Named")),
        store.append(request("s1", 0, "Created", command_id="again")),  # lost to the first
        store.append(request("old", 1, "Renamed")),
        return_exceptions=True,
    )
    s1, conflict, s2, lost, renamed = outcomes
    assert isinstance(conflict, ConcurrencyConflict)
    assert (conflict.stream_id, conflict.expected, conflict.current) == ("old", 0, 1)
    assert isinstance(lost, ConcurrencyConflict) and lost.current == 1
    assert isinstance(s1, CommandResult) and (s1.version, s1.position) == (1, 2)
    assert isinstance(s2, CommandResult) and (s2.version, s2.position) == (2, 4)
    assert isinstance(renamed, CommandResult) and (renamed.version, renamed.position) == (2, 5)
    log = await store.read_all(0, 100)
    assert [(e.stream_id, e.version, e.position) for e in log] == [
        ("old", 1, 1), ("s1", 1, 2), ("s2", 1, 3), ("s2", 2, 4), ("old", 2, 5),
    ]
    assert await store.get_command("again") is None


async def test_a_conflict_reports_the_current_version(backend: Backend) -> None:
    store = await backend.event_store()
    await store.append(request("a", 0, "Created", "Named", "Renamed"))
    for expected in (0, 2, 4):
        with pytest.raises(ConcurrencyConflict) as raised:
            await store.append(request("a", expected, "Renamed"))
        assert (raised.value.stream_id, raised.value.expected, raised.value.current) == (
            "a", expected, 3
        )
        assert "at version 3, not the expected" in str(raised.value)
    assert await store.last_position() == 3


async def test_a_replayed_command_id_returns_the_first_result_and_appends_nothing(
    backend: Backend,
) -> None:
    store = await backend.event_store()
    first = await store.append(request("a", 0, "Created", "Named", command_id="c-1"))
    await store.append(request("b", 0, "Created"))
    # Same id and hash, even with other events and an outdated expected version.
    again = await store.append(request("zzz", 0, "Other", command_id="c-1"))
    assert again == CommandResult("c-1", "a", 2, 2, replayed=True)
    assert first == CommandResult("c-1", "a", 2, 2)
    assert await store.last_position() == 3
    assert await store.read_stream("zzz") == []
    stored = await store.get_command("c-1")
    assert stored is not None
    assert (stored.command_id, stored.command_hash, stored.result) == ("c-1", "h", first)


async def test_a_command_id_reused_for_another_command_is_refused(backend: Backend) -> None:
    store = await backend.event_store()
    await store.append(request("a", 0, "Created", command_id="c-1"))
    with pytest.raises(IdempotencyKeyReused) as raised:
        await store.append(request("b", 0, "Created", command_id="c-1", command_hash="other"))
    assert raised.value.command_id == "c-1"
    assert await store.last_position() == 1
    assert await store.read_stream("b") == []
    stored = await store.get_command("c-1")
    assert stored is not None and stored.command_hash == "h"


async def test_concurrent_duplicates_of_a_command_id_are_stored_once(backend: Backend) -> None:
    store = await backend.event_store()
    # Each duplicate targets its own new stream (a create without an id): still one store.
    outcomes = await asyncio.gather(
        *(store.append(request(f"s{i}", 0, "Created", command_id="dup")) for i in range(20)),
        store.append(request("x", 0, "Created", command_id="dup", command_hash="other")),
        return_exceptions=True,
    )
    *results, reused = outcomes
    assert isinstance(reused, IdempotencyKeyReused)
    assert all(isinstance(r, CommandResult) for r in results), results
    assert [r.replayed for r in results].count(False) == 1
    assert {(r.stream_id, r.version, r.position) for r in results} == {("s0", 1, 1)}
    assert [e.stream_id for e in await store.read_all(0, 100)] == ["s0"]


async def test_concurrent_duplicates_from_two_store_instances_are_stored_once(
    backend: Backend,
) -> None:
    """Two processes on one database: the check inside the transaction still holds."""
    one, two = await backend.event_store(), await backend.event_store()
    outcomes = await asyncio.gather(
        *(store.append(request(f"s{i}", 0, "Created", command_id=f"dup-{i % 5}"))
          for i in range(30) for store in (one, two)),
    )
    assert [r.replayed for r in outcomes].count(False) == 5
    log = await whole_log(one)
    assert [e.position for e in log] == [1, 2, 3, 4, 5]
    assert sorted(e.metadata["command_id"] for e in log) == [f"dup-{i}" for i in range(5)]
    for result in outcomes:
        stored = await two.get_command(result.command_id)
        assert stored is not None and stored.result == CommandResult(
            result.command_id, result.stream_id, result.version, result.position
        )


async def test_concurrent_duplicate_commands_through_the_handler_store_once(
    backend: Backend,
) -> None:
    store = await backend.event_store()
    handler = CommandHandler(store, Registry([records.domain]))
    command = InsertRecord(data={"same": True})
    results = await asyncio.gather(*(handler.handle(command, command_id="dup") for _ in range(25)))
    assert len({(r.stream_id, r.version, r.position) for r in results}) == 1
    assert [r.replayed for r in results].count(False) == 1
    assert len(await store.read_all(0, 100)) == 1
    with pytest.raises(IdempotencyKeyReused):
        await handler.handle(InsertRecord(data={"same": False}), command_id="dup")


async def test_wait_for_append_wakes_on_an_append(backend: Backend) -> None:
    store = await backend.event_store()
    await store.append(request("a", 0, "Created"))

    # Already beyond `after`: returns at once.
    await asyncio.wait_for(store.wait_for_append(0, 30), 5)
    # Nothing new: returns by the timeout (it may wake early: "the log *may* hold events").
    await asyncio.wait_for(store.wait_for_append(1, 0.2), 5)

    async def append_later() -> CommandResult:
        await asyncio.sleep(0.2)
        return await store.append(request("b", 0, "Created"))

    waiter = asyncio.create_task(store.wait_for_append(1, 30))
    appended = await append_later()
    # Woken by the append, long before its 30 s timeout.
    await asyncio.wait_for(waiter, 10)
    assert appended.position == 2
    assert [e.position for e in await store.read_all(1, 10)] == [2]


async def test_data_survives_reopen_and_migrating_again_is_harmless(backend: Backend) -> None:
    store = await backend.event_store()
    await store.append(request("a", 0, "Created", "Named", command_id="c-1"))
    before = await store.read_all(0, 100)
    await backend.close(store)

    for round_ in range(2):
        store = await backend.event_store()  # opening migrates (again)
        assert (await store.read_all(0, 100))[:2] == before
        stored = await store.get_command("c-1")
        assert stored is not None and stored.result.position == 2
        result = await store.append(request("a", 2 + round_, "Renamed"))
        assert (result.version, result.position) == (3 + round_, 3 + round_)
        await backend.close(store)

    store = await backend.event_store()
    assert [e.version for e in await store.read_stream("a")] == [1, 2, 3, 4]


async def test_a_closed_store_is_unavailable(backend: Backend) -> None:
    store = await backend.event_store()
    await store.append(request("a", 0, "Created"))
    await backend.close(store)
    await store.close()  # closing twice is fine
    with pytest.raises(Unavailable):
        await store.append(request("b", 0, "Created"))
    with pytest.raises(Unavailable):
        await store.read_all(0, 10)
    reopened = await backend.event_store()
    assert await reopened.last_position() == 1
