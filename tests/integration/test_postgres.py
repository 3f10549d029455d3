"""PostgreSQL adapters against the real server: gap safety under concurrent, late-committing
writers; outages (nothing half written, fail with Unavailable, recover); versioned migrations.

The behaviour both SQL adapters share is in tests/contract/; this module holds what only
PostgreSQL has: several processes writing the log, connections that die, the server's own
settings (time zone, collation).
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import pytest

psycopg = pytest.importorskip("psycopg")

from integration_helpers import (  # noqa: E402
    records_view,
    replay_records,
    replay_statistics,
    statistics_view,
    whole_log,
)
from psycopg.types.json import Jsonb  # noqa: E402

from cqrskit.bootstrap import Runtime, open_runtime  # noqa: E402
from cqrskit.config import Settings  # noqa: E402
from cqrskit.domains import records  # noqa: E402
from cqrskit.domains.records import InsertRecord, UpdateRecord  # noqa: E402
from cqrskit.errors import CqrskitError, Unavailable  # noqa: E402
from cqrskit.messages import CommandResult, ConsistencyToken, NewEvent, new_id  # noqa: E402
from cqrskit.ports import AppendRequest, Collection  # noqa: E402
from cqrskit.registry import Registry  # noqa: E402
from cqrskit.stores.postgres import (  # noqa: E402
    PostgresEventStore,
    PostgresUrl,
    PostgresViewStore,
    _event_store_schema,
    _next_group,
    _view_store_schema,
    migrate,
)

T = TypeVar("T")


def request(stream_id: str, expected: int = 0, events: int = 1) -> AppendRequest:
    command_id = new_id()
    return AppendRequest(
        stream_id=stream_id, stream_type="thing", expected_version=expected,
        events=[NewEvent("Happened", {"n": k}) for k in range(events)],
        metadata={"command_id": command_id}, command_id=command_id, command_hash="h",
    )


def schema_of(url: str) -> str:
    return PostgresUrl.parse(url).schema


async def admin(dsn: str) -> Any:
    """A connection of the test's own, outside every pool of the stores."""
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True)


# ---------------------------------------------------------------- gap safety


def raw_request(stream_id: str, events: int) -> dict[str, Any]:
    """One request as `append_events` takes it (see _request_json in stores/postgres.py;
    both versions of the function take this shape)."""
    command_id = new_id()
    return {
        "stream_id": stream_id, "stream_type": "thing", "expected_version": 0,
        "command_id": command_id, "command_hash": "h", "metadata": {"command_id": command_id},
        "events": [
            {"event_id": new_id(), "type": "Raw", "schema_version": 1, "data": {"k": k}}
            for k in range(events)
        ],
    }


