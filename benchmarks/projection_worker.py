"""One update processor in a process of its own, for lag_distributed's projection cases.

`python -m benchmarks.projection_worker COMMAND_DB QUERY_DB STREAM PARTITIONS OWNED`
(OWNED: comma-separated partitions) opens a runtime of the `update-processor` role,
prints `ready`, starts processing the owned partitions when a line arrives on stdin
and stops when stdin closes. So start-up (imports, connections) is not timed, and
each processor has a GIL and an event loop of its own, as `cqrskit update-processor`
processes do.
"""

from __future__ import annotations

import asyncio
import sys

from cqrskit.bootstrap import open_runtime
from cqrskit.config import Settings
from cqrskit.update_processor import RetryPolicy, UpdateProcessor


async def _line() -> str:
    return await asyncio.to_thread(sys.stdin.readline)


async def main(command_db: str, query_db: str, stream: str, partitions: int,
               owned: list[int]) -> None:
    settings = Settings(command_db=command_db, query_db=query_db, stream=stream)
    rt = await open_runtime(settings, role="update-processor")
    assert rt.views is not None and rt.stream is not None
    processor = UpdateProcessor(
        rt.registry, rt.views, rt.stream, partitions=partitions, owned=owned,
        retry=RetryPolicy(), checkpoints=rt.checkpoints,
    )
    try:
        print("ready", flush=True)
        await _line()  # go
        processor.start()
        await _line()  # stdin closed: stop
    finally:
        await asyncio.wait_for(processor.stop(), 20)
        await rt.close()


if __name__ == "__main__":
    command_db, query_db, stream, partitions, owned = sys.argv[1:6]
    asyncio.run(main(command_db, query_db, stream, int(partitions),
                     [int(p) for p in owned.split(",")]))
