"""Helpers for the integration tests: a test domain that fails on demand, and replays
of the log that the views must equal."""

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from cqrskit.aggregate import Aggregate, decides, evolves
from cqrskit.bootstrap import Runtime
from cqrskit.messages import Command, Envelope, Event, Identifier
from cqrskit.ports import Collection, EventStore, Stream, ViewStore, ViewWriter
from cqrskit.registry import Domain, Projection, Registry, projects
from cqrskit.update_processor import ProjectionRunner


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


def make_ledger() -> Ledger:
    """A fresh domain per test: `add` appends a value to an entry; the `entries`
    projection raises on events with fail=True while `projection.broken` is set."""
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

    registry = Registry([domain])
    return Ledger(registry, Add, registry.projection("entries"))


async def all_docs(views: ViewStore, collection: str, page: int = 100) -> list[dict[str, Any]]:
    """Every document of a collection in id order, read page by page."""
    docs: list[dict[str, Any]] = []
    cursor = None
    while True:
        found = await views.find(collection, {}, after=cursor, limit=page)
        docs.extend(found.items)
        if found.next_cursor is None:
            return docs
        cursor = found.next_cursor


async def whole_log(store: EventStore) -> list[Envelope]:
    events: list[Envelope] = []
    while batch := await store.read_all(events[-1].position if events else 0, 500):
        events.extend(batch)
    return events


def replay_records(log: list[Envelope]) -> dict[str, dict[str, Any]]:
    """What the records view must hold after the log, computed independently."""
    docs: dict[str, dict[str, Any]] = {}
    for e in log:
        if e.type == "RecordInserted":
            docs[e.stream_id] = {
                "id": e.stream_id, "data": e.data["data"], "version": e.version,
                "created_at": e.recorded_at, "updated_at": e.recorded_at,
            }
        elif e.type == "RecordUpdated":
            docs[e.stream_id] = {
                **docs[e.stream_id], "data": e.data["data"], "version": e.version,
                "updated_at": e.recorded_at,
            }
        elif e.type == "RecordDeleted":
            del docs[e.stream_id]
    return docs


def replay_statistics(log: list[Envelope]) -> dict[str, Any]:
    """What the statistics views must hold after the log."""
    by_day: dict[str, Counter[str]] = {}
    for e in log:
        by_day.setdefault(e.recorded_at[:10], Counter())[e.type] += 1
    return {
        "total": len(log),
        "by_type": dict(Counter(e.type for e in log)),
        "by_day": {
            day: {"day": day, "total": sum(c.values()), "by_type": dict(c)}
            for day, c in by_day.items()
        },
    }


async def records_view(views: ViewStore) -> dict[str, dict[str, Any]]:
    return {doc["id"]: doc for doc in await all_docs(views, "records", page=37)}


async def statistics_view(views: ViewStore) -> dict[str, Any]:
    totals = await views.get("stats_totals", "all") or {"total": 0, "by_type": {}}
    return {
        "total": totals["total"],
        "by_type": totals["by_type"],
        "by_day": {d["day"]: d for d in await all_docs(views, "stats_by_day")},
    }


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
