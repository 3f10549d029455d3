"""The relay saves a batch's position while it reads and publishes the next batch,
never before the batch's publish returned, one save at a time."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from nats_helpers import wait_until

from cqrskit.errors import Unavailable
from cqrskit.messages import Envelope, NewEvent, new_id
from cqrskit.ports import AppendRequest
from cqrskit.relay import Backoff, Relay
from cqrskit.stores.sqlite import SqliteEventStore


class GatedState:
    """A RelayState whose saves wait for `gate`; records what was published meanwhile."""

    def __init__(self, published: list[int]) -> None:
        self.published = published
        self.gate = asyncio.Event()
        self.saved = 0
        self.in_flight = 0
        self.most_in_flight = 0
        # (position saved, last position published when the save began)
        self.saves: list[tuple[int, int]] = []
        self.fail_next = False

    async def position(self) -> int:
        return self.saved

    async def save(self, position: int) -> None:
        self.saves.append((position, self.published[-1]))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
            if self.fail_next:
                self.fail_next = False
                raise Unavailable("the command DB is down (fake)")
            self.saved = max(self.saved, position)
        finally:
            self.in_flight -= 1

    @contextlib.asynccontextmanager
    async def lead(self) -> AsyncIterator[None]:
        yield


class Published:
    def __init__(self) -> None:
        self.positions: list[int] = []

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        self.positions.extend(e.position for e in envelopes)

    async def close(self) -> None:
        pass


async def append(store: SqliteEventStore, count: int) -> None:
    for _ in range(count):
        await store.append(AppendRequest(
            stream_id=new_id(), stream_type="thing", expected_version=0,
            events=[NewEvent("Happened", {})], metadata={}, command_id=new_id(),
            command_hash="",
        ))


async def test_the_next_batch_is_published_while_the_last_position_is_saved(
    tmp_path: Path,
) -> None:
    store = SqliteEventStore(tmp_path / "command.db", synchronous="NORMAL")
    stream = Published()
    state = GatedState(stream.positions)
    relay = Relay(store, stream, state, batch_size=10, idle_wait=0.05,  # type: ignore[arg-type]
                  backoff=Backoff(first=0.01, maximum=0.05))
    try:
        await append(store, 30)
        task = asyncio.create_task(relay.run())
        # The first save is held; the second batch goes out all the same (it used to
        # wait for the save), and no third save starts before the first one ended.
        await wait_until(lambda: len(stream.positions) >= 20, 5, "the second batch published")
        await asyncio.sleep(0.1)
        assert stream.positions == list(range(1, 21))
        assert state.saves == [(10, 10)] and state.saved == 0
        state.gate.set()
        await wait_until(lambda: state.saved == 30, 5, "every position saved")
        # A save begins only once its batch was published; one at a time.
        assert state.saves == [(10, 10), (20, 20), (30, 30)]
        assert state.most_in_flight == 1
        assert stream.positions == list(range(1, 31))

        # A failed save fails the relay at its next step: it leads again and
        # publishes from the saved position, so nothing is skipped.
        state.gate.clear()
        await append(store, 10)
        await wait_until(lambda: len(state.saves) == 4, 5, "the next save started")
        state.fail_next = True
        state.gate.set()
        await wait_until(lambda: state.saved == 40, 5, "the position saved after a failure")
        assert stream.positions[:30] == list(range(1, 31))
        assert set(stream.positions[30:]) == set(range(31, 41))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await store.close()
