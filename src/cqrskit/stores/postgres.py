"""PostgreSQL adapters: the event store (command DB) and the view store (query DB).

URL: `postgresql://user:password@host:port/database?schema=name`. Every table
lives in the schema (default `cqrskit`), so one database can hold several
deployments or test runs side by side.

Appends go to the server in groups, one call of a PL/pgSQL function per group,
which takes an advisory lock, checks idempotency and expected versions, assigns
positions and inserts the rows. The lock is held until that transaction
commits, so positions become visible in commit order with no gaps: a reader
following the log cannot skip an event that commits late. One round trip
serves the whole group, and one call is in flight at a time (on the store's own
connection): the appends that arrive meanwhile make the next group, so the
groups grow with the load instead of queueing one by one for the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import zlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from operator import itemgetter
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import orjson
import psycopg
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb, set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from cqrskit.errors import (
    ConcurrencyConflict,
    CqrskitError,
    IdempotencyKeyReused,
    InvalidRequest,
    Unavailable,
)
from cqrskit.leases import plan_claim
from cqrskit.messages import CommandResult, Envelope
from cqrskit.ports import (
    AppendRequest,
    Collection,
    DeadLetter,
    Page,
    StoredCommand,
    UnitOfWork,
)
from cqrskit.stores.group_commit import GroupCommitter, next_group, run_each
from cqrskit.stores.queries import (
    check_limit,
    decode_cursor,
    filter_path,
    known_collection,
    page_rows,
)
from cqrskit.stores.rows import DEAD_LETTER_COLUMNS, EVENT_COLUMNS, dead_letter_of, envelope_of
from cqrskit.stores.unit_of_work import BufferedUnitOfWork

log = logging.getLogger(__name__)

T = TypeVar("T")
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_MAX_GROUP = 512


@dataclass(frozen=True, slots=True)
class PostgresUrl:
    """A libpq connection string and the schema our tables live in."""

    conninfo: str
    schema: str

    @classmethod
    def parse(cls, url: str) -> PostgresUrl:
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise CqrskitError(f"not a PostgreSQL URL: {url!r}")
        query = dict(parse_qsl(parts.query))
        schema = query.pop("schema", "cqrskit")
        if not _SCHEMA_NAME.match(schema):
            raise CqrskitError(f"schema {schema!r} must match {_SCHEMA_NAME.pattern}")
        query.setdefault("connect_timeout", "5")
        # quote, not quote_plus: libpq does not read "+" as a space.
        query_string = urlencode(query, quote_via=quote)
        conninfo = urlunsplit(("postgresql", parts.netloc, parts.path, query_string, ""))
        return cls(conninfo, schema)


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    set_json_loads(orjson.loads, conn)


def _unavailable(error: Exception) -> Unavailable:
    return Unavailable(f"the PostgreSQL server cannot be reached: {error}".strip())


@contextlib.asynccontextmanager
async def _translated() -> Any:
    """Turn connection failures into Unavailable (503) with a message a person can act on."""
    try:
        yield
    except (psycopg.OperationalError, PoolTimeout) as error:
        raise _unavailable(error) from error


def _event_store_schema(s: str) -> list[str]:
    lock_key = zlib.crc32(f"{s}.events".encode())
    return [
        f"""
        CREATE TABLE IF NOT EXISTS {s}.events (
            position BIGINT PRIMARY KEY,
            event_id TEXT NOT NULL UNIQUE,
            stream_id TEXT NOT NULL,
            stream_type TEXT NOT NULL,
            version INTEGER NOT NULL,
            type TEXT NOT NULL,
            schema_version INTEGER NOT NULL,
            data JSONB NOT NULL,
            metadata JSONB NOT NULL,
            recorded_at TIMESTAMPTZ NOT NULL,
            UNIQUE (stream_id, version)
        );
        CREATE TABLE IF NOT EXISTS {s}.commands (
            command_id TEXT PRIMARY KEY,
            command_hash TEXT NOT NULL,
            stream_id TEXT NOT NULL,
            version INTEGER NOT NULL,
            position BIGINT NOT NULL,
            recorded_at TIMESTAMPTZ NOT NULL
        );
        -- Appends a group of commands. The caller sends no two requests for one
        -- stream or one command id in a group, so the whole group is judged and
        -- written set-based, in one statement.
        CREATE OR REPLACE FUNCTION {s}.append_events(requests JSONB) RETURNS JSONB
        LANGUAGE plpgsql AS $$
        DECLARE
            last_position BIGINT;
            outcomes JSONB;
            now_ts TIMESTAMPTZ := clock_timestamp();
        BEGIN
            -- Held until commit: positions become visible in commit order, gap-free.
            PERFORM pg_advisory_xact_lock({lock_key});
            SELECT coalesce(max(position), 0) INTO last_position FROM {s}.events;
            WITH r AS (
                SELECT t.i, t.req, t.req->>'command_id' AS command_id,
                       t.req->>'stream_id' AS stream_id,
                       jsonb_array_length(t.req->'events') AS n
                FROM jsonb_array_elements(requests) WITH ORDINALITY AS t(req, i)
            ), known AS (
                -- = ANY(ARRAY(...)) rather than IN (SELECT ...): it uses the index.
                SELECT c.* FROM {s}.commands c
                WHERE c.command_id = ANY(ARRAY(SELECT command_id FROM r))
            ), heads AS (
                SELECT e.stream_id, max(e.version) AS version FROM {s}.events e
                WHERE e.stream_id = ANY(ARRAY(SELECT stream_id FROM r))
                GROUP BY e.stream_id
            ), judged AS (
                SELECT r.*, k.command_hash AS known_hash, k.stream_id AS known_stream,
                       k.version AS known_version, k.position AS known_position,
                       coalesce(h.version, 0) AS head
                FROM r LEFT JOIN known k USING (command_id)
                       LEFT JOIN heads h ON h.stream_id = r.stream_id
            ), accepted AS (
                SELECT j.i, j.req, j.command_id, j.stream_id, j.n, j.head,
                       last_position + sum(j.n) OVER (ORDER BY j.i) AS end_position
                FROM judged j
                WHERE j.known_hash IS NULL AND j.head = (j.req->>'expected_version')::INTEGER
            ), stored_events AS (
                INSERT INTO {s}.events (position, event_id, stream_id, stream_type, version,
                    type, schema_version, data, metadata, recorded_at)
                SELECT a.end_position - a.n + e.k, e.ev->>'event_id', a.stream_id,
                       a.req->>'stream_type', a.head + e.k, e.ev->>'type',
                       (e.ev->>'schema_version')::INTEGER, e.ev->'data', a.req->'metadata',
                       now_ts
                FROM accepted a,
                     jsonb_array_elements(a.req->'events') WITH ORDINALITY AS e(ev, k)
            ), stored_commands AS (
                INSERT INTO {s}.commands (command_id, command_hash, stream_id, version,
                    position, recorded_at)
                SELECT a.command_id, a.req->>'command_hash', a.stream_id, a.head + a.n,
                       a.end_position, now_ts
                FROM accepted a
            )
            SELECT jsonb_agg(CASE
                WHEN j.known_hash IS NOT NULL AND j.known_hash <> j.req->>'command_hash'
                    THEN jsonb_build_object('error', 'reused')
                WHEN j.known_hash IS NOT NULL
                    THEN jsonb_build_object('replayed', true, 'stream_id', j.known_stream,
                        'version', j.known_version, 'position', j.known_position)
                WHEN a.i IS NULL
                    THEN jsonb_build_object('error', 'conflict', 'current', j.head)
                ELSE jsonb_build_object('stream_id', j.stream_id, 'version', j.head + j.n,
                    'position', a.end_position)
                END ORDER BY j.i)
            INTO outcomes
            FROM judged j LEFT JOIN accepted a ON a.i = j.i;
            PERFORM pg_notify('{s}_events', last_position::TEXT);
            RETURN coalesce(outcomes, '[]'::JSONB);
        END $$;
        """,  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
        f"""
        CREATE TABLE IF NOT EXISTS {s}.relay (
            name TEXT PRIMARY KEY,
            position BIGINT NOT NULL
        );
        """,
        _append_function(s, lock_key),
    ]


def _append_function(s: str, lock_key: int) -> str:
    """Migration 3: `append_events(requests, lookup_all)`, what the store calls since.

    The one-argument version of migration 1 stays for processes of the previous
    version during a rolling upgrade; both take the same lock, so they interleave
    safely. Against it this one
    - decodes the group once, with `jsonb_to_recordset`, instead of per field;
    - looks a command id up only when the caller chose it (`command_hash` not empty)
      or `lookup_all` says so: an id the handler generated cannot be stored yet,
      unless this is the retry of a call whose answer was lost (the client then
      passes `lookup_all`);
    - probes `commands` and each stream's head by index, one row at a time, whatever
      the table statistics say. PL/pgSQL keeps the plan it made while the tables
      were small: the plan of migration 1 read both tables sequentially in every
      call, a cost that grew with the log (`SET enable_seqscan = off` and the
      `LIMIT 1` laterals keep that from happening);
    - reads the last position in the same statement (its snapshot is taken after
      the lock, so it sees every earlier append) and notifies only if it stored.
    """
    return f"""
        ALTER FUNCTION {s}.append_events(JSONB) SET enable_seqscan = off;
        CREATE OR REPLACE FUNCTION {s}.append_events(requests JSONB, lookup_all BOOLEAN)
        RETURNS JSONB
        LANGUAGE plpgsql
        SET enable_seqscan = off
        AS $$
        DECLARE
            outcomes JSONB;
            stored BOOLEAN;
            now_ts TIMESTAMPTZ := clock_timestamp();
        BEGIN
            -- Held until commit: positions become visible in commit order, gap-free.
            PERFORM pg_advisory_xact_lock({lock_key});
            WITH r AS (
                SELECT * FROM ROWS FROM (jsonb_to_recordset(requests) AS (
                    stream_id TEXT, stream_type TEXT, expected_version INTEGER,
                    command_id TEXT, command_hash TEXT, metadata JSONB, events JSONB
                )) WITH ORDINALITY AS t(stream_id, stream_type, expected_version, command_id,
                                          command_hash, metadata, events, i)
            ), judged AS (
                SELECT r.*, jsonb_array_length(r.events) AS n, k.known_hash, k.known_stream,
                       k.known_version, k.known_position, coalesce(h.head, 0) AS head
                FROM r
                LEFT JOIN LATERAL (
                    SELECT c.command_hash AS known_hash, c.stream_id AS known_stream,
                           c.version AS known_version, c.position AS known_position
                    FROM {s}.commands c
                    WHERE (lookup_all OR r.command_hash <> '') AND c.command_id = r.command_id
                    LIMIT 1
                ) k ON true
                LEFT JOIN LATERAL (
                    SELECT e.version AS head FROM {s}.events e
                    WHERE e.stream_id = r.stream_id ORDER BY e.version DESC LIMIT 1
                ) h ON true
            ), accepted AS (
                SELECT j.*, (SELECT coalesce(max(position), 0) FROM {s}.events)
                            + sum(j.n) OVER (ORDER BY j.i) AS end_position
                FROM judged j
                WHERE j.known_hash IS NULL AND j.head = j.expected_version
            ), stored_events AS (
                INSERT INTO {s}.events (position, event_id, stream_id, stream_type, version,
                    type, schema_version, data, metadata, recorded_at)
                SELECT a.end_position - a.n + e.k, e.event_id, a.stream_id, a.stream_type,
                       a.head + e.k, e.type, e.schema_version, e.data, a.metadata, now_ts
                FROM accepted a,
                     ROWS FROM (jsonb_to_recordset(a.events) AS (
                         event_id TEXT, type TEXT, schema_version INTEGER, data JSONB
                     )) WITH ORDINALITY AS e(event_id, type, schema_version, data, k)
            ), stored_commands AS (
                INSERT INTO {s}.commands (command_id, command_hash, stream_id, version,
                    position, recorded_at)
                SELECT a.command_id, a.command_hash, a.stream_id, a.head + a.n,
                       a.end_position, now_ts
                FROM accepted a
            )
            SELECT jsonb_agg(CASE
                WHEN j.known_hash IS NOT NULL AND j.known_hash <> j.command_hash
                    THEN jsonb_build_object('error', 'reused')
                WHEN j.known_hash IS NOT NULL
                    THEN jsonb_build_object('replayed', true, 'stream_id', j.known_stream,
                        'version', j.known_version, 'position', j.known_position)
                WHEN a.i IS NULL
                    THEN jsonb_build_object('error', 'conflict', 'current', j.head)
                ELSE jsonb_build_object('version', a.head + a.n, 'position', a.end_position)
                END ORDER BY j.i),
                bool_or(a.i IS NOT NULL)
            INTO outcomes, stored
            FROM judged j LEFT JOIN accepted a ON a.i = j.i;
            IF stored THEN
                PERFORM pg_notify('{s}_events', '');
            END IF;
            RETURN coalesce(outcomes, '[]'::JSONB);
        END $$;
        """  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters


async def migrate(conn: psycopg.AsyncConnection[Any], schema: str, name: str,
                  migrations: Sequence[str]) -> None:
    """Apply the numbered migrations of `name` that this schema has not seen, once.

    An advisory lock keeps two processes starting together from racing.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (zlib.crc32(schema.encode()),))
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {schema}.migrations "
            "(name TEXT NOT NULL, number INTEGER NOT NULL, applied_at TIMESTAMPTZ NOT NULL "
            "DEFAULT now(), PRIMARY KEY (name, number))"
        )
        cursor = await conn.execute(
            f"SELECT coalesce(max(number), 0) FROM {schema}.migrations WHERE name = %s",  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
            (name,),
        )
        row = await cursor.fetchone()
        current = int(row[0]) if row else 0
        for number, script in enumerate(migrations, start=1):
            if number > current:
                await conn.execute(script)
                await conn.execute(
                    f"INSERT INTO {schema}.migrations (name, number) VALUES (%s, %s)",  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
                    (name, number),
                )