async def test_a_follower_never_skips_an_event_that_commits_late(
    postgres_url: str, postgres_dsn: str
) -> None:
    """Writers in explicit transactions sleep a random while before COMMIT (or roll back),
    store instances append at the same time, and a follower reads the log all along: it
    must see every committed event once, in position order, with no position ever
    visible before a lower one."""
    schema = schema_of(postgres_url)
    stores = [await PostgresEventStore.open(postgres_url, pool_size=3) for _ in range(3)]
    follower = await PostgresEventStore.open(postgres_url, pool_size=2)
    committed: list[str] = []
    rolled_back: list[str] = []
    writing = True

    async def raw_writer(seed: int) -> None:
        rng = random.Random(seed)
        async with await admin(postgres_dsn) as conn:
            for t in range(10):
                calls = [
                    raw_request(f"raw-{seed}-{t}-{k}", rng.randint(1, 3))
                    for k in range(rng.randint(1, 3))
                ]
                event_ids = [e["event_id"] for r in calls for e in r["events"]]
                rollback = rng.random() < 0.15
                async with conn.transaction():
                    # The transaction starts before it asks for the log's lock.
                    await conn.execute("SELECT pg_sleep(%s)", (rng.uniform(0, 0.01),))
                    # Half the writers call the function of the previous version, as
                    # processes not yet upgraded would: the two take the same lock.
                    args = "%s" if seed % 2 else "%s, false"
                    cursor = await conn.execute(
                        f"SELECT {schema}.append_events({args})", (Jsonb(calls),)
                    )
                    row = await cursor.fetchone()
                    assert row is not None
                    assert all("error" not in a for a in row[0]), row[0]
                    await conn.execute("SELECT pg_sleep(%s)", (rng.uniform(0, 0.02),))
                    if rollback:
                        raise psycopg.Rollback()  # ends the block with ROLLBACK
                (rolled_back if rollback else committed).extend(event_ids)

    async def store_writer(index: int, store: PostgresEventStore) -> None:
        rng = random.Random(100 + index)
        for round_ in range(6):
            appends = [
                request(f"st-{index}-{round_}-{k}", 0, rng.randint(1, 2))
                for k in range(rng.randint(5, 15))
            ]
            results = await asyncio.gather(*(store.append(a) for a in appends))
            assert all(not r.replayed for r in results)
            committed.extend(e.event_id for a in appends for e in a.events)
            await asyncio.sleep(rng.uniform(0, 0.01))

    seen: list[Any] = []
    gaps: list[tuple[int, list[int]]] = []
    reads_with_data = 0

    async def follow() -> None:
        nonlocal reads_with_data
        after = 0
        while True:
            batch = await follower.read_all(after, 100)
            if batch:
                reads_with_data += 1
                positions = [e.position for e in batch]
                if positions != list(range(after + 1, after + 1 + len(batch))):
                    gaps.append((after, positions[:10]))
                seen.extend(batch)
                after = positions[-1]
            elif not writing and after >= await follower.last_position():
                return
            else:
                await asyncio.sleep(0)

    following = asyncio.create_task(follow())
    try:
        await asyncio.gather(
            *(raw_writer(seed) for seed in range(4)),
            *(store_writer(i, store) for i, store in enumerate(stores)),
        )
        writing = False
        await asyncio.wait_for(following, 20)
    finally:
        following.cancel()
        for store in [*stores, follower]:
            await store.close()

    assert gaps == [], "the follower saw a position before a lower one was visible"
    assert [e.position for e in seen] == list(range(1, len(seen) + 1))
    event_ids = [e.event_id for e in seen]
    assert len(set(event_ids)) == len(event_ids)
    assert sorted(event_ids) == sorted(committed)
    assert rolled_back and not set(rolled_back) & set(event_ids)
    assert reads_with_data >= 10, "the follower did not read while the writers wrote"


def generated(stream_id: str) -> AppendRequest:
    """An append as the handler makes it for a command without an idempotency key."""
    command_id = new_id()
    return AppendRequest(
        stream_id=stream_id, stream_type="thing", expected_version=0,
        events=[NewEvent("Happened", {})], metadata={"command_id": command_id},
        command_id=command_id, command_hash="",
    )


def test_a_group_never_holds_two_requests_for_one_stream_or_command_id() -> None:
    def item(stream_id: str, command_id: str) -> Any:
        return (AppendRequest(stream_id, "t", 0, [], {}, command_id, "h"), command_id)

    queue = [item("a", "1"), item("b", "2"), item("a", "3"), item("c", "4"), item("d", "3"),
             item("e", "5"), item("f", "6")]
    group, rest = _next_group(queue, limit=4)
    assert [i[1] for i in group] == ["1", "2", "4", "5"]
    # "3" waits behind "1" (stream a), and "3" on d behind it (the same command id); "6"
    # waits for room: the limit.
    assert [i[1] for i in rest] == ["3", "3", "6"]
    group, rest = _next_group(rest, limit=4)
    assert [(i[0].stream_id, i[1]) for i in group] == [("a", "3"), ("f", "6")]
    assert [(i[0].stream_id, i[1]) for i in rest] == [("d", "3")]


