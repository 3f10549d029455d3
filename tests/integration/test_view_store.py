"""SqliteViewStore on real files: units of work, filters, pagination, input checks."""

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from cqrskit.errors import CqrskitError, InvalidRequest
from cqrskit.messages import Envelope
from cqrskit.ports import Collection
from cqrskit.stores.queries import encode_cursor
from cqrskit.stores.sqlite import SqliteUnitOfWork, SqliteViewStore

COLLECTIONS = [Collection("docs", indexed=("kind", "data.color")), Collection("other")]


@pytest.fixture
async def views(tmp_path: Path) -> Any:
    views = SqliteViewStore(tmp_path / "query.db")
    await views.setup(COLLECTIONS)
    yield views
    await views.close()


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
]


async def seed(views: SqliteViewStore, docs: list[dict[str, Any]] = SEED) -> None:
    def work(uow: SqliteUnitOfWork) -> None:
        for d in docs:
            uow.put("docs", d["id"], d)

    await views.run(work)


async def ids(views: SqliteViewStore, filters: dict[str, Any], **kwargs: Any) -> list[str]:
    page = await views.find("docs", filters, **kwargs)
    return [d["id"] for d in page.items]


async def test_unit_of_work_reads_its_own_writes_and_commits_them(
    views: SqliteViewStore,
) -> None:
    await seed(views, [doc("keep", "a"), doc("gone", "a")])

    def work(uow: SqliteUnitOfWork) -> list[Any]:
        seen = []
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
        seen.append(uow.get("docs", "never"))
        return seen

    seen = await views.run(work)
    assert seen == [
        doc("new", "b", n=1), {**doc("keep", "a"), "data": {"changed": True}}, None, None, None,
    ]
    assert await views.get("docs", "new") == doc("new", "b", n=1)
    assert await views.get("docs", "keep") == {**doc("keep", "a"), "data": {"changed": True}}
    assert await views.get("docs", "gone") is None
    assert await views.get("docs", "brief") is None


async def test_nothing_is_written_when_the_work_raises(views: SqliteViewStore) -> None:
    await seed(views, [doc("keep", "a")])

    def work(uow: SqliteUnitOfWork) -> None:
        uow.put("docs", "new", doc("new", "b"))
        uow.delete("docs", "keep")
        uow.set_checkpoint("p", 0, 99)
        uow.clear("other")
        raise LookupError("changed my mind")

    with pytest.raises(LookupError, match="changed my mind"):
        await views.run(work)
    assert await views.get("docs", "new") is None
    assert await views.get("docs", "keep") == doc("keep", "a")
    assert await views.checkpoints() == {}
    # The store still works afterwards.
    await seed(views, [doc("after", "a")])
    assert await views.get("docs", "after") == doc("after", "a")


async def test_clear_empties_a_collection_in_the_unit(views: SqliteViewStore) -> None:
    await seed(views)

    def work(uow: SqliteUnitOfWork) -> Any:
        uow.clear("docs")
        before = uow.get("docs", "d00")
        uow.put("docs", "fresh", doc("fresh", "z"))
        return before, uow.get("docs", "fresh")

    assert await views.run(work) == (None, doc("fresh", "z"))
    assert await ids(views, {}) == ["fresh"]


async def test_undeclared_collections_are_refused(views: SqliteViewStore) -> None:
    with pytest.raises(CqrskitError, match="not declared"):
        await views.run(lambda uow: uow.put("nope", "x", {}))
    with pytest.raises(CqrskitError, match="not set up"):
        await views.get("nope", "x")
    with pytest.raises(CqrskitError, match="not set up"):
        await views.find("nope", {})


