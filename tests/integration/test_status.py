"""The pipeline status (lag per projection and partition) read from real SQLite stores."""

from typing import Any

from integration_helpers import OpenRuntime, drain

from cqrskit import status
from cqrskit.bootstrap import Runtime
from cqrskit.domains.records import InsertRecord, UpdateRecord
from cqrskit.messages import partition_of
from cqrskit.ports import UnitOfWork
from cqrskit.status import read_status
from cqrskit.update_processor import ProjectionRunner


async def _insert(runtime: Runtime, n: int) -> list[str]:
    ids = []
    for i in range(n):
        result = await runtime.commands.handle(InsertRecord(data={"i": i}))
        ids.append(result.stream_id)
    return ids


def _by_key(st: status.Status) -> dict[tuple[str, int], status.Lag]:
    return {(lag.projection, lag.partition): lag for lag in st.lags}


async def test_lag_counts_unapplied_events_and_drains_to_zero(runtime: Runtime) -> None:
    await _insert(runtime, 5)
    before = await read_status(runtime.registry, runtime.store, runtime.views, 1)
    assert before.last_position == 5
    for lag in before.lags:
        assert (lag.events, lag.checkpoint, lag.exact) == (5, 0, True)
        assert lag.seconds >= 0
    assert [e.position for e in before.recent] == [5, 4, 3, 2, 1]
    # Fewer recent events than the lag window holds: taken from the window.
    short = await read_status(runtime.registry, runtime.store, runtime.views, 1, recent=3)
    assert [e.position for e in short.recent] == [5, 4, 3]

    runner = ProjectionRunner(runtime.registry.projection("records"), runtime.registry,
                              runtime.views)
    await drain(runner, runtime)
    after = _by_key(await read_status(runtime.registry, runtime.store, runtime.views, 1))
    assert (after["records", 0].events, after["records", 0].seconds) == (0, 0.0)
    assert after["statistics", 0].events == 5  # not run: still behind


async def test_lag_is_per_partition(runtime: Runtime) -> None:
    ids = await _insert(runtime, 12)
    partitions = 4
    # Partition p has applied everything up to its first event: the rest is its lag.
    firsts: dict[int, int] = {}
    for position, stream_id in enumerate(ids, start=1):
        firsts.setdefault(partition_of(stream_id, partitions), position)

    def checkpoint(uow: UnitOfWork) -> None:
        for partition, position in firsts.items():
            uow.set_checkpoint("records", partition, position)

    await runtime.views.run(checkpoint)
    lags = _by_key(await read_status(runtime.registry, runtime.store, runtime.views, partitions))
    for partition in range(partitions):
        expected = sum(
            1 for position, stream_id in enumerate(ids, start=1)
            if partition_of(stream_id, partitions) == partition
            and position > firsts.get(partition, 0)
        )
        assert lags["records", partition].events == expected


async def test_dead_letters_and_estimate_past_the_window(
    runtime: Runtime, monkeypatch: Any
) -> None:
    ids = await _insert(runtime, 6)
    await runtime.commands.handle(UpdateRecord(id=ids[0], data={"x": 1}))
    log = await runtime.store.read_all(0, 10)

    def park(uow: UnitOfWork) -> None:
        uow.park("records", 0, log[0], "boom", attempts=3, is_cause=True)

    await runtime.views.run(park)
    monkeypatch.setattr(status, "WINDOW", 3)
    st = await read_status(runtime.registry, runtime.store, runtime.views, 1)
    assert st.dead_letters == {"records": 1, "statistics": 0}
    lag = _by_key(st)["records", 0]
    assert (lag.events, lag.exact) == (7, False)  # 3 seen + 4 estimated from the log's end


async def test_status_of_an_empty_log(open_rt: OpenRuntime) -> None:
    runtime = await open_rt()
    st = await read_status(runtime.registry, runtime.store, runtime.views, 1)
    assert st.last_position == 0 and st.recent == []
    assert {lag.events for lag in st.lags} == {0}
    assert st.to_dict()["lags"][0]["exact"] is True
