"""The relay from the event log to the stream: saves its position only after the
broker acknowledged, retries through outages, never skips or doubles an event;
one leader at a time. Fakes first, then the real SQLite/PostgreSQL stores and NATS."""

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from integration_helpers import (
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
    PrivateNatsServer,
    collect,
    delete_stream,
    require_nats_binary,
    stream_messages,
    stream_url,
    unique_names,
    wait_until,
)

from cqrskit.command_handler import CommandHandler
from cqrskit.domains import records
from cqrskit.errors import Unavailable
from cqrskit.messages import Envelope, NewEvent, new_id, partition_of
from cqrskit.ports import AppendRequest, EventStore
from cqrskit.registry import Registry
from cqrskit.relay import Backoff, Relay
from cqrskit.stores.sqlite import SqliteEventStore, SqliteRelayState, SqliteViewStore
from cqrskit.streams.nats import NatsStream
from cqrskit.update_processor import UpdateProcessor

FAST = Backoff(first=0.01, maximum=0.2)


# ------------------------------------------------------------------ fakes


class MemoryRelayState:
    """The RelayState port in memory: records every save and every leadership."""

    def __init__(self) -> None:
        self.saved = 0
        self.saves: list[int] = []
        self.leads = 0
        self._lock = asyncio.Lock()

    async def position(self) -> int:
        return self.saved

    async def save(self, position: int) -> None:
        self.saved = max(self.saved, position)
        self.saves.append(position)

    @contextlib.asynccontextmanager
    async def lead(self) -> AsyncIterator[None]:
        async with self._lock:
            self.leads += 1
            yield


class FakeStream:
    """Records acknowledged batches; `failing(attempt)` says which attempts fail."""

    def __init__(self, failing: Callable[[int], bool] = lambda attempt: False) -> None:
        self.failing = failing
        self.attempts: list[list[int]] = []
        self.acknowledged: list[list[int]] = []
        self.on_ack: Callable[[list[int]], None] = lambda positions: None

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        positions = [e.position for e in envelopes]
        self.attempts.append(positions)
        if self.failing(len(self.attempts)):
            raise Unavailable("the broker is down (fake)")
        self.acknowledged.append(positions)
        self.on_ack(positions)

    def subscribe(self, partition: int, partitions: int, after: int) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class FailingReads:
    """An event store whose read_all fails `times` times once `after` reaches `at`."""

    def __init__(self, store: EventStore, at: int, times: int) -> None:
        self.store = store
        self.at = at
        self.times = times

    async def read_all(self, after: int, limit: int) -> list[Envelope]:
        if after >= self.at and self.times:
            self.times -= 1
            raise Unavailable("the command DB is down (fake)")
        return await self.store.read_all(after, limit)

    async def wait_for_append(self, after: int, timeout: float) -> None:
        await self.store.wait_for_append(after, timeout)


# ---------------------------------------------------------------- helpers


async def append(store: EventStore, count: int, *, streams: int = 20, seed: int = 0) -> None:
    """Append `count` one-event commands over `streams` aggregates, many at once."""
    rng = random.Random(seed)
    versions: dict[str, int] = {}
    prefix = new_id()[-8:]
    remaining = count
    while remaining:
        ids = [f"s{prefix}-{i}" for i in rng.sample(range(streams), min(streams, remaining))]
        requests = [
            AppendRequest(
                stream_id=sid, stream_type="thing", expected_version=versions.get(sid, 0),
                events=[NewEvent("Happened", {"n": rng.random()})], metadata={},
                command_id=new_id(), command_hash="",
            )
            for sid in ids
        ]
        for result in await asyncio.gather(*(store.append(r) for r in requests)):
            versions[result.stream_id] = result.version
        remaining -= len(ids)


