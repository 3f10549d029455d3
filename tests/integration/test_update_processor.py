"""The update processor on real files: views equal a replay of the log, exactly-once
effect, retries and the sequenced dead-letter queue, operator actions, rebuilds."""

import asyncio
import logging
import random
from pathlib import Path

import pytest
from integration_helpers import (
    Ledger,
    OpenRuntime,
    all_docs,
    drain,
    records_view,
    replay_records,
    replay_statistics,
    statistics_view,
    wait_for_checkpoint,
    whole_log,
)

from cqrskit.bootstrap import Runtime
from cqrskit.domains.records import DeleteRecord, InsertRecord, ListRecords, UpdateRecord
from cqrskit.errors import NotFound
from cqrskit.messages import CommandResult, ConsistencyToken, NewEvent
from cqrskit.ports import AppendRequest
from cqrskit.streams.embedded import EmbeddedStream
from cqrskit.update_processor import (
    ProjectionRunner,
    RetryOutcome,
    RetryPolicy,
    rebuild,
    retry_dead_letters,
    skip_dead_letter,
)

FAST = RetryPolicy(attempts=3, backoff_seconds=0.01)


async def write_records(runtime: Runtime, count: int, seed: int) -> CommandResult:
    """Concurrent inserts, updates and deletes of records; returns the last result."""
    rng = random.Random(seed)
    handle = runtime.commands.handle
    ids = [f"s{seed}-{i}" for i in range(count)]
    results = list(await asyncio.gather(
        *(handle(InsertRecord(id=i, data={"n": 0, "color": rng.choice("rgb")})) for i in ids)
    ))
    results += await asyncio.gather(
        *(handle(UpdateRecord(id=i, data={"n": k, "color": rng.choice("rgb")}))
          for k in (1, 2) for i in ids if rng.random() < 0.7)
    )
    results += await asyncio.gather(*(handle(DeleteRecord(id=i)) for i in ids[::5]))
    return max(results, key=lambda r: r.position)


async def caught_up(runtime: Runtime, result: CommandResult, *projections: str) -> None:
    token = ConsistencyToken.decode(result.consistency_token)
    names = projections or tuple(runtime.registry.projections)
    assert await runtime.checkpoints.wait(names, token, timeout=10)


async def add(runtime: Runtime, ledger: Ledger, stream: str, value: int, fail: bool = False
              ) -> CommandResult:
    return await runtime.commands.handle(ledger.add(id=stream, value=value, fail=fail))


async def entries(runtime: Runtime) -> dict[str, list[int]]:
    return {d["id"]: d["values"] for d in await all_docs(runtime.views, "entries")}


# ------------------------------------------------- views equal the log


async def test_views_end_up_equal_to_a_replay_of_the_log(runtime: Runtime) -> None:
    runtime.processor.start()
    last = await write_records(runtime, 60, seed=1)
    await caught_up(runtime, last)
    log = await whole_log(runtime.store)
    assert await records_view(runtime.views) == replay_records(log)
    assert await statistics_view(runtime.views) == replay_statistics(log)
    assert await runtime.views.checkpoints() == {
        ("records", 0): last.position, ("statistics", 0): last.position,
    }
    assert await runtime.views.list_dead_letters() == []


async def test_processing_the_same_batch_twice_changes_nothing(
    open_rt: OpenRuntime, ledger: Ledger
) -> None:
    rt = await open_rt(ledger.registry)
    for i in range(12):
        await add(rt, ledger, f"e{i % 3}", i)
    batch = await rt.store.read_all(0, 100)
    runner = ProjectionRunner(ledger.projection, ledger.registry, rt.views, retry=FAST)
    await runner.process(batch)
    once = await entries(rt)
    calls = list(ledger.projection.calls)
    assert once == {"e0": [0, 3, 6, 9], "e1": [1, 4, 7, 10], "e2": [2, 5, 8, 11]}

    await runner.process(batch)
    await runner.process(batch[4:9])
    # A second runner that has read nothing: the checkpoint read inside the transaction
    # tells it the events are applied already.
    other = ProjectionRunner(ledger.projection, ledger.registry, rt.views, retry=FAST)
    await other.process(batch)
    await other.process(batch[:2])
    assert await entries(rt) == once
    assert ledger.projection.calls == calls
    assert await rt.views.checkpoints() == {("entries", 0): 12}
    assert other.position == 12


