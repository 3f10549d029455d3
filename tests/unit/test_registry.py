"""Domain registration, Registry merging and upcasting."""

from typing import Any, ClassVar

import pytest

from cqrskit.aggregate import Aggregate, decides, evolves
from cqrskit.errors import CqrskitError
from cqrskit.messages import Command, Envelope, Event
from cqrskit.ports import Collection, ViewReader, ViewWriter
from cqrskit.registry import Domain, Projection, Query, Registry, projects


class Ping(Command):
    name: ClassVar[str] = "ping"
    id: str


class Pinged(Event):
    schema_version: ClassVar[int] = 3
    count: int
    source: str


class Pinger(Aggregate):
    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.count = 0

    @decides(Ping)
    def ping(self, command: Ping) -> list[Event]:
        return [Pinged(count=self.count + 1, source="ping")]

    @evolves(Pinged)
    def pinged(self, event: Pinged) -> None:
        self.count = event.count


def envelope(type_name: str, data: dict[str, Any], schema_version: int) -> Envelope:
    return Envelope(
        event_id="e-1", stream_id="s-1", stream_type="pinger", version=1, position=1,
        type=type_name, schema_version=schema_version, data=data,
        metadata={"command_id": "c-1"}, recorded_at="2024-05-01T10:00:00+00:00",
    )


def projection_class(name: str, *collections: Collection) -> type[Projection]:
    return type(f"P_{name}", (Projection,), {"name": name, "collections": collections})


def query_class(name: str, reads: tuple[str, ...]) -> type[Query]:
    async def run(self: Query, views: ViewReader) -> Any:
        return None

    return type(
        f"Q_{name}", (Query,),
        {"__annotations__": {}, "name": name, "reads": reads, "run": run},
    )


# ----------------------------------------------------------------- Domain


def test_domain_registers_commands_projections_and_queries() -> None:
    domain = Domain("pings")
    assert domain.prefix == "/api/pings"
    domain.aggregate(Pinger)
    domain.projection(projection_class("pings", Collection("pings")))
    domain.query(query_class("count", ("pings",)))
    assert domain.commands == {"ping": (Ping, Pinger)}
    assert [p.name for p in domain.projections] == ["pings"]
    assert list(domain.queries) == ["count"]
    assert Domain("other", prefix="/x").prefix == "/x"


@pytest.mark.parametrize("name", ["Pings", "1pings", "pings-x", "", "p" * 64])
def test_bad_domain_names_are_rejected(name: str) -> None:
    with pytest.raises(CqrskitError, match="domain name"):
        Domain(name)


def test_a_command_name_registered_twice_is_rejected() -> None:
    class OtherPing(Command):
        name: ClassVar[str] = "ping"
        id: str

    class OtherPinger(Aggregate):
        @decides(OtherPing)
        def ping(self, command: OtherPing) -> list[Event]:
            return []

    domain = Domain("pings")
    domain.aggregate(Pinger)
    with pytest.raises(CqrskitError, match="command 'ping' registered twice"):
        domain.aggregate(OtherPinger)
    assert domain.aggregates == [Pinger]


def test_a_query_name_registered_twice_is_rejected() -> None:
    domain = Domain("pings")
    domain.query(query_class("count", ()))
    with pytest.raises(CqrskitError, match="query 'count' registered twice"):
        domain.query(query_class("count", ()))


def test_a_query_reading_an_unknown_projection_is_rejected() -> None:
    domain = Domain("pings")
    domain.projection(projection_class("pings", Collection("pings")))
    with pytest.raises(CqrskitError, match=r"reads unknown projections \['nope'\]"):
        domain.query(query_class("count", ("pings", "nope")))
    assert domain.queries == {}


@pytest.mark.parametrize("name", ["Pings", "has space", "dash-ed", "9lives", 'x"; DROP'])
def test_bad_projection_names_are_rejected(name: str) -> None:
    domain = Domain("pings")
    with pytest.raises(CqrskitError, match="projection name"):
        domain.projection(projection_class(name, Collection("ok")))
    assert domain.projections == []


@pytest.mark.parametrize("name", ["Pings", "has space", 'x"; DROP TABLE events; --', ""])
def test_bad_collection_names_are_rejected(name: str) -> None:
    domain = Domain("pings")
    with pytest.raises(CqrskitError, match="collection name"):
        domain.projection(projection_class("pings", Collection("ok"), Collection(name)))
    assert domain.projections == []


def test_projection_dispatches_on_the_event_type_name() -> None:
    seen: list[tuple[int, str]] = []

    class Pings(Projection):
        name = "pings"

        @projects(Pinged)
        def pinged(self, event: Pinged, env: Envelope, views: ViewWriter) -> None:
            seen.append((event.count, env.stream_id))

    projection = Pings()
    assert projection.handles("Pinged") and not projection.handles("Other")
    assert projection.event_types() == ["Pinged"]
    projection.apply(envelope("Pinged", {"count": 2, "source": "x"}, 3), views=None)  # type: ignore[arg-type]
    projection.apply(envelope("Other", {}, 1), views=None)  # type: ignore[arg-type]
    assert seen == [(2, "s-1")]