async def _open_pool(
    url: PostgresUrl, name: str, schema: Callable[[str], list[str]], size: int
) -> AsyncConnectionPool:
    """A pool of autocommit connections, with the schema migrated."""
    async with _translated():
        # One plain connection first: a refused connection or a bad option then
        # fails at once with the server's own words, not after the pool's timeout.
        probe = await psycopg.AsyncConnection.connect(url.conninfo)
        await probe.close()
        pool = AsyncConnectionPool(
            url.conninfo, min_size=1, max_size=size, open=False, timeout=5,
            kwargs={"autocommit": True}, configure=_configure,
        )
        await pool.open(wait=True, timeout=10)
        try:
            async with pool.connection() as conn:
                await migrate(conn, url.schema, name, schema(url.schema))
        except BaseException:
            await pool.close()
            raise
    return pool


async def _fetch(
    pool: AsyncConnectionPool, sql: str, params: Sequence[Any]
) -> list[tuple[Any, ...]]:
    """One statement on a pooled connection, retried once on a connection that died.

    Every statement sent this way is safe to repeat: reads, and the append function,
    which recognises a command id it already stored.
    """
    for attempt in (1, 2):
        try:
            async with _translated(), pool.connection() as conn:
                cursor = conn.cursor(row_factory=tuple_row)
                await cursor.execute(sql, params)
                return await cursor.fetchall()
        except Unavailable:
            if attempt == 2:
                raise
            await pool.check()  # drop the pooled connections that died while idle
    raise AssertionError("unreachable")


