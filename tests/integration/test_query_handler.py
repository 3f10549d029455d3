"""QueryHandler on real files: read-your-writes with consistency tokens, command status."""

import pytest
from integration_helpers import Ledger, OpenRuntime, drain

from cqrskit.bootstrap import Runtime
from cqrskit.domains.records import (
    GetRecord,
    GetStatistics,
    InsertRecord,
    ListRecords,
    UpdateRecord,
)
from cqrskit.errors import InvalidRequest, NotFound
from cqrskit.messages import ConsistencyToken
from cqrskit.update_processor import ProjectionRunner, RetryPolicy, retry_dead_letters


async def test_a_query_with_a_token_waits_for_its_write(runtime: Runtime) -> None:
    runtime.processor.start()
    inserted = await runtime.commands.handle(InsertRecord(data={"color": "red"}))
    answer = await runtime.queries.handle(
        GetRecord(id=inserted.stream_id), inserted.consistency_token
    )
    assert answer.fresh is True
    assert (answer.result.id, answer.result.data, answer.result.version) == (
        inserted.stream_id, {"color": "red"}, 1,
    )
    updated = await runtime.commands.handle(
        UpdateRecord(id=inserted.stream_id, data={"color": "blue"})
    )
    answer = await runtime.queries.handle(
        ListRecords(filter=["color:blue"]), updated.consistency_token
    )
    assert answer.fresh is True
    assert [(r.id, r.version) for r in answer.result.items] == [(inserted.stream_id, 2)]
    stats = await runtime.queries.handle(GetStatistics(), updated.consistency_token)
    assert stats.fresh is True and stats.result.total == 2


async def test_a_token_from_another_process_is_awaited_by_polling(
    open_rt: OpenRuntime,
) -> None:
    writer = await open_rt()
    reader = await open_rt()  # same files; its own processor is not running
    writer.processor.start()
    inserted = await writer.commands.handle(InsertRecord(data={"a": 1}))
    answer = await reader.queries.handle(
        GetRecord(id=inserted.stream_id), inserted.consistency_token
    )
    assert answer.fresh is True and answer.result.data == {"a": 1}


async def test_with_the_processor_stopped_a_token_times_out_and_answers_stale(
    open_rt: OpenRuntime,
) -> None:
    runtime = await open_rt(consistency_timeout=0.3)
    inserted = await runtime.commands.handle(InsertRecord(data={"color": "red"}))
    answer = await runtime.queries.handle(ListRecords(), inserted.consistency_token)
    assert answer.fresh is False
    assert answer.result.items == []  # what the view has: nothing yet

    runtime.processor.start()
    answer = await runtime.queries.handle(ListRecords(), inserted.consistency_token)
    assert answer.fresh is True
    assert [r.id for r in answer.result.items] == [inserted.stream_id]


async def test_without_a_token_the_answer_is_neither_fresh_nor_stale(runtime: Runtime) -> None:
    inserted = await runtime.commands.handle(InsertRecord(data={}))
    for token in (None, ""):
        answer = await runtime.queries.handle(ListRecords(), token)
        assert answer.fresh is None and answer.result.items == []
    with pytest.raises(NotFound):
        await runtime.queries.handle(GetRecord(id=inserted.stream_id))


async def test_a_token_of_an_old_write_is_fresh_at_once(open_rt: OpenRuntime) -> None:
    runtime = await open_rt(consistency_timeout=0.3)
    first = await runtime.commands.handle(InsertRecord(data={}))
    runtime.processor.start()
    assert (await runtime.queries.handle(ListRecords(), first.consistency_token)).fresh is True
    await runtime.processor.stop()
    second = await runtime.commands.handle(InsertRecord(data={}))
    assert (await runtime.queries.handle(ListRecords(), first.consistency_token)).fresh is True
    assert (await runtime.queries.handle(ListRecords(), second.consistency_token)).fresh is False


@pytest.mark.parametrize("token", ["garbage", "1.2.3", "-4.00000000", "12", "x.ff"])
async def test_a_garbage_token_is_an_invalid_request(runtime: Runtime, token: str) -> None:
    with pytest.raises(InvalidRequest, match="consistency_token"):
        await runtime.queries.handle(ListRecords(), token)


async def test_a_token_for_a_position_never_written_is_refused(open_rt: OpenRuntime) -> None:
    # Waiting the full timeout for a position that does not exist would let anyone
    # slow requests down at will: such a token did not come from this service.
    runtime = await open_rt(consistency_timeout=5)
    runtime.processor.start()
    await runtime.commands.handle(InsertRecord(data={}))
    future = ConsistencyToken.for_event("nope", 10_000).encode()
    with pytest.raises(InvalidRequest, match="ahead of the event log"):
        await runtime.queries.handle(ListRecords(), future)


async def test_command_status_pending_then_projected(runtime: Runtime) -> None:
    inserted = await runtime.commands.handle(InsertRecord(data={}), command_id="cmd-1")
    status = await runtime.queries.command_status("cmd-1")
    assert status["status"] == "pending"
    assert status["projections"] == {"records": "pending", "statistics": "pending"}
    assert status["position"] == inserted.position
    assert status["id"] == inserted.stream_id
    assert status["consistency_token"] == inserted.consistency_token

    # One projection caught up, the other not: still pending overall.
    records = ProjectionRunner(runtime.registry.projection("records"), runtime.registry,
                               runtime.views)
    await drain(records, runtime)
    status = await runtime.queries.command_status("cmd-1")
    assert status["projections"] == {"records": "projected", "statistics": "pending"}
    assert status["status"] == "pending"

    runtime.processor.start()
    token = ConsistencyToken.decode(inserted.consistency_token)
    assert await runtime.checkpoints.wait(["records", "statistics"], token, timeout=5)
    status = await runtime.queries.command_status("cmd-1")
    assert status["status"] == "projected"
    assert status["projections"] == {"records": "projected", "statistics": "projected"}

    with pytest.raises(NotFound):
        await runtime.queries.command_status("never-sent")


async def test_command_status_says_parked_for_a_parked_stream(
    open_rt: OpenRuntime, ledger: Ledger
) -> None:
    rt = await open_rt(ledger.registry)
    handle = rt.commands.handle
    await handle(ledger.add(id="a", value=1), command_id="a1")
    await handle(ledger.add(id="a", value=2, fail=True), command_id="a2")
    await handle(ledger.add(id="b", value=1), command_id="b1")
    await handle(ledger.add(id="a", value=3), command_id="a3")
    runner = ProjectionRunner(ledger.projection, ledger.registry, rt.views,
                              retry=RetryPolicy(2, 0.01))
    await drain(runner, rt)

    statuses = {c: (await rt.queries.command_status(c))["status"] for c in ("a1", "a2", "b1", "a3")}
    assert statuses == {"a1": "projected", "a2": "parked", "b1": "projected", "a3": "parked"}
    assert (await rt.queries.command_status("a3"))["projections"] == {"entries": "parked"}

    ledger.projection.broken = False
    [head, _] = await rt.views.list_dead_letters()
    await retry_dead_letters(ledger.registry, rt.views, head.id)
    assert (await rt.queries.command_status("a2"))["status"] == "projected"
    assert (await rt.queries.command_status("a3"))["status"] == "projected"
