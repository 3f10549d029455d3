"""SqliteViewStore on real files, what is particular to it: the expression indexes of
indexed fields. What every view store must do (units of work, checkpoints, dead
letters, filters, paging, input checks, persistence) is
tests/contract/test_view_store_contract.py, which runs on SQLite too."""

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from cqrskit.ports import Collection
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


async def test_indexed_fields_get_an_expression_index_that_find_uses(
    views: SqliteViewStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await seed(views)
    # The statements find() really runs (not a query written here), for the plan below.
    queries: list[tuple[str, list[Any]]] = []
    read = views.db.read

    class Recording:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
            queries.append((sql, list(params)))
            return self.conn.execute(sql, params)

    async def recording_read(work: Any) -> Any:
        return await read(lambda conn: work(Recording(conn)))

    monkeypatch.setattr(views.db, "read", recording_read)
    assert await ids(views, {"kind": "a"}, limit=3) == ["d00", "d01", "d04"]
    assert await ids(views, {"data.color": "red"}) == ["d00", "d01", "d03", "d05"]
    assert len(queries) == 2

    with sqlite3.connect(views.db.path) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"ix_docs_kind", "ix_docs_data_color"} <= names
        for (sql, params), index in zip(
            queries, ("ix_docs_kind", "ix_docs_data_color"), strict=True
        ):
            plan = " ".join(
                str(row[-1]) for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)
            )
            assert index in plan, (sql, plan)
    conn.close()
