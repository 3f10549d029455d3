"""lag_distributed: the distributed topology's lag and projection throughput.

PostgreSQL command and query DBs (fresh schemas, dropped afterwards) and a NATS
JetStream stream (fresh, deleted afterwards) with `PARTITIONS` partitions; the
relay and the update processor run in the benchmark's process, on its event loop.

lag: as the embedded `lag` workload. Eight closed-loop clients measure the max
insert rate with relay and processor stopped (reported, no longer the yardstick);
then `runtime.start()` and the max sustained rate: 8 closed-loop clients with relay
and processor running, commands counted once every projection has processed them.
An open-loop load then offers half that rate (InsertRecord and UpdateRecord
alternating), then a quarter. Per command, "accepted → visible" runs
from `handle` returning to `Checkpoints.wait` saying every projection has
processed its consistency token (command DB → relay → NATS → processor → query DB).

projection throughput: N InsertRecords are appended with the processor stopped,
the relay publishes them to NATS (timed: relay events/s), then 1 or 2 update
processors start, each in a process of its own (`benchmarks.projection_worker`,
the `update-processor` role, owning 1/N of the partitions via
`UpdateProcessor(owned=...)`, started and connected before the clock starts);
timed until every projection's checkpoint in every partition reaches that
partition's last event. The processes share the machine's cores with PostgreSQL
and NATS.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.append import insert_records
from benchmarks.common import ROOT, Measurement, Size
from benchmarks.lag import (
    CATCH_UP_TIMEOUT,
    LOADS,
    VISIBLE_TIMEOUT,
    calibrate,
    measure_level,
)
from benchmarks.services import nats_stream, postgres_schemas
from cqrskit.bootstrap import Runtime, open_runtime
from cqrskit.config import Settings
from cqrskit.messages import ConsistencyToken, partition_of

NAME = "lag_distributed"
PARTITIONS = 4
_POLL = 0.01
# Stopping a processor, the relay or a runtime that takes longer than this is reported
# (with the stacks of the tasks still pending) and abandoned: the numbers are taken.
STOP_TIMEOUT = 20.0
# The tasks `_bounded` cancels, and reports if they do not end.
_STOPPED_TASKS = ("projection-", "relay", "bench-relay")
T = TypeVar("T")


async def _bounded(step: Awaitable[object], what: str) -> None:
    """Await `step` for at most STOP_TIMEOUT seconds.

    Cancelling a task parked in nats-py's `fetch` can be lost (Python 3.11's
    `asyncio.wait_for`, which nats-py uses, swallows a cancel that races with a
    message arriving); `UpdateProcessor._supervise` then restarts the runner and
    `stop()` waits forever. So the projection and relay tasks are cancelled again
    until they end; what is still pending after STOP_TIMEOUT is reported and abandoned.
    """
    task = asyncio.ensure_future(step)
    deadline = time.perf_counter() + STOP_TIMEOUT
    while time.perf_counter() < deadline:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            task.result()
            return
        for other in asyncio.all_tasks():
            if other.get_name().startswith(_STOPPED_TASKS):
                other.cancel()
    print(f"  {NAME}: {what} did not finish within {STOP_TIMEOUT:.0f}s; abandoned. "
          "Pending:", file=sys.stderr)
    for pending in asyncio.all_tasks():
        if pending.get_name().startswith(_STOPPED_TASKS):
            pending.print_stack(limit=4, file=sys.stderr)


def _run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, except that tasks which ignore cancellation cannot hang the exit."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main)
    finally:
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=5))
        closing = loop.create_task(loop.shutdown_asyncgens())
        loop.run_until_complete(asyncio.wait({closing}, timeout=5))
        loop.close()


class _Heads:
    """The last position of each partition in the log, read incrementally."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self.after = 0
        self.last = [0] * partitions

    async def update(self, rt: Runtime) -> list[int]:
        while batch := await rt.store.read_all(self.after, 5000):
            for envelope in batch:
                p = partition_of(envelope.stream_id, self.partitions)
                self.last[p] = max(self.last[p], envelope.position)
            self.after = batch[-1].position
        return self.last


async def _catch_up(rt: Runtime, heads: _Heads) -> None:
    """Wait until every projection has processed the whole log in every partition."""
    projections = list(rt.registry.projections)
    deadline = time.perf_counter() + CATCH_UP_TIMEOUT
    for partition, position in enumerate(await heads.update(rt)):
        if position == 0:
            continue
        token = ConsistencyToken(position, partition)  # its hash mod PARTITIONS = partition
        while not await rt.checkpoints.wait(projections, token, VISIBLE_TIMEOUT):
            if time.perf_counter() > deadline:
                raise TimeoutError(f"no catch-up within {CATCH_UP_TIMEOUT}s")