def _as_is(value: T) -> T:
    return value


def _timestamp(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


# psycopg decodes JSONB itself (with orjson, see _configure).
_envelope = partial(envelope_of, json=_as_is, timestamp=_timestamp)
_dead_letter = partial(dead_letter_of, json=_as_is, timestamp=_timestamp)


def _outcome(request: AppendRequest, answer: dict[str, Any]) -> Any:
    error = answer.get("error")
    if error == "reused":
        return IdempotencyKeyReused(request.command_id)
    if error == "conflict":
        return ConcurrencyConflict(request.stream_id, request.expected_version, answer["current"])
    if answer.get("replayed"):
        return CommandResult(
            request.command_id, answer["stream_id"], answer["version"], answer["position"],
            replayed=True,
        )
    return CommandResult(
        request.command_id, request.stream_id, answer["version"], answer["position"]
    )


_Pending = tuple[AppendRequest, asyncio.Future[Any]]


# The SQL function judges a group set-based: see next_group.
_next_group = next_group


def _request_json(request: AppendRequest) -> dict[str, Any]:
    return {
        "stream_id": request.stream_id,
        "stream_type": request.stream_type,
        "expected_version": request.expected_version,
        "command_id": request.command_id,
        "command_hash": request.command_hash,
        "metadata": request.metadata,
        "events": [
            {"event_id": e.event_id, "type": e.type, "schema_version": e.schema_version,
             "data": e.data}
            for e in request.events
        ],
    }


class PostgresEventStore:
    """The command DB on PostgreSQL. Open with `await PostgresEventStore.open(url)`."""

    def __init__(self, url: PostgresUrl, pool: AsyncConnectionPool) -> None:
        self.url = url
        self.schema = url.schema
        self.pool = pool
        # Appends waiting for the next call of `append_events`, in arrival order.
        self._pending: list[_Pending] = []
        self._sender: asyncio.Task[None] | None = None
        # The appender's own connection: one call in flight at a time needs no pool.
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._closed = False
        self._appended = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, url: str, *, pool_size: int = 8) -> PostgresEventStore:
        parsed = PostgresUrl.parse(url)
        pool = await _open_pool(parsed, "event_store", _event_store_schema, pool_size)
        return cls(parsed, pool)

    async def append(self, request: AppendRequest) -> CommandResult:
        if self._closed:
            raise Unavailable(f"the event store on {self.schema} is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        if self._sender is None or self._sender.done():
            # Its first step runs in the next loop iteration: everything appended in
            # this one is in the first group.
            self._sender = asyncio.create_task(self._send_pending(), name="event-store-append")
        result: CommandResult = await future
        return result

    async def _send_pending(self) -> None:
        """Send the queue, one group per call and one call at a time, until it is empty.

        While a call is in flight, new appends queue up and go together in the next
        call: the busier the store, the bigger the groups. (The calls serialise on the
        log's lock in the server anyway; one at a time leaves none waiting for it.)
        """
        while self._pending:
            group, self._pending = _next_group(self._pending, _MAX_GROUP)
            await self._append_group(group)

    async def _append_group(self, group: list[_Pending]) -> None:
        try:
            answers = await self._call_append([request for request, _ in group])
        except Unavailable as error:
            for _, future in group:
                if not future.done():
                    future.set_exception(error)
            return
        except Exception as error:
            if len(group) > 1:
                # Something in the group broke the transaction: run each alone.
                for item in group:
                    await self._append_group([item])
                return
            log.error("append to %s failed", self.schema, exc_info=error)
            if not group[0][1].done():
                group[0][1].set_exception(error)
            return
        # A follower in this process need not wait for the NOTIFY to come round.
        self._appended.set()
        for (request, future), answer in zip(group, answers, strict=True):
            if future.done():
                continue
            outcome = _outcome(request, answer)
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    async def _call_append(self, requests: list[AppendRequest]) -> list[dict[str, Any]]:
        """One call of `append_events` on the appender's own connection.

        A connection that fails is replaced and the call made once more. Whether the
        first call committed is then unknown, so the second looks up every command
        id, generated ones too: a group already stored is answered as replayed
        instead of being stored twice.
        """
        payload = Jsonb([_request_json(r) for r in requests], dumps=orjson.dumps)
        sql = f"SELECT {self.schema}.append_events(%s, %s)"
        for attempt in (1, 2):
            try:
                conn = await self._append_connection()
                cursor = await conn.execute(sql, (payload, attempt > 1))
                row = await cursor.fetchone()
            except Unavailable:
                await self._drop_append_connection()
                if attempt == 2 or self._closed:
                    raise
                continue
            except psycopg.OperationalError as error:
                await self._drop_append_connection()
                if attempt == 2 or self._closed:
                    raise _unavailable(error) from error
                continue
            except BaseException:
                # Cancelled or failed mid-call: the connection's state is unknown.
                await self._drop_append_connection()
                raise
            if row is None:  # the function returns one row, always
                raise RuntimeError("append_events returned no row")
            answers: list[dict[str, Any]] = row[0]
            return answers
        raise AssertionError("unreachable")

    async def _append_connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            async with _translated():
                conn = await psycopg.AsyncConnection.connect(self.url.conninfo, autocommit=True)
            await _configure(conn)
            self._conn = conn
        return self._conn

    async def _drop_append_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return await _fetch(self.pool, sql, params)

    async def read_stream(self, stream_id: str) -> list[Envelope]:
        rows = await self._fetch(
            f"SELECT {EVENT_COLUMNS} FROM {self.schema}.events WHERE stream_id = %s "  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
            "ORDER BY version",
            (stream_id,),
        )
        return [_envelope(row) for row in rows]

    async def read_all(self, after: int, limit: int) -> list[Envelope]:
        rows = await self._fetch(
            f"SELECT {EVENT_COLUMNS} FROM {self.schema}.events WHERE position > %s "  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
            "ORDER BY position LIMIT %s",
            (after, limit),
        )
        return [_envelope(row) for row in rows]

    async def last_position(self) -> int:
        rows = await self._fetch(f"SELECT coalesce(max(position), 0) FROM {self.schema}.events", ())  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
        return int(rows[0][0])

    async def _listen(self) -> None:
        """Follow NOTIFY from every appender, in this process or another.

        Started by the first `wait_for_append`: a process that never follows the log
        (an API or command-handler process) keeps no listening connection and is not
        woken by every append of every process.
        """
        channel = f"{self.schema}_events"
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.url.conninfo, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {channel}")
                    self._appended.set()
                    async for _ in conn.notifies():
                        self._appended.set()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("listening for appends on %s failed (%s); retrying", channel, error)
                await asyncio.sleep(1)

    async def wait_for_append(self, after: int, timeout: float) -> None:
        if self._listener is None and not self._closed:
            # Once it listens it wakes the waiters, who read the log again: an append
            # made before the LISTEN is not missed.
            self._listener = asyncio.create_task(self._listen(), name="event-store-listener")
        self._appended.clear()
        if await self.last_position() > after:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._appended.wait(), timeout)

    async def get_command(self, command_id: str) -> StoredCommand | None:
        rows = await self._fetch(
            f"SELECT command_hash, stream_id, version, position FROM {self.schema}.commands "  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
            "WHERE command_id = %s",
            (command_id,),
        )
        if not rows:
            return None
        hash_, stream_id, version, position = rows[0]
        return StoredCommand(command_id, hash_, CommandResult(command_id, stream_id, version,
                                                              position))

    async def check(self) -> None:
        await self._fetch("SELECT 1", ())

    async def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if self._sender is not None:
            # The appends already queued are still sent.
            await asyncio.gather(self._sender, return_exceptions=True)
        await self._drop_append_connection()
        await self.pool.close()


