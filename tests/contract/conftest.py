"""The `backend` fixture: every contract test runs on SQLite, PostgreSQL and Cosmos DB
(the local stand-in, `scripts/cosmos-standin`), and on a real Azure Cosmos DB account
when CQRSKIT_TEST_AZURE_COSMOS_URL names one (`pytest -m azure`; skipped otherwise).

A test that documents a bug of one adapter says so with
`@pytest.mark.xfail_backend("postgres", reason="BUG: ...")`: it is a strict xfail
for that backend only, so the fix shows up as an unexpected pass.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from cqrskit.ports import Collection, EventStore, ViewStore

AZURE_COSMOS_URL = "CQRSKIT_TEST_AZURE_COSMOS_URL"
BACKENDS = ("sqlite", "postgres", "cosmos", pytest.param("azure-cosmos", marks=pytest.mark.azure))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "xfail_backend(name, reason): a strict xfail of a contract test on one backend only",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or "backend" not in callspec.params:
            continue
        for mark in item.iter_markers("xfail_backend"):
            if mark.args[0] == callspec.params["backend"]:
                item.add_marker(pytest.mark.xfail(strict=True, reason=mark.kwargs["reason"]))


class Backend:
    """Opens event and view stores on one backend; every store opened is closed at the end.

    Two stores opened on one backend share the data, like two processes would.
    """

    def __init__(self, name: str, command_url: str, query_url: str) -> None:
        self.name = name
        self.command_url = command_url
        self.query_url = query_url
        self.opened: list[Any] = []

    async def event_store(self) -> EventStore:
        store: EventStore
        if self.name == "sqlite":
            from cqrskit.stores.sqlite import SqliteEventStore

            store = SqliteEventStore.from_url(self.command_url)
        elif self.name == "cosmos":
            from cqrskit.stores.cosmos_events import CosmosEventStore

            store = await CosmosEventStore.open(self.command_url)
        else:
            from cqrskit.stores.postgres import PostgresEventStore

            store = await PostgresEventStore.open(self.command_url, pool_size=4)
        self.opened.append(store)
        return store

    async def view_store(self, collections: Sequence[Collection] = ()) -> ViewStore:
        views: ViewStore
        if self.name == "sqlite":
            from cqrskit.stores.sqlite import SqliteViewStore

            views = SqliteViewStore.from_url(self.query_url)
        elif self.name == "cosmos":
            from cqrskit.stores.cosmos_views import CosmosViewStore

            views = await CosmosViewStore.open(self.query_url)
        else:
            from cqrskit.stores.postgres import PostgresViewStore

            views = await PostgresViewStore.open(self.query_url, pool_size=4)
        self.opened.append(views)
        await views.setup(collections)
        return views

    async def close(self, store: Any) -> None:
        await store.close()
        self.opened.remove(store)

    async def close_all(self) -> None:
        while self.opened:
            await self.opened.pop().close()


@pytest.fixture(params=BACKENDS)
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        made = Backend(
            "sqlite", f"sqlite:///{tmp_path / 'command.db'}", f"sqlite:///{tmp_path / 'query.db'}"
        )
    elif request.param == "cosmos":
        url = request.getfixturevalue("cosmos_standin").new_url()
        made = Backend("cosmos", url, url)
    elif request.param == "azure-cosmos":
        async for made in _live_cosmos():
            yield made
        return
    else:
        new_url: Callable[..., str] = request.getfixturevalue("postgres_schemas")
        url = new_url()
        made = Backend("postgres", url, url)
    yield made
    await made.close_all()


async def _live_cosmos() -> AsyncIterator[Backend]:
    """A database of its own on the live account, deleted afterwards."""
    base = os.environ.get(AZURE_COSMOS_URL)
    if not base:
        pytest.skip(f"live Azure suite: set {AZURE_COSMOS_URL} to "
                    "cosmos://<account>.documents.azure.com?key_env=<VARIABLE> to run it")
    parts = urlsplit(base)
    options = {**dict(parse_qsl(parts.query)), "database": f"t{uuid.uuid4().hex[:16]}"}
    url = urlunsplit(parts._replace(query=urlencode(options)))
    made = Backend("cosmos", url, url)
    try:
        yield made
    finally:
        await made.close_all()
        from cqrskit.stores.cosmos import CosmosUrl, open_database

        parsed = CosmosUrl.parse(url)
        account = await open_database(parsed)
        try:
            await account.client.delete_database(parsed.database)
        finally:
            await account.close()
