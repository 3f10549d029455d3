"""Run one hot path alone, long enough for a profiler to see it.

    python -m benchmarks.hotpath append [--commands 20000] [--synchronous NORMAL]
    python -m benchmarks.hotpath rebuild [--events 100000] [--projection records]

Wrap it in a profiler, e.g.
    py-spy record --threads --format speedscope -o append.json -- \
        .venv/bin/python -m benchmarks.hotpath append
    .venv/bin/pyinstrument -m benchmarks.hotpath rebuild
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.append import commands_per_second, insert_records
from benchmarks.rebuild import create_schemas, write_log
from cqrskit.bootstrap import open_runtime
from cqrskit.config import Settings
from cqrskit.update_processor import rebuild


async def append(directory: Path, commands: int, synchronous: str, clients: int) -> None:
    rt = await open_runtime(Settings(data_dir=directory, sqlite_synchronous=synchronous))
    try:
        ids = await insert_records(rt, 100, clients=8)
        rate = await commands_per_second(rt, "insert", clients, commands, ids)
    finally:
        await rt.close()
    print(f"append: {rate:,.0f} cmd/s ({clients} clients, {synchronous})", file=sys.stderr)


async def replay(directory: Path, events: int, projection: str) -> None:
    await create_schemas(directory)
    write_log(directory / "command.db", events)
    rt = await open_runtime(Settings(data_dir=directory))
    try:
        start = time.perf_counter()
        await rebuild(rt.registry.projection(projection), rt.registry, rt.views, rt.stream,
                      events)
        elapsed = time.perf_counter() - start
    finally:
        await rt.close()
    print(f"rebuild {projection}: {events / elapsed:,.0f} events/s", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hotpath")
    parser.add_argument("path", choices=["append", "rebuild"])
    parser.add_argument("--commands", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--synchronous", default="NORMAL")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--projection", default="records")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cqrskit-hot-") as tmp:
        if args.path == "append":
            asyncio.run(append(Path(tmp), args.commands, args.synchronous, args.clients))
        else:
            asyncio.run(replay(Path(tmp), args.events, args.projection))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
