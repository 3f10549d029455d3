"""Partition leases on a real query DB (SQLite and PostgreSQL): two processes share
the partitions, one dies and the other takes everything, it comes back and they
split again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from cqrskit.leases import PartitionLeases
from cqrskit.ports import ViewStore

TTL = 1.0
HEARTBEAT = 0.1
PARTITIONS = 8


@pytest.fixture(params=["sqlite", "postgres"])
async def open_views(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[], Awaitable[ViewStore]]]:
    """Open view stores on one query DB, like separate processes would."""
    opened: list[ViewStore] = []
    if request.param == "sqlite":
        from cqrskit.stores.sqlite import SqliteViewStore

        url = f"sqlite:///{tmp_path / 'query.db'}"
    else:
        url = request.getfixturevalue("postgres_url")

    async def factory() -> ViewStore:
        views: ViewStore
        if request.param == "sqlite":
            views = SqliteViewStore.from_url(url)
        else:
            from cqrskit.stores.postgres import PostgresViewStore

            views = await PostgresViewStore.open(url, pool_size=2)
        opened.append(views)
        return views

    yield factory
    for views in opened:
        await views.close()


class Owner:
    """A PartitionLeases whose processor just records what it was told to run."""

    def __init__(self, views: ViewStore, name: str) -> None:
        self.running: set[int] = set()
        self.leases = PartitionLeases(
            views, PARTITIONS, self.assign, owner=name, ttl=TTL, heartbeat_seconds=HEARTBEAT
        )
        self.task: asyncio.Task[None] | None = None

    async def assign(self, partitions: set[int]) -> None:
        self.running = set(partitions)

    def start(self) -> None:
        self.task = asyncio.create_task(self.leases.run())

    async def pause(self) -> None:
        """Stop heartbeating, as a process that hangs or dies would."""
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_two_owners_split_take_over_and_rebalance(
    open_views: Callable[[], Awaitable[ViewStore]],
) -> None:
    a = Owner(await open_views(), "a")
    b = Owner(await open_views(), "b")
    a.start()
    await eventually(lambda: a.running == set(range(8)))
    b.start()
    await eventually(lambda: len(a.running) == 4 and len(b.running) == 4)
    assert a.running | b.running == set(range(8))
    stored = await a.leases.store.leases()
    assert sorted(stored) == list(range(8)) and set(stored.values()) == {"a", "b"}

    await b.pause()
    started = asyncio.get_running_loop().time()
    await eventually(lambda: a.running == set(range(8)))
    # b's leases expire after the ttl; a takes them at its next heartbeat after that.
    assert asyncio.get_running_loop().time() - started < TTL + 5 * HEARTBEAT + 1

    b.start()
    await eventually(lambda: len(a.running) == 4 and len(b.running) == 4)
    assert a.running.isdisjoint(b.running)
    await a.pause()
    await b.pause()


async def test_a_released_owner_hands_over_at_once(
    open_views: Callable[[], Awaitable[ViewStore]],
) -> None:
    a = Owner(await open_views(), "a")
    b = Owner(await open_views(), "b")
    a.start()
    b.start()
    await eventually(lambda: len(a.running) == 4 and len(b.running) == 4)
    await a.pause()
    await a.leases.release()
    assert a.running == set()
    # No waiting for the ttl: b sees one live owner and the released partitions.
    await eventually(lambda: b.running == set(range(8)), timeout=TTL)
    await b.pause()


async def test_update_processors_with_leases_hand_the_partition_over(tmp_path: Path) -> None:
    """Two `update-processor` runtimes on one pair of SQLite files (embedded stream, one
    partition): one runs it; once it stops, the other takes over and finishes the log."""
    from cqrskit.bootstrap import open_runtime
    from cqrskit.config import Settings
    from cqrskit.domains.records import InsertRecord

    settings = Settings(
        data_dir=tmp_path, stream="embedded", lease_ttl=TTL, lease_heartbeat=HEARTBEAT,
        command_db=f"sqlite:///{tmp_path / 'command.db'}",
        query_db=f"sqlite:///{tmp_path / 'query.db'}",
    )
    one = await open_runtime(settings, role="update-processor")
    two = await open_runtime(settings, role="update-processor")
    writer = await open_runtime(settings, role="command-handler")
    # Each role builds only its parts: no command handler in a processor, no views in a writer.
    assert one.commands is None and one.queries is None and writer.views is None
    running = [one, two, writer]
    try:
        one.start()
        await eventually(lambda: one.processor.owned == [0])
        two.start()
        for n in range(20):
            await writer.commands.handle(InsertRecord(id=f"r{n}", data={"n": n}))
        await asyncio.sleep(5 * HEARTBEAT)
        assert one.processor.owned == [0] and two.processor.owned == []
        running.remove(one)
        await one.close()
        for n in range(20, 40):
            await writer.commands.handle(InsertRecord(id=f"r{n}", data={"n": n}))
        await eventually(lambda: two.processor.owned == [0])
        last = await writer.store.last_position()

        async def done() -> bool:
            return (await two.views.checkpoints()).get(("records", 0), 0) >= last

        deadline = asyncio.get_running_loop().time() + 10
        while not await done():
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        page = await two.views.find("records", {}, limit=100)
        assert len(page.items) == 40
        totals = await two.views.get("stats_totals", "all")
        assert totals is not None and totals["total"] == 40
    finally:
        for runtime in running:
            await runtime.close()
