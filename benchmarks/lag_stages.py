"""Where accepted → visible goes in the distributed topology, per stage (a diagnostic,
not a workload of the benchmark CLI).

    .venv/bin/python -m benchmarks.lag_stages RATE SECONDS

The runtime `lag_distributed` uses (PostgreSQL command and query schemas, a fresh
JetStream stream, relay and update processor on this event loop) takes an open-loop
load of RATE commands/s (InsertRecord and UpdateRecord alternating) for SECONDS.
Each command's position is stamped when `handle` returns (acc), when the relay's
`read_all` returns it (read), when the relay's `publish` returns (pub: the broker
acked), when the processor's batch holding it starts (recv; the last projection's),
when a projection's `_apply` starts in the view writer thread (apply), when the
batch committed (commit) and when `Checkpoints.wait` returns (vis). Prints p50 / p90 /
p99 / max per step, what the slowest 1 % spent in each, and the event loop's lag
(a 1 ms ticker). The stamps wrap methods of this process's objects and classes, so
it runs against whichever cqrskit is first on the path (PYTHONPATH=<copy>/src).

SWITCH=<seconds> sets `sys.setswitchinterval`; DEBUG_PULL=1 prints the NATS pull
requests and statuses of a subscriber whose `take` fails.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.append import insert_records
from benchmarks.common import payload
from benchmarks.lag_distributed import PARTITIONS, _catch_up, _Heads, _settings
from benchmarks.services import nats_stream, postgres_schemas
from cqrskit import update_processor
from cqrskit.bootstrap import Runtime, open_runtime
from cqrskit.domains.records import InsertRecord, UpdateRecord
from cqrskit.messages import ConsistencyToken, Envelope

now = time.perf_counter
STAGES = ("acc", "read", "pub", "recv", "apply", "commit", "vis")
STEPS = (("acc", "read"), ("read", "pub"), ("pub", "recv"), ("recv", "apply"),
         ("apply", "commit"), ("commit", "vis"), ("acc", "vis"))
stamps: dict[str, dict[int, float]] = {stage: {} for stage in STAGES}
batches: dict[str, list[int]] = {"relay": [], "processor": []}
loop_lag: list[float] = []


def _stamp(stage: str, envelopes: Sequence[Envelope], *, last: bool = False) -> None:
    """Stamp each envelope's position: the first time, or (last) the latest time."""
    t, seen = now(), stamps[stage]
    for envelope in envelopes:
        if last or envelope.position not in seen:
            seen[envelope.position] = t


def _instrument(rt: Runtime) -> None:
    relay = rt.relay
    assert relay is not None
    store: Any = relay.store
    stream: Any = relay.stream
    read_all, publish = store.read_all, stream.publish

    async def reading(after: int, limit: int) -> list[Envelope]:
        batch: list[Envelope] = await read_all(after, limit)
        task = asyncio.current_task()
        if batch and task is not None and task.get_name() == "relay":
            _stamp("read", batch)
            batches["relay"].append(len(batch))
        return batch

    async def publishing(batch: Sequence[Envelope]) -> None:
        await publish(batch)
        _stamp("pub", batch)

    store.read_all, stream.publish = reading, publishing
    runner: Any = getattr(update_processor, "PartitionRunner", update_processor.ProjectionRunner)
    process, apply = runner.process, update_processor.ProjectionRunner._apply

    async def processing(self: Any, batch: Sequence[Envelope]) -> None:
        batches["processor"].append(len(batch))
        _stamp("recv", batch, last=True)
        await process(self, batch)
        _stamp("commit", batch, last=True)

    def applying(self: Any, uow: Any, batch: Sequence[Envelope], after: int) -> int:
        _stamp("apply", batch, last=True)
        result: int = apply(self, uow, batch, after)
        return result

    runner.process = processing
    update_processor.ProjectionRunner._apply = applying  # type: ignore[method-assign]
    if os.environ.get("DEBUG_PULL"):
        _debug_pulls()


