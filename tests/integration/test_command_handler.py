"""CommandHandler on real files: conflicts, retries, idempotency, stale caches."""

import asyncio
from pathlib import Path

import pytest
from integration_helpers import Ledger, OpenRuntime

from cqrskit.bootstrap import Runtime
from cqrskit.domains import records
from cqrskit.domains.records import DeleteRecord, InsertRecord, UpdateRecord
from cqrskit.errors import (
    CommandRejected,
    ConcurrencyConflict,
    IdempotencyKeyReused,
    NotFound,
)
from cqrskit.registry import Registry


async def data_of(runtime: Runtime, stream_id: str) -> list[tuple[int, str, dict[str, object]]]:
    return [
        (e.version, e.type, e.data.get("data", {}))
        for e in await runtime.store.read_stream(stream_id)
    ]


async def test_insert_update_delete_end_to_end(runtime: Runtime) -> None:
    handle = runtime.commands.handle
    inserted = await handle(InsertRecord(data={"a": 1}), metadata={"principal": "ada"})
    assert inserted.version == 1 and inserted.position == 1
    updated = await handle(UpdateRecord(id=inserted.stream_id, data={"a": 2}))
    deleted = await handle(DeleteRecord(id=inserted.stream_id, expected_version=2))
    assert (updated.version, deleted.version, deleted.position) == (2, 3, 3)
    log = await runtime.store.read_stream(inserted.stream_id)
    assert [e.type for e in log] == ["RecordInserted", "RecordUpdated", "RecordDeleted"]
    metadata = log[0].metadata
    assert metadata["principal"] == "ada"
    assert metadata["command_id"] == metadata["correlation_id"] == inserted.command_id
    with pytest.raises(NotFound, match="was deleted"):
        await handle(UpdateRecord(id=inserted.stream_id, data={}))


async def test_rejected_commands_store_nothing(runtime: Runtime) -> None:
    handle = runtime.commands.handle
    await handle(InsertRecord(id="r-1", data={}))
    with pytest.raises(CommandRejected, match="already exists"):
        await handle(InsertRecord(id="r-1", data={"again": True}))
    with pytest.raises(NotFound, match="no record"):
        await handle(UpdateRecord(id="missing", data={}))
    with pytest.raises(NotFound):
        await handle(DeleteRecord(id="missing"))
    assert await runtime.store.last_position() == 1


async def test_a_command_no_aggregate_handles_is_rejected(runtime: Runtime, ledger: Ledger) -> None:
    with pytest.raises(CommandRejected, match="no aggregate handles"):
        await runtime.commands.handle(ledger.add(id="x", value=1))


async def test_a_command_on_a_stream_of_another_type_is_not_found(
    open_rt: OpenRuntime, ledger: Ledger
) -> None:
    runtime = await open_rt(Registry([records.domain, *ledger.registry.domains]))
    await runtime.commands.handle(InsertRecord(id="shared", data={}))
    fresh = await open_rt(Registry([records.domain, *ledger.registry.domains]))  # cold cache
    with pytest.raises(NotFound, match="no entry with id 'shared'"):
        await fresh.commands.handle(ledger.add(id="shared", value=1))
    assert await runtime.store.last_position() == 1


async def test_concurrent_updates_without_expected_version_are_retried(
    runtime: Runtime,
) -> None:
    handle = runtime.commands.handle
    await handle(InsertRecord(id="r-1", data={"v": 0}))
    first, second = await asyncio.gather(
        handle(UpdateRecord(id="r-1", data={"v": "first"})),
        handle(UpdateRecord(id="r-1", data={"v": "second"})),
    )
    assert sorted([first.version, second.version]) == [2, 3]
    stored = await data_of(runtime, "r-1")
    assert [v for v, _, _ in stored] == [1, 2, 3]
    assert stored[first.version - 1][2] == {"v": "first"}
    assert stored[second.version - 1][2] == {"v": "second"}


async def test_many_concurrent_updates_of_one_record_all_land(runtime: Runtime) -> None:
    handle = runtime.commands.handle
    await handle(InsertRecord(id="r-1", data={}))
    # Four contenders stay well inside the handler's MAX_ATTEMPTS retries.
    results = await asyncio.gather(
        *(handle(UpdateRecord(id="r-1", data={"k": k})) for k in range(4))
    )
    assert sorted(r.version for r in results) == [2, 3, 4, 5]


async def test_concurrent_updates_with_expected_version_conflict(runtime: Runtime) -> None:
    handle = runtime.commands.handle
    await handle(InsertRecord(id="r-1", data={}))
    outcomes = await asyncio.gather(
        handle(UpdateRecord(id="r-1", data={"v": 1}, expected_version=1)),
        handle(UpdateRecord(id="r-1", data={"v": 2}, expected_version=1)),
        return_exceptions=True,
    )
    conflicts = [o for o in outcomes if isinstance(o, ConcurrencyConflict)]
    accepted = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(conflicts) == 1 and len(accepted) == 1
    assert (conflicts[0].expected, conflicts[0].current) == (1, 2)
    assert accepted[0].version == 2
    assert len(await runtime.store.read_stream("r-1")) == 2


async def test_a_stale_expected_version_is_refused(runtime: Runtime) -> None:
    handle = runtime.commands.handle
    await handle(InsertRecord(id="r-1", data={}))
    await handle(UpdateRecord(id="r-1", data={"v": 1}))
    with pytest.raises(ConcurrencyConflict) as raised:
        await handle(UpdateRecord(id="r-1", data={"v": 2}, expected_version=1))
    assert (raised.value.stream_id, raised.value.expected, raised.value.current) == (
        "r-1", 1, 2,
    )
    assert (await handle(UpdateRecord(id="r-1", data={}, expected_version=2))).version == 3