class PostgresRelayState:
    """The relay's position in the command DB; one leader at a time by a session
    advisory lock, held on a connection of its own: if the leader dies, its
    connection closes, the lock is released and a standby takes over."""

    def __init__(self, store: PostgresEventStore, name: str = "relay", poll: float = 1.0):
        self.store = store
        self.name = name
        self.poll = poll
        self.lock_key = zlib.crc32(f"{store.schema}.relay.{name}".encode())

    async def position(self) -> int:
        rows = await self.store._fetch(
            f"SELECT position FROM {self.store.schema}.relay WHERE name = %s", (self.name,)  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
        )
        return int(rows[0][0]) if rows else 0

    async def save(self, position: int) -> None:
        # GREATEST: a deposed leader finishing late never moves the position back.
        await self.store._fetch(
            f"INSERT INTO {self.store.schema}.relay AS r (name, position) VALUES (%s, %s) "  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
            "ON CONFLICT (name) DO UPDATE SET position = GREATEST(r.position, excluded.position) "
            "RETURNING position",
            (self.name, position),
        )

    @contextlib.asynccontextmanager
    async def lead(self) -> AsyncIterator[None]:
        async with _translated():
            conn = await psycopg.AsyncConnection.connect(
                self.store.url.conninfo, autocommit=True
            )
        async with conn:
            while True:
                cursor = await conn.execute("SELECT pg_try_advisory_lock(%s)", (self.lock_key,))
                row = await cursor.fetchone()
                if row and row[0]:
                    break
                await asyncio.sleep(self.poll)
            yield