@contextlib.asynccontextmanager
async def running(*relays: Relay) -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks = [asyncio.create_task(relay.run()) for relay in relays]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def caught_up(relay: Relay, store: EventStore, state: Any, timeout: float = 20) -> int:
    """Wait until the relay saved the store's last position (and knows it); return it."""
    last = await store.last_position()

    async def done() -> bool:
        return relay.position >= last and await state.position() >= last

    await wait_until(done, timeout, f"relay saving position {last}")
    return last


async def assert_stream_holds_log(stream: NatsStream, store: EventStore, partitions: int) -> None:
    """Every event of the log is in the broker once, in its partition, in order."""
    log = await whole_log(store)
    assert await stream_messages(stream.url.server, stream.url.stream) == len(log)
    for partition in range(partitions):
        expected = [e for e in log if partition_of(e.stream_id, partitions) == partition]
        got = await collect(stream, partition, partitions, 0, len(expected))
        assert [e.event_id for e in got] == [e.event_id for e in expected]
        assert [e.position for e in got] == [e.position for e in expected]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteEventStore]:
    opened = SqliteEventStore(tmp_path / "command.db", synchronous="NORMAL")
    yield opened
    await opened.close()


@pytest.fixture
async def nats_stream(require_service: Any) -> AsyncIterator[NatsStream]:
    """A NatsStream on a fresh stream (4 partitions) of the shared broker."""
    require_service("NATS", NATS_HOST, NATS_PORT, start=NATS_START)
    name, subject = unique_names()
    stream = NatsStream.from_url(stream_url(NATS_SERVER, name, subject, partitions=4))
    yield stream
    await stream.close()
    await delete_stream(NATS_SERVER, name)


@pytest.fixture
def private_nats(tmp_path: Path) -> Any:
    """A nats-server of this test's own, not started yet; stopped at the end."""
    require_nats_binary()
    server = PrivateNatsServer(tmp_path / "nats")
    yield server
    server.stop()


# --------------------------------------------------------- unit-level, fakes


async def test_publishes_batches_and_saves_each_after_it(store: SqliteEventStore) -> None:
    await append(store, 25)
    stream, state = FakeStream(), MemoryRelayState()
    relay = Relay(store, stream, state, batch_size=10, idle_wait=0.05)
    async with running(relay):
        await caught_up(relay, store, state)
    assert stream.acknowledged == [list(range(1, 11)), list(range(11, 21)), list(range(21, 26))]
    assert state.saves == [10, 20, 25]


async def test_failed_publishes_are_retried_and_the_position_waits(
    store: SqliteEventStore,
) -> None:
    await append(store, 40)
    rng = random.Random(3)
    stream, state = FakeStream(lambda attempt: attempt <= 3 or rng.random() < 0.4), \
        MemoryRelayState()
    acknowledged: set[int] = set()

    def on_ack(positions: list[int]) -> None:
        # The position saved so far never passes an acknowledged event.
        assert state.saved <= max(acknowledged, default=0)
        acknowledged.update(positions)

    stream.on_ack = on_ack
    relay = Relay(store, stream, state, batch_size=7, idle_wait=0.05, backoff=FAST)
    async with running(relay):
        await caught_up(relay, store, state)
    # Every attempt at a batch is the same batch again until it is acknowledged.
    batches = [stream.attempts[0]]
    for attempt in stream.attempts[1:]:
        assert attempt == batches[-1] or attempt[0] == batches[-1][-1] + 1
        if attempt != batches[-1]:
            batches.append(attempt)
    assert batches == stream.acknowledged
    assert [p for batch in stream.acknowledged for p in batch] == list(range(1, 41))
    assert state.saves == [batch[-1] for batch in stream.acknowledged]
    assert relay.failed_publishes == len(stream.attempts) - len(stream.acknowledged) >= 3