def _debug_pulls() -> None:
    from cqrskit.streams import nats

    puller: Any = nats._Puller
    request, receive, take = puller._request, puller._on_msg, puller.take
    history: dict[int, list[str]] = {}

    def note(self: Any, what: str) -> None:
        lines = history.setdefault(id(self), [])
        lines.append(f"{now():.3f} {what} open={self.open} lingering={self.lingering} "
                     f"outstanding={self.outstanding} brought={self.brought}")
        del lines[:-40]

    async def requesting(self: Any) -> None:
        await request(self)
        note(self, "request")

    async def receiving(self: Any, msg: Any) -> None:
        await receive(self, msg)
        note(self, f"status {msg.headers.get('Status') if msg.headers else None}")

    async def taking(self: Any) -> Any:
        try:
            return await take(self)
        except Exception as error:
            note(self, f"take failed: {error}")
            print("\n".join(history[id(self)]), file=sys.stderr)
            raise

    puller._request, puller._on_msg, puller.take = requesting, receiving, taking


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def _ticker(stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = now()
        await asyncio.sleep(0.001)
        loop_lag.append((now() - t - 0.001) * 1000)


async def _offer(rt: Runtime, rate: float, seconds: float, ids: list[str]) -> None:
    projections = list(rt.registry.projections)
    payloads = [payload(i) for i in range(256)]

    async def one(i: int) -> None:
        data = payloads[i % 256]
        if i % 2:
            result = await rt.commands.handle(UpdateRecord(id=ids[i % len(ids)], data=data))
        else:
            result = await rt.commands.handle(InsertRecord(data=data))
        stamps["acc"][result.position] = now()
        token = ConsistencyToken.for_event(result.stream_id, result.position)
        await rt.checkpoints.wait(projections, token, 30)
        stamps["vis"][result.position] = now()

    tasks: set[asyncio.Task[None]] = set()
    issued, start = 0, now()
    while (elapsed := now() - start) < seconds:
        for _ in range(int(elapsed * rate) - issued):
            task = asyncio.create_task(one(issued))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            issued += 1
        await asyncio.sleep(0.002)
    await asyncio.gather(*tasks)


async def main(rate: float, seconds: float) -> None:
    with postgres_schemas(2) as (command_db, query_db):
        async with nats_stream() as names:
            rt = await open_runtime(_settings(command_db, query_db, names.url(PARTITIONS)))
            try:
                ids = await insert_records(rt, 400, clients=8)
                _instrument(rt)
                rt.start()
                await asyncio.wait_for(_catch_up(rt, _Heads(PARTITIONS)), 60)
                for stage in stamps.values():
                    stage.clear()
                for sizes in batches.values():
                    sizes.clear()
                stop = asyncio.Event()
                ticking = asyncio.create_task(_ticker(stop))
                load_before = os.getloadavg()
                await _offer(rt, rate, seconds, ids)
                stop.set()
                await ticking
                load_after = os.getloadavg()
            finally:
                await rt.close()
    _report(rate, seconds, load_before, load_after)


def _report(rate: float, seconds: float, before: tuple[float, ...],
            after: tuple[float, ...]) -> None:
    positions = sorted(stamps["vis"])
    print(f"{rate:.0f} cmd/s for {seconds:.0f} s, {len(positions)} commands, load average "
          f"{before[0]:.2f} -> {after[0]:.2f}")
    print("step (ms)                p50      p90      p99      max")
    for a, b in STEPS:
        gaps = [(stamps[b][p] - stamps[a][p]) * 1000 for p in positions
                if p in stamps[a] and p in stamps[b]]
        print(f"  {a:>6} -> {b:<6} {_percentile(gaps, 50):8.1f} {_percentile(gaps, 90):8.1f} "
              f"{_percentile(gaps, 99):8.1f} {max(gaps, default=float('nan')):8.1f}")
    slow = sorted(positions, key=lambda p: stamps["vis"][p] - stamps["acc"][p])
    slow = slow[-max(1, len(slow) // 100):]
    print("slowest 1 %, mean ms per step:")
    for a, b in STEPS[:-1]:
        gaps = [(stamps[b][p] - stamps[a][p]) * 1000 for p in slow
                if p in stamps[a] and p in stamps[b]]
        print(f"  {a:>6} -> {b:<6} {sum(gaps) / max(1, len(gaps)):8.1f}")
    for name, sizes in batches.items():
        print(f"{name} batches: {len(sizes)}, mean {sum(sizes) / max(1, len(sizes)):.1f} events")
    print(f"event loop lag ms: p50 {_percentile(loop_lag, 50):.1f} "
          f"p99 {_percentile(loop_lag, 99):.1f} max {max(loop_lag, default=0):.1f}")


if __name__ == "__main__":
    if os.environ.get("SWITCH"):
        sys.setswitchinterval(float(os.environ["SWITCH"]))
    asyncio.run(main(float(sys.argv[1]), float(sys.argv[2])))