async def test_appends_arriving_during_a_call_go_together_in_the_next(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await PostgresEventStore.open(postgres_url, pool_size=2)
    sizes: list[int] = []
    call = store._call_append
    in_flight = asyncio.Event()

    async def slow_call(requests: list[AppendRequest]) -> Any:
        sizes.append(len(requests))
        in_flight.set()
        await asyncio.sleep(0.2)
        return await call(requests)

    monkeypatch.setattr(store, "_call_append", slow_call)
    try:
        first = asyncio.create_task(store.append(request("first")))
        await in_flight.wait()
        later = [asyncio.create_task(store.append(request(f"s{k}"))) for k in range(10)]
        await asyncio.sleep(0.01)
        later.append(asyncio.create_task(store.append(request("s0", expected=1))))
        results = await asyncio.gather(first, *later)
        # One call at a time: the ten that came while the first was in flight went in
        # one call; the second append to s0 waited for the first one's.
        assert sizes == [1, 10, 1]
        assert [r.position for r in results] == list(range(1, 13))
        assert results[-1].version == 2
    finally:
        await store.close()


async def test_a_generated_command_id_is_not_stored_twice_when_the_answer_is_lost(
    postgres_url: str,
) -> None:
    """The first call commits, but its connection dies before the answer arrives: the
    retry, on a new connection, looks generated ids up too and answers from the log."""
    store = await PostgresEventStore.open(postgres_url, pool_size=2)
    lose_answers = 1
    connect = store._append_connection

    async def losing_connection() -> Any:
        conn = await connect()
        execute = conn.execute

        async def execute_then_die(*args: Any, **kwargs: Any) -> Any:
            nonlocal lose_answers
            cursor = await execute(*args, **kwargs)
            if lose_answers:
                lose_answers -= 1
                await conn.close()
                raise psycopg.OperationalError("the connection died (a test)")
            return cursor

        conn.execute = execute_then_die  # type: ignore[method-assign]
        return conn

    store._append_connection = losing_connection  # type: ignore[method-assign]
    try:
        results = await asyncio.gather(*(store.append(generated(f"g{k}")) for k in range(3)))
        assert [(r.stream_id, r.version, r.position) for r in results] == [
            ("g0", 1, 1), ("g1", 1, 2), ("g2", 1, 3),
        ]
        assert all(r.replayed for r in results)  # the retry found them stored
        assert [e.stream_id for e in await store.read_all(0, 10)] == ["g0", "g1", "g2"]
        # Later appends go on normally.
        again = await store.append(generated("g3"))
        assert (again.position, again.replayed) == (4, False)
    finally:
        await store.close()


async def test_the_append_function_probes_by_index_however_big_the_log(
    postgres_url: str, postgres_dsn: str
) -> None:
    """PL/pgSQL keeps a plan made while the tables were small; a sequential scan in it
    would cost a read of the whole log per call."""
    schema = schema_of(postgres_url)
    store = await PostgresEventStore.open(postgres_url, pool_size=2)
    try:
        for k in range(20):  # past the calls after which PL/pgSQL keeps a generic plan
            await asyncio.gather(*(store.append(generated(f"s{k}-{n}")) for n in range(50)))
    finally:
        await store.close()
    async with await admin(postgres_dsn) as conn:
        for _ in range(6):
            await conn.execute(
                f"SELECT {schema}.append_events(%s, true)",
                (Jsonb([raw_request(new_id(), 1)]),),
            )
        plans: list[str] = []
        conn.add_notice_handler(lambda notice: plans.append(notice.message_primary or ""))
        await conn.execute("LOAD 'auto_explain'")
        for setting in ("log_min_duration = 0", "log_nested_statements = on",
                        "log_level = notice"):
            await conn.execute(f"SET auto_explain.{setting}")
        for args in ("%s, true", "%s, false", "%s"):  # the function of migration 1 too
            await conn.execute(
                f"SELECT {schema}.append_events({args})", (Jsonb([raw_request(new_id(), 2)]),)
            )
    text = "\n".join(plans)
    assert "Index" in text and "on events" in text and "on commands" in text, text
    assert "Seq Scan" not in text, text


async def test_wait_for_append_wakes_on_an_append_from_another_process(
    postgres_url: str, postgres_dsn: str
) -> None:
    """NOTIFY reaches every store on the schema (SQLite only notifies its own instance;
    appends by other processes reach the embedded stream by its polling)."""
    app = f"cqrskit_t_{uuid.uuid4().hex[:8]}"
    waiting = await PostgresEventStore.open(f"{postgres_url}&application_name={app}", pool_size=2)
    writing = await PostgresEventStore.open(postgres_url, pool_size=2)
    try:
        async with await admin(postgres_dsn) as conn:
            assert not await listening(conn, app)  # nobody waited yet: no listener
            await asyncio.wait_for(waiting.wait_for_append(0, 0.1), 5)  # starts it
            await eventually_true(lambda: listening(conn, app))  # the listener is connected
        waiter = asyncio.create_task(waiting.wait_for_append(0, 30))
        await asyncio.sleep(0.3)
        assert not waiter.done()
        await writing.append(request("a"))
        await asyncio.wait_for(waiter, 10)
        assert [e.stream_id for e in await waiting.read_all(0, 10)] == ["a"]
    finally:
        await waiting.close()
        await writing.close()


async def listening(conn: Any, application_name: str) -> bool:
    cursor = await conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
        "AND query LIKE 'LISTEN %%'", (application_name,),
    )
    row = await cursor.fetchone()
    return bool(row and row[0])


