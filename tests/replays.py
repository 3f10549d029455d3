"""Independent replays of the log and full reads of the views, for tests to compare.

Shared by the integration and contract suites (tests/ is on pytest's path
through the root conftest).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from cqrskit.messages import Envelope
from cqrskit.ports import EventStore, ViewReader


async def whole_log(store: EventStore, page: int = 97) -> list[Envelope]:
    events: list[Envelope] = []
    while batch := await store.read_all(events[-1].position if events else 0, page):
        events.extend(batch)
    return events


async def all_docs(views: ViewReader, collection: str, page: int = 37) -> list[dict[str, Any]]:
    """Every document of a collection in id order, read page by page."""
    docs: list[dict[str, Any]] = []
    cursor = None
    while True:
        found = await views.find(collection, {}, after=cursor, limit=page)
        docs.extend(found.items)
        if found.next_cursor is None:
            return docs
        cursor = found.next_cursor


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


async def records_view(views: ViewReader) -> dict[str, dict[str, Any]]:
    return {doc["id"]: doc for doc in await all_docs(views, "records")}


async def statistics_view(views: ViewReader) -> dict[str, Any]:
    totals = await views.get("stats_totals", "all") or {"total": 0, "by_type": {}}
    return {
        "total": totals["total"],
        "by_type": totals["by_type"],
        "by_day": {d["day"]: d for d in await all_docs(views, "stats_by_day")},
    }
