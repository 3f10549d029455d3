"""rebuild: replay a log of N events into the `records` and `statistics` projections.

The log is written straight into the event store's `events` table (the schema
the SqliteEventStore creates, in 50,000-row transactions), so making a million
events takes seconds. Half the events insert a record, half update one inserted
about 600 positions earlier, so the `records` projection reads documents back
both from its own batch and from the view table.

Reported per projection: events/s, the CPU time of the process per event (all
its threads; steadier than the rate on a shared machine), the peak RSS growth
over the rebuild, and the RSS growth over its second half (memory must stay flat
as the log grows).
Baseline, in the same run: raw sqlite3 inserting N documents of the same size,
1000 per transaction, into a `(id TEXT PRIMARY KEY, doc TEXT) WITHOUT ROWID`
table, which is the shape of a view table.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import shutil
import sqlite3
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import uuid_utils

from benchmarks import raw_sqlite
from benchmarks.common import (
    Measurement,
    Size,
    payload,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
)
from cqrskit.bootstrap import open_runtime
from cqrskit.config import Settings
from cqrskit.ports import ViewStore
from cqrskit.update_processor import rebuild

NAME = "rebuild"
PROJECTIONS = ("records", "statistics")
BASELINE = "raw sqlite3 · 1000 docs/tx"
# An update targets the stream inserted this many streams earlier.
UPDATE_DISTANCE = 300
_GENERATE_BATCH = 50_000
_RSS_SAMPLES = 20

_INSERT_EVENT = (
    "INSERT INTO events (position, event_id, stream_id, stream_type, version, type, "
    "schema_version, data, metadata, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def stream_id(n: int) -> str:
    """A UUID-shaped id, like the ones the command handler assigns."""
    return f"0190a0b0-0000-7000-8000-{n:012x}"


def event_rows(count: int) -> Iterator[tuple[Any, ...]]:
    """Rows of the `events` table: even positions insert stream j, odd ones update an
    older stream. Versions follow from the scheme, so no per-stream state is kept."""
    inserted = [orjson.dumps({"data": payload(i)}).decode() for i in range(64)]
    updated = [orjson.dumps({"data": payload(i + 1)}).decode() for i in range(64)]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    recorded_at = ""
    for i in range(count):
        j = i // 2
        if i % 2 == 0:
            target, version, type_name, data = j, 1, "RecordInserted", inserted[i % 64]
        elif j < UPDATE_DISTANCE:
            target, version, type_name, data = j, 2, "RecordUpdated", updated[i % 64]
        else:
            target = j - UPDATE_DISTANCE
            version = 3 if target < UPDATE_DISTANCE else 2
            type_name, data = "RecordUpdated", updated[i % 64]
        command_id = stream_id(count + i)
        metadata = (
            f'{{"command_id":"{command_id}","correlation_id":"{command_id}",'
            f'"causation_id":"{command_id}"}}'
        )
        if i % 100 == 0:
            # One event per second: a million events span about twelve days of statistics.
            recorded_at = (start + timedelta(seconds=i)).isoformat()
        yield (
            i + 1, str(uuid_utils.uuid7()), stream_id(target), "record", version, type_name,
            1, data, metadata, recorded_at,
        )


def write_log(path: Path, count: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-262144")  # 256 MiB: index pages stay in memory
        rows = event_rows(count)
        while True:
            batch = [row for _, row in zip(range(_GENERATE_BATCH), rows, strict=False)]
            if not batch:
                break
            conn.execute("BEGIN")
            conn.executemany(_INSERT_EVENT, batch)
            conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


async def create_schemas(directory: Path) -> None:
    """Open the stores once so that they create their schemas, then close them."""
    rt = await open_runtime(Settings(data_dir=directory))
    await rt.close()


def prepare(directory: Path, events: int) -> None:
    """A data directory whose event log holds `events` events and whose views are empty."""
    asyncio.run(create_schemas(directory))
    started = time.perf_counter()
    write_log(directory / "command.db", events)
    generated = time.perf_counter() - started
    print(f"  rebuild: wrote {events:,} events in {generated:.1f}s", file=sys.stderr)


def measure(directory: Path, events: int) -> list[Measurement]:
    return asyncio.run(_rebuild_all(directory, events))


async def _rebuild_all(directory: Path, events: int) -> list[Measurement]:
    settings = Settings(data_dir=directory)
    results: list[Measurement] = []
    rt = await open_runtime(settings)
    try:
        until = await rt.store.last_position()
        assert until == events, f"log holds {until} events, expected {events}"
        for name in PROJECTIONS:
            projection = rt.registry.projection(name)
            gc.collect()
            peak_resettable = reset_peak_rss()
            base = rss_mib()
            samples: list[tuple[int, float]] = [(0, base)]
            every = max(1, until // _RSS_SAMPLES)

            def progress(
                position: int, samples: list[tuple[int, float]] = samples, every: int = every
            ) -> None:
                if position - samples[-1][0] >= every or position >= until:
                    samples.append((position, rss_mib()))

            start, cpu_start = time.perf_counter(), time.process_time()
            reached = await rebuild(
                projection, rt.registry, rt.views, rt.stream, until, progress=progress
            )
            elapsed = time.perf_counter() - start
            # CPU of every thread of this process: on a shared machine it moves far less
            # than the rate does with what the other processes are doing.
            cpu = time.process_time() - cpu_start
            assert reached == until, f"{name} stopped at {reached} of {until}"
            peak = peak_rss_mib() if peak_resettable else max(rss for _, rss in samples)
            half = min(samples, key=lambda s: abs(s[0] - until / 2))[1]
            details = {
                "events": events,
                "seconds": round(elapsed, 3),
                "cpu_seconds": round(cpu, 3),
                "rss_base_mib": round(base, 1),
                "rss_samples_mib": [(p, round(r, 1)) for p, r in samples],
                "peak_from": "VmHWM" if peak_resettable else "samples",
            }
            results += [
                Measurement(NAME, f"{name} · rebuild", events / elapsed, "events/s",
                            baseline=BASELINE, details=details),
                Measurement(NAME, f"{name} · CPU per event", cpu / events * 1e6, "µs"),
                Measurement(NAME, f"{name} · peak RSS growth", peak - base, "MiB"),
                Measurement(NAME, f"{name} · RSS growth, 2nd half", samples[-1][1] - half, "MiB"),
            ]
        await _check_views(rt.views, events)
    finally:
        await rt.close()
    return results


async def _check_views(views: ViewStore, events: int) -> None:
    """The rebuilt views hold what the log says: a fast but wrong rebuild must not pass."""
    totals = await views.get("stats_totals", "all")
    assert totals is not None and totals["total"] == events, totals
    last = await views.get("records", stream_id((events - 1) // 2))
    assert last is not None and last["version"] >= 1, last


def run(size: Size, workdir: Path) -> list[Measurement]:
    events = size.rebuild_events
    directory = workdir / "rebuild"
    try:
        prepare(directory, events)
        # Rebuild in a fresh process: its RSS starts from the library's own footprint,
        # not from memory that the log generator or an earlier workload freed but that
        # this process's allocator still holds (which would hide any growth).
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            results = pool.submit(measure, directory, events).result()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    # The baseline runs after the rebuild so that its rows, built in memory first,
    # cannot inflate the RSS the rebuild starts from.
    path = workdir / "raw.db"
    baseline = raw_sqlite.insert_rate(path, rows=events, per_transaction=1000, synchronous="FULL")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return [Measurement(NAME, BASELINE, baseline, "docs/s"), *results]
