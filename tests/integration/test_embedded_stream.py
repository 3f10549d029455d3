"""The embedded stream on a real SQLite command DB: subscribers at the same position
share one read of the log, and each still sees every event once, in order."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from integration_helpers import OpenRuntime

from cqrskit.aggregate import Aggregate, decides
from cqrskit.bootstrap import Runtime
from cqrskit.domains.records import InsertRecord
from cqrskit.messages import Command, ConsistencyToken, Envelope, Event, NewEvent
from cqrskit.ports import AppendRequest, Collection, ViewWriter
from cqrskit.registry import Domain, Projection, Registry, projects
from cqrskit.streams.embedded import EmbeddedStream


class CountingReads:
    """Counts the reads of the log that reach the real store."""

    def __init__(self, runtime: Runtime) -> None:
        assert runtime.store is not None
        self.store = runtime.store
        self.reads = 0

    async def read_all(self, after: int, limit: int) -> list[Envelope]:
        self.reads += 1
        return await self.store.read_all(after, limit)

    async def wait_for_append(self, after: int, timeout: float) -> None:
        await self.store.wait_for_append(after, timeout)


async def _collect(batches: AsyncIterator[list[Envelope]], until: int) -> list[int]:
    positions: list[int] = []
    async for batch in batches:
        positions += [envelope.position for envelope in batch]
        if positions[-1] >= until:
            return positions


async def _insert(runtime: Runtime, count: int) -> int:
    results = [await runtime.commands.handle(InsertRecord(data={"n": n})) for n in range(count)]
    return results[-1].position


async def test_subscribers_at_one_position_share_reads_and_each_get_every_event(
    runtime: Runtime,
) -> None:
    store = CountingReads(runtime)
    stream = EmbeddedStream(store, batch_size=10)  # type: ignore[arg-type]
    last = await _insert(runtime, 45)
    first, second = await asyncio.gather(
        _collect(stream.subscribe(0, 1, 0), last), _collect(stream.subscribe(0, 1, 0), last)
    )
    assert first == second == list(range(1, last + 1))
    assert store.reads == 5  # 45 events in batches of 10, read once for both


async def test_an_empty_read_is_not_shared_so_new_events_reach_every_subscriber(
    runtime: Runtime,
) -> None:
    """Both subscribers find the log at its end and wait; the events appended then
    reach both, and a subscriber further behind reads for itself."""
    store = CountingReads(runtime)
    stream = EmbeddedStream(store, batch_size=1000)  # type: ignore[arg-type]
    start = await _insert(runtime, 3)
    waiting = [
        asyncio.create_task(_collect(stream.subscribe(0, 1, start), start + 4))
        for _ in range(2)
    ]
    await asyncio.sleep(0.05)  # both have read nothing and wait for an append
    last = await _insert(runtime, 4)
    behind = await asyncio.wait_for(_collect(stream.subscribe(0, 1, 0), last), 5)
    done = await asyncio.wait_for(asyncio.gather(*waiting), 5)
    expected = list(range(start + 1, last + 1))
    assert all(positions[-len(expected):] == expected for positions in done)
    assert all(positions == sorted(set(positions)) for positions in done)
    assert behind == list(range(1, last + 1))


async def test_an_append_during_a_followers_check_wakes_it_though_another_checked_since(
    runtime: Runtime,
) -> None:
    """Follower A checks the log (a read that ran before an append committed) and then
    waits; follower B checks after the append. B must not swallow the wake-up A needs:
    with a shared Event that B cleared, A slept until the next append or its timeout."""
    store = runtime.store
    assert store is not None
    start = await _insert(runtime, 1)
    real = store.last_position
    answer_held = asyncio.Event()

    async def answer_from_before_the_append() -> int:
        position = await real()
        await answer_held.wait()
        return position

    # Controls only the interleaving: A's read runs now, its answer arrives later.
    store.last_position = answer_from_before_the_append  # type: ignore[method-assign]
    follower_a = asyncio.create_task(store.wait_for_append(start, 10))
    await asyncio.sleep(0.01)
    store.last_position = real  # type: ignore[method-assign]
    await _insert(runtime, 1)
    await asyncio.wait_for(store.wait_for_append(start, 10), 1)  # follower B
    answer_held.set()
    await asyncio.wait_for(follower_a, 1)


class Shout(Command):
    name: ClassVar[str] = "shout"
    id: str


class Shouted(Event):
    schema_version: ClassVar[int] = 2
    text: str


class Shouter(Aggregate):
    stream_type = "shouter"

    @decides(Shout)
    def shout(self, command: Shout) -> list[Event]:
        return [Shouted(text="hi")]


def _shouts_registry() -> Registry:
    """Two projections of one event type whose upcaster changes its data in place."""
    domain = Domain("shouts")
    domain.aggregate(Shouter)
    for name in ("loud", "quiet"):
        def shouted(self: Projection, event: Shouted, env: Envelope, views: ViewWriter,
                    collection: str = name) -> None:
            views.put(collection, env.stream_id, {"id": env.stream_id, "text": event.text})

        domain.projection(type(name, (Projection,), {
            "name": name, "collections": (Collection(name),),
            "shouted": projects(Shouted)(shouted),
        }))

    @domain.upcaster("Shouted", 1)
    def rename(data: dict[str, Any]) -> dict[str, Any]:
        data["text"] = data.pop("message")
        return data

    return Registry([domain])


async def test_projections_sharing_a_read_each_upcast_their_own_copy(
    open_rt: OpenRuntime,
) -> None:
    """Both projections get the same envelopes from one read; the first one's upcaster
    must not change the data the second one upcasts (it would fail on it, and park)."""
    rt = await open_rt(_shouts_registry())
    assert rt.store is not None and rt.processor is not None and rt.checkpoints is not None
    for i in range(5):
        await rt.store.append(AppendRequest(
            stream_id=f"s{i}", stream_type="shouter", expected_version=0,
            events=[NewEvent("Shouted", {"message": f"old {i}"}, schema_version=1)],
            metadata={}, command_id=f"c{i}", command_hash="",
        ))
    rt.processor.start()
    last = ConsistencyToken(await rt.store.last_position(), 0)
    assert await rt.checkpoints.wait(["loud", "quiet"], last, 10)
    assert rt.views is not None
    assert await rt.views.list_dead_letters() == []
    for name in ("loud", "quiet"):
        docs = [await rt.views.get(name, f"s{i}") for i in range(5)]
        assert [d["text"] if d else None for d in docs] == [f"old {i}" for i in range(5)]