def _settings(command_db: str, query_db: str, stream: str) -> Settings:
    return Settings(command_db=command_db, query_db=query_db, stream=stream)


async def _lag(size: Size) -> list[Measurement]:
    results: list[Measurement] = []
    with postgres_schemas(2) as (command_db, query_db):
        async with nats_stream() as names:
            rt = await open_runtime(_settings(command_db, query_db, names.url(PARTITIONS)))
            heads = _Heads(PARTITIONS)
            try:
                max_rate, ids, results = await calibrate(
                    NAME, rt, rt.start, lambda: _catch_up(rt, heads), size
                )
                for fraction, label in LOADS:
                    await _catch_up(rt, heads)
                    rate = max_rate * fraction
                    results += await measure_level(
                        NAME, rt, label, rate, size.lag_seconds, ids
                    )
            finally:
                await _bounded(rt.close(), "closing the runtime")
    return results


async def _projection(processors: int, size: Size) -> tuple[float, float]:
    """(relay events/s, projection events/s with `processors` update processors, each
    in a process of its own)."""
    events = size.projection_events
    with postgres_schemas(2) as (command_db, query_db):
        async with nats_stream() as names:
            stream_url = names.url(PARTITIONS)
            rt = await open_runtime(_settings(command_db, query_db, stream_url))
            relay: asyncio.Task[None] | None = None
            workers: list[asyncio.subprocess.Process] = []
            try:
                await insert_records(rt, events, clients=64)
                heads = await _Heads(PARTITIONS).update(rt)
                assert rt.relay is not None and rt.views is not None
                start = time.perf_counter()
                relay = asyncio.create_task(rt.relay.run(), name="bench-relay")
                while rt.relay.position < max(heads):
                    if relay.done():
                        relay.result()
                    await asyncio.sleep(_POLL)
                relay_rate = events / (time.perf_counter() - start)
                relay.cancel()
                await _bounded(asyncio.gather(relay, return_exceptions=True),
                               "stopping the relay")

                for k in range(processors):
                    owned = ",".join(str(p) for p in range(k, PARTITIONS, processors))
                    workers.append(await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "benchmarks.projection_worker", command_db,
                        query_db, stream_url, str(PARTITIONS), owned,
                        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                        cwd=ROOT,
                    ))
                for worker in workers:
                    assert worker.stdout is not None
                    line = await asyncio.wait_for(worker.stdout.readline(), 60)
                    if line.strip() != b"ready":
                        raise RuntimeError(f"an update processor did not start: {line!r}")
                projections = list(rt.registry.projections)
                start = time.perf_counter()
                for worker in workers:
                    assert worker.stdin is not None
                    worker.stdin.write(b"go\n")
                    await worker.stdin.drain()
                deadline = start + CATCH_UP_TIMEOUT
                while True:
                    stored = await rt.views.checkpoints()
                    if all(stored.get((name, p), 0) >= heads[p]
                           for name in projections for p in range(PARTITIONS) if heads[p]):
                        break
                    if time.perf_counter() > deadline:
                        raise TimeoutError(f"projections not done within {CATCH_UP_TIMEOUT}s")
                    await asyncio.sleep(_POLL)
                return relay_rate, events / (time.perf_counter() - start)
            finally:
                for worker in workers:
                    if worker.stdin is not None:
                        worker.stdin.close()
                for worker in workers:
                    try:
                        await asyncio.wait_for(worker.wait(), STOP_TIMEOUT)
                    except TimeoutError:
                        worker.kill()
                        await worker.wait()
                if relay is not None and not relay.done():
                    relay.cancel()
                    await _bounded(asyncio.gather(relay, return_exceptions=True),
                                   "stopping the relay")
                await _bounded(rt.close(), "closing the runtime")


def run(size: Size, workdir: Path) -> list[Measurement]:
    del workdir  # everything lives in PostgreSQL and NATS
    results = _run(_lag(size))
    one = "projection · 1 update processor"
    for processors in (1, 2):
        relay_rate, rate = _run(_projection(processors, size))
        noun = "processor" if processors == 1 else "processors"
        case = f"projection · {processors} update {noun}"
        results.append(Measurement(
            NAME, case, rate, "events/s", baseline=None if processors == 1 else one,
            details={"events": size.projection_events, "partitions": PARTITIONS,
                     "processes": processors},
        ))
        if processors == 1:
            results.append(Measurement(NAME, "relay · PostgreSQL → NATS", relay_rate, "events/s"))
    return results