async def test_two_runners_of_one_projection_do_not_double_apply(
    open_rt: OpenRuntime, ledger: Ledger
) -> None:
    rt = await open_rt(ledger.registry)
    expected: dict[str, list[int]] = {}
    for chunk in range(8):
        await asyncio.gather(*(add(rt, ledger, f"e{i}", chunk) for i in range(25)))
        for i in range(25):
            expected.setdefault(f"e{i}", []).append(chunk)
    last = await rt.store.last_position()
    small = EmbeddedStream(rt.store, batch_size=7)  # many small, interleaved transactions
    runners = [
        ProjectionRunner(ledger.projection, ledger.registry, rt.views, retry=FAST)
        for _ in range(3)
    ]
    await asyncio.gather(*(drain(r, rt, small) for r in runners))
    assert await entries(rt) == expected
    assert sorted(ledger.projection.calls) == list(range(1, last + 1))
    docs = await all_docs(rt.views, "entries")
    assert all(d["versions"] == list(range(1, 9)) for d in docs)


async def test_two_processes_with_processors_on_the_same_files(
    open_rt: OpenRuntime, tmp_path: Path
) -> None:
    one = await open_rt(data_dir=tmp_path)
    two = await open_rt(data_dir=tmp_path)
    one.processor.start()
    two.processor.start()
    first, second = await asyncio.gather(
        write_records(one, 30, seed=2), write_records(two, 30, seed=3)
    )
    last = max(first.position, second.position)
    for name in ("records", "statistics"):
        await wait_for_checkpoint(one.views, name, last)
    log = await whole_log(one.store)
    assert len(log) == last
    assert await records_view(one.views) == replay_records(log)
    assert await statistics_view(one.views) == replay_statistics(log)


# -------------------------------------------------------- dead letters


@pytest.mark.parametrize("attempts", [1, 4])
async def test_a_failing_event_is_retried_then_parked_with_the_rest_of_its_stream(
    open_rt: OpenRuntime, ledger: Ledger, attempts: int
) -> None:
    rt = await open_rt(ledger.registry, retry_attempts=attempts)
    rt.processor.start()
    plan = [("a", 1, False), ("a", 2, True), ("b", 1, False), ("a", 3, False),
            ("b", 2, False), ("a", 4, False)]
    results = [await add(rt, ledger, s, v, f) for s, v, f in plan]
    await caught_up(rt, results[-1])

    failing = results[1].position
    assert ledger.projection.calls.count(failing) == attempts
    letters = await rt.views.list_dead_letters("entries")
    assert [(d.stream_id, d.envelope.version, d.is_cause, d.attempts) for d in letters] == [
        ("a", 2, True, attempts), ("a", 3, False, 0), ("a", 4, False, 0),
    ]
    assert letters[0].error == "RuntimeError: cannot apply a v2"
    assert "queued behind" in letters[1].error
    assert [d.position for d in letters] == sorted(d.position for d in letters)
    # Other streams went on; the parked stream stopped before its failing event.
    assert await entries(rt) == {"a": [1], "b": [1, 2]}
    # Later events: the parked stream's are queued behind, the others' applied.
    more = [await add(rt, ledger, "a", 5), await add(rt, ledger, "b", 3)]
    await caught_up(rt, more[-1])
    assert await entries(rt) == {"a": [1], "b": [1, 2, 3]}
    letters = await rt.views.list_dead_letters("entries")
    assert [(d.envelope.version, d.is_cause) for d in letters] == [
        (2, True), (3, False), (4, False), (5, False),
    ]
    # The later events of the parked stream were never handed to the projection.
    for result in (results[3], results[5], more[0]):
        assert result.position not in ledger.projection.calls