# ----------------------------------------------------------------- view store


def _view_store_schema(s: str) -> list[str]:
    return [
        f"""
        CREATE TABLE IF NOT EXISTS {s}.checkpoints (
            projection TEXT NOT NULL,
            partition INTEGER NOT NULL,
            position BIGINT NOT NULL,
            updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            PRIMARY KEY (projection, partition)
        );
        CREATE TABLE IF NOT EXISTS {s}.dead_letters (
            id BIGSERIAL PRIMARY KEY,
            projection TEXT NOT NULL,
            partition INTEGER NOT NULL,
            stream_id TEXT NOT NULL,
            position BIGINT NOT NULL,
            envelope JSONB NOT NULL,
            error TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            is_cause BOOLEAN NOT NULL,
            parked_at TIMESTAMPTZ NOT NULL,
            UNIQUE (projection, position)
        );
        CREATE INDEX IF NOT EXISTS dead_letters_by_stream
            ON {s}.dead_letters (projection, stream_id, position);
        """,
        f"""
        CREATE TABLE IF NOT EXISTS {s}.lease_owners (
            owner TEXT PRIMARY KEY,
            seen_at DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE IF NOT EXISTS {s}.leases (
            partition INTEGER PRIMARY KEY,
            owner TEXT NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL
        );
        """,
    ]


# Lease times come from the database's clock, so processes on several machines agree.
_NOW = "SELECT extract(epoch FROM clock_timestamp())::float8"


def _db_now(conn: psycopg.Connection[Any]) -> float:
    row = conn.execute(_NOW).fetchone()
    return float(row[0]) if row else 0.0


