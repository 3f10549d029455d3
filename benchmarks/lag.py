"""lag: how long after a command is accepted its effect is visible in every view.

With the update processor running in the same process (as `cqrskit serve` runs
it), the load levels are fractions of the max *sustained* rate: 8 closed-loop
clients (InsertRecord and UpdateRecord alternating, as in the load) for as long
as a load level, with the processor running, and the rate is the commands they got
accepted divided by the time until every projection had processed them all, so
it counts only work the whole process finished (accepted AND visible). The older
yardstick, the insert rate with the processor stopped, is still measured first
and reported as its own row: the process cannot sustain it once it also projects,
so half of it was an overload test, not "half load".

Then an open-loop load offers half the sustained rate for a few seconds, then a
quarter of it. For each command the clock starts when `handle` returns (accepted,
durable) and stops when the in-process `Checkpoints` say every projection has
processed its consistency token, the same wait a query carrying the token does.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from benchmarks.append import insert_records
from benchmarks.common import Measurement, Size, payload, percentile
from cqrskit.bootstrap import Runtime, open_runtime
from cqrskit.config import Settings
from cqrskit.domains.records import InsertRecord, UpdateRecord
from cqrskit.messages import ConsistencyToken

NAME = "lag"
CALIBRATION = "max sustained rate · 8 clients, processor running (calibration)"
APPEND_ONLY = "max insert rate · 8 clients, processor stopped (former calibration)"
# The load the issue asks for (half the max sustained rate), and a lighter one.
LOADS = ((0.5, "½ max"), (0.25, "¼ max"))
# A command not visible after this long counts as a timeout (its latency is then
# recorded as this long: look at the timeouts row before trusting the percentiles).
VISIBLE_TIMEOUT = 30.0
CATCH_UP_TIMEOUT = 600.0
_TICK = 0.002
_PAYLOADS = [payload(i) for i in range(256)]


async def _calibrate(rt: Runtime, seconds: float) -> tuple[float, list[str]]:
    """Closed-loop insert rate of 8 clients over about `seconds`; also return the ids."""
    ids: list[str] = []
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            result = await rt.commands.handle(InsertRecord(data=_PAYLOADS[len(ids) % 256]))
            ids.append(result.stream_id)

    await insert_records(rt, 100, clients=8)  # warm up
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(8)))
    return len(ids) / (time.perf_counter() - start), ids


async def _sustain(
    rt: Runtime, seconds: float, ids: list[str], catch_up: Callable[[], Awaitable[None]]
) -> tuple[float, float]:
    """The max rate the running process sustains: 8 closed-loop clients for about
    `seconds`, then until every projection has processed all they got accepted.

    Return (commands accepted and projected per second, the accept-only rate of the
    clients' window; above the first when the processor fell behind meanwhile).
    """
    count = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            data = _PAYLOADS[count % len(_PAYLOADS)]
            if count % 2:
                await rt.commands.handle(UpdateRecord(id=ids[count % len(ids)], data=data))
            else:
                await rt.commands.handle(InsertRecord(data=data))
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(8)))
    accepting = time.perf_counter() - start
    await catch_up()
    return count / (time.perf_counter() - start), count / accepting


async def calibrate(
    name: str, rt: Runtime, start: Callable[[], None],
    catch_up: Callable[[], Awaitable[None]], size: Size,
) -> tuple[float, list[str], list[Measurement]]:
    """Both yardsticks: the append-only rate (processor stopped), then `start()` and the
    sustained rate. Return the sustained rate, the record ids, and the two rows.

    The sustained window is as long as a load level: the time the last commands take
    to become visible counts against the rate, and over a short window that fixed
    delay (a relay, a broker) would weigh more than the throughput.
    """
    append_only, ids = await _calibrate(rt, size.lag_calibration_seconds)
    start()
    await catch_up()
    sustained, window = await _sustain(rt, size.lag_seconds, ids, catch_up)
    rows = [
        Measurement(name, APPEND_ONLY, append_only, "cmd/s"),
        Measurement(name, CALIBRATION, sustained, "cmd/s", baseline=APPEND_ONLY,
                    details={"accepted_rate_while_clients_ran": window}),
    ]
    return sustained, ids, rows


async def _steady(
    rt: Runtime, rate: float, seconds: float, ids: list[str]
) -> tuple[int, float, list[float], list[float], int]:
    """Offer `rate` commands/s for `seconds`.

    Return the commands issued, the seconds from the start to the last acceptance
    (longer than `seconds` when the load was more than the handler could take),
    the latencies and the number of commands that never became visible.
    """
    projections = list(rt.registry.projections)
    accept_ms: list[float] = []
    visible_ms: list[float] = []
    timeouts = 0
    last_accepted = 0.0

    async def one(i: int) -> None:
        nonlocal timeouts, last_accepted
        data = _PAYLOADS[i % len(_PAYLOADS)]
        submitted = time.perf_counter()
        if i % 2:
            result = await rt.commands.handle(UpdateRecord(id=ids[i % len(ids)], data=data))
        else:
            result = await rt.commands.handle(InsertRecord(data=data))
        accepted = last_accepted = time.perf_counter()
        token = ConsistencyToken.for_event(result.stream_id, result.position)
        if not await rt.checkpoints.wait(projections, token, VISIBLE_TIMEOUT):
            timeouts += 1
        visible = time.perf_counter()
        accept_ms.append((accepted - submitted) * 1000)
        visible_ms.append((visible - accepted) * 1000)

    tasks: set[asyncio.Task[None]] = set()
    issued = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        due = int(elapsed * rate) - issued
        for _ in range(due):
            task = asyncio.create_task(one(issued))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            issued += 1
        await asyncio.sleep(_TICK)
    await asyncio.gather(*tasks)
    return issued, last_accepted - start, accept_ms, visible_ms, timeouts


async def _catch_up(rt: Runtime) -> None:
    """Wait until every projection has processed the whole log, so that one load level
    does not start with the backlog of the one before."""
    last = await rt.store.last_position()
    token = ConsistencyToken(last, 0)
    projections = list(rt.registry.projections)
    for _ in range(round(CATCH_UP_TIMEOUT / VISIBLE_TIMEOUT)):
        if await rt.checkpoints.wait(projections, token, VISIBLE_TIMEOUT):
            return
    raise TimeoutError(f"the projections did not catch up within {CATCH_UP_TIMEOUT}s")


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy ticks of the whole machine, ticks of this process), from /proc (Linux)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        mine = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    idle = int(fields[3]) + int(fields[4])  # idle, iowait
    return sum(map(int, fields)) - idle, int(mine[11]) + int(mine[12])  # utime, stime


def _others_share(before: tuple[int, int] | None, seconds: float) -> float | None:
    """The share of the machine's CPU (all cores, %) that other processes used since
    `before`: p99 latencies on a shared machine follow it more than anything here."""
    after = _cpu_ticks()
    if before is None or after is None:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    cores = os.cpu_count() or 1
    return max(0.0, 100 * others / os.sysconf("SC_CLK_TCK") / seconds / cores)


async def measure_level(
    name: str, rt: Runtime, label: str, rate: float, seconds: float, ids: list[str]
) -> list[Measurement]:
    """Offer `rate` commands/s for `seconds`; what was accepted and when it became visible."""
    ticks, start = _cpu_ticks(), time.perf_counter()
    issued, accepting, accept_ms, visible_ms, timeouts = await _steady(rt, rate, seconds, ids)
    others = _others_share(ticks, time.perf_counter() - start)
    if timeouts:
        print(f"  {name}: {timeouts} commands not visible within {VISIBLE_TIMEOUT}s",
              file=sys.stderr)
    offered = f"{label} · offered"
    visible = f"{label} · accepted → visible in all views"
    return [
        Measurement(name, offered, rate, "cmd/s", baseline=CALIBRATION,
                    details={"commands": issued, "timeouts": timeouts}),
        Measurement(name, f"{label} · accepted", issued / accepting, "cmd/s",
                    baseline=offered),
        Measurement(name, f"{label} · submitted → accepted · p50",
                    percentile(accept_ms, 50), "ms"),
        Measurement(name, f"{label} · submitted → accepted · p99",
                    percentile(accept_ms, 99), "ms"),
        Measurement(name, f"{visible} · p50", percentile(visible_ms, 50), "ms"),
        Measurement(name, f"{visible} · p99", percentile(visible_ms, 99), "ms"),
        Measurement(name, f"{visible} · max", max(visible_ms), "ms"),
        Measurement(name, f"{label} · not visible within {VISIBLE_TIMEOUT:.0f} s",
                    100 * timeouts / issued, "%"),
    ] + ([] if others is None else [
        Measurement(name, f"{label} · CPU used by other processes (of all cores)", others, "%"),
    ])


async def _measure(directory: Path, size: Size) -> list[Measurement]:
    results: list[Measurement] = []
    rt = await open_runtime(Settings(data_dir=directory))
    try:
        assert rt.processor is not None
        max_rate, ids, results = await calibrate(
            NAME, rt, rt.processor.start, lambda: _catch_up(rt), size
        )
        for fraction, label in LOADS:
            await _catch_up(rt)
            rate = max_rate * fraction
            results += await measure_level(NAME, rt, label, rate, size.lag_seconds, ids)
    finally:
        await rt.close()
    return results


def run(size: Size, workdir: Path) -> list[Measurement]:
    directory = workdir / "lag"
    try:
        return asyncio.run(_measure(directory, size))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
