"""What a domain declares, in one place: aggregates, projections, queries, upcasters.

The runtime, the HTTP routes, the OpenAPI schema and the CLI are all derived
from a `Domain`, so a domain author writes plain Python and nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict

from cqrskit.aggregate import Aggregate
from cqrskit.errors import CqrskitError, NotFound
from cqrskit.messages import Command, Envelope, Event
from cqrskit.ports import Collection, ViewReader, ViewWriter

F = TypeVar("F", bound=Callable[..., Any])
A = TypeVar("A", bound=type[Aggregate])
P = TypeVar("P", bound=type["Projection"])
Q = TypeVar("Q", bound=type["Query"])

_PROJECTS = "__cqrskit_projects__"
# Short enough that a table name built from it (view_<name>) fits PostgreSQL's 63 bytes.
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,49}$")

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


def projects(event_type: type[Event]) -> Callable[[F], F]:
    """Mark a projection method as the one that maps `event_type` onto views.

    The method is called as `method(self, event, envelope, views)`.
    """

    def mark(method: F) -> F:
        setattr(method, _PROJECTS, event_type)
        return method

    return mark


class Projection:
    """Maps events onto view documents. Subclasses set `name` and `collections`.

    Handlers must be deterministic functions of the event and the current
    documents: a rebuild replays them over the whole log.
    """

    name: ClassVar[str]
    collections: ClassVar[Sequence[Collection]] = ()
    _handlers: ClassVar[dict[str, tuple[type[Event], Callable[..., None]]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._handlers = {}
        for klass in reversed(cls.__mro__):
            for member in vars(klass).values():
                if (event_type := getattr(member, _PROJECTS, None)) is not None:
                    cls._handlers[event_type.type_name] = (event_type, member)

    def handles(self, type_name: str) -> bool:
        return type_name in self._handlers

    def event_types(self) -> list[str]:
        return list(self._handlers)

    def event_classes(self) -> list[type[Event]]:
        return [event_type for event_type, _ in self._handlers.values()]

    def documents_read(self, envelope: Envelope) -> Iterable[tuple[str, str]]:
        """(collection, id) of the documents applying this event will read.

        They are loaded for a whole batch in one round trip. The default guesses
        one document per stream in each collection; override it when documents
        are keyed otherwise. A wrong guess costs a round trip, never correctness.
        """
        return [(c.name, envelope.stream_id) for c in self.collections]

    def apply(self, envelope: Envelope, views: ViewWriter) -> None:
        entry = self._handlers.get(envelope.type)
        if entry is not None:
            event_type, handler = entry
            handler(self, event_type.model_validate(envelope.data), envelope, views)


class Query(BaseModel):
    """A read. Fields are its parameters; `run` reads views and returns the answer.

    `reads` names the projections whose views it reads, so a query sent with a
    consistency token waits for exactly those.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ClassVar[str]
    reads: ClassVar[tuple[str, ...]] = ()
    result: ClassVar[Any] = Any

    async def run(self, views: ViewReader) -> Any:
        raise NotImplementedError


class Domain:
    """The registry of one domain."""

    def __init__(self, name: str, *, prefix: str | None = None) -> None:
        if not _NAME.match(name):
            raise CqrskitError(f"domain name {name!r} must match {_NAME.pattern}")
        self.name = name
        self.prefix = prefix if prefix is not None else f"/api/{name}"
        self.aggregates: list[type[Aggregate]] = []
        self.projections: list[Projection] = []
        self.queries: dict[str, type[Query]] = {}
        self.commands: dict[str, tuple[type[Command], type[Aggregate]]] = {}
        self.upcasters: dict[tuple[str, int], Upcaster] = {}

    def aggregate(self, cls: A) -> A:
        for command_type in cls.command_types():
            if command_type.name in self.commands:
                raise CqrskitError(f"command {command_type.name!r} registered twice")
            self.commands[command_type.name] = (command_type, cls)
        self.aggregates.append(cls)
        return cls

    def projection(self, cls: P) -> P:
        if not _NAME.match(cls.name):
            raise CqrskitError(f"projection name {cls.name!r} must match {_NAME.pattern}")
        for collection in cls.collections:
            if not _NAME.match(collection.name):
                raise CqrskitError(
                    f"collection name {collection.name!r} must match {_NAME.pattern}"
                )
        self.projections.append(cls())
        return cls

    def query(self, cls: Q) -> Q:
        if cls.name in self.queries:
            raise CqrskitError(f"query {cls.name!r} registered twice")
        known = {p.name for p in self.projections}
        unknown = set(cls.reads) - known
        if unknown:
            raise CqrskitError(f"query {cls.name!r} reads unknown projections {sorted(unknown)}")
        self.queries[cls.name] = cls
        return cls

    def upcaster(self, type_name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Register a function that turns `type_name` data of `from_version` into the next."""

        def register(fn: Upcaster) -> Upcaster:
            self.upcasters[(type_name, from_version)] = fn
            return fn

        return register


class Registry:
    """All the domains a process serves, merged for lookup."""

    def __init__(self, domains: Iterable[Domain]) -> None:
        self.domains = list(domains)
        self.projections: dict[str, Projection] = {}
        self.upcasters: dict[tuple[str, int], Upcaster] = {}
        self.schema_versions: dict[str, int] = {}
        events: dict[str, type[Event]] = {}
        commands: dict[type[Command], str] = {}
        for domain in self.domains:
            for command_type in domain.commands.values():
                if commands.setdefault(command_type[0], domain.name) != domain.name:
                    raise CqrskitError(f"{command_type[0].__name__} is in two domains")
            event_types = [t for a in domain.aggregates for t in a.event_types()]
            event_types += [t for p in domain.projections for t in p.event_classes()]
            for event_type in event_types:
                # Projections match events by type name, so a name means one class.
                if events.setdefault(event_type.type_name, event_type) is not event_type:
                    raise CqrskitError(
                        f"two event classes are named {event_type.type_name!r}; "
                        "set type_name to tell them apart"
                    )
                self.schema_versions[event_type.type_name] = event_type.schema_version
            for projection in domain.projections:
                if projection.name in self.projections:
                    raise CqrskitError(f"projection {projection.name!r} registered twice")
                self.projections[projection.name] = projection
            self.upcasters.update(domain.upcasters)

    def collections(self) -> list[Collection]:
        return [c for p in self.projections.values() for c in p.collections]

    def projection(self, name: str) -> Projection:
        try:
            return self.projections[name]
        except KeyError:
            known = ", ".join(sorted(self.projections)) or "none"
            raise NotFound(f"no projection named {name!r} (known: {known})") from None

    def upcast(self, envelope: Envelope) -> Envelope:
        """Bring an old event's data up to the schema version the code knows."""
        data, version = envelope.data, envelope.schema_version
        current = self.schema_versions.get(envelope.type, version)
        if version >= current:
            return envelope
        while version < current:
            step = self.upcasters.get((envelope.type, version))
            if step is None:
                raise CqrskitError(
                    f"no upcaster for {envelope.type} from schema version {version}"
                )
            data, version = step(data), version + 1
        return Envelope(**{**envelope.to_dict(), "data": data, "schema_version": version})