async def test_store_failure_gives_up_the_lead_and_resumes(store: SqliteEventStore) -> None:
    await append(store, 30)
    stream, state = FakeStream(), MemoryRelayState()
    relay = Relay(FailingReads(store, at=10, times=2), stream, state,
                  batch_size=10, idle_wait=0.05, backoff=FAST)
    async with running(relay):
        await caught_up(relay, store, state)
    assert state.leads == 3
    assert stream.acknowledged == [list(range(1, 11)), list(range(11, 21)), list(range(21, 31))]


async def test_resumes_from_the_saved_position(store: SqliteEventStore) -> None:
    await append(store, 30)
    stream, state = FakeStream(), MemoryRelayState()
    await state.save(12)  # a previous leader published up to 12
    relay = Relay(store, stream, state, batch_size=100, idle_wait=0.05)
    async with running(relay):
        await caught_up(relay, store, state)
    assert stream.acknowledged == [list(range(13, 31))]


# ------------------------------------------------------- the real NATS broker


async def test_relay_carries_the_log_to_nats(
    store: SqliteEventStore, nats_stream: NatsStream
) -> None:
    state = SqliteRelayState(store)
    relay = Relay(store, nats_stream, state, batch_size=100, idle_wait=0.05)
    await append(store, 150, streams=30, seed=1)
    async with running(relay):
        await append(store, 350, streams=30, seed=2)  # while it relays
        last = await caught_up(relay, store, state)
    assert last == 500
    assert await SqliteRelayState(store).position() == 500
    await assert_stream_holds_log(nats_stream, store, partitions=4)


async def test_a_standby_relay_takes_over(
    tmp_path: Path, store: SqliteEventStore, nats_stream: NatsStream
) -> None:
    second_store = SqliteEventStore(tmp_path / "command.db")  # like another process
    try:
        first = Relay(store, nats_stream, SqliteRelayState(store, poll=0.05),
                      batch_size=50, idle_wait=0.05)
        standby = Relay(second_store, nats_stream, SqliteRelayState(second_store, poll=0.05),
                        batch_size=50, idle_wait=0.05)
        async with running(first) as (first_task,):
            await wait_until(lambda: first.leading, what="the first relay leading")
            async with running(standby):
                await append(store, 120)
                await caught_up(first, store, first.state)
                await asyncio.sleep(0.2)
                assert first.leading and not standby.leading
                first_task.cancel()  # the leader dies; its lock goes with it
                await append(store, 130, seed=5)
                await caught_up(standby, store, standby.state)
                assert standby.leading
                assert standby.position == 250
        await assert_stream_holds_log(nats_stream, store, partitions=4)
    finally:
        await second_store.close()


async def test_closing_the_client_mid_run_loses_and_doubles_nothing(
    store: SqliteEventStore, nats_stream: NatsStream
) -> None:
    state = MemoryRelayState()
    relay = Relay(store, nats_stream, state, batch_size=200, idle_wait=0.05, backoff=FAST)

    async def break_connections_until_a_publish_fails() -> None:
        # Publishing a batch is quick: close the connection again and again, while
        # events keep coming, until one close lands in the middle of a publish.
        rng = random.Random(9)
        deadline = asyncio.get_running_loop().time() + 20
        round_ = 0
        while relay.failed_publishes == 0:
            assert asyncio.get_running_loop().time() < deadline, "no publish was interrupted"
            await append(store, 300, streams=50, seed=round_)
            round_ += 1
            await asyncio.sleep(rng.uniform(0, 0.02))
            link = nats_stream._links.get("publish")
            if link is not None:
                await link.client.close()

    async with running(relay):
        await break_connections_until_a_publish_fails()
        await append(store, 300, streams=50, seed=999)  # and the relay goes on after
        await caught_up(relay, store, state, timeout=30)
    assert relay.failed_publishes > 0
    await assert_stream_holds_log(nats_stream, store, partitions=4)


