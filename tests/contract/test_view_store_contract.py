"""The ViewStore port and its UnitOfWork: what every adapter (SQLite, PostgreSQL) must do."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import pytest

from cqrskit.errors import CqrskitError, InvalidRequest
from cqrskit.messages import Envelope, Event
from cqrskit.ports import Collection, UnitOfWork, ViewStore, ViewWriter
from cqrskit.registry import Domain, Projection, Registry, projects
from cqrskit.stores.queries import encode_cursor
from cqrskit.update_processor import ProjectionRunner

from .conftest import Backend

COLLECTIONS = [Collection("docs", indexed=("kind", "data.color")), Collection("other")]


def doc(doc_id: str, kind: str, **data: Any) -> dict[str, Any]:
    return {"id": doc_id, "kind": kind, "data": data}


SEED = [
    doc("d00", "a", color="red", size=3, flag=True, ratio=2.5, note=None),
    doc("d01", "a", color="red", size="3", flag=False, ratio=1),
    doc("d02", "b", color="blue", size=3, flag=True, note="x"),
    doc("d03", "b", color="red", size=4, flag=False, note=None),
    doc("d04", "a", color="green", size=3.0, ratio=2.5),
    doc("d05", "c", color="red", size=5, flag=True, nested={"deep": "yes"}),
    doc("d06", "a", color="blue", size=0, flag=False, note="null"),
    doc("d07", "c", color="", size=1, flag=1, note=0, tags=["red"]),
    {"id": "d08", "kind": "d", "data": "red"},
]


async def seed(views: ViewStore, docs: list[dict[str, Any]] = SEED) -> None:
    def work(uow: UnitOfWork) -> None:
        for d in docs:
            uow.put("docs", d["id"], d)

    await views.run(work)


async def ids(views: ViewStore, filters: dict[str, Any], **kwargs: Any) -> list[str]:
    page = await views.find("docs", filters, **kwargs)
    return [d["id"] for d in page.items]


def parked_envelope(stream_id: str, version: int, position: int) -> Envelope:
    return Envelope(
        event_id=f"e-{position}", stream_id=stream_id, stream_type="t", version=version,
        position=position, type="X", schema_version=1, data={"a": position}, metadata={},
        recorded_at="2024-01-01T00:00:00+00:00",
    )


# ------------------------------------------------------------ unit of work


async def test_a_unit_of_work_reads_its_own_writes_and_commits_them(backend: Backend) -> None:
    views = await backend.view_store(COLLECTIONS)
    await seed(views, [doc("keep", "a"), doc("gone", "a"), doc("pre", "a", n=1)])

    def work(uow: UnitOfWork) -> list[Any]:
        seen = []
        uow.prefetch("docs", ["pre", "keep", "missing", "new"])
        uow.put("docs", "new", doc("new", "b", n=1))
        seen.append(uow.get("docs", "new"))
        kept = uow.get("docs", "keep")
        assert kept is not None
        uow.put("docs", "keep", {**kept, "data": {"changed": True}})
        seen.append(uow.get("docs", "keep"))
        uow.delete("docs", "gone")
        seen.append(uow.get("docs", "gone"))
        uow.put("docs", "brief", doc("brief", "b"))
        uow.delete("docs", "brief")
        seen.append(uow.get("docs", "brief"))
        seen.append(uow.get("docs", "missing"))
        # A prefetch after a write does not bring back the stored document.
        uow.put("docs", "pre", doc("pre", "a", n=2))
        uow.prefetch("docs", ["pre", "gone"])
        seen.append(uow.get("docs", "pre"))
        seen.append(uow.get("docs", "gone"))
        return seen

    seen = await views.run(work)
    assert seen == [
        doc("new", "b", n=1), {**doc("keep", "a"), "data": {"changed": True}}, None, None, None,
        doc("pre", "a", n=2), None,
    ]
    assert await views.get("docs", "new") == doc("new", "b", n=1)
    assert await views.get("docs", "keep") == {**doc("keep", "a"), "data": {"changed": True}}
    assert await views.get("docs", "pre") == doc("pre", "a", n=2)
    assert await views.get("docs", "gone") is None
    assert await views.get("docs", "brief") is None
    assert await views.get("docs", "missing") is None


async def test_nothing_is_written_when_the_work_raises_and_the_others_commit(
    backend: Backend,
) -> None:
    views = await backend.view_store(COLLECTIONS)
    await seed(views, [doc("keep", "a")])
    await views.run(lambda uow: uow.put("other", "o", {"id": "o"}))

    def good(name: str) -> Any:
        def work(uow: UnitOfWork) -> str:
            uow.put("docs", name, doc(name, "g"))
            uow.set_checkpoint(f"p-{name}", 0, 5)
            return name

        return work

    def bad(uow: UnitOfWork) -> None:
        uow.checkpoint("p", 0)
        uow.put("docs", "new", doc("new", "b"))
        uow.delete("docs", "keep")
        uow.set_checkpoint("p", 0, 99)
        uow.park("p", 0, parked_envelope("s", 1, 1), "boom", attempts=1, is_cause=True)
        uow.clear("other")
        raise LookupError("changed my mind")

    # Submitted in one loop iteration: the adapters commit them as one group.
    outcomes = await asyncio.gather(
        views.run(good("g1")), views.run(bad), views.run(good("g2")), return_exceptions=True,
    )
    assert outcomes[0] == "g1" and outcomes[2] == "g2"
    assert isinstance(outcomes[1], LookupError) and str(outcomes[1]) == "changed my mind"
    assert await views.get("docs", "new") is None
    assert await views.get("docs", "keep") == doc("keep", "a")
    assert await views.get("docs", "g1") == doc("g1", "g")
    assert await views.get("docs", "g2") == doc("g2", "g")
    assert await views.get("other", "o") == {"id": "o"}
    assert await views.list_dead_letters() == []
    checkpoints = await views.checkpoints()
    assert checkpoints.get(("p", 0), 0) == 0
    assert (checkpoints[("p-g1", 0)], checkpoints[("p-g2", 0)]) == (5, 5)
    # The store still works afterwards.
    await seed(views, [doc("after", "a")])
    assert await views.get("docs", "after") == doc("after", "a")


async def test_units_are_serialised_each_sees_the_ones_before(backend: Backend) -> None:
    views = await backend.view_store(COLLECTIONS)

    def increment(uow: UnitOfWork) -> int:
        counter = uow.get("docs", "counter") or {"id": "counter", "n": 0}
        counter = {**counter, "n": counter["n"] + 1}
        uow.put("docs", "counter", counter)
        return int(counter["n"])

    seen = await asyncio.gather(*(views.run(increment) for _ in range(40)))
    assert sorted(seen) == list(range(1, 41))
    assert await views.get("docs", "counter") == {"id": "counter", "n": 40}


async def test_clear_empties_a_collection_in_the_unit(backend: Backend) -> None:
    views = await backend.view_store(COLLECTIONS)
    await seed(views)
    await views.run(lambda uow: uow.put("other", "o", {"id": "o"}))

    def work(uow: UnitOfWork) -> Any:
        uow.put("docs", "early", doc("early", "z"))
        uow.clear("docs")
        before = (uow.get("docs", "d00"), uow.get("docs", "early"))
        uow.prefetch("docs", ["d01"])
        uow.put("docs", "fresh", doc("fresh", "z"))
        return before, uow.get("docs", "d01"), uow.get("docs", "fresh")

    assert await views.run(work) == ((None, None), None, doc("fresh", "z"))
    assert await ids(views, {}) == ["fresh"]
    assert await views.get("other", "o") == {"id": "o"}


async def test_undeclared_collections_are_refused(backend: Backend) -> None:
    views = await backend.view_store(COLLECTIONS)
    with pytest.raises(CqrskitError, match="not declared"):
        await views.run(lambda uow: uow.put("nope", "x", {}))
    with pytest.raises(CqrskitError, match="not set up"):
        await views.get("nope", "x")
    with pytest.raises(CqrskitError, match="not set up"):
        await views.find("nope", {})


async def test_long_collection_names_are_kept_apart_or_refused(backend: Backend) -> None:
    first, second = "n" * 58 + "_one", "n" * 58 + "_two"  # both valid for the registry
    try:
        views = await backend.view_store([Collection(first), Collection(second)])
    except CqrskitError:
        return  # refused when set up: fine, as long as they are never mixed
    await views.run(lambda uow: uow.put(first, "x", {"id": "x", "in": first}))
    assert await views.get(first, "x") == {"id": "x", "in": first}
    assert await views.get(second, "x") is None


# ------------------------------------------------- checkpoints, dead letters


async def test_checkpoints_commit_with_the_unit(backend: Backend) -> None:
    views = await backend.view_store(COLLECTIONS)
    assert await views.run(lambda uow: uow.checkpoint("p", 0)) == 0

    def advance(uow: UnitOfWork) -> tuple[int, int]:
        before = uow.checkpoint("p", 0)
        uow.set_checkpoint("p", 0, 7)
        uow.set_checkpoint("p", 1, 3)
        return before, uow.checkpoint("p", 0)

    assert await views.run(advance) == (0, 7)
    assert await views.run(lambda uow: (uow.checkpoint("p", 0), uow.checkpoint("p", 1))) == (
        7, 3
    )
    stored = await views.checkpoints()
    # PostgreSQL keeps a row (at 0) for a checkpoint that was only read; SQLite does not.
    assert {k: v for k, v in stored.items() if v} == {("p", 0): 7, ("p", 1): 3}


async def test_dead_letters_park_list_get_fail_and_remove(backend: Backend) -> None:
    views = await backend.view_store(COLLECTIONS)
    cause, behind, elsewhere = (
        parked_envelope("s-1", 2, 7), parked_envelope("s-1", 3, 9), parked_envelope("s-2", 1, 8)
    )

    def park(uow: UnitOfWork) -> tuple[set[str], int]:
        uow.park("p", 0, cause, "boom", attempts=3, is_cause=True)
        uow.park("p", 0, behind, "queued", attempts=0, is_cause=False)
        uow.park("q", 1, elsewhere, "bang", attempts=2, is_cause=True)
        uow.set_checkpoint("p", 0, 9)
        return uow.parked_streams("p"), uow.checkpoint("p", 0)

    assert await views.run(park) == ({"s-1"}, 9)
    assert await views.checkpoints() == {("p", 0): 9}
    letters = await views.list_dead_letters()
    assert [(d.projection, d.position) for d in letters] == [("p", 7), ("p", 9), ("q", 8)]
    first, second = await views.list_dead_letters("p")
    assert (first.partition, first.stream_id, first.error, first.attempts, first.is_cause) == (
        0, "s-1", "boom", 3, True
    )
    assert (second.error, second.attempts, second.is_cause) == ("queued", 0, False)
    assert first.envelope == cause and second.envelope == behind
    assert datetime.fromisoformat(first.parked_at).utcoffset() == timedelta(0)
    assert await views.get_dead_letter(first.id) == first
    assert await views.get_dead_letter(first.id + second.id + 1000) is None
    [other] = await views.list_dead_letters("q")
    assert (other.partition, other.stream_id, other.envelope) == (1, "s-2", elsewhere)
    assert await views.list_dead_letters("none") == []
    assert first.to_dict()["event_type"] == "X"

    def queue(uow: UnitOfWork) -> list[int]:
        return [d.position for d in uow.dead_letters("p", "s-1")]

    assert await views.run(queue) == [7, 9]

    await views.run(lambda uow: uow.record_failure(second.id, "boom again"))
    again = await views.get_dead_letter(second.id)
    assert again is not None
    assert (again.error, again.attempts, again.is_cause) == ("boom again", 1, True)

    def remove_head(uow: UnitOfWork) -> list[int]:
        uow.remove_dead_letter(first.id)
        return [d.position for d in uow.dead_letters("p", "s-1")]

    assert await views.run(remove_head) == [9]
    assert await views.get_dead_letter(first.id) is None
    await views.run(lambda uow: uow.remove_dead_letter(second.id))
    assert await views.run(lambda uow: uow.parked_streams("p")) == set()
    assert [d.projection for d in await views.list_dead_letters()] == ["q"]


# ------------------------------------------- exactly-once effect, concurrently


class Counted(Event):
    n: int


def counting_registry() -> tuple[Registry, Projection]:
    domain = Domain("counting")

    @domain.projection
    class Counts(Projection):
        """Not idempotent on purpose: it records every position it is applied to."""

        name = "counts"
        collections = (Collection("counts"),)

        @projects(Counted)
        def counted(self, event: Counted, envelope: Envelope, views: ViewWriter) -> None:
            current = views.get("counts", envelope.stream_id) or {
                "id": envelope.stream_id, "applied": []
            }
            views.put("counts", envelope.stream_id, {
                **current, "applied": [*current["applied"], envelope.position],
            })

    registry = Registry([domain])
    return registry, registry.projection("counts")


def totals_registry() -> tuple[Registry, Projection]:
    domain = Domain("totals")

    @domain.projection
    class Totals(Projection):
        """A view across all streams: one document that counts every event."""

        name = "totals"
        collections = (Collection("totals"),)

        def documents_read(self, envelope: Envelope) -> list[tuple[str, str]]:
            return [("totals", "all")]

        @projects(Counted)
        def counted(self, event: Counted, envelope: Envelope, views: ViewWriter) -> None:
            total = views.get("totals", "all") or {"id": "all", "events": 0, "sum": 0}
            views.put("totals", "all", {
                **total, "events": total["events"] + 1, "sum": total["sum"] + event.n,
            })

    registry = Registry([domain])
    return registry, registry.projection("totals")


def counted_batch(count: int, streams: int) -> list[Envelope]:
    versions: dict[str, int] = {}
    batch = []
    for position in range(1, count + 1):
        stream_id = f"s{position % streams}"
        versions[stream_id] = versions.get(stream_id, 0) + 1
        batch.append(Envelope(
            event_id=f"e{position}", stream_id=stream_id, stream_type="t",
            version=versions[stream_id], position=position, type="Counted", schema_version=1,
            data={"n": position}, metadata={}, recorded_at="2024-01-01T00:00:00+00:00",
        ))
    return batch


async def test_concurrent_runners_over_one_batch_apply_each_event_once(
    backend: Backend,
) -> None:
    registry, projection = counting_registry()
    collections = list(projection.collections)
    one = await backend.view_store(collections)
    two = await backend.view_store(collections)  # another process on the same views
    batch = counted_batch(240, streams=7)
    for round_ in range(3):
        chunk = batch[round_ * 80 : (round_ + 1) * 80]
        runners = [
            ProjectionRunner(projection, registry, views)
            for views in (one, one, two, two)
        ]
        for runner in runners:
            runner.position = round_ * 80
        # Every runner applies the same events at the same time, whole or in pieces.
        await asyncio.gather(
            runners[0].process(chunk),
            runners[1].process(chunk[::-1][::-1]),
            runners[2].process(chunk),
            *(runners[3].process(chunk[i : i + 20]) for i in range(0, 80, 20)),
        )
    docs = {d["id"]: d["applied"] for d in (await two.find("counts", {}, limit=100)).items}
    assert docs == {
        f"s{k}": [e.position for e in batch if e.stream_id == f"s{k}"] for k in range(7)
    }
    assert (await one.checkpoints())[("counts", 0)] == 240


async def test_two_processes_on_two_partitions_do_not_lose_updates(backend: Backend) -> None:
    """ViewStore.run: "Transactions are serialised against every other writer of the store".

    Partitioned update processors run one projection's partitions in different
    processes; each locks only its own checkpoint, so the shared document is safe
    only if units of work are serialised across store instances.
    """
    registry, projection = totals_registry()
    collections = list(projection.collections)
    one = await backend.view_store(collections)
    two = await backend.view_store(collections)
    batch = counted_batch(400, streams=11)
    by_partition = [[e for e in batch if e.position % 2 == p] for p in (0, 1)]

    async def follow(views: ViewStore, partition: int) -> None:
        runner = ProjectionRunner(projection, registry, views, partition=partition)
        events = by_partition[partition]
        for start in range(0, len(events), 4):
            await runner.process(events[start : start + 4])

    await asyncio.gather(follow(one, 0), follow(two, 1))
    assert await one.get("totals", "all") == {
        "id": "all", "events": 400, "sum": sum(range(1, 401))
    }


# ------------------------------------------------------------------- find


async def test_find_on_strings_and_nested_paths(backend: Backend) -> None:
    views = await backend.view_store(COLLECTIONS)
    await seed(views)
    assert await ids(views, {"kind": "a"}) == ["d00", "d01", "d04", "d06"]
    assert await ids(views, {"data.color": "red"}) == ["d00", "d01", "d03", "d05"]
    assert await ids(views, {"kind": "a", "data.color": "red"}) == ["d00", "d01"]
    assert await ids(views, {"data.color": ""}) == ["d07"]
    assert await ids(views, {"data.note": "x"}) == ["d02"]
    assert await ids(views, {"data.nested.deep": "yes"}) == ["d05"]
    assert await ids(views, {"data.nested": "yes"}) == []
    assert await ids(views, {"data.tags": "red"}) == []  # an array does not equal a value
    assert await ids(views, {"data": "red"}) == ["d08"]
    assert await ids(views, {"kind": "zzz"}) == []
    assert await ids(views, {"missing.path": "red"}) == []
    assert await ids(views, {}) == [d["id"] for d in SEED]


async def test_find_tells_numbers_from_strings_and_booleans(backend: Backend) -> None:
    views = await backend.view_store(COLLECTIONS)
    await seed(views)
    assert await ids(views, {"data.size": 3}) == ["d00", "d02", "d04"]  # 3 and 3.0
    assert await ids(views, {"data.size": 3.0}) == ["d00", "d02", "d04"]
    assert await ids(views, {"data.size": "3"}) == ["d01"]
    assert await ids(views, {"data.ratio": 2.5}) == ["d00", "d04"]
    assert await ids(views, {"data.size": 0}) == ["d06"]
    assert await ids(views, {"data.flag": True}) == ["d00", "d02", "d05"]
    assert await ids(views, {"data.flag": False}) == ["d01", "d03", "d06"]
    assert await ids(views, {"data.flag": 1}) == ["d07"]
    assert await ids(views, {"data.note": 0}) == ["d07"]
    assert await ids(views, {"data.note": False}) == []
    assert await ids(views, {"data.note": "null"}) == ["d06"]


async def test_find_a_null_matches_explicit_nulls_only(backend: Backend) -> None:
    views = await backend.view_store(COLLECTIONS)
    await seed(views)
    assert await ids(views, {"data.note": None}) == ["d00", "d03"]


async def test_filters_on_a_path_and_its_parent_match_nothing_or_are_refused(
    backend: Backend,
) -> None:
    views = await backend.view_store(COLLECTIONS)
    await seed(views)
    for filters in ({"data": "red", "data.color": "red"}, {"data.color": "red", "data": "red"}):
        try:
            found = await ids(views, filters)
        except InvalidRequest:
            continue
        assert found == [], filters


async def test_cursor_paging_visits_every_document_once(backend: Backend) -> None:
    views = await backend.view_store(COLLECTIONS)
    # Ids from the whole identifier alphabet, so the order is byte order, not a locale's.
    stems = ["A", "a", "B", "b", "Z", "z", "0", "9", "a.b", "a_b", "a-b", "a:b", "aB", "Ab"]
    docs = [doc(f"{stem}{i}", "x" if i % 3 else "y", i=i) for stem in stems for i in range(4)]
    await seed(views, docs)
    for filters, expected in (
        ({}, [d["id"] for d in docs]),
        ({"kind": "x"}, [d["id"] for d in docs if d["kind"] == "x"]),
        ({"kind": "y"}, [d["id"] for d in docs if d["kind"] == "y"]),
        ({"kind": "none"}, []),
    ):
        for descending in (False, True):
            for limit in (1, 7, 56, 100):
                seen: list[str] = []
                cursor, pages = None, 0
                while True:
                    page = await views.find(
                        "docs", filters, after=cursor, limit=limit, descending=descending
                    )
                    pages += 1
                    assert len(page.items) <= limit
                    seen.extend(d["id"] for d in page.items)
                    if page.next_cursor is None:
                        break
                    cursor = page.next_cursor
                want = sorted(expected, reverse=descending)
                assert seen == want, (filters, descending, limit)
                assert pages == max(1, -(-len(want) // limit))


async def test_descending_order_and_a_cursor_from_anywhere(backend: Backend) -> None:
    views = await backend.view_store(COLLECTIONS)
    await seed(views)
    assert await ids(views, {"kind": "a"}, descending=True) == ["d06", "d04", "d01", "d00"]
    after = encode_cursor("d03")
    assert await ids(views, {}, after=after) == ["d04", "d05", "d06", "d07", "d08"]
    assert await ids(views, {}, after=after, descending=True) == ["d02", "d01", "d00"]
    assert await ids(views, {"kind": "a"}, after=encode_cursor("d015"), limit=1) == ["d04"]


async def test_bad_input_to_find_is_refused(backend: Backend) -> None:
    views = await backend.view_store(COLLECTIONS)
    await seed(views)
    for field in (
        "data.", ".data", "data..color", "data.col-or", "data.color[0]", "data.$x", "1data",
        "data.co lor", "' OR 1=1 --", "data.color') IS NOT NULL OR ('", "", "a" * 64,
        'data"color', "data.color->>'x'",
    ):
        with pytest.raises(InvalidRequest, match="dotted path of identifiers"):
            await views.find("docs", {field: "red"})
    for value in ({"a": 1}, ["red"], [], {}):
        for field in ("data.color", "kind"):
            with pytest.raises(InvalidRequest, match="scalar"):
                await views.find("docs", {field: value})
    for cursor in ("a", "////", "gA", "//8", "!!!!", "%%%", "@"):
        with pytest.raises(InvalidRequest, match="cursor"):
            await views.find("docs", {}, after=cursor)
    for limit in (0, -1):
        with pytest.raises(InvalidRequest, match="limit"):
            await views.find("docs", {}, limit=limit)
    assert len(await ids(views, {})) == len(SEED)  # nothing changed


async def test_views_survive_reopen_and_setting_up_again_is_harmless(backend: Backend) -> None:
    views = await backend.view_store(COLLECTIONS)
    await seed(views)
    await views.run(lambda uow: uow.set_checkpoint("p", 0, 12))
    await backend.close(views)

    for _ in range(2):
        views = await backend.view_store(COLLECTIONS)
        await views.setup(COLLECTIONS)  # setting up again is harmless
        await views.check()
        assert await ids(views, {"kind": "b"}) == ["d02", "d03"]
        assert await views.checkpoints() == {("p", 0): 12}
        await backend.close(views)