async def test_checkpoints_and_dead_letters_commit_with_the_unit(views: SqliteViewStore) -> None:
    envelope = Envelope(
        event_id="e-7", stream_id="s-1", stream_type="t", version=2, position=7, type="X",
        schema_version=1, data={"a": 1}, metadata={}, recorded_at="2024-01-01T00:00:00+00:00",
    )

    def park(uow: SqliteUnitOfWork) -> set[str]:
        uow.set_checkpoint("p", 0, 7)
        uow.park("p", 0, envelope, "boom", attempts=3, is_cause=True)
        assert uow.checkpoint("p", 0) == 7
        return uow.parked_streams("p")

    assert await views.run(park) == {"s-1"}
    assert await views.checkpoints() == {("p", 0): 7}
    [letter] = await views.list_dead_letters("p")
    assert (letter.stream_id, letter.position, letter.error, letter.attempts) == (
        "s-1", 7, "boom", 3,
    )
    assert letter.is_cause and letter.envelope == envelope
    assert await views.get_dead_letter(letter.id) == letter
    assert await views.list_dead_letters("other") == []

    await views.run(lambda uow: uow.record_failure(letter.id, "boom again"))
    again = await views.get_dead_letter(letter.id)
    assert again is not None and (again.attempts, again.error) == (4, "boom again")
    await views.run(lambda uow: uow.remove_dead_letter(letter.id))
    assert await views.get_dead_letter(letter.id) is None
    assert await views.run(lambda uow: uow.parked_streams("p")) == set()


async def test_find_on_indexed_and_non_indexed_fields(views: SqliteViewStore) -> None:
    await seed(views)
    assert await ids(views, {"kind": "a"}) == ["d00", "d01", "d04", "d06"]
    assert await ids(views, {"data.color": "red"}) == ["d00", "d01", "d03", "d05"]
    assert await ids(views, {"kind": "a", "data.color": "red"}) == ["d00", "d01"]
    assert await ids(views, {"data.note": "x"}) == ["d02"]
    assert await ids(views, {"data.nested.deep": "yes"}) == ["d05"]
    assert await ids(views, {"kind": "zzz"}) == []
    assert await ids(views, {}) == [d["id"] for d in SEED]


async def test_find_tells_numbers_from_strings(views: SqliteViewStore) -> None:
    await seed(views)
    assert await ids(views, {"data.size": 3}) == ["d00", "d02", "d04"]  # 3 and 3.0
    assert await ids(views, {"data.size": "3"}) == ["d01"]
    assert await ids(views, {"data.ratio": 2.5}) == ["d00", "d04"]
    assert await ids(views, {"data.size": 0}) == ["d06"]


async def test_find_with_none_and_bools(views: SqliteViewStore) -> None:
    await seed(views)
    nulls = await ids(views, {"data.note": None})
    assert {"d00", "d03"} <= set(nulls)  # the explicit nulls
    assert "d06" not in nulls and "d02" not in nulls  # "null" the string, and "x"
    assert await ids(views, {"data.flag": True}) == ["d00", "d02", "d05"]
    assert await ids(views, {"data.flag": False}) == ["d01", "d03", "d06"]
    assert await ids(views, {"data.note": "null"}) == ["d06"]


async def test_find_does_not_confuse_bools_with_numbers(views: SqliteViewStore) -> None:
    """Regression: json_extract() gives 1/0 for true/false, so a bool filter matched
    numbers and a number filter matched bools."""
    await seed(views, [doc("t", "a", v=True), doc("one", "a", v=1), doc("zero", "a", v=0)])
    assert await ids(views, {"data.v": True}) == ["t"]
    assert await ids(views, {"data.v": 1}) == ["one"]
    assert await ids(views, {"data.v": False}) == []