async def test_broker_outage_stops_the_position_then_catches_up(
    store: SqliteEventStore, private_nats: PrivateNatsServer
) -> None:
    """A broker that is down at first, then up, then stopped and restarted under load."""
    name, subject = unique_names()
    stream = NatsStream.from_url(
        stream_url(private_nats.url, name, subject, partitions=4), connect_timeout=1
    )
    state = MemoryRelayState()
    relay = Relay(store, stream, state, batch_size=100, idle_wait=0.05, backoff=FAST)
    try:
        async with running(relay):
            # Nothing listens yet: the relay retries and saves nothing.
            await append(store, 200, seed=11)
            await wait_until(lambda: relay.failed_publishes >= 3, what="failed publishes")
            assert state.saved == 0
            private_nats.start()
            await caught_up(relay, store, state)

            # Stopped under load: the saved position stops at what the broker took.
            writer = asyncio.create_task(append(store, 2000, streams=40, seed=12))
            await wait_until(lambda: state.saved >= 400, what="publishing under load")
            private_nats.stop()
            failures = relay.failed_publishes
            await wait_until(lambda: relay.failed_publishes > failures + 2, what="failures")
            stopped_at = state.saved
            await writer
            await asyncio.sleep(0.3)
            assert state.saved == stopped_at < await store.last_position()

            private_nats.start()  # same store dir: the stream and its events are back
            await caught_up(relay, store, state, timeout=30)
        await assert_stream_holds_log(stream, store, partitions=4)
    finally:
        await stream.close()


# ------------------------------------------------------- with PostgreSQL state


async def test_relay_with_the_postgresql_store_and_state(
    postgres_url: str, nats_stream: NatsStream
) -> None:
    from cqrskit.stores.postgres import PostgresEventStore, PostgresRelayState

    pg = await PostgresEventStore.open(postgres_url)
    try:
        state = PostgresRelayState(pg, poll=0.05)
        relay = Relay(pg, nats_stream, state, batch_size=100, idle_wait=0.05)
        standby = Relay(pg, nats_stream, PostgresRelayState(pg, poll=0.05), idle_wait=0.05)
        async with running(relay) as (leader,):
            await wait_until(lambda: relay.leading, what="the first relay leading")
            async with running(standby):
                await append(pg, 300, streams=25, seed=21)
                await caught_up(relay, pg, state)
                await asyncio.sleep(0.2)
                assert relay.leading and not standby.leading
                leader.cancel()  # its connection closes, and the advisory lock with it
                await append(pg, 100, streams=25, seed=22)
                await caught_up(standby, pg, state)
                assert standby.leading
        await assert_stream_holds_log(nats_stream, pg, partitions=4)
    finally:
        await pg.close()


# ------------------------------------------- the whole pipeline through NATS


async def test_views_through_nats_equal_a_replay_of_the_log(
    tmp_path: Path, store: SqliteEventStore, nats_stream: NatsStream
) -> None:
    registry = Registry([records.domain])
    views = SqliteViewStore(tmp_path / "query.db", synchronous="NORMAL")
    await views.setup(registry.collections())
    commands = CommandHandler(store, registry)
    processor = UpdateProcessor(registry, views, nats_stream, partitions=4, owned=range(4))
    relay = Relay(store, nats_stream, MemoryRelayState(), idle_wait=0.05)
    try:
        processor.start()
        async with running(relay):
            ids = [f"r{i}" for i in range(120)]
            await asyncio.gather(*(commands.handle(records.InsertRecord(id=i, data={"n": 0}))
                                   for i in ids))
            await asyncio.gather(*(commands.handle(records.UpdateRecord(id=i, data={"n": 1}))
                                   for i in ids[::2]))
            await asyncio.gather(*(commands.handle(records.DeleteRecord(id=i))
                                   for i in ids[::3]))
            log = await whole_log(store)

            async def converged() -> bool:
                return await records_view(views) == replay_records(log) and \
                    await statistics_view(views) == replay_statistics(log)

            await wait_until(converged, 20, "views equal to a replay of the log")
    finally:
        await processor.stop()
        await views.close()
