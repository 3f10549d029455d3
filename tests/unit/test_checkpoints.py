"""Checkpoints' bookkeeping, and when a wait reads the stored checkpoints (pure logic,
with a stand-in for the store; waiting on real files is tested in integration)."""

import asyncio

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


# When a wait may skip its first read of the stored checkpoints, and when it may not:
# only while every checkpoint it waits for is followed by a runner of this process
# (it called `advance`) and is short of the token in memory.

PROJECTIONS = ["records", "statistics"]


def _followed(store: StoredCheckpoints, position: int) -> Checkpoints:
    # A long poll interval: these tests count the reads a wait itself makes.
    checkpoints = Checkpoints(store, poll_seconds=30)  # type: ignore[arg-type]
    for projection in PROJECTIONS:
        store.commit(checkpoints, projection, position)
    return checkpoints


async def test_a_wait_behind_this_process_runners_reads_nothing_and_wakes_on_commit() -> None:
    store = StoredCheckpoints()
    checkpoints = _followed(store, 10)
    waiter = asyncio.create_task(checkpoints.wait(PROJECTIONS, ConsistencyToken(12, 0), 10))
    await asyncio.sleep(0.01)
    assert store.reads == 0 and not waiter.done()
    store.commit(checkpoints, "records", 12)
    await asyncio.sleep(0.01)
    assert not waiter.done()  # statistics is still short
    store.commit(checkpoints, "statistics", 15)
    assert await asyncio.wait_for(waiter, 1) is True
    assert store.reads == 0


async def test_a_token_memory_has_passed_is_checked_against_the_store() -> None:
    """Memory at 10, but a rebuild in another process moved records back to 0: a wait
    on a token at 8 must not answer from memory (it would read views being rebuilt)."""
    store = StoredCheckpoints()
    checkpoints = _followed(store, 10)
    store.stored[("records", 0)] = 0
    assert await checkpoints.wait(PROJECTIONS, ConsistencyToken(8, 0), 0.05) is False
    assert store.reads >= 1
    store.stored[("records", 0)] = 8  # the rebuild got there
    assert await checkpoints.wait(PROJECTIONS, ConsistencyToken(8, 0), 1) is True


async def test_one_checkpoint_past_the_token_means_a_read_as_before() -> None:
    """records passed the token in memory, statistics did not: records' memory could be
    ahead of a rebuild elsewhere, so the store is asked, and its answer holds."""
    store = StoredCheckpoints()
    checkpoints = _followed(store, 10)
    store.commit(checkpoints, "records", 20)
    store.stored[("records", 0)] = 0  # rebuilt elsewhere
    waiter = asyncio.create_task(checkpoints.wait(PROJECTIONS, ConsistencyToken(15, 0), 10))
    await asyncio.sleep(0.01)
    assert store.reads == 1
    store.commit(checkpoints, "statistics", 15)
    await asyncio.sleep(0.01)
    assert not waiter.done()  # records is at 0 in the store, and memory now says so
    store.commit(checkpoints, "records", 15)
    assert await asyncio.wait_for(waiter, 1) is True


async def test_checkpoints_not_followed_here_are_read_from_the_store() -> None:
    """A process without a runner for the checkpoint (a query handler, or a partition
    another process leases) learns of progress only from the store."""
    store = StoredCheckpoints()
    checkpoints = Checkpoints(store, poll_seconds=30)  # type: ignore[arg-type]
    store.stored.update({("records", 0): 10, ("statistics", 0): 10})
    assert await checkpoints.wait(PROJECTIONS, ConsistencyToken(10, 0), 1) is True
    assert store.reads == 1

    followed = _followed(store, 10)
    followed.unfollow("statistics", 0)  # its runner stopped
    store.stored[("statistics", 0)] = 12  # another process's runner went on
    assert await followed.wait(PROJECTIONS, ConsistencyToken(11, 0), 0.05) is False
    assert store.reads == 2  # records is short in memory, and nothing here advances it
    store.stored[("records", 0)] = 12
    assert await followed.wait(PROJECTIONS, ConsistencyToken(11, 0), 1) is True


async def test_a_reset_projection_is_no_longer_trusted_to_be_followed() -> None:
    store = StoredCheckpoints()
    checkpoints = _followed(store, 10)
    checkpoints.reset("records")  # its runner saw the stored checkpoint go back
    store.stored[("records", 0)] = 11
    assert await checkpoints.wait(PROJECTIONS, ConsistencyToken(11, 0), 0.05) is False
    assert store.reads == 1
