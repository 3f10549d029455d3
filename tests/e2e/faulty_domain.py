"""A test-only domain whose projection fails on poisoned events, on a switch.

Loaded by the server and the CLI subprocesses through CQRSKIT_DOMAINS (with this
directory on PYTHONPATH). An item's event whose data has `"poison": true` fails to
project while the file named by CQRSKIT_TEST_POISON_FILE exists; remove the file
and the same event applies. The view keeps the versions it applied, in order, so a
test can see that parked events were re-applied in stream order.

Routes: POST /api/faulty/command/create|change, GET /api/faulty/query/get?id=
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, JsonValue

from cqrskit.aggregate import Aggregate, decides
from cqrskit.errors import CommandRejected, NotFound
from cqrskit.messages import Command, Envelope, Event, Identifier
from cqrskit.ports import Collection, ViewReader, ViewWriter
from cqrskit.registry import Domain, Projection, Query, projects

domain = Domain("faulty")

POISON_FILE = os.environ.get("CQRSKIT_TEST_POISON_FILE")


class CreateItem(Command):
    """Create an item."""

    name: ClassVar[str] = "create"
    creates: ClassVar[bool] = True
    id: Identifier | None = None
    data: dict[str, JsonValue]


class ChangeItem(Command):
    """Change an item's data."""

    name: ClassVar[str] = "change"
    id: Identifier
    data: dict[str, JsonValue]


class ItemCreated(Event):
    data: dict[str, Any]


class ItemChanged(Event):
    data: dict[str, Any]


@domain.aggregate
class Item(Aggregate):
    stream_type = "item"

    @decides(CreateItem)
    def create(self, command: CreateItem) -> list[Event]:
        if self.version:
            raise CommandRejected(f"item {self.id!r} already exists")
        return [ItemCreated(data=command.data)]

    @decides(ChangeItem)
    def change(self, command: ChangeItem) -> list[Event]:
        if not self.version:
            raise NotFound(f"no item with id {self.id!r}")
        return [ItemChanged(data=command.data)]


class PoisonedEvent(RuntimeError):
    pass


def _check(data: dict[str, Any], envelope: Envelope) -> None:
    if data.get("poison") is True and POISON_FILE and Path(POISON_FILE).exists():
        raise PoisonedEvent(f"poisoned event {envelope.stream_id} v{envelope.version}")


@domain.projection
class Items(Projection):
    name = "items"
    collections = (Collection("items"),)

    @projects(ItemCreated)
    def created(self, event: ItemCreated, envelope: Envelope, views: ViewWriter) -> None:
        _check(event.data, envelope)
        views.put("items", envelope.stream_id, {
            "id": envelope.stream_id, "data": event.data, "version": envelope.version,
            "applied": [envelope.version],
        })

    @projects(ItemChanged)
    def changed(self, event: ItemChanged, envelope: Envelope, views: ViewWriter) -> None:
        _check(event.data, envelope)
        doc = views.get("items", envelope.stream_id)
        if doc is None:
            raise LookupError(f"item {envelope.stream_id} is not in the view")
        views.put("items", envelope.stream_id, {
            **doc, "data": event.data, "version": envelope.version,
            "applied": [*doc["applied"], envelope.version],
        })


class ItemView(BaseModel):
    id: str
    data: dict[str, Any]
    version: int
    applied: list[int]


@domain.query
class GetItem(Query):
    """One item by id."""

    name: ClassVar[str] = "get"
    reads: ClassVar[tuple[str, ...]] = ("items",)
    result: ClassVar[Any] = ItemView
    id: Identifier

    async def run(self, views: ViewReader) -> ItemView:
        doc = await views.get("items", self.id)
        if doc is None:
            raise NotFound(f"no item with id {self.id!r}")
        return ItemView.model_validate(doc)