async def test_a_replayed_command_id_returns_the_first_result(runtime: Runtime) -> None:
    handle = runtime.commands.handle
    first = await handle(InsertRecord(data={"a": 1}), command_id="key-1")
    again = await handle(InsertRecord(data={"a": 1}), command_id="key-1")
    assert again.replayed and not first.replayed
    assert (again.stream_id, again.version, again.position) == (
        first.stream_id, first.version, first.position,
    )
    assert again.consistency_token == first.consistency_token
    assert await runtime.store.last_position() == 1

    with pytest.raises(IdempotencyKeyReused):
        await handle(InsertRecord(data={"a": 2}), command_id="key-1")
    with pytest.raises(IdempotencyKeyReused):
        await handle(UpdateRecord(id=first.stream_id, data={"a": 1}), command_id="key-1")
    assert await runtime.store.last_position() == 1


async def test_concurrent_different_commands_with_one_id_store_one(runtime: Runtime) -> None:
    outcomes = await asyncio.gather(
        runtime.commands.handle(InsertRecord(id="r-1", data={}), command_id="k"),
        runtime.commands.handle(InsertRecord(id="r-2", data={}), command_id="k"),
        return_exceptions=True,
    )
    assert sum(isinstance(o, IdempotencyKeyReused) for o in outcomes) == 1
    [stored] = await runtime.store.read_all(0, 10)
    [accepted] = [o for o in outcomes if not isinstance(o, BaseException)]
    assert (stored.stream_id, stored.position) == (accepted.stream_id, accepted.position)


async def test_a_replayed_update_is_not_applied_twice(runtime: Runtime) -> None:
    handle = runtime.commands.handle
    await handle(InsertRecord(id="r-1", data={}))
    update = UpdateRecord(id="r-1", data={"v": 1})
    first = await handle(update, command_id="u-1")
    await handle(UpdateRecord(id="r-1", data={"v": 2}))
    again = await handle(update, command_id="u-1")
    assert again.replayed and again.version == first.version == 2
    assert [v for v, _, _ in await data_of(runtime, "r-1")] == [1, 2, 3]


async def test_a_stale_cache_in_a_second_handler_recovers_by_conflict_and_reload(
    open_rt: OpenRuntime, tmp_path: Path
) -> None:
    one = await open_rt(data_dir=tmp_path)
    two = await open_rt(data_dir=tmp_path)  # same files: another process
    await one.commands.handle(InsertRecord(id="r-1", data={"by": "one"}))  # one caches v1
    assert (await two.commands.handle(UpdateRecord(id="r-1", data={"by": "two"}))).version == 2

    # One's cache still says version 1: the append conflicts, the handler reloads, retries.
    result = await one.commands.handle(UpdateRecord(id="r-1", data={"by": "one again"}))
    assert result.version == 3
    assert await data_of(one, "r-1") == [
        (1, "RecordInserted", {"by": "one"}),
        (2, "RecordUpdated", {"by": "two"}),
        (3, "RecordUpdated", {"by": "one again"}),
    ]
    # Deleted elsewhere: the reload shows the record gone.
    await two.commands.handle(DeleteRecord(id="r-1"))
    with pytest.raises(NotFound, match="was deleted"):
        await one.commands.handle(UpdateRecord(id="r-1", data={}))
    assert await one.store.last_position() == 4


async def test_a_stale_cache_does_not_refuse_a_correct_expected_version(
    open_rt: OpenRuntime, tmp_path: Path
) -> None:
    """Regression: expected_version was checked against the cached aggregate only, so a
    stale cache raised ConcurrencyConflict(current=<stale>) without reading the store."""
    one = await open_rt(data_dir=tmp_path)
    two = await open_rt(data_dir=tmp_path)
    await one.commands.handle(InsertRecord(id="r-1", data={}))  # one caches v1
    await two.commands.handle(UpdateRecord(id="r-1", data={"v": 2}))  # the stream is at v2
    # The caller read version 2 (e.g. from the view) and is right about it.
    result = await one.commands.handle(UpdateRecord(id="r-1", data={"v": 3}, expected_version=2))
    assert result.version == 3


async def test_a_stale_cache_does_not_hide_a_record_created_elsewhere(
    open_rt: OpenRuntime, tmp_path: Path
) -> None:
    """Regression: a not-yet-existing aggregate (version 0) was cached, and the stale
    entry made decide() raise NotFound for a record another process had created."""
    one = await open_rt(data_dir=tmp_path)
    two = await open_rt(data_dir=tmp_path)
    with pytest.raises(NotFound):
        await one.commands.handle(UpdateRecord(id="r-1", data={}))  # too early
    await two.commands.handle(InsertRecord(id="r-1", data={}))
    result = await one.commands.handle(UpdateRecord(id="r-1", data={"v": 2}))
    assert result.version == 2


async def test_without_a_cache_every_command_reads_the_stream(open_rt: OpenRuntime) -> None:
    runtime = await open_rt(aggregate_cache_size=0)
    handle = runtime.commands.handle
    await handle(InsertRecord(id="r-1", data={}))
    results = await asyncio.gather(
        *(handle(UpdateRecord(id="r-1", data={"k": k})) for k in range(3))
    )
    assert sorted(r.version for r in results) == [2, 3, 4]