async def eventually_true(probe: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await probe():
        assert loop.time() < deadline, f"not true within {timeout}s"
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------ outages


@pytest.fixture(scope="module")
def closed_port_open() -> tuple[list[BaseException], float]:
    """Open both stores on a port nothing listens on, once for the module (it is slow)."""
    url = "postgresql://postgres@127.0.0.1:1/test?schema=cqrskit_t_unreachable"

    async def attempt() -> list[BaseException]:
        outcomes = await asyncio.gather(
            PostgresEventStore.open(url), PostgresViewStore.open(url), return_exceptions=True
        )
        for outcome in outcomes:
            if not isinstance(outcome, BaseException):
                await outcome.close()
        return [o if isinstance(o, BaseException) else AssertionError(o) for o in outcomes]

    started = time.monotonic()
    errors = asyncio.run(attempt())
    return errors, time.monotonic() - started


def test_a_store_on_a_closed_port_fails_to_open_with_unavailable(
    closed_port_open: tuple[list[BaseException], float],
) -> None:
    errors, elapsed = closed_port_open
    for error in errors:
        assert isinstance(error, Unavailable), repr(error)
        assert "PostgreSQL" in str(error)
    assert elapsed < 15, f"opening took {elapsed:.1f}s"


def test_a_store_on_a_closed_port_fails_fast_and_says_why(
    closed_port_open: tuple[list[BaseException], float],
) -> None:
    errors, elapsed = closed_port_open
    for error in errors:
        assert "refused" in str(error).lower() and "127.0.0.1" in str(error), str(error)
    assert elapsed < 6, f"opening took {elapsed:.1f}s"


async def kill_connections(dsn: str, application_name: str) -> int:
    async with await admin(dsn) as conn:
        cursor = await conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = 'test' AND application_name = %s",
            (application_name,),
        )
        row = await cursor.fetchone()
        return int(row[0]) if row else 0


