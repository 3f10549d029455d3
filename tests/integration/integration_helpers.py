"""Helpers for the integration tests: a test domain that fails on demand, and replays
of the log that the views must equal."""

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from cqrskit.aggregate import Aggregate, decides, evolves
from cqrskit.bootstrap import Runtime
from cqrskit.messages import Command, Envelope, Event, Identifier
from cqrskit.ports import Collection, Stream, ViewStore, ViewWriter
from cqrskit.registry import Domain, Projection, Registry, projects
from cqrskit.update_processor import ProjectionRunner
from replays import (  # noqa: F401  (re-exported for the integration tests)
    all_docs,
    records_view,
    replay_records,
    replay_statistics,
    statistics_view,
    whole_log,
)


class OpenRuntime(Protocol):
    """The `open_rt` fixture: open a runtime (closed at the end of the test)."""

    def __call__(
        self, registry: Registry | None = None, *, data_dir: Path | None = None, **settings: Any
    ) -> Awaitable[Runtime]: ...


# ------------------------------------------------------------ test domain


@dataclass
class Ledger:
    registry: Registry
    add: Callable[..., Command]
    projection: Any  # the registered Entries instance: .broken, .calls


def make_ledger(*, healthy_twin: bool = False) -> Ledger:
    """A fresh domain per test: `add` appends a value to an entry; the `entries`
    projection raises on events with fail=True while `projection.broken` is set. With
    `healthy_twin`, a `tally` projection also appends every value and never fails."""
    domain = Domain("ledger")

    class Add(Command):
        name: ClassVar[str] = "add"
        creates: ClassVar[bool] = True
        id: Identifier
        value: int
        fail: bool = False

    class Added(Event):
        value: int
        fail: bool = False

    @domain.aggregate
    class Entry(Aggregate):
        stream_type = "entry"

        def __init__(self, aggregate_id: str) -> None:
            super().__init__(aggregate_id)
            self.total = 0

        @decides(Add)
        def add(self, command: Add) -> list[Event]:
            return [Added(value=command.value, fail=command.fail)]

        @evolves(Added)
        def added(self, event: Added) -> None:
            self.total += event.value

    @domain.projection
    class Entries(Projection):
        name = "entries"
        collections = (Collection("entries"),)

        def __init__(self) -> None:
            self.broken = True
            self.calls: list[int] = []  # positions, one per attempt to apply

        @projects(Added)
        def added(self, event: Added, envelope: Envelope, views: ViewWriter) -> None:
            self.calls.append(envelope.position)
            if event.fail and self.broken:
                raise RuntimeError(f"cannot apply {envelope.stream_id} v{envelope.version}")
            doc = views.get("entries", envelope.stream_id) or {
                "id": envelope.stream_id, "values": [], "versions": []
            }
            doc["values"].append(event.value)
            doc["versions"].append(envelope.version)
            views.put("entries", envelope.stream_id, doc)

    if healthy_twin:
        @domain.projection
        class Tally(Projection):
            name = "tally"
            collections = (Collection("tally"),)

            @projects(Added)
            def added(self, event: Added, envelope: Envelope, views: ViewWriter) -> None:
                doc = views.get("tally", envelope.stream_id) or {
                    "id": envelope.stream_id, "values": []
                }
                doc["values"].append(event.value)
                views.put("tally", envelope.stream_id, doc)

    registry = Registry([domain])
    return Ledger(registry, Add, registry.projection("entries"))


async def drain(runner: ProjectionRunner, runtime: Runtime, stream: Stream | None = None) -> int:
    """Have the runner apply everything in the log now, then return its position."""
    until = await runtime.store.last_position()
    await asyncio.wait_for(runner.follow(stream or runtime.stream, 1, until=until), 10)
    return runner.position


async def wait_for_checkpoint(
    views: ViewStore, projection: str, position: int, timeout: float = 10
) -> None:
    """Poll the stored checkpoint (not the in-memory one) until it reaches `position`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (await views.checkpoints()).get((projection, 0), 0) < position:
        assert loop.time() < deadline, f"{projection} did not reach {position} in {timeout}s"
        await asyncio.sleep(0.02)