async def test_retry_after_a_fix_applies_the_parked_events_in_order_and_unparks(
    open_rt: OpenRuntime, ledger: Ledger
) -> None:
    rt = await open_rt(ledger.registry)
    for s, v, f in [("a", 1, False), ("a", 2, True), ("b", 1, False), ("a", 3, False),
                    ("a", 4, False)]:
        await add(rt, ledger, s, v, f)
    runner = ProjectionRunner(ledger.projection, ledger.registry, rt.views, retry=FAST)
    await drain(runner, rt)
    letters = await rt.views.list_dead_letters("entries")
    assert len(letters) == 3

    ledger.projection.broken = False  # the fix is deployed
    # Any of the stream's dead letters retries the whole queue from its head.
    outcome = await retry_dead_letters(ledger.registry, rt.views, letters[-1].id)
    assert outcome == RetryOutcome(applied=3, remaining=0, error=None)
    assert await rt.views.list_dead_letters() == []
    docs = {d["id"]: d for d in await all_docs(rt.views, "entries")}
    assert docs["a"]["values"] == [1, 2, 3, 4]
    assert docs["a"]["versions"] == [1, 2, 3, 4]

    # The stream is no longer parked: its next event is applied at once.
    after = await add(rt, ledger, "a", 5)
    await drain(runner, rt)
    assert after.position in ledger.projection.calls
    assert (await entries(rt))["a"] == [1, 2, 3, 4, 5]
    assert await rt.views.list_dead_letters() == []


async def test_retry_while_still_failing_keeps_the_head_and_counts_attempts(
    open_rt: OpenRuntime, ledger: Ledger
) -> None:
    rt = await open_rt(ledger.registry)
    for v, fail in [(1, False), (2, True), (3, False), (4, True), (5, False)]:
        await add(rt, ledger, "a", v, fail)
    runner = ProjectionRunner(ledger.projection, ledger.registry, rt.views, retry=FAST)
    await drain(runner, rt)
    head, *behind = await rt.views.list_dead_letters("entries")
    assert (head.envelope.version, head.attempts, head.is_cause) == (2, 3, True)

    outcome = await retry_dead_letters(ledger.registry, rt.views, head.id)
    assert outcome == RetryOutcome(0, 4, "RuntimeError: cannot apply a v2")
    again = await rt.views.get_dead_letter(head.id)
    assert again is not None and (again.attempts, again.is_cause) == (4, True)
    assert ledger.projection.calls.count(head.position) == 4
    assert await rt.views.list_dead_letters("entries") == [again, *behind]

    # Skip the head: the next one (v3) applies, then v4 fails and becomes the head.
    skipped = await skip_dead_letter(rt.views, head.id)
    assert skipped.id == head.id and skipped.envelope.version == 2
    outcome = await retry_dead_letters(ledger.registry, rt.views, behind[0].id)
    assert outcome == RetryOutcome(1, 2, "RuntimeError: cannot apply a v4")
    v4, v5 = await rt.views.list_dead_letters("entries")
    assert (v4.envelope.version, v4.attempts, v4.is_cause) == (4, 1, True)
    assert (v5.envelope.version, v5.is_cause) == (5, False)
    assert (await entries(rt))["a"] == [1, 3]

    ledger.projection.broken = False
    assert await retry_dead_letters(ledger.registry, rt.views, v5.id) == RetryOutcome(2, 0, None)
    assert (await entries(rt))["a"] == [1, 3, 4, 5]  # v2 was skipped for good


