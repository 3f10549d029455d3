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