def _heartbeat(schema: str, owner: str, ttl: float, conn: psycopg.Connection[Any]) -> list[str]:
    now = _db_now(conn)
    conn.execute(
        f"INSERT INTO {schema}.lease_owners (owner, seen_at) VALUES (%s, %s) "  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
        "ON CONFLICT (owner) DO UPDATE SET seen_at = excluded.seen_at",
        (owner, now),
    )
    # Owners gone for long are forgotten; the recent ones are the live ones.
    conn.execute(f"DELETE FROM {schema}.lease_owners WHERE seen_at < %s", (now - 10 * ttl,))  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
    rows = conn.execute(
        f"SELECT owner FROM {schema}.lease_owners WHERE seen_at > %s ORDER BY owner",  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
        (now - ttl,),
    ).fetchall()
    return [row[0] for row in rows]


def _claim(
    schema: str, owner: str, wanted: int, partitions: int, ttl: float,
    conn: psycopg.Connection[Any],
) -> set[int]:
    now = _db_now(conn)
    rows = conn.execute(f"SELECT partition, owner, expires_at FROM {schema}.leases").fetchall()  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
    keep, release = plan_claim(owner, wanted, partitions, {r[0]: (r[1], r[2]) for r in rows}, now)
    with conn.cursor() as cursor:
        cursor.executemany(
            f"DELETE FROM {schema}.leases WHERE partition = %s AND owner = %s",  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
            [(p, owner) for p in release],
        )
        cursor.executemany(
            f"INSERT INTO {schema}.leases (partition, owner, expires_at) VALUES (%s, %s, %s) "  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
            "ON CONFLICT (partition) DO UPDATE SET owner = excluded.owner, "
            "expires_at = excluded.expires_at",
            [(p, owner, now + ttl) for p in sorted(keep)],
        )
    return keep


def _release(schema: str, owner: str, conn: psycopg.Connection[Any]) -> None:
    conn.execute(f"DELETE FROM {schema}.leases WHERE owner = %s", (owner,))  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
    conn.execute(f"DELETE FROM {schema}.lease_owners WHERE owner = %s", (owner,))  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters


def _containment(filters: Mapping[str, Any]) -> dict[str, Any]:
    """{"data.color": "red"} → {"data": {"color": "red"}}, for `doc @> %s`."""
    nested: dict[str, Any] = {}
    for field, value in filters.items():
        segments = filter_path(field, value)
        node = nested
        for segment in segments[:-1]:
            child = node.setdefault(segment, {})
            if not isinstance(child, dict):
                raise InvalidRequest(f"filters on {field!r} and its parent contradict")
            node = child
        if isinstance(node.get(segments[-1]), dict):
            raise InvalidRequest(f"filters on {field!r} and a path inside it contradict")
        node[segments[-1]] = value
    return nested


