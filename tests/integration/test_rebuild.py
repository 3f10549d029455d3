"""A rebuild runs the cyclic garbage collector less often, and puts it back as it was;
and it still upcasts old events.

A rebuild allocates a batch's worth of objects at a time; at the default threshold
the collector took a third of a rebuild's CPU walking objects that reference counting
frees anyway. These tests check the behaviour, not the speed: the threshold is raised
while (and only while) a rebuild runs, overlapping rebuilds do not leave it raised,
collection turned off (threshold 0) stays off, and cyclic garbage is still collected
during a rebuild (memory stays flat).
"""

import asyncio
import gc
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, ClassVar

import pytest
from integration_helpers import OpenRuntime, records_view, replay_records, whole_log

from cqrskit.aggregate import Aggregate, decides
from cqrskit.bootstrap import Runtime
from cqrskit.domains.records import InsertRecord, UpdateRecord
from cqrskit.messages import Command, Envelope, Event, NewEvent
from cqrskit.ports import AppendRequest, Collection, Stream, ViewWriter
from cqrskit.registry import Domain, Projection, Registry, projects
from cqrskit.streams.embedded import EmbeddedStream
from cqrskit.update_processor import REBUILD_GC_THRESHOLD, rebuild


class Watched:
    """The embedded stream, noting the collector's threshold at every batch it hands
    out, and able to hold the batches back until released."""

    def __init__(self, stream: Stream, *, held: bool = False) -> None:
        self.stream = stream
        self.thresholds: list[int] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        if not held:
            self.release.set()

    partitions = 1
    needs_relay = False

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        pass

    async def subscribe(
        self, partition: int, partitions: int, after: int, *, consumer: str | None = None
    ) -> AsyncIterator[list[Envelope]]:
        async for batch in self.stream.subscribe(partition, partitions, after):
            self.started.set()
            await self.release.wait()
            self.thresholds.append(gc.get_threshold()[0])
            yield batch

    async def close(self) -> None:
        pass


@pytest.fixture
def default_thresholds() -> Iterator[tuple[int, int, int]]:
    """Start from Python's defaults and put back whatever the process had."""
    saved = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield gc.get_threshold()
    gc.set_threshold(*saved)


async def write(runtime: Runtime, count: int) -> int:
    for i in range(count):
        await runtime.commands.handle(InsertRecord(id=f"r{i}", data={"n": i}))
    for i in range(0, count, 3):
        await runtime.commands.handle(UpdateRecord(id=f"r{i}", data={"n": -i}))
    return await runtime.store.last_position()


async def test_the_threshold_is_raised_during_a_rebuild_and_restored_after(
    runtime: Runtime, default_thresholds: tuple[int, int, int]
) -> None:
    last = await write(runtime, 30)
    watched = Watched(EmbeddedStream(runtime.store, batch_size=7))
    await rebuild(runtime.registry.projection("records"), runtime.registry, runtime.views,
                  watched, last)
    assert len(watched.thresholds) > 1
    assert set(watched.thresholds) == {REBUILD_GC_THRESHOLD}
    assert gc.get_threshold() == default_thresholds
    assert await records_view(runtime.views) == replay_records(await whole_log(runtime.store))


async def test_a_failed_rebuild_restores_the_threshold(
    runtime: Runtime, default_thresholds: tuple[int, int, int]
) -> None:
    last = await write(runtime, 5)

    class Failing(Watched):
        async def subscribe(
            self, partition: int, partitions: int, after: int, *, consumer: str | None = None
        ) -> AsyncIterator[list[Envelope]]:
            self.thresholds.append(gc.get_threshold()[0])
            raise OSError("the log is gone")
            yield []  # an async generator all the same

    failing = Failing(runtime.stream)
    with pytest.raises(OSError, match="the log is gone"):
        await rebuild(runtime.registry.projection("records"), runtime.registry,
                      runtime.views, failing, last)
    assert failing.thresholds == [REBUILD_GC_THRESHOLD]
    assert gc.get_threshold() == default_thresholds