async def until_available(call: Callable[[], Awaitable[T]], timeout: float = 10) -> T:
    """Call until it does not raise Unavailable; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await call()
        except Unavailable:
            assert loop.time() < deadline, f"still unavailable after {timeout}s"
            await asyncio.sleep(0.05)


async def open_pg_runtime(url: str, tmp_path: Any) -> Runtime:
    settings = Settings(
        data_dir=tmp_path, command_db=url, query_db=url, stream="embedded",
        retry_backoff=0.01, consistency_timeout=10,
    )
    return await open_runtime(settings, Registry([records.domain]))


async def test_killed_connections_fail_commands_with_unavailable_and_write_nothing_half(
    postgres_schemas: Callable[..., str], postgres_dsn: str, tmp_path: Any
) -> None:
    app = f"cqrskit_t_{uuid.uuid4().hex[:8]}"
    url = postgres_schemas(application_name=app)
    schema = schema_of(url)
    runtime = await open_pg_runtime(url, tmp_path)
    outcomes: dict[str, CommandResult | BaseException] = {}
    stop = asyncio.Event()
    try:
        runtime.processor.start()

        async def worker(w: int) -> None:
            live: list[str] = []
            n = 0
            while not stop.is_set():
                n += 1
                command_id = f"cmd-{w}-{n}"
                command: Any = (
                    UpdateRecord(id=random.choice(live), data={"n": n})
                    if live and n % 2 else InsertRecord(id=f"r-{w}-{n}", data={"n": n})
                )
                try:
                    result = await runtime.commands.handle(command, command_id=command_id)
                except Exception as error:
                    outcomes[command_id] = error
                    await asyncio.sleep(0.01)
                    continue
                outcomes[command_id] = result
                if isinstance(command, InsertRecord):
                    live.append(result.stream_id)
                await asyncio.sleep(0.002)

        workers = [asyncio.create_task(worker(w)) for w in range(6)]
        killed = []
        for _ in range(4):
            await asyncio.sleep(0.25)
            killed.append(await kill_connections(postgres_dsn, app))
        await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*workers)

        assert all(killed), f"no connection was killed in some round: {killed}"
        errors = [e for e in outcomes.values() if isinstance(e, BaseException)]
        assert all(isinstance(e, Unavailable) for e in errors), {repr(e) for e in errors}
        assert len(outcomes) > 50  # commands kept coming all through the outage
        assert all("PostgreSQL" in str(e) for e in errors)

        # Nothing half written: a command's events and its idempotency record exist
        # together or not at all, and every accepted command is there as answered.
        async with await admin(postgres_dsn) as conn:
            rows = await (await conn.execute(
                f"SELECT command_id, stream_id, version, position FROM {schema}.commands"
            )).fetchall()
            stored = {r[0]: tuple(r[1:]) for r in rows}
            rows = await (await conn.execute(
                f"SELECT metadata->>'command_id', stream_id, version, position "
                f"FROM {schema}.events ORDER BY position"
            )).fetchall()
        events = {r[0]: tuple(r[1:]) for r in rows}
        assert [r[3] for r in rows] == list(range(1, len(rows) + 1))
        assert len(events) == len(rows)  # one event per command in this domain
        assert stored == events
        for command_id, outcome in outcomes.items():
            if isinstance(outcome, CommandResult):
                assert stored[command_id] == (outcome.stream_id, outcome.version,
                                              outcome.position)
        assert set(stored) <= set(outcomes)

        # Recovery by itself: new commands succeed again, and the views catch up. (Until
        # every pooled connection the server dropped was tried, a call may still fail:
        # see test_the_first_call_after_idle_connections_died_succeeds.)
        await until_available(lambda: runtime.commands.handle(InsertRecord(data={"k": -1})))
        last = None
        for k in range(20):
            last = await until_available(
                lambda k=k: runtime.commands.handle(InsertRecord(data={"k": k}))
            )
        assert last is not None
        token = ConsistencyToken.decode(last.consistency_token)
        names = tuple(runtime.registry.projections)
        assert await until_available(lambda: runtime.checkpoints.wait(names, token, 20))
        log = await until_available(lambda: whole_log(runtime.store))
        assert await until_available(lambda: records_view(runtime.views)) == replay_records(log)
        assert await until_available(
            lambda: statistics_view(runtime.views)
        ) == replay_statistics(log)
    finally:
        stop.set()
        await runtime.close()


async def test_the_first_call_after_idle_connections_died_succeeds(
    postgres_schemas: Callable[..., str], postgres_dsn: str
) -> None:
    app = f"cqrskit_t_{uuid.uuid4().hex[:8]}"
    url = postgres_schemas(application_name=app)
    store = await PostgresEventStore.open(url, pool_size=4)
    views = await PostgresViewStore.open(url, pool_size=4)
    try:
        await views.setup([Collection("docs")])
        # Fill both pools with idle connections, then have the server drop them all.
        await asyncio.gather(*(store.read_all(0, 10) for _ in range(8)))
        await asyncio.gather(*(views.checkpoints() for _ in range(8)))
        assert await kill_connections(postgres_dsn, app) >= 3
        await asyncio.sleep(0.2)
        for k in range(6):
            await store.append(request(f"after-{k}"))
            await views.get("docs", "x")
    finally:
        await store.close()
        await views.close()


def test_a_missing_server_skips_the_test_or_fails_it_in_ci(
    require_service: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CQRSKIT_REQUIRE_SERVICES", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        require_service("PostgreSQL", "127.0.0.1", 1, start="pg_ctl start")
    assert "PostgreSQL is not reachable on 127.0.0.1:1" in str(skipped.value)
    assert "start it with `pg_ctl start`" in str(skipped.value)
    monkeypatch.setenv("CQRSKIT_REQUIRE_SERVICES", "1")
    with pytest.raises(pytest.fail.Exception) as failed:
        require_service("PostgreSQL", "127.0.0.1", 1, start="pg_ctl start")
    assert "PostgreSQL is not reachable on 127.0.0.1:1" in str(failed.value)
    require_service("PostgreSQL", "127.0.0.1", 5432)  # there: returns quietly


# ---------------------------------------------------------- server settings


def test_the_url_keeps_other_parameters_and_checks_the_schema() -> None:
    parsed = PostgresUrl.parse(
        "postgresql://u:p@h:5/db?schema=my_schema&application_name=app_1&sslmode=disable"
    )
    assert parsed.schema == "my_schema"
    assert "application_name=app_1" in parsed.conninfo and "sslmode=disable" in parsed.conninfo
    assert "schema" not in parsed.conninfo
    assert "connect_timeout=5" in parsed.conninfo
    assert PostgresUrl.parse("postgres://h/db").schema == "cqrskit"
    for bad in ("Upper", "a-b", "x;drop", "1x", "a" * 64, "pg_x%20y"):
        with pytest.raises(CqrskitError, match="schema"):
            PostgresUrl.parse(f"postgresql://h/db?schema={bad}")
    with pytest.raises(CqrskitError, match="not a PostgreSQL URL"):
        PostgresUrl.parse("mysql://h/db")


async def test_url_parameters_with_spaces_reach_the_server(
    postgres_dsn: str, postgres_url: str
) -> None:
    parsed = PostgresUrl.parse(f"{postgres_url}&options=-c%20statement_timeout%3D12345")
    async with await psycopg.AsyncConnection.connect(parsed.conninfo) as conn:
        row = await (await conn.execute("SHOW statement_timeout")).fetchone()
    assert row is not None and row[0] == "12345ms"


async def test_timestamps_are_utc_whatever_the_server_time_zone(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # libpq sends PGTZ as the session's TimeZone: as on a server whose default is not UTC.
    monkeypatch.setenv("PGTZ", "Asia/Tokyo")
    store = await PostgresEventStore.open(postgres_url, pool_size=2)
    views = await PostgresViewStore.open(postgres_url, pool_size=2)
    try:
        await store.append(request("a"))
        [event] = await store.read_stream("a")
        await views.run(lambda uow: uow.park("p", 0, event, "boom", attempts=1, is_cause=True))
        [letter] = await views.list_dead_letters()
        assert datetime.fromisoformat(event.recorded_at).utcoffset() == timedelta(0)
        assert datetime.fromisoformat(letter.parked_at).utcoffset() == timedelta(0)
    finally:
        await store.close()
        await views.close()


async def default_collation_to_icu(dsn: str, table: str) -> None:
    """What `id TEXT` gets in a database created with an en_US locale (common default)."""
    async with await admin(dsn) as conn:
        row = await (await conn.execute(
            "SELECT c.collname FROM pg_attribute a JOIN pg_collation c ON c.oid = a.attcollation "
            "WHERE a.attrelid = %s::regclass AND a.attname = 'id'", (table,),
        )).fetchone()
        if row is not None and row[0] == "default":
            await conn.execute(f'ALTER TABLE {table} ALTER COLUMN id TYPE text COLLATE "en-x-icu"')


async def test_paging_is_complete_in_a_database_with_a_language_collation(
    postgres_url: str, postgres_dsn: str
) -> None:
    views = await PostgresViewStore.open(postgres_url, pool_size=2)
    try:
        await views.setup([Collection("docs")])
        await default_collation_to_icu(postgres_dsn, f"{schema_of(postgres_url)}.view_docs")
        stems = ("a", "A", "b", "B", "a-", "a.", "Z", "z")
        ids = [f"{stem}{i}" for stem in stems for i in range(3)]

        def seed(uow: Any) -> None:
            for doc_id in ids:
                uow.put("docs", doc_id, {"id": doc_id})

        await views.run(seed)
        for descending in (False, True):
            seen: list[str] = []
            cursor = None
            while True:
                page = await views.find("docs", {}, after=cursor, limit=4, descending=descending)
                seen.extend(d["id"] for d in page.items)
                if page.next_cursor is None or len(seen) > 2 * len(ids):
                    break
                cursor = page.next_cursor
            assert seen == sorted(ids, reverse=descending)
    finally:
        await views.close()


async def test_a_page_of_find_is_read_from_an_index(
    postgres_url: str, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    views = await PostgresViewStore.open(postgres_url, pool_size=2)
    try:
        await views.setup([Collection("docs")])
        await views.run(lambda uow: [uow.put("docs", f"d{i:04d}", {"i": i}) for i in range(300)])
        queries: list[tuple[str, list[Any]]] = []
        fetch = views._fetch

        async def recording(sql: str, params: Any) -> Any:
            queries.append((sql, list(params)))
            return await fetch(sql, params)

        monkeypatch.setattr(views, "_fetch", recording)
        page = await views.find("docs", {}, limit=10)
        await views.find("docs", {}, after=page.next_cursor, limit=10, descending=True)
        async with await admin(postgres_dsn) as conn:
            await conn.execute("SET enable_seqscan = off")
            for sql, params in queries:
                plan = [r[0] for r in await (await conn.execute(
                    f"EXPLAIN {sql}", [p.obj if isinstance(p, Jsonb) else p for p in params]
                )).fetchall()]
                assert not any("Sort" in line for line in plan), "\n".join(plan)
    finally:
        await views.close()


# --------------------------------------------------------------- migrations


def all_migrations(schema: str) -> list[tuple[str, int]]:
    """Every migration the code defines, as the migrations table must list them."""
    return [
        *(("event_store", n + 1) for n in range(len(_event_store_schema(schema)))),
        *(("view_store", n + 1) for n in range(len(_view_store_schema(schema)))),
    ]


async def migrations_of(dsn: str, schema: str) -> list[tuple[str, int]]:
    async with await admin(dsn) as conn:
        rows = await (await conn.execute(
            f"SELECT name, number FROM {schema}.migrations "
            "WHERE applied_at IS NOT NULL ORDER BY name, number"
        )).fetchall()
    return [(r[0], r[1]) for r in rows]


async def test_migrations_are_versioned_and_applied_once(
    postgres_url: str, postgres_dsn: str
) -> None:
    schema = schema_of(postgres_url)
    for _ in range(2):
        store = await PostgresEventStore.open(postgres_url, pool_size=1)
        views = await PostgresViewStore.open(postgres_url, pool_size=1)
        await views.setup([Collection("docs")])
        await store.close()
        await views.close()
    assert await migrations_of(postgres_dsn, schema) == all_migrations(schema)

    # A later version adds a migration: only the new one runs, once.
    first = [f"CREATE TABLE {schema}.extra_one (n INT)"]
    second = [*first, f"INSERT INTO {schema}.extra_one VALUES (1)"]
    async with await admin(postgres_dsn) as conn:
        await migrate(conn, schema, "extra", first)
        await migrate(conn, schema, "extra", second)
        await migrate(conn, schema, "extra", second)
        rows = await (await conn.execute(f"SELECT n FROM {schema}.extra_one")).fetchall()
    assert rows == [(1,)]
    assert ("extra", 2) in await migrations_of(postgres_dsn, schema)


async def test_stores_opening_together_on_a_new_schema_migrate_it_once(
    postgres_url: str, postgres_dsn: str
) -> None:
    opened = await asyncio.gather(
        *(PostgresEventStore.open(postgres_url, pool_size=1) for _ in range(3)),
        *(PostgresViewStore.open(postgres_url, pool_size=1) for _ in range(3)),
        return_exceptions=True,
    )
    stores = [s for s in opened if not isinstance(s, BaseException)]
    try:
        assert len(stores) == 6, [repr(s) for s in opened if isinstance(s, BaseException)]
        event_stores = [s for s in stores if isinstance(s, PostgresEventStore)]
        view_stores = [s for s in stores if isinstance(s, PostgresViewStore)]
        await asyncio.gather(*(v.setup([Collection("docs")]) for v in view_stores))
        results = await asyncio.gather(*(s.append(request(f"s{i}")) for i, s in enumerate(
            event_stores
        )))
        assert sorted(r.position for r in results) == [1, 2, 3]
        await asyncio.gather(*(
            v.run(lambda uow, i=i: uow.put("docs", f"d{i}", {"i": i}))
            for i, v in enumerate(view_stores)
        ))
        assert len((await view_stores[0].find("docs", {})).items) == 3
    finally:
        for store in stores:
            await store.close()
    schema = schema_of(postgres_url)
    assert await migrations_of(postgres_dsn, schema) == all_migrations(schema)


MIGRATING_PROCESS = """
import asyncio, sys
from cqrskit.ports import Collection
from cqrskit.stores.postgres import PostgresEventStore, PostgresViewStore
from cqrskit.messages import NewEvent, new_id
from cqrskit.ports import AppendRequest

async def main(url):
    store, views = await asyncio.gather(
        PostgresEventStore.open(url, pool_size=1), PostgresViewStore.open(url, pool_size=1))
    await views.setup([Collection("docs")])
    command_id = new_id()
    await store.append(AppendRequest(command_id, "thing", 0, [NewEvent("Happened", {})],
                                     {}, command_id, "h"))
    await store.close()
    await views.close()

asyncio.run(main(sys.argv[1]))
"""


async def test_two_processes_migrating_one_new_schema_at_once(
    postgres_url: str, postgres_dsn: str
) -> None:
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", MIGRATING_PROCESS, postgres_url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = await asyncio.wait_for(
        asyncio.gather(*(p.communicate() for p in processes)), 60
    )
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr.decode()
    schema = schema_of(postgres_url)
    assert await migrations_of(postgres_dsn, schema) == all_migrations(schema)
    async with await admin(postgres_dsn) as conn:
        rows = await (await conn.execute(
            f"SELECT position FROM {schema}.events ORDER BY position"
        )).fetchall()
    assert rows == [(1,), (2,)]
