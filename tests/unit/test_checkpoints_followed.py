"""When a wait may skip its first read of the stored checkpoints, and when it may not.

A wait skips the read only while every checkpoint it waits for is followed by a
runner of this process (it called `advance`) and is short of the token in memory.
"""

import asyncio

from cqrskit.checkpoints import Checkpoints
from cqrskit.messages import ConsistencyToken

PROJECTIONS = ["records", "statistics"]


class StoredCheckpoints:
    """The one part of a view store Checkpoints reads; counts the reads."""

    def __init__(self) -> None:
        self.stored: dict[tuple[str, int], int] = {}
        self.reads = 0

    async def checkpoints(self) -> dict[tuple[str, int], int]:
        self.reads += 1
        return dict(self.stored)

    def commit(self, checkpoints: Checkpoints, projection: str, position: int) -> None:
        """What a runner does: commit its checkpoint, then advance memory."""
        self.stored[(projection, 0)] = position
        checkpoints.advance(projection, 0, position)


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