async def test_cursor_pagination_visits_every_document_once(views: SqliteViewStore) -> None:
    docs = [doc(f"p{i:03d}", "a" if i % 3 else "b", i=i) for i in range(53)]
    await seed(views, docs)
    for filters, expected in (
        ({}, [d["id"] for d in docs]),
        ({"kind": "a"}, [d["id"] for d in docs if d["kind"] == "a"]),
        ({"kind": "b"}, [d["id"] for d in docs if d["kind"] == "b"]),
    ):
        for descending in (False, True):
            seen: list[str] = []
            cursor = None
            pages = 0
            while True:
                page = await views.find(
                    "docs", filters, after=cursor, limit=7, descending=descending
                )
                pages += 1
                assert len(page.items) <= 7
                seen.extend(d["id"] for d in page.items)
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            want = sorted(expected, reverse=descending)
            assert seen == want
            assert pages == max(1, -(-len(want) // 7))


async def test_a_full_last_page_has_no_cursor(views: SqliteViewStore) -> None:
    await seed(views, [doc(f"x{i}", "a") for i in range(6)])
    first = await views.find("docs", {}, limit=3)
    assert first.next_cursor is not None
    second = await views.find("docs", {}, limit=3, after=first.next_cursor)
    assert [d["id"] for d in second.items] == ["x3", "x4", "x5"]
    assert second.next_cursor is None


async def test_find_with_a_zero_limit_does_not_crash(views: SqliteViewStore) -> None:
    """Regression: limit=0 sliced the rows to [] and then read rows[-1]: IndexError."""
    await seed(views)
    try:
        page = await views.find("docs", {}, limit=0)
    except InvalidRequest:
        return  # refused: fine
    assert page.items == []  # or an empty page: fine too


async def test_descending_order_and_a_cursor_from_anywhere(views: SqliteViewStore) -> None:
    await seed(views)
    assert await ids(views, {"kind": "a"}, descending=True) == ["d06", "d04", "d01", "d00"]
    after = encode_cursor("d03")
    assert await ids(views, {}, after=after) == ["d04", "d05", "d06"]
    assert await ids(views, {}, after=after, descending=True) == ["d02", "d01", "d00"]


@pytest.mark.parametrize(
    "field",
    [
        "data.", ".data", "data..color", "data.col-or", "data.color[0]", "data.$x",
        "1data", "data.co lor", "' OR 1=1 --", "data.color') IS NOT NULL OR ('", "",
        "a" * 64,
    ],
)
async def test_invalid_field_paths_are_refused(views: SqliteViewStore, field: str) -> None:
    await seed(views)
    with pytest.raises(InvalidRequest, match="dotted path of identifiers"):
        await views.find("docs", {field: "red"})


@pytest.mark.parametrize("value", [{"a": 1}, ["red"], []])
async def test_non_scalar_filter_values_are_refused(views: SqliteViewStore, value: Any) -> None:
    with pytest.raises(InvalidRequest, match="scalar"):
        await views.find("docs", {"data.color": value})
    with pytest.raises(InvalidRequest, match="scalar"):
        await views.find("docs", {"kind": value})


@pytest.mark.parametrize("cursor", ["a", "////", "gA", "//8"])
async def test_a_bad_cursor_is_refused(views: SqliteViewStore, cursor: str) -> None:
    with pytest.raises(InvalidRequest, match="cursor"):
        await views.find("docs", {}, after=cursor)


@pytest.mark.parametrize("cursor", ["!!!!", "%%%", "@"])
async def test_a_cursor_of_garbage_characters_is_refused(
    views: SqliteViewStore, cursor: str
) -> None:
    """Regression: urlsafe_b64decode dropped characters outside the alphabet, so garbage
    decoded to '' and silently restarted the list."""
    await seed(views)
    with pytest.raises(InvalidRequest, match="cursor"):
        await views.find("docs", {}, after=cursor)


async def test_indexed_fields_get_an_expression_index_that_find_uses(
    views: SqliteViewStore,
) -> None:
    await seed(views)
    with sqlite3.connect(views.db.path) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"ix_docs_kind", "ix_docs_data_color"} <= names
        plan = " ".join(
            str(row[-1]) for row in conn.execute(
                "EXPLAIN QUERY PLAN SELECT id, doc FROM \"view_docs\" "
                "WHERE json_extract(doc, '$.kind') = ? ORDER BY id ASC LIMIT ?", ("a", 3),
            )
        )
        assert "ix_docs_kind" in plan
    conn.close()


async def test_views_survive_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "query.db"
    views = SqliteViewStore(path)
    await views.setup(COLLECTIONS)
    await seed(views)
    await views.run(lambda uow: uow.set_checkpoint("p", 0, 12))
    await views.close()

    views = SqliteViewStore(path)
    try:
        await views.setup(COLLECTIONS)  # setting up again is harmless
        assert await ids(views, {"kind": "b"}) == ["d02", "d03"]
        assert await views.checkpoints() == {("p", 0): 12}
        await views.check()
    finally:
        await views.close()
