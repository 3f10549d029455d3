"""The update processor reads each partition once for all projections and commits a
batch's views and checkpoints in one unit of work; a projection that fails on an
event still gets its retries and dead letter, and the others apply the event."""

import asyncio
from pathlib import Path
from typing import Any

import nats
import pytest
from integration_helpers import (
    OpenRuntime,
    all_docs,
    make_ledger,
    records_view,
    replay_records,
    replay_statistics,
    statistics_view,
    whole_log,
)
from nats_helpers import (
    NATS_HOST,
    NATS_PORT,
    NATS_SERVER,
    NATS_START,
    delete_stream,
    stream_url,
    unique_names,
    wait_until,
)

from cqrskit.command_handler import CommandHandler
from cqrskit.domains import records
from cqrskit.messages import ConsistencyToken
from cqrskit.registry import Registry
from cqrskit.relay import Relay
from cqrskit.stores.sqlite import SqliteEventStore, SqliteRelayState, SqliteViewStore
from cqrskit.streams.nats import NatsStream
from cqrskit.update_processor import UpdateProcessor


@pytest.mark.parametrize("attempts", [1, 3])
async def test_a_projection_failing_in_the_shared_unit_is_retried_and_parks_alone(
    open_rt: OpenRuntime, attempts: int
) -> None:
    ledger = make_ledger(healthy_twin=True)
    rt = await open_rt(ledger.registry, retry_attempts=attempts)
    # Appended before the processor starts, so that they come as one batch.
    plan = [("a", 1, False), ("a", 2, True), ("b", 1, False), ("a", 3, False)]
    results = [await rt.commands.handle(ledger.add(id=s, value=v, fail=f)) for s, v, f in plan]
    rt.processor.start()
    token = ConsistencyToken.decode(results[-1].consistency_token)
    assert await rt.checkpoints.wait(["tally", "entries"], token, timeout=10)

    failing = results[1].position
    # The attempt in the shared unit was the first of `attempts`, not an extra one.
    assert ledger.projection.calls.count(failing) == attempts
    tally = {d["id"]: d["values"] for d in await all_docs(rt.views, "tally")}
    kept = {d["id"]: d["values"] for d in await all_docs(rt.views, "entries")}
    assert tally == {"a": [1, 2, 3], "b": [1]}  # the healthy one applied it all
    assert kept == {"a": [1], "b": [1]}  # stream a stopped before its failing event
    letters = await rt.views.list_dead_letters("entries")
    assert [(d.stream_id, d.envelope.version, d.is_cause, d.attempts) for d in letters] == [
        ("a", 2, True, attempts), ("a", 3, False, 0),
    ]
    assert await rt.views.list_dead_letters("tally") == []


@pytest.fixture
async def nats_url(require_service: Any) -> Any:
    require_service("NATS", NATS_HOST, NATS_PORT, start=NATS_START)
    name, subject = unique_names()
    yield name, stream_url(NATS_SERVER, name, subject, partitions=4)
    await delete_stream(NATS_SERVER, name)


async def test_one_consumer_per_partition_serves_every_projection(
    tmp_path: Path, nats_url: tuple[str, str]
) -> None:
    name, url = nats_url
    registry = Registry([records.domain])
    store = SqliteEventStore(tmp_path / "command.db", synchronous="NORMAL")
    views = SqliteViewStore(tmp_path / "query.db", synchronous="NORMAL")
    stream = NatsStream.from_url(url)
    await views.setup(registry.collections())
    processor = UpdateProcessor(registry, views, stream, partitions=4, owned=range(4))
    relay = Relay(store, stream, SqliteRelayState(store), idle_wait=0.05)
    relaying = asyncio.create_task(relay.run())
    try:
        processor.start()
        commands = CommandHandler(store, registry)
        ids = [f"r{i}" for i in range(60)]
        await asyncio.gather(*(commands.handle(records.InsertRecord(id=i, data={"n": 0}))
                               for i in ids))
        await asyncio.gather(*(commands.handle(records.UpdateRecord(id=i, data={"n": 1}))
                               for i in ids[::2]))
        log = await whole_log(store)

        async def converged() -> bool:
            return await records_view(views) == replay_records(log) and \
                await statistics_view(views) == replay_statistics(log)

        await wait_until(converged, 20, "views equal to a replay of the log")
        client = await nats.connect(NATS_SERVER)
        try:
            consumers = await client.jetstream().consumers_info(name)
        finally:
            await client.close()
        # Before: one consumer per projection and partition (8 here).
        assert sorted(c.config.filter_subject or "" for c in consumers) == sorted(
            f"{url.split('subject=')[1].split('&')[0]}.{p}" for p in range(4)
        )
    finally:
        await processor.stop()
        relaying.cancel()
        await asyncio.gather(relaying, return_exceptions=True)
        await stream.close()
        await views.close()
        await store.close()
