"""The Azure Functions entry points (deploy/azure/function_app.py), called as the host calls them.

Requests and events are azure.functions' own types, handed to the decorated
functions the host indexes. The stores and the broker are real: end to end on the
Cosmos DB stand-in and tansu (the Kafka protocol, as Event Hubs' Kafka endpoint,
which is how the relay publishes), SQLite files where only the update logic is
under test. The answers are compared with those of `cqrskit serve` for the same
requests.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from cqrskit.api.app import create_app
from cqrskit.config import Settings
from cqrskit.streams.wire import encode

from .conftest import DEPLOY, LoadFunctionApp, indexed, user_functions

func = pytest.importorskip("azure.functions")

PARTITIONS = 4
# (path, body, headers): the commands of the comparison, good and bad, in order.
KEY = "key-alpha"
COMMANDS: list[tuple[str, Any, dict[str, str]]] = [
    ("/api/command/insert", {"id": "alpha", "data": {"n": 1}}, {"Idempotency-Key": KEY}),
    ("/api/command/insert", {"id": "beta", "data": {"n": 2, "tags": ["x"]}}, {}),
    ("/api/command/update", {"id": "alpha", "data": {"n": 3}, "expected_version": 1}, {}),
    ("/api/command/insert", {"id": "gamma", "data": {}}, {}),
    ("/api/command/delete", {"id": "gamma"}, {}),
    # the same command again with its key: the first answer, nothing stored twice
    ("/api/command/insert", {"id": "alpha", "data": {"n": 1}}, {"Idempotency-Key": KEY}),
    # bad input: each a 4xx that changes nothing
    ("/api/command/update", {"id": "alpha", "data": {"n": 4}, "expected_version": 1}, {}),
    ("/api/command/update", {"id": "nobody", "data": {}}, {}),
    ("/api/command/insert", b'{"id": "delta", "data": ', {}),
    ("/api/command/insert", {"id": "bad id!", "data": {}}, {}),
    ("/api/command/insert", {"id": "beta", "data": {}}, {}),
    ("/api/command/nosuch", {"id": "epsilon"}, {}),
    ("/api/command/insert", {"id": "delta", "data": {}}, {"Idempotency-Key": KEY}),
]
EVENTS = 5  # stored by the commands above: alpha x2, beta, gamma x2
QUERIES = [
    "/api/query/get?id=alpha",
    "/api/query/get?id=beta",
    "/api/query/get?id=gamma",
    "/api/query/get?id=nobody",
    "/api/query/get",
    "/api/query/list",
    "/api/query/list?filter=n:2",
    "/api/query/list?limit=0",
    "/api/query/stats",
    f"/api/commands/{KEY}",
    "/api/commands/never-sent",
]

Answer = tuple[int, Any, dict[str, str]]


def _request(method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> Any:
    """What the Functions host hands an HTTP function for this request."""
    content = body if isinstance(body, bytes) else (
        b"" if body is None else json.dumps(body).encode())
    sent = dict(headers or {})
    if method == "POST":
        sent.setdefault("Content-Type", "application/json")
    return func.HttpRequest(method, f"https://cqrskit-fn.azurewebsites.net{path}",
                            headers=sent, body=content)


def _normal(status: int, body: bytes, headers: Any) -> Answer:
    """What must be equal wherever a request is answered: generated ids and times aside."""
    data: Any = json.loads(body) if body else None
    if status == 202:
        data = {key: data[key] for key in ("id", "version")}
    for doc in _records(data):
        doc.pop("created_at", None)
        doc.pop("updated_at", None)
    if isinstance(data, dict) and "by_day" in data:
        data["by_day"] = [{**day, "day": "today"} for day in data["by_day"]]
    meaning = ("idempotent-replayed", "x-consistency", "location")
    kept = {name: headers[name] for name in meaning if headers.get(name) is not None}
    if "location" in kept:
        kept["location"] = kept["location"].rsplit("/", 1)[0]
    return status, data, kept


def _records(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, dict) and "version" in data and "data" in data:
        return [data]
    if isinstance(data, dict) and isinstance(data.get("items"), list):
        return list(data["items"])
    return []


async def _through_functions(fns: dict[str, Callable[..., Any]], method: str, path: str,
                             body: Any = None, headers: dict[str, str] | None = None) -> Answer:
    name = "command" if method == "POST" else "query"
    response = await fns[name](_request(method, path, body, headers))
    return _normal(response.status_code, response.get_body(), response.headers)


async def _through_serve(client: httpx.AsyncClient, method: str, path: str, body: Any = None,
                         headers: dict[str, str] | None = None) -> Answer:
    content = body if isinstance(body, bytes) else (None if body is None else json.dumps(body))
    sent = dict(headers or {})
    if method == "POST":
        sent.setdefault("Content-Type", "application/json")
    response = await client.request(method, path, content=content, headers=sent)
    return _normal(response.status_code, response.content, response.headers)


async def _serve_answers(tmp_path: Path) -> tuple[list[Answer], list[Answer]]:
    """The same requests answered by `cqrskit serve` (SQLite files), over HTTP."""
    from integration.live_server import LiveServer

    data = tmp_path / "serve"
    # Explicit: the test's environment holds the Function app's settings.
    settings = Settings(data_dir=data, command_db=f"sqlite:///{data / 'command.db'}",
                        query_db=f"sqlite:///{data / 'query.db'}", stream="embedded")
    server = await LiveServer(create_app(settings, role="serve")).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            commands = [await _through_serve(client, "POST", *command) for command in COMMANDS]
            token = await _last_token(client)
            queries = [await _through_serve(client, "GET", path, None, token)
                       for path in QUERIES]
    finally:
        await server.stop()
    return commands, queries


async def _last_token(client: httpx.AsyncClient) -> dict[str, str]:
    """A token past every event: queries carrying it read the views that include them."""
    answer = await client.post("/api/command/insert", json={"id": "zz-last", "data": {}})
    assert answer.status_code == 202, answer.text
    return {"X-Consistency-Token": answer.json()["consistency_token"]}


def _event(record: Any) -> Any:
    """What the Event Hubs trigger hands the function for a record the relay published."""
    return func.EventHubEvent(
        body=record.value, partition_key=record.key.decode(), sequence_number=record.offset,
        offset=str(record.offset),
        enqueued_time=datetime.fromtimestamp(record.timestamp / 1000, UTC),
    )


async def _published(address: str, topic: str, expected: int) -> dict[int, list[Any]]:
    """Every record of the topic, by partition, in partition order (waits for `expected`)."""
    import asyncio

    from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]

    consumer = AIOKafkaConsumer(bootstrap_servers=address, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: dict[int, list[Any]] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while sum(map(len, records.values())) < expected and loop.time() < deadline:
            for tp, batch in (await consumer.getmany(timeout_ms=500)).items():
                records.setdefault(tp.partition, []).extend(batch)
        # Anything beyond `expected` would be a duplicate publication: read a little more.
        for tp, batch in (await consumer.getmany(timeout_ms=1000)).items():
            records.setdefault(tp.partition, []).extend(batch)
        return records
    finally:
        await consumer.stop()


async def _change_feed(url: str) -> Any:
    """The documents a change-feed trigger on `events` would deliver: all of them."""
    from cqrskit.stores.cosmos_events import CosmosEventStore

    store = await CosmosEventStore.open(url)
    try:
        docs = [doc async for doc in store.events.query_items("SELECT * FROM c")]
    finally:
        await store.close()
    assert docs, "the commands stored nothing in the events container"
    return func.DocumentList([func.Document.from_dict(doc) for doc in docs])


async def test_functions_on_cosmos_and_a_kafka_broker_answer_as_cqrskit_serve(
    load_function_app: LoadFunctionApp, cosmos_standin: Any, tmp_path: Path
) -> None:
    from integration.kafka_helpers import TansuBroker, require_tansu

    broker = TansuBroker(require_tansu(), tmp_path)
    broker.start()
    try:
        topic = f"cqrskit-t-{uuid.uuid4().hex[:10]}"
        url = cosmos_standin.new_url()
        module = await load_function_app({
            "CQRSKIT_COMMAND_DB": url, "CQRSKIT_QUERY_DB": url,
            "CQRSKIT_STREAM": broker.url(topic, partitions=PARTITIONS),
            **cosmos_standin.key_env(),
        })
        module.host.relay_quiet = 0.5  # the test has nothing more coming
        fns = user_functions(module)

        commands = [await _through_functions(fns, "POST", *command) for command in COMMANDS]

        # The change feed wakes the relay, which publishes the log to the broker.
        await fns["relay"](await _change_feed(url))
        await fns["relay"](await _change_feed(url))  # a second wake-up publishes nothing
        published = await _published(broker.address, topic, EVENTS)
        assert sum(map(len, published.values())) == EVENTS

        # Each partition's records arrive as the trigger's batches (one partition each).
        batches = [[_event(r) for r in records] for _, records in sorted(published.items())]
        for batch in batches:
            await fns["update_views"](batch)
        token_answer = await fns["command"](_request(
            "POST", "/api/command/insert", {"id": "zz-last", "data": {}}))
        token = {"X-Consistency-Token": json.loads(token_answer.get_body())["consistency_token"]}
        await fns["relay"](await _change_feed(url))
        rest = await _published(broker.address, topic, EVENTS + 1)
        for records in rest.values():
            await fns["update_views"]([_event(r) for r in records])
        queries = [await _through_functions(fns, "GET", path, None, token) for path in QUERIES]

        expected_commands, expected_queries = await _serve_answers(tmp_path)
        assert commands == expected_commands
        assert queries == expected_queries
        # Read-your-writes through the Functions: every view had the events when asked.
        assert queries[0] == (200, {"id": "alpha", "data": {"n": 3}, "version": 2},
                              {"x-consistency": "fresh"})
        assert queries[QUERIES.index("/api/query/stats")][1]["total"] == EVENTS + 1

        # Delivered again, and with copies inside one batch (a relay retry): nothing doubles.
        for batch in batches:
            await fns["update_views"](batch)
            await fns["update_views"](batch + batch)
        again = [await _through_functions(fns, "GET", path, None, token) for path in QUERIES]
        assert again == queries
    finally:
        broker.stop()


async def _on_sqlite(load_function_app: LoadFunctionApp, tmp_path: Path) -> tuple[str, Any]:
    """The function app on SQLite files; the command DB's URL and the module."""
    command_db = f"sqlite:///{tmp_path / 'command.db'}"
    module = await load_function_app({
        "CQRSKIT_COMMAND_DB": command_db,
        "CQRSKIT_QUERY_DB": f"sqlite:///{tmp_path / 'query.db'}",
        # Only its partition count is used: update_views gets its events from the trigger.
        "CQRSKIT_STREAM": f"kafka://127.0.0.1:9?partitions={PARTITIONS}&idempotence=false",
    })
    return command_db, module