async def test_overlapping_rebuilds_restore_the_threshold_after_the_last_one(
    runtime: Runtime, default_thresholds: tuple[int, int, int]
) -> None:
    last = await write(runtime, 20)
    held = Watched(EmbeddedStream(runtime.store, batch_size=5), held=True)
    first = asyncio.create_task(rebuild(
        runtime.registry.projection("records"), runtime.registry, runtime.views, held, last
    ))
    await held.started.wait()
    # A second rebuild starts and ends while the first is still running.
    await rebuild(runtime.registry.projection("statistics"), runtime.registry,
                  runtime.views, EmbeddedStream(runtime.store), last)
    assert gc.get_threshold()[0] == REBUILD_GC_THRESHOLD
    held.release.set()
    assert await first == last
    assert set(held.thresholds) == {REBUILD_GC_THRESHOLD}
    assert gc.get_threshold() == default_thresholds


async def test_a_process_that_turned_automatic_collection_off_keeps_it_off(
    runtime: Runtime, default_thresholds: tuple[int, int, int]
) -> None:
    last = await write(runtime, 6)
    gc.set_threshold(0, 10, 10)
    watched = Watched(EmbeddedStream(runtime.store, batch_size=4))
    await rebuild(runtime.registry.projection("records"), runtime.registry, runtime.views,
                  watched, last)
    assert set(watched.thresholds) == {0}
    assert gc.get_threshold() == (0, 10, 10)


async def test_cyclic_garbage_is_still_collected_during_a_rebuild(
    runtime: Runtime, default_thresholds: tuple[int, int, int]
) -> None:
    last = await write(runtime, 12)
    collected: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            collected.append(info["collected"])

    class Littering(Watched):
        """Leaves cycles behind at every batch, as a careless projection might, and
        notes how many the collector had freed by then."""

        def __init__(self, stream: Stream) -> None:
            super().__init__(stream)
            self.freed: list[int] = []

        async def subscribe(
            self, partition: int, partitions: int, after: int, *, consumer: str | None = None
        ) -> AsyncIterator[list[Envelope]]:
            async for batch in super().subscribe(partition, partitions, after):
                for _ in range(REBUILD_GC_THRESHOLD // 4):
                    cycle: list[object] = []
                    cycle.append(cycle)
                self.freed.append(sum(collected))
                yield batch

    gc.collect()
    gc.callbacks.append(count)
    littering = Littering(EmbeddedStream(runtime.store, batch_size=2))
    try:
        await rebuild(runtime.registry.projection("records"), runtime.registry, runtime.views,
                      littering, last)
    finally:
        gc.callbacks.remove(count)
    # 8 batches leave twice the threshold in cycles: collected while the rebuild runs.
    assert len(littering.freed) == 8
    assert littering.freed[-1] >= REBUILD_GC_THRESHOLD // 2


class Rename(Command):
    name: ClassVar[str] = "rename"
    id: str


class Renamed(Event):
    schema_version: ClassVar[int] = 2
    title: str


class Thing(Aggregate):
    stream_type = "thing"

    @decides(Rename)
    def rename(self, command: Rename) -> list[Event]:
        return [Renamed(title="new")]


def _titles_registry() -> Registry:
    """`Renamed` was stored as {"name": ...} at schema version 1; now it has a title."""
    domain = Domain("things")
    domain.aggregate(Thing)

    @domain.projection
    class Titles(Projection):
        name = "titles"
        collections = (Collection("titles"),)

        @projects(Renamed)
        def renamed(self, event: Renamed, envelope: Envelope, views: ViewWriter) -> None:
            views.put("titles", envelope.stream_id, {"title": event.title})

    @domain.upcaster("Renamed", 1)
    def to_title(data: dict[str, Any]) -> dict[str, Any]:
        return {"title": data["name"]}

    return Registry([domain])


async def test_a_rebuild_upcasts_old_events(
    open_rt: OpenRuntime, default_thresholds: tuple[int, int, int]
) -> None:
    rt = await open_rt(_titles_registry())
    for i in range(9):
        await rt.store.append(AppendRequest(
            stream_id=f"t{i}", stream_type="thing", expected_version=0,
            events=[NewEvent("Renamed", {"name": f"old {i}"}, schema_version=1)],
            metadata={}, command_id=f"c{i}", command_hash="",
        ))
    await rt.commands.handle(Rename(id="t0"))
    last = await rt.store.last_position()
    await rebuild(rt.registry.projection("titles"), rt.registry, rt.views,
                  EmbeddedStream(rt.store, batch_size=4), last)
    assert await rt.views.list_dead_letters() == []
    titles = [await rt.views.get("titles", f"t{i}") for i in range(9)]
    assert titles == [{"title": "new"}] + [{"title": f"old {i}"} for i in range(1, 9)]