class _WriterBackend:
    """A synchronous connection for the view store's group-committing writer thread."""

    def __init__(self, url: PostgresUrl) -> None:
        self.name = f"postgres-{url.schema}-views"
        self.url = url
        self.lock_key = zlib.crc32(f"{url.schema}.views".encode())

    def connect(self) -> psycopg.Connection[Any]:
        try:
            # Autocommit with explicit BEGIN/COMMIT, so that each unit of work's
            # `conn.transaction()` is a savepoint inside the group's transaction.
            conn = psycopg.connect(self.url.conninfo, autocommit=True)
        except psycopg.OperationalError as error:
            raise _unavailable(error) from error
        set_json_loads(orjson.loads, conn)
        return conn

    def usable(self, conn: psycopg.Connection[Any]) -> bool:
        return not conn.closed and not conn.broken

    def begin(self, conn: psycopg.Connection[Any]) -> None:
        # Serialise view writers across processes, as the ViewStore port promises:
        # partitions share documents (a statistics total), and a unit of work
        # reads them without row locks. (One round trip: no parameters, so psycopg
        # sends both statements as one simple query.)
        conn.execute(f"BEGIN; SELECT pg_advisory_xact_lock({int(self.lock_key)})")

    def commit(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("COMMIT")

    def rollback(self, conn: psycopg.Connection[Any]) -> None:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")

    def close(self, conn: psycopg.Connection[Any]) -> None:
        conn.close()

    def translate(self, error: Exception) -> Exception:
        if isinstance(error, (psycopg.OperationalError, Unavailable)):
            return error if isinstance(error, Unavailable) else _unavailable(error)
        log.error("view store write on %s failed", self.url.schema, exc_info=error)
        return error


def _json_param(value: Any) -> Jsonb:
    """One JSONB parameter, encoded by orjson: far cheaper than psycopg's text[] arrays,
    which escape every element with a regular expression in Python."""
    return Jsonb(value, dumps=orjson.dumps)


class PostgresUnitOfWork(BufferedUnitOfWork):
    """A unit of work in the view writer's transaction, in few round trips.

    Round trips matter twice here: each costs the server's latency, and each makes the
    writer thread give up the GIL and wait to get it back from a busy event loop. A
    unit therefore takes its checkpoint and the projection's parked streams in one
    statement, and sends all its writes (and the end of its savepoint) in one
    pipeline.
    """

    def __init__(self, conn: psycopg.Connection[Any], schema: str, known: set[str]) -> None:
        super().__init__(known)
        self.conn = conn
        self.schema = schema
        self._parked: dict[str, set[str]] = {}

    def _table(self, collection: str) -> str:
        return f"{self.schema}.view_{collection}"

    def load(self, collection: str, doc_ids: list[str]) -> dict[str, dict[str, Any]]:
        rows = self.conn.execute(
            f"SELECT id, doc FROM {self._table(collection)} "  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
            "WHERE id = ANY(ARRAY(SELECT jsonb_array_elements_text(%s)))",
            (_json_param(doc_ids),),
        ).fetchall()
        return {row[0]: row[1] for row in rows}

    def load_checkpoint(self, projection: str, partition: int) -> int:
        # The upsert locks the row (created if missing): it serialises every processor
        # of this projection and partition until the group commits.
        row = self.conn.execute(
            f"INSERT INTO {self.schema}.checkpoints AS c (projection, partition, position) "  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
            "VALUES (%s, %s, 0) ON CONFLICT (projection, partition) "
            "DO UPDATE SET position = c.position "
            f"RETURNING c.position, ARRAY(SELECT DISTINCT stream_id FROM "
            f"{self.schema}.dead_letters WHERE projection = %s)",
            (projection, partition, projection),
        ).fetchone()
        if row is None:  # an aggregate query returns one row, always
            raise RuntimeError("the checkpoint query returned no row")
        self._parked[projection] = set(row[1])
        return int(row[0])

    def load_parked_streams(self, projection: str) -> set[str]:
        parked = self._parked.get(projection)
        if parked is not None:
            return set(parked)
        rows = self.conn.execute(
            f"SELECT DISTINCT stream_id FROM {self.schema}.dead_letters WHERE projection = %s",  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
            (projection,),
        ).fetchall()
        self._parked[projection] = {row[0] for row in rows}
        return set(self._parked[projection])

    def load_dead_letters(self, projection: str, stream_id: str) -> list[DeadLetter]:
        rows = self.conn.execute(
            f"SELECT {DEAD_LETTER_COLUMNS} FROM {self.schema}.dead_letters "  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
            "WHERE projection = %s AND stream_id = %s ORDER BY position",
            (projection, stream_id),
        ).fetchall()
        return [_dead_letter(row) for row in rows]

    def flush(self) -> None:
        """Queue the unit's writes; the caller's pipeline sends them together."""
        conn, s = self.conn, self.schema
        for collection in self.cleared:
            conn.execute(f"DELETE FROM {self._table(collection)}")  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
        upserts, deletes = self.changes()
        for collection, docs in upserts.items():
            conn.execute(
                f"INSERT INTO {self._table(collection)} (id, doc) "  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
                "SELECT key, value FROM jsonb_each(%s) "
                "ON CONFLICT (id) DO UPDATE SET doc = excluded.doc",
                (_json_param(dict(docs)),),
            )
        for collection, doc_ids in deletes.items():
            conn.execute(
                f"DELETE FROM {self._table(collection)} "  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
                "WHERE id = ANY(ARRAY(SELECT jsonb_array_elements_text(%s)))",
                (_json_param(doc_ids),),
            )
        if self.removed:
            conn.execute(f"DELETE FROM {s}.dead_letters WHERE id = ANY(%s)", (self.removed,))  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
        for error, dead_letter_id in self.failures:
            conn.execute(
                f"UPDATE {s}.dead_letters SET error = %s, attempts = attempts + 1, "  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
                "is_cause = true WHERE id = %s",
                (error, dead_letter_id),
            )
        for p, part, e, err, n, c, at in self.parked:
            conn.execute(
                f"INSERT INTO {s}.dead_letters (projection, partition, stream_id, position, "  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
                "envelope, error, attempts, is_cause, parked_at) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (p, part, e.stream_id, e.position, Jsonb(e.to_dict()), err, n, c, at),
            )
        for (p, part), pos in self.checkpoints.items():
            conn.execute(
                f"INSERT INTO {s}.checkpoints (projection, partition, position, updated_at) "  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
                "VALUES (%s, %s, %s, now()) ON CONFLICT (projection, partition) "
                "DO UPDATE SET position = excluded.position, updated_at = now()",
                (p, part, pos),
            )


class PostgresViewStore:
    """The query DB on PostgreSQL: one JSONB table per collection, GIN-indexed for filters.

    Reads use an async pool; writes go through one group-committing writer thread
    with its own connection, because projections are plain synchronous code.
    """

    def __init__(self, url: PostgresUrl, pool: AsyncConnectionPool) -> None:
        self.url = url
        self.schema = url.schema
        self.pool = pool
        self.collections: dict[str, Collection] = {}
        self._writer = GroupCommitter(_WriterBackend(url))

    @classmethod
    async def open(cls, url: str, *, pool_size: int = 8) -> PostgresViewStore:
        parsed = PostgresUrl.parse(url)
        return cls(parsed, await _open_pool(parsed, "view_store", _view_store_schema, pool_size))

    async def setup(self, collections: Sequence[Collection]) -> None:
        async with _translated(), self.pool.connection() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(%s)", (zlib.crc32(self.schema.encode()),)
            )
            for collection in collections:
                if len(f"view_{collection.name}_doc") > 63:
                    raise CqrskitError(
                        f"collection name {collection.name!r} is too long for PostgreSQL "
                        "(at most 54 characters)"
                    )
                self.collections[collection.name] = collection
                table = f"{self.schema}.view_{collection.name}"
                await conn.execute(
                    # Byte order ("C"): pages follow the primary key whatever the
                    # database's collation, and the cursor compares the same way.
                    f"CREATE TABLE IF NOT EXISTS {table} "
                    '(id TEXT COLLATE "C" PRIMARY KEY, doc JSONB NOT NULL)'
                )
                await conn.execute(
                    f"CREATE INDEX IF NOT EXISTS view_{collection.name}_doc "
                    f"ON {table} USING GIN (doc jsonb_path_ops)"
                )

    async def run(self, work: Callable[[UnitOfWork], T]) -> T:
        result: T = await self._writer.submit(self._run_units, work)
        return result

    def _run_units(
        self, conn: psycopg.Connection[Any], works: list[Callable[[UnitOfWork], Any]]
    ) -> list[Any]:
        outcomes: list[Any] = []
        known = set(self.collections)  # read only: one copy serves the group
        for work in works:
            uow = PostgresUnitOfWork(conn, self.schema, known)
            try:
                # Pipelined: the savepoint goes out with the unit's first read, and its
                # writes and the savepoint's release in one round trip at the end.
                with conn.pipeline(), conn.transaction():
                    # A savepoint per unit: a failing projection undoes only its own reads
                    # and locks; its writes were never sent (they wait for flush).
                    result = work(uow)
                    uow.flush()
            except psycopg.Error:
                raise
            except Exception as error:
                outcomes.append(error)
                continue
            outcomes.append(result)
        return outcomes

    def _known(self, collection: str) -> Collection:
        return known_collection(self.collections, collection)

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return await _fetch(self.pool, sql, params)

    async def get(self, collection: str, doc_id: str) -> dict[str, Any] | None:
        self._known(collection)
        rows = await self._fetch(
            f"SELECT doc FROM {self.schema}.view_{collection} WHERE id = %s", (doc_id,)  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
        )
        return rows[0][0] if rows else None

    async def find(
        self,
        collection: str,
        filters: Mapping[str, Any],
        *,
        after: str | None = None,
        limit: int = 50,
        descending: bool = False,
        id_range: tuple[str, str] | None = None,
    ) -> Page:
        check_limit(limit)
        self._known(collection)
        clauses: list[str] = []
        params: list[Any] = []
        if filters:
            clauses.append("doc @> %s")
            params.append(Jsonb(_containment(filters)))
        if after is not None:
            clauses.append("id < %s" if descending else "id > %s")
            params.append(decode_cursor(after))
        if id_range is not None:
            # A range on the primary key: a tenant's documents without a scan.
            clauses.append("id >= %s AND id < %s")
            params += list(id_range)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        order = "DESC" if descending else "ASC"
        params.append(limit + 1)
        rows = await self._fetch(
            f"SELECT id, doc FROM {self.schema}.view_{collection} {where} "  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
            f"ORDER BY id {order} LIMIT %s",
            params,
        )
        rows, cursor = page_rows(rows, limit, itemgetter(0))
        return Page([row[1] for row in rows], cursor)

    async def checkpoints(self) -> dict[tuple[str, int], int]:
        rows = await self._fetch(
            f"SELECT projection, partition, position FROM {self.schema}.checkpoints", ()  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
        )
        return {(row[0], row[1]): row[2] for row in rows}

    async def list_dead_letters(self, projection: str | None = None) -> list[DeadLetter]:
        sql = f"SELECT {DEAD_LETTER_COLUMNS} FROM {self.schema}.dead_letters"  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
        if projection is None:
            rows = await self._fetch(sql + " ORDER BY projection, position", ())
        else:
            rows = await self._fetch(
                sql + " WHERE projection = %s ORDER BY position", (projection,)
            )
        return [_dead_letter(row) for row in rows]

    async def get_dead_letter(self, dead_letter_id: int) -> DeadLetter | None:
        rows = await self._fetch(
            f"SELECT {DEAD_LETTER_COLUMNS} FROM {self.schema}.dead_letters WHERE id = %s",  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
            (dead_letter_id,),
        )
        return _dead_letter(rows[0]) if rows else None

    async def heartbeat(self, owner: str, ttl: float) -> list[str]:
        work = partial(_heartbeat, self.schema, owner, ttl)
        live: list[str] = await self._writer.submit(run_each, work)
        return live

    async def claim_partitions(
        self, owner: str, wanted: int, partitions: int, ttl: float
    ) -> set[int]:
        work = partial(_claim, self.schema, owner, wanted, partitions, ttl)
        held: set[int] = await self._writer.submit(run_each, work)
        return held

    async def release_partitions(self, owner: str) -> None:
        await self._writer.submit(run_each, partial(_release, self.schema, owner))

    async def leases(self) -> dict[int, str]:
        rows = await self._fetch(
            f"SELECT partition, owner FROM {self.schema}.leases "  # nosec B608 # schema and tables are identifiers checked on setup; values are bound parameters
            f"WHERE expires_at > ({_NOW}) ORDER BY partition",
            (),
        )
        return {row[0]: row[1] for row in rows}

    async def check(self) -> None:
        await self._fetch("SELECT 1", ())

    async def close(self) -> None:
        await self._writer.close()
        await self.pool.close()