async def test_update_views_drops_copies_and_what_is_not_an_event(
    load_function_app: LoadFunctionApp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from cqrskit.stores.sqlite import SqliteEventStore

    command_db, module = await _on_sqlite(load_function_app, tmp_path)
    fns = user_functions(module)
    for rid in ("r1", "r2", "r3"):
        answer = await fns["command"](_request("POST", "/api/command/insert",
                                               {"id": rid, "data": {"rid": rid}}))
        assert answer.status_code == 202
    await fns["command"](_request("POST", "/api/command/update", {"id": "r1", "data": {"v": 2}}))

    store = SqliteEventStore.from_url(command_db)
    try:
        log = await store.read_all(0, 100)
    finally:
        await store.close()
    assert len(log) == 4

    def event(body: bytes, sequence: int) -> Any:
        return func.EventHubEvent(body=body, sequence_number=sequence, offset=str(sequence))

    bodies: Sequence[bytes] = [encode(e) for e in log]
    # First copies in order, later copies behind them, and a body no relay wrote.
    mixed = [bodies[0], bodies[1], bodies[0], bodies[2], b"not an envelope", bodies[1],
             bodies[3], bodies[2]]
    with caplog.at_level(logging.ERROR, logger="cqrskit.functions"):
        await fns["update_views"]([event(b, i) for i, b in enumerate(mixed)])
    assert "is not a cqrskit envelope" in caplog.text

    async def stats() -> Any:
        answer = await fns["query"](_request("GET", "/api/query/stats"))
        return json.loads(answer.get_body())

    first = await stats()
    assert (first["total"], first["by_type"]) == (4, {"RecordInserted": 3, "RecordUpdated": 1})
    record = json.loads((await fns["query"](_request("GET", "/api/query/get?id=r1"))).get_body())
    assert (record["version"], record["data"]) == (2, {"v": 2})

    await fns["update_views"]([event(b, i) for i, b in enumerate(bodies)])
    assert await stats() == first
    status = await fns["query"](_request("GET", f"/api/commands/{log[-1].metadata['command_id']}"))
    assert json.loads(status.get_body())["status"] == "projected"


async def test_http_functions_answer_503_in_the_error_shape_when_the_stores_cannot_open(
    load_function_app: LoadFunctionApp, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    module = await load_function_app({
        "CQRSKIT_COMMAND_DB": f"sqlite:///{blocker / 'command.db'}",
        "CQRSKIT_QUERY_DB": f"sqlite:///{blocker / 'query.db'}",
    })
    fns = user_functions(module)
    answer = await fns["command"](_request("POST", "/api/command/insert", {"data": {}}))
    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == "1"
    body = json.loads(answer.get_body())
    assert body["error"] == "unavailable" and "command-handler" in body["message"]


def test_binding_settings_name_every_setting_the_bindings_read() -> None:
    """BINDING_SETTINGS is what the deployment must set for the triggers: all of it."""
    pytest.importorskip("azure.functions")
    spec = importlib.util.spec_from_file_location("function_app_bindings",
                                                  DEPLOY / "function_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    functions = module.app.get_functions()  # the host's indexing; once per app
    referenced: set[str] = set()
    for function in functions:
        for binding in json.loads(function.get_function_json())["bindings"]:
            for key, value in binding.items():
                if key == "connection":
                    referenced.add(value)
                elif isinstance(value, str) and value.startswith("%") and value.endswith("%"):
                    referenced.add(value.strip("%"))
    assert referenced == set(module.BINDING_SETTINGS)
    names = {function.get_function_name() for function in functions}
    assert names == {"command", "query", "update_views", "relay", "relay_sweep"}


class FunctionsHostShim:
    """The Functions host's part for HTTP, as an ASGI app: a request becomes an
    azure.functions.HttpRequest for the function whose route and methods match (routes
    as host.json's empty routePrefix leaves them), and its HttpResponse the answer."""

    def __init__(self, module: Any) -> None:
        self.routes: list[tuple[str, str, Callable[..., Any]]] = []
        for function in indexed(module):
            trigger = json.loads(function.get_function_json())["bindings"][0]
            if trigger["type"] == "httpTrigger":
                prefix = "/" + trigger["route"].removesuffix("{*path}")
                for method in trigger["methods"]:
                    self.routes.append((method, prefix, function.get_user_function()))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path, query = scope["path"], scope["query_string"].decode()
        matching = [fn for method, prefix, fn in self.routes
                    if method == scope["method"] and path.startswith(prefix)]
        # The most specific route wins, as in the host's router.
        fn = max(matching, key=lambda f: next(len(p) for _, p, g in self.routes if g is f))
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        url = f"https://cqrskit-fn.azurewebsites.net{path}" + (f"?{query}" if query else "")
        response = await fn(func.HttpRequest(scope["method"], url, headers=headers, body=body))
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": [(k.encode(), v.encode()) for k, v in response.headers.items()]})
        await send({"type": "http.response.body", "body": response.get_body()})


async def test_the_app_service_api_forwards_to_the_functions_unchanged(
    load_function_app: LoadFunctionApp, tmp_path: Path
) -> None:
    from cqrskit.stores.sqlite import SqliteEventStore
    from integration.live_server import LiveServer

    command_db, module = await _on_sqlite(load_function_app, tmp_path)
    fns = user_functions(module)
    functions = await LiveServer(FunctionsHostShim(module)).start()  # type: ignore[arg-type]
    api_settings = Settings(
        data_dir=tmp_path / "api", command_handler_url=functions.url,
        query_handler_url=functions.url, stream="embedded",
        command_db=f"sqlite:///{tmp_path / 'api-unused.db'}",
        query_db=f"sqlite:///{tmp_path / 'api-unused-views.db'}",
    )
    api = await LiveServer(create_app(api_settings, role="api")).start()
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            ready = await client.get("/readyz")
            assert ready.json()["checks"] == {"command_handler": "ok", "query_handler": "ok"}
            sent = await client.post("/api/command/insert", json={"id": "f1", "data": {"a": 1}},
                                     headers={"Idempotency-Key": "fk-1"})
            assert sent.status_code == 202, sent.text
            again = await client.post("/api/command/insert",
                                      json={"id": "f1", "data": {"a": 1}},
                                      headers={"Idempotency-Key": "fk-1"})
            assert (again.status_code, again.headers["Idempotent-Replayed"]) == (202, "true")
            # A 409 decided by the command function reaches the client as it answered.
            taken = await client.post("/api/command/insert", json={"id": "f1", "data": {}})
            assert (taken.status_code, taken.json()["error"]) == (409, "rejected")

            store = SqliteEventStore.from_url(command_db)
            try:
                log = await store.read_all(0, 100)
            finally:
                await store.close()
            await fns["update_views"]([func.EventHubEvent(body=encode(e)) for e in log])

            token = {"X-Consistency-Token": sent.json()["consistency_token"]}
            got = await client.get("/api/query/get", params={"id": "f1"}, headers=token)
            assert (got.status_code, got.json()["data"], got.headers["X-Consistency"]) == (
                200, {"a": 1}, "fresh")
            missing = await client.get("/api/query/get", params={"id": "nope"})
            assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
            status = await client.get(sent.headers["Location"])
            assert status.json()["status"] == "projected"
    finally:
        await api.stop()
        await functions.stop()
