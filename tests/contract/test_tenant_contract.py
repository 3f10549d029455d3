"""Tenants on every store: the id-range bound of `find`, the tenant wrappers of
cqrskit.tenancy over each view store, and prefixed stream and command ids in each
event store."""

from __future__ import annotations

from typing import Any

from cqrskit.messages import NewEvent
from cqrskit.ports import AppendRequest, Collection, UnitOfWork, ViewStore
from cqrskit.tenancy import DEFAULT, TenantViews, TenantWriter, id_range, scoped

from .conftest import Backend

COLLECTIONS = [Collection("docs", indexed=("data.color",))]
TENANTS = (DEFAULT, "A", "AB", "B")


async def _seed(views: ViewStore) -> None:
    """The same five local ids in the default tenant and in tenants A, AB and B,
    written through the projection-side wrapper; colors differ by tenant."""

    def work(uow: UnitOfWork) -> None:
        for tenant in TENANTS:
            writer = uow if tenant == DEFAULT else TenantWriter(uow, tenant)
            for n in range(5):
                doc_id = f"d{n}"
                writer.put("docs", doc_id, {"id": doc_id, "tenant": tenant,
                                            "data": {"color": "red" if n % 2 else "blue"}})

    await views.run(work)


async def _all(views: TenantViews, filters: dict[str, Any], *, descending: bool = False,
               limit: int = 2) -> list[dict[str, Any]]:
    """Every page, following the cursors."""
    found: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = await views.find("docs", filters, after=cursor, limit=limit,
                                descending=descending)
        found += page.items
        if page.next_cursor is None:
            return found
        cursor = page.next_cursor


async def test_a_tenant_reads_only_its_own_documents(backend: Backend) -> None:
    views = await backend.view_store(COLLECTIONS)
    await _seed(views)
    for tenant in TENANTS:
        mine = TenantViews(views, tenant)
        docs = await _all(mine, {})
        assert [d["id"] for d in docs] == ["d0", "d1", "d2", "d3", "d4"], tenant
        assert {d["tenant"] for d in docs} == {tenant}
        backwards = await _all(mine, {}, descending=True)
        assert [d["id"] for d in backwards] == ["d4", "d3", "d2", "d1", "d0"], tenant
        red = await _all(mine, {"data.color": "red"}, limit=1)
        assert [(d["id"], d["tenant"]) for d in red] == [("d1", tenant), ("d3", tenant)]
        got = await mine.get("docs", "d2")
        assert got is not None and got["tenant"] == tenant
        assert await mine.get("docs", "d9") is None


async def test_a_forged_cursor_or_id_stays_inside_the_tenant(backend: Backend) -> None:
    views = await backend.view_store(COLLECTIONS)
    await _seed(views)
    a, b, default = (TenantViews(views, t) for t in ("A", "B", DEFAULT))
    # A's cursor (naming A's stored id) handed to B or the default tenant moves their
    # start, but never out of their own documents.
    cursor = (await a.find("docs", {}, limit=1)).next_cursor
    assert cursor is not None
    for other, tenant in ((b, "B"), (default, DEFAULT)):
        page = await other.find("docs", {}, after=cursor, limit=10)
        assert {d["tenant"] for d in page.items} <= {tenant}
        backwards = await other.find("docs", {}, after=cursor, limit=10, descending=True)
        assert {d["tenant"] for d in backwards.items} <= {tenant}
    # The default tenant cannot name another tenant's stored id.
    assert await default.get("docs", scoped("A", "d1")) is None


async def test_find_with_an_id_range_is_bounded_on_the_primary_key(backend: Backend) -> None:
    views = await backend.view_store(COLLECTIONS)
    await _seed(views)
    low, high = id_range("A")
    page = await views.find("docs", {}, limit=50, id_range=(low, high))
    assert [d["tenant"] for d in page.items] == ["A"] * 5  # not AB's "~AB~..." ids
    page = await views.find("docs", {}, limit=50, id_range=id_range(DEFAULT))
    assert [d["tenant"] for d in page.items] == [DEFAULT] * 5
    # Without a range, the store is as before: every tenant's documents.
    page = await views.find("docs", {}, limit=50)
    assert len(page.items) == 20


async def test_event_stores_keep_prefixed_stream_and_command_ids(backend: Backend) -> None:
    store = await backend.event_store()
    results = {}
    for tenant in ("A", "B"):
        request = AppendRequest(
            stream_id=scoped(tenant, "same"), stream_type="record", expected_version=0,
            events=[NewEvent("RecordInserted", {"data": {"t": tenant}})],
            metadata={"tenant": tenant}, command_id=scoped(tenant, "k1"), command_hash="h",
        )
        results[tenant] = await store.append(request)
    for tenant in ("A", "B"):
        events = await store.read_stream(scoped(tenant, "same"))
        assert [e.data for e in events] == [{"data": {"t": tenant}}]
        assert events[0].metadata["tenant"] == tenant
        stored = await store.get_command(scoped(tenant, "k1"))
        assert stored is not None and stored.result.stream_id == scoped(tenant, "same")
    assert await store.read_stream("same") == []
    assert await store.get_command("k1") is None