async def test_skip_drops_exactly_one_and_unknown_ids_are_not_found(
    open_rt: OpenRuntime, ledger: Ledger
) -> None:
    rt = await open_rt(ledger.registry)
    for v, fail in [(1, True), (2, False), (3, False)]:
        await add(rt, ledger, "a", v, fail)
    await add(rt, ledger, "b", 1, True)
    runner = ProjectionRunner(ledger.projection, ledger.registry, rt.views, retry=FAST)
    await drain(runner, rt)
    letters = await rt.views.list_dead_letters("entries")
    assert [(d.stream_id, d.envelope.version) for d in letters] == [
        ("a", 1), ("a", 2), ("a", 3), ("b", 1),
    ]
    await skip_dead_letter(rt.views, letters[1].id)
    assert [d.id for d in await rt.views.list_dead_letters()] == [
        letters[0].id, letters[2].id, letters[3].id,
    ]
    with pytest.raises(NotFound):
        await skip_dead_letter(rt.views, letters[1].id)
    with pytest.raises(NotFound):
        await retry_dead_letters(ledger.registry, rt.views, 10_000)

    ledger.projection.broken = False
    assert await retry_dead_letters(ledger.registry, rt.views, letters[0].id) == RetryOutcome(
        2, 0, None
    )
    assert await entries(rt) == {"a": [1, 3]}  # b is still parked: retries are per stream
    assert [d.stream_id for d in await rt.views.list_dead_letters()] == ["b"]


async def test_a_batch_full_of_failing_events_is_parked_without_crashing(
    open_rt: OpenRuntime, ledger: Ledger
) -> None:
    """Regression: process() recursed once per failing event, so a batch of ~1000
    failing events (one EmbeddedStream batch) raised RecursionError."""
    rt = await open_rt(ledger.registry, sqlite_synchronous="NORMAL")
    # A projection bug that fails on every event, met by a backlog: a full batch of failures.
    await asyncio.gather(*(
        rt.store.append(AppendRequest(
            stream_id=f"s{i}", stream_type="entry", expected_version=0,
            events=[NewEvent("Added", {"value": i, "fail": True})],
            metadata={}, command_id=f"c{i}", command_hash="",
        ))
        for i in range(1000)
    ))
    batch = await rt.store.read_all(0, 1000)
    assert len(batch) == 1000
    runner = ProjectionRunner(ledger.projection, ledger.registry, rt.views,
                              retry=RetryPolicy(attempts=1, backoff_seconds=0))
    await runner.process(batch)
    assert runner.position == 1000
    assert len(await rt.views.list_dead_letters("entries")) == 1000


# ------------------------------------------------------------- rebuild


async def test_rebuild_empties_the_views_and_replays_the_log(runtime: Runtime) -> None:
    runtime.processor.start()
    last = await write_records(runtime, 40, seed=4)
    await caught_up(runtime, last)
    await runtime.processor.stop()
    records_before = await records_view(runtime.views)
    statistics_before = await statistics_view(runtime.views)

    def vandalise(uow: object) -> None:
        uow.put("records", "bogus", {"id": "bogus"})  # type: ignore[attr-defined]
        uow.delete("records", sorted(records_before)[0])  # type: ignore[attr-defined]
        uow.put("stats_totals", "all", {"total": -1, "by_type": {}})  # type: ignore[attr-defined]

    await runtime.views.run(vandalise)
    assert await records_view(runtime.views) != records_before

    for name in ("records", "statistics"):
        projection = runtime.registry.projection(name)
        seen: list[int] = []
        position = await rebuild(
            projection, runtime.registry, runtime.views,
            EmbeddedStream(runtime.store, batch_size=13), last.position, progress=seen.append,
        )
        assert position == last.position
        assert seen == sorted(seen) and seen[-1] == last.position and len(seen) > 1
    assert await records_view(runtime.views) == records_before
    assert await statistics_view(runtime.views) == statistics_before
    assert await runtime.views.checkpoints() == {
        ("records", 0): last.position, ("statistics", 0): last.position,
    }


async def test_rebuild_moves_the_checkpoints_of_other_partitions_past_the_replay(
    runtime: Runtime,
) -> None:
    # Processors of a partitioned stream left checkpoints in partitions 1 and 3;
    # after a rebuild from the log they must resume after it, not re-apply.
    last = await write_records(runtime, 12, seed=9)

    def old_checkpoints(uow: object) -> None:
        uow.set_checkpoint("records", 1, 2)  # type: ignore[attr-defined]
        uow.set_checkpoint("records", 3, 5)  # type: ignore[attr-defined]

    await runtime.views.run(old_checkpoints)
    position = await rebuild(
        runtime.registry.projection("records"), runtime.registry, runtime.views,
        EmbeddedStream(runtime.store), last.position,
    )
    checkpoints = await runtime.views.checkpoints()
    assert {p: checkpoints[("records", p)] for p in (0, 1, 3)} == {
        0: position, 1: position, 3: position,
    }
    assert position == last.position


