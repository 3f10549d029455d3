"""The built-in domain: the reference's "insert data / query data" on JSON documents.

`POST /api/command/insert` and `GET /api/query/get?id=` keep the reference's
API; update, delete, list and statistics go beyond it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson
from pydantic import BaseModel, Field

from cqrskit.aggregate import Aggregate, decides, evolves
from cqrskit.errors import CommandRejected, InvalidRequest, NotFound
from cqrskit.messages import Command, Envelope, Event, Identifier, JsonObject
from cqrskit.ports import Collection, ViewReader, ViewWriter
from cqrskit.registry import Domain, Projection, Query, projects

domain = Domain("records", prefix="/api")

MAX_PAGE_SIZE = 500
MAX_FILTERS = 8
# A filter's text (field:value) and how deep its field may reach into the data.
MAX_FILTER_LENGTH = 256
MAX_FILTER_DEPTH = 4


# ------------------------------------------------------------------- commands


class InsertRecord(Command):
    """Store a new record. Without an `id`, the service assigns one."""

    name: ClassVar[str] = "insert"
    creates: ClassVar[bool] = True
    id: Identifier | None = None
    data: JsonObject


class UpdateRecord(Command):
    """Replace a record's data; with `expected_version`, only if nobody changed it since."""

    name: ClassVar[str] = "update"
    id: Identifier
    data: JsonObject
    expected_version: int | None = Field(default=None, ge=1, le=2**62)


class DeleteRecord(Command):
    """Delete a record; with `expected_version`, only if nobody changed it since."""

    name: ClassVar[str] = "delete"
    id: Identifier
    expected_version: int | None = Field(default=None, ge=1, le=2**62)


# --------------------------------------------------------------------- events


class RecordInserted(Event):
    data: dict[str, Any]


class RecordUpdated(Event):
    data: dict[str, Any]


class RecordDeleted(Event):
    pass


# ------------------------------------------------------------------ aggregate


@domain.aggregate
class Record(Aggregate):
    stream_type = "record"

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.deleted = False

    def _require_live(self) -> None:
        if self.version == 0:
            raise NotFound(f"no record with id {self.id!r}")
        if self.deleted:
            raise NotFound(f"record {self.id!r} was deleted")

    @decides(InsertRecord)
    def insert(self, command: InsertRecord) -> list[Event]:
        if self.version:
            raise CommandRejected(f"record {self.id!r} already exists; ids are not reused")
        return [RecordInserted(data=command.data)]

    @decides(UpdateRecord)
    def update(self, command: UpdateRecord) -> list[Event]:
        self._require_live()
        return [RecordUpdated(data=command.data)]

    @decides(DeleteRecord)
    def delete(self, command: DeleteRecord) -> list[Event]:
        self._require_live()
        return [RecordDeleted()]

    @evolves(RecordDeleted)
    def deleted_(self, event: RecordDeleted) -> None:
        self.deleted = True


# ---------------------------------------------------------------- projections


@domain.projection
class Records(Projection):
    """One document per live record."""

    name = "records"
    collections = (Collection("records"),)

    def documents_read(self, envelope: Envelope) -> list[tuple[str, str]]:
        # An insert only writes; updates read the document they replace.
        return [] if envelope.type == "RecordInserted" else [("records", envelope.stream_id)]

    @projects(RecordInserted)
    def inserted(self, event: RecordInserted, envelope: Envelope, views: ViewWriter) -> None:
        views.put("records", envelope.stream_id, {
            "id": envelope.stream_id,
            "data": event.data,
            "version": envelope.version,
            "created_at": envelope.recorded_at,
            "updated_at": envelope.recorded_at,
        })

    @projects(RecordUpdated)
    def updated(self, event: RecordUpdated, envelope: Envelope, views: ViewWriter) -> None:
        doc = views.get("records", envelope.stream_id)
        if doc is None:
            raise NotFound(f"record {envelope.stream_id!r} is not in the view")
        views.put("records", envelope.stream_id, {
            **doc, "data": event.data, "version": envelope.version,
            "updated_at": envelope.recorded_at,
        })

    @projects(RecordDeleted)
    def deleted(self, event: RecordDeleted, envelope: Envelope, views: ViewWriter) -> None:
        views.delete("records", envelope.stream_id)


