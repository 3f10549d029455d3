"""Checkpoints' in-memory bookkeeping (pure logic; waiting is tested on real files)."""

from cqrskit.checkpoints import Checkpoints
from cqrskit.messages import ConsistencyToken, partition_of


def test_advance_only_moves_forward_and_reset_forgets_one_projection() -> None:
    checkpoints = Checkpoints(views=None)  # type: ignore[arg-type]
    checkpoints.advance("records", 0, 10)
    checkpoints.advance("records", 0, 7)
    checkpoints.advance("statistics", 0, 3)
    assert checkpoints.positions == {("records", 0): 10, ("statistics", 0): 3}
    checkpoints.reset("records")
    assert checkpoints.positions == {("statistics", 0): 3}


def test_reached_needs_every_named_projection_in_the_token_partition() -> None:
    checkpoints = Checkpoints(views=None, partitions=4)  # type: ignore[arg-type]
    token = ConsistencyToken.for_event("abc", 10)
    partition = partition_of("abc", 4)
    other = (partition + 1) % 4
    checkpoints.advance("records", other, 100)  # another partition does not count
    assert not checkpoints.reached(["records"], token)
    checkpoints.advance("records", partition, 10)
    assert checkpoints.reached(["records"], token)
    assert not checkpoints.reached(["records", "statistics"], token)
    checkpoints.advance("statistics", partition, 9)
    assert not checkpoints.reached(["records", "statistics"], token)
    checkpoints.advance("statistics", partition, 11)
    assert checkpoints.reached(["records", "statistics"], token)
    assert checkpoints.reached([], token)  # a query that reads no projection never waits


class StoredCheckpoints:
    """The one part of a view store Checkpoints reads; counts the reads. A processor
    commits its checkpoint before it advances the in-memory one: `commit` does both."""

    def __init__(self) -> None:
        self.stored: dict[tuple[str, int], int] = {}
        self.reads = 0

    async def checkpoints(self) -> dict[tuple[str, int], int]:
        self.reads += 1
        return dict(self.stored)

    def commit(self, checkpoints: Checkpoints, projection: str, position: int) -> None:
        self.stored[(projection, 0)] = position
        checkpoints.advance(projection, 0, position)


async def test_a_waiter_wakes_once_every_projection_passed_its_token() -> None:
    import asyncio

    store = StoredCheckpoints()
    checkpoints = Checkpoints(store, partitions=1)  # type: ignore[arg-type]
    waiters = {
        position: asyncio.create_task(checkpoints.wait(
            ["records", "statistics"], ConsistencyToken(position, 0), 10
        ))
        for position in (5, 10, 15)
    }
    await asyncio.sleep(0.01)
    store.commit(checkpoints, "records", 12)
    await asyncio.sleep(0.01)
    assert not any(w.done() for w in waiters.values())  # statistics is not there yet
    store.commit(checkpoints, "statistics", 10)
    await asyncio.sleep(0.01)
    assert [p for p, w in waiters.items() if w.done()] == [5, 10]
    store.commit(checkpoints, "statistics", 20)
    await asyncio.sleep(0.01)
    assert not waiters[15].done()  # records is at 12
    store.commit(checkpoints, "records", 15)
    assert await asyncio.wait_for(waiters[15], 1) is True
    assert checkpoints._parked == 0 and not checkpoints._waiting


async def test_progress_of_other_processes_is_polled_once_for_all_waiters() -> None:
    import asyncio

    store = StoredCheckpoints()
    checkpoints = Checkpoints(store, poll_seconds=0.02)  # type: ignore[arg-type]
    waiters = [
        asyncio.create_task(checkpoints.wait(["records"], ConsistencyToken(k, 0), 10))
        for k in range(1, 201)
    ]
    await asyncio.sleep(0.1)
    reads = store.reads
    assert reads < 30  # about one per interval, not one per waiter and interval
    store.stored[("records", 0)] = 150  # another process's processor got there
    for _ in range(200):
        await asyncio.sleep(0.01)
        done = [w for w in waiters if w.done()]
        if len(done) == 150:
            break
    assert len(done) == 150 and all(w.result() for w in done)
    pending = [w for w in waiters if not w.done()]
    store.stored[("records", 0)] = 200
    assert all(await asyncio.gather(*pending))


async def test_a_waiter_that_timed_out_is_forgotten_and_a_checkpoint_moved_back_counts() -> None:
    import asyncio

    store = StoredCheckpoints()
    checkpoints = Checkpoints(store, poll_seconds=0.01)  # type: ignore[arg-type]
    assert await checkpoints.wait(["records"], ConsistencyToken(5, 0), 0.05) is False
    await asyncio.sleep(0.05)
    assert checkpoints._parked == 0 and not checkpoints._waiting
    assert checkpoints._poller is not None and checkpoints._poller.done()

    # A waiter parked on statistics after records passed; then a rebuild elsewhere moves
    # records back: statistics arriving must not wake it.
    store.commit(checkpoints, "records", 10)
    waiter = asyncio.create_task(
        checkpoints.wait(["records", "statistics"], ConsistencyToken(8, 0), 10)
    )
    await asyncio.sleep(0.02)
    store.stored[("records", 0)] = 0
    await checkpoints.refresh()
    store.commit(checkpoints, "statistics", 9)
    await asyncio.sleep(0.03)
    assert not waiter.done()
    store.commit(checkpoints, "records", 8)
    assert await asyncio.wait_for(waiter, 1) is True