async def test_rebuild_clears_the_dead_letters_and_parks_again(
    open_rt: OpenRuntime, ledger: Ledger
) -> None:
    rt = await open_rt(ledger.registry)
    for s, v, f in [("a", 1, True), ("a", 2, False), ("b", 1, False)]:
        await add(rt, ledger, s, v, f)
    runner = ProjectionRunner(ledger.projection, ledger.registry, rt.views, retry=FAST)
    await drain(runner, rt)
    assert len(await rt.views.list_dead_letters()) == 2

    ledger.projection.broken = False
    last = await rt.store.last_position()
    await rebuild(ledger.projection, ledger.registry, rt.views, rt.stream, last)
    assert await rt.views.list_dead_letters() == []
    assert await entries(rt) == {"a": [1, 2], "b": [1]}


async def test_a_running_processor_follows_a_checkpoint_reset_under_it(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cqrskit.update_processor")
    runtime.processor.start()
    last = await write_records(runtime, 20, seed=5)
    await caught_up(runtime, last)

    # A rebuild that has only got as far as position 5 (another process, still running).
    statistics = runtime.registry.projection("statistics")
    await rebuild(
        statistics, runtime.registry, runtime.views,
        EmbeddedStream(runtime.store, batch_size=5), until=5,
    )
    assert (await statistics_view(runtime.views))["total"] == 5

    # New events: the processor finds the checkpoint behind it and follows from there.
    newest = await write_records(runtime, 10, seed=6)
    await wait_for_checkpoint(runtime.views, "statistics", newest.position)
    await wait_for_checkpoint(runtime.views, "records", newest.position)
    assert "statistics/0: checkpoint reset to 5; following from there" in caplog.messages
    log = await whole_log(runtime.store)
    assert await statistics_view(runtime.views) == replay_statistics(log)
    assert await records_view(runtime.views) == replay_records(log)


async def test_a_rebuild_while_commands_and_the_processor_run_loses_and_doubles_nothing(
    runtime: Runtime,
) -> None:
    runtime.processor.start()
    first = await write_records(runtime, 30, seed=7)

    async def keep_writing() -> CommandResult:
        last = first
        for round_ in range(6):
            last = await write_records(runtime, 8, seed=100 + round_)
        return last

    writer = asyncio.create_task(keep_writing())
    for name in ("statistics", "records"):
        await rebuild(
            runtime.registry.projection(name), runtime.registry, runtime.views,
            EmbeddedStream(runtime.store, batch_size=17), await runtime.store.last_position(),
        )
    newest = await writer
    for name in ("statistics", "records"):
        await wait_for_checkpoint(runtime.views, name, newest.position)
    log = await whole_log(runtime.store)
    assert await statistics_view(runtime.views) == replay_statistics(log)
    assert await records_view(runtime.views) == replay_records(log)


async def test_a_query_is_not_fresh_while_its_view_is_being_rebuilt(
    open_rt: OpenRuntime, tmp_path: Path
) -> None:
    """Regression: checkpoints only moved forward in memory, so after a rebuild reset one
    a query with an older token was answered fresh=True from a half-built view."""
    server = await open_rt(data_dir=tmp_path, consistency_timeout=0.3)
    server.processor.start()
    last = await write_records(server, 10, seed=8)
    await caught_up(server, last)
    count = len(await records_view(server.views))

    cli = await open_rt(data_dir=tmp_path)  # `cqrskit projections rebuild` in a terminal
    await rebuild(  # still running: it has replayed one event so far
        cli.registry.projection("records"), cli.registry, cli.views,
        EmbeddedStream(cli.store, batch_size=1), until=1,
    )
    answer = await server.queries.handle(ListRecords(limit=500), last.consistency_token)
    assert answer.fresh is False or len(answer.result.items) == count