@domain.projection
class Statistics(Projection):
    """Counts of events by type, in total and per day: a view across all streams."""

    name = "statistics"
    collections = (Collection("stats_totals"), Collection("stats_by_day", indexed=("day",)))

    def documents_read(self, envelope: Envelope) -> list[tuple[str, str]]:
        return [("stats_totals", "all"), ("stats_by_day", envelope.recorded_at[:10])]

    def _count(self, envelope: Envelope, views: ViewWriter) -> None:
        day = envelope.recorded_at[:10]
        totals = views.get("stats_totals", "all") or {"total": 0, "by_type": {}}
        daily = views.get("stats_by_day", day) or {"day": day, "total": 0, "by_type": {}}
        for doc in (totals, daily):
            doc["total"] += 1
            doc["by_type"][envelope.type] = doc["by_type"].get(envelope.type, 0) + 1
        views.put("stats_totals", "all", totals)
        views.put("stats_by_day", day, daily)

    @projects(RecordInserted)
    def inserted(self, event: RecordInserted, envelope: Envelope, views: ViewWriter) -> None:
        self._count(envelope, views)

    @projects(RecordUpdated)
    def updated(self, event: RecordUpdated, envelope: Envelope, views: ViewWriter) -> None:
        self._count(envelope, views)

    @projects(RecordDeleted)
    def deleted(self, event: RecordDeleted, envelope: Envelope, views: ViewWriter) -> None:
        self._count(envelope, views)


# -------------------------------------------------------------------- queries


class RecordView(BaseModel):
    id: str
    data: dict[str, Any]
    version: int
    created_at: str
    updated_at: str


class RecordPage(BaseModel):
    items: list[RecordView]
    next_cursor: str | None


class DayStatistics(BaseModel):
    day: str
    total: int
    by_type: dict[str, int]


class StatisticsView(BaseModel):
    total: int
    by_type: dict[str, int]
    by_day: list[DayStatistics]


@domain.query
class GetRecord(Query):
    """One record by id."""

    name: ClassVar[str] = "get"
    reads: ClassVar[tuple[str, ...]] = ("records",)
    result: ClassVar[Any] = RecordView
    id: Identifier

    async def run(self, views: ViewReader) -> RecordView:
        doc = await views.get("records", self.id)
        if doc is None:
            raise NotFound(f"no record with id {self.id!r}")
        return RecordView.model_validate(doc)


def parse_filter(text: str) -> tuple[str, Any]:
    """`field:value`: the value is read as JSON when it is JSON, else as a string."""
    if len(text) > MAX_FILTER_LENGTH:
        raise InvalidRequest(
            f"filter {text[:40]!r}... is {len(text)} characters long; at most "
            f"{MAX_FILTER_LENGTH} are allowed")
    field, sep, raw = text.partition(":")
    if not sep or not field:
        raise InvalidRequest(f"filter {text!r} must look like field:value, e.g. color:red")
    if field.count(".") >= MAX_FILTER_DEPTH:
        raise InvalidRequest(
            f"filter field {field!r} is nested too deep; at most {MAX_FILTER_DEPTH} levels")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = raw
    if isinstance(value, (dict, list)):
        raise InvalidRequest(
            f"filter {text!r} must compare with a string, number, true, false or null"
        )
    return f"data.{field}", value


@domain.query
class ListRecords(Query):
    """Records ordered by id, filtered on top-level data fields, one page at a time.

    `filter=color:red` matches records whose `data.color` is "red"; `filter=size:3`
    matches the number 3 (`size:"3"` the string). Pass `cursor` from the previous
    page's `next_cursor` to get the next page.
    """

    name: ClassVar[str] = "list"
    reads: ClassVar[tuple[str, ...]] = ("records",)
    result: ClassVar[Any] = RecordPage
    filter: list[str] = Field(default_factory=list, max_length=MAX_FILTERS)
    cursor: str | None = Field(default=None, max_length=200)
    limit: int = Field(default=50, ge=1, le=MAX_PAGE_SIZE)

    async def run(self, views: ViewReader) -> RecordPage:
        filters = dict(parse_filter(f) for f in self.filter)
        if len(filters) < len(self.filter):
            # Two values for one field would match nothing, or silently drop one.
            raise InvalidRequest("each field may be filtered on once; a field was given twice")
        page = await views.find("records", filters, after=self.cursor, limit=self.limit)
        return RecordPage(
            items=[RecordView.model_validate(d) for d in page.items], next_cursor=page.next_cursor
        )


@domain.query
class GetStatistics(Query):
    """Event counts by type, in total and for each of the latest `days` days (newest first)."""

    name: ClassVar[str] = "stats"
    reads: ClassVar[tuple[str, ...]] = ("statistics",)
    result: ClassVar[Any] = StatisticsView
    days: int = Field(default=31, ge=1, le=366)

    async def run(self, views: ViewReader) -> StatisticsView:
        totals = await views.get("stats_totals", "all") or {"total": 0, "by_type": {}}
        page = await views.find("stats_by_day", {}, limit=self.days, descending=True)
        return StatisticsView(
            total=totals["total"],
            by_type=totals["by_type"],
            by_day=[DayStatistics.model_validate(d) for d in page.items],
        )