# --------------------------------------------------------------- Registry


def test_registry_merges_projections_of_all_domains() -> None:
    first, second = Domain("first"), Domain("second")
    first.projection(projection_class("a", Collection("a_docs", indexed=("x",))))
    second.projection(projection_class("b", Collection("b_docs"), Collection("b_more")))
    registry = Registry([first, second])
    assert sorted(registry.projections) == ["a", "b"]
    assert [c.name for c in registry.collections()] == ["a_docs", "b_docs", "b_more"]
    assert registry.projection("b") is second.projections[0]


def test_registry_rejects_a_projection_name_used_by_two_domains() -> None:
    first, second = Domain("first"), Domain("second")
    first.projection(projection_class("same", Collection("one")))
    second.projection(projection_class("same", Collection("two")))
    with pytest.raises(CqrskitError, match="projection 'same' registered twice"):
        Registry([first, second])


def test_registry_names_the_known_projections_when_one_is_missing() -> None:
    domain = Domain("first")
    domain.projection(projection_class("a", Collection("a_docs")))
    with pytest.raises(CqrskitError, match=r"no projection named 'zzz' \(known: a\)"):
        Registry([domain]).projection("zzz")
    with pytest.raises(CqrskitError, match=r"known: none"):
        Registry([]).projection("zzz")


def _pinger_registry() -> tuple[Domain, Registry]:
    domain = Domain("pings")
    domain.aggregate(Pinger)

    @domain.upcaster("Pinged", 1)
    def v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
        return {"count": data["n"]}

    @domain.upcaster("Pinged", 2)
    def v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "source": "upcast"}

    return domain, Registry([domain])


def test_upcasting_runs_the_chain_of_upcasters_up_to_the_current_schema() -> None:
    _, registry = _pinger_registry()
    old = envelope("Pinged", {"n": 7}, schema_version=1)
    new = registry.upcast(old)
    assert (new.schema_version, new.data) == (3, {"count": 7, "source": "upcast"})
    assert new.to_dict() | {"data": old.data, "schema_version": 1} == old.to_dict()

    middle = registry.upcast(envelope("Pinged", {"count": 2}, schema_version=2))
    assert (middle.schema_version, middle.data) == (3, {"count": 2, "source": "upcast"})


def test_upcasting_leaves_current_and_unknown_events_alone() -> None:
    _, registry = _pinger_registry()
    current = envelope("Pinged", {"count": 1, "source": "ping"}, schema_version=3)
    assert registry.upcast(current) is current
    unknown = envelope("NotOurs", {"n": 1}, schema_version=1)
    assert registry.upcast(unknown) is unknown


def test_upcasting_without_an_upcaster_for_a_step_raises() -> None:
    domain = Domain("pings")
    domain.aggregate(Pinger)

    @domain.upcaster("Pinged", 1)
    def v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
        return {"count": data["n"]}

    registry = Registry([domain])
    with pytest.raises(CqrskitError, match="no upcaster for Pinged from schema version 2"):
        registry.upcast(envelope("Pinged", {"n": 1}, schema_version=1))


def test_upcasters_of_all_domains_are_merged() -> None:
    domain, _ = _pinger_registry()
    registry = Registry([Domain("empty"), domain])
    assert set(registry.upcasters) == {("Pinged", 1), ("Pinged", 2)}
    assert registry.schema_versions["Pinged"] == 3


class Shout(Command):
    name: ClassVar[str] = "shout"
    id: str


class Shouted(Event):
    """Decided by the aggregate and projected, but not evolved (like RecordInserted)."""

    schema_version: ClassVar[int] = 2
    text: str


class Shouter(Aggregate):
    @decides(Shout)
    def shout(self, command: Shout) -> list[Event]:
        return [Shouted(text="hi")]


def test_an_event_type_that_is_only_projected_is_upcast_too() -> None:
    """Regression: schema versions were collected only from @evolves, so events an
    aggregate decides but does not evolve (like RecordInserted) were never upcast."""
    domain = Domain("shouts")
    domain.aggregate(Shouter)

    class Shouts(Projection):
        name = "shouts"

        @projects(Shouted)
        def shouted(self, event: Shouted, env: Envelope, views: ViewWriter) -> None:
            pass

    domain.projection(Shouts)

    @domain.upcaster("Shouted", 1)
    def v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
        return {"text": data["message"]}

    upcast = Registry([domain]).upcast(envelope("Shouted", {"message": "old"}, 1))
    assert (upcast.schema_version, upcast.data) == (2, {"text": "old"})
