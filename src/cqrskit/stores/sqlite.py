"""SQLite adapters: the event store (command DB) and the view store (query DB).

Each database file gets one writer thread that commits many concurrent writes in
one transaction (group commit), and a small pool of reader threads. We use the
stdlib driver directly: async wrappers that hop threads per statement are about
ten times slower on this workload.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeVar

import orjson

from cqrskit.errors import (
    ConcurrencyConflict,
    CqrskitError,
    IdempotencyKeyReused,
    Unavailable,
)
from cqrskit.leases import plan_claim
from cqrskit.messages import CommandResult, Envelope, utc_now
from cqrskit.ports import (
    AppendRequest,
    Collection,
    DeadLetter,
    Page,
    StoredCommand,
)
from cqrskit.stores.group_commit import BatchHandler, GroupCommitter, run_each
from cqrskit.stores.queries import (
    check_limit,
    decode_cursor,
    filter_path,
    known_collection,
    page_rows,
)
from cqrskit.stores.rows import (
    DEAD_LETTER_COLUMNS,
    EVENT_COLUMNS,
    dead_letter_of,
    text_envelopes_of,
)
from cqrskit.stores.unit_of_work import BufferedUnitOfWork

log = logging.getLogger(__name__)
T = TypeVar("T")



def path_from_url(url: str) -> Path:
    """`sqlite:///relative/or/absolute.db` → a filesystem path."""
    if not url.startswith("sqlite:///"):
        raise CqrskitError(f"not a sqlite URL: {url!r} (expected sqlite:///path/to/file.db)")
    return Path(url.removeprefix("sqlite:///"))


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


class _SqliteBackend:
    """How the group committer connects to and runs transactions on one SQLite file."""

    def __init__(self, path: Path, synchronous: str) -> None:
        self.name = path.name
        self.path = path
        self.synchronous = synchronous

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def usable(self, conn: sqlite3.Connection) -> bool:
        return True

    def begin(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def commit(self, conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    def rollback(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def close(self, conn: sqlite3.Connection) -> None:
        conn.close()

    def translate(self, error: Exception) -> Exception:
        return _as_unavailable(error, self.path)


class Database:
    """One SQLite file in WAL mode: a group-committing writer and pooled readers."""

    def __init__(
        self, path: Path, *, synchronous: str = "FULL", readers: int = 2,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self._backend = _SqliteBackend(path, synchronous)
        self._writer = GroupCommitter(self._backend, on_commit=on_commit)
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix=f"sqlite-read-{path.name}")
        self._local = threading.local()
        self._reader_connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    async def submit(self, handler: BatchHandler[sqlite3.Connection], item: Any) -> Any:
        """Have `handler` process `item` in the next group-committed transaction."""
        return await self._writer.submit(handler, item)

    async def read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise Unavailable(f"database {self.path} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._read, work)

    def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._backend.connect()
            with self._lock:
                self._reader_connections.append(conn)
        return work(conn)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._writer.close()
        self._readers.shutdown(wait=True)
        with self._lock:
            for conn in self._reader_connections:
                conn.close()
            self._reader_connections.clear()


def _as_unavailable(error: Exception, path: Path) -> Exception:
    if isinstance(error, sqlite3.OperationalError):
        log.error("sqlite write to %s failed: %s", path, error)
        return Unavailable(f"the database {path.name} could not be written: {error}")
    log.exception("sqlite write to %s failed", path, exc_info=error)
    return error


# ---------------------------------------------------------------- event store

_EVENT_STORE_SCHEMA = [
    """
    CREATE TABLE IF NOT EXISTS events (
        position INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL UNIQUE,
        stream_id TEXT NOT NULL,
        stream_type TEXT NOT NULL,
        version INTEGER NOT NULL,
        type TEXT NOT NULL,
        schema_version INTEGER NOT NULL,
        data TEXT NOT NULL,
        metadata TEXT NOT NULL,
        recorded_at TEXT NOT NULL,
        UNIQUE (stream_id, version)
    );
    CREATE TABLE IF NOT EXISTS commands (
        command_id TEXT PRIMARY KEY,
        command_hash TEXT NOT NULL,
        stream_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        position INTEGER NOT NULL,
        recorded_at TEXT NOT NULL
    ) WITHOUT ROWID;
    """,
    """
    CREATE TABLE IF NOT EXISTS relay (
        name TEXT PRIMARY KEY,
        position INTEGER NOT NULL
    ) WITHOUT ROWID;
    """,
]

def _run_script(path: Path, script: str) -> None:
    """Run DDL on a connection of its own; `executescript` would commit a group's work."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        conn.executescript(script)
    finally:
        conn.close()


def _migrate(path: Path, migrations: Sequence[str]) -> None:
    """Apply the migrations this file has not seen yet (tracked in user_version)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        current = conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()
    for number, script in enumerate(migrations, start=1):
        if number > current:
            _run_script(path, f"BEGIN IMMEDIATE; {script}; PRAGMA user_version={number}; COMMIT;")


# JSON is stored as text and times as ISO strings.
_envelopes = partial(text_envelopes_of, json=orjson.loads)
_dead_letter = partial(dead_letter_of, json=orjson.loads, timestamp=str)


class SqliteEventStore:
    """The command DB on one SQLite file. Positions follow commit order, with no gaps:
    SQLite admits one writer at a time and positions are assigned inside its lock."""

    def __init__(self, path: Path, *, synchronous: str = "FULL") -> None:
        self._loop = asyncio.get_running_loop()
        # Resolved by the next commit, then replaced. Not a shared Event: a follower
        # that cleared it could swallow a commit another follower had not seen yet.
        self._next_append: asyncio.Future[None] = self._loop.create_future()
        _migrate(path, _EVENT_STORE_SCHEMA)
        self.db = Database(path, synchronous=synchronous, on_commit=self._notify)

    @classmethod
    def from_url(cls, url: str, *, synchronous: str = "FULL") -> SqliteEventStore:
        return cls(path_from_url(url), synchronous=synchronous)

    def _notify(self) -> None:
        self._loop.call_soon_threadsafe(self._appended)

    def _appended(self) -> None:
        done, self._next_append = self._next_append, self._loop.create_future()
        done.set_result(None)

    async def append(self, request: AppendRequest) -> CommandResult:
        result: CommandResult = await self.db.submit(_append_batch, request)
        return result

    async def read_stream(self, stream_id: str) -> list[Envelope]:
        def work(conn: sqlite3.Connection) -> list[Envelope]:
            return _envelopes(conn.execute(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = ? ORDER BY version",  # nosec B608 # fixed column lists and checked collection names; values are ? parameters
                (stream_id,),
            ).fetchall())

        return await self.db.read(work)

    async def read_all(self, after: int, limit: int) -> list[Envelope]:
        def work(conn: sqlite3.Connection) -> list[Envelope]:
            return _envelopes(conn.execute(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE position > ? "  # nosec B608 # fixed column lists and checked collection names; values are ? parameters
                "ORDER BY position LIMIT ?",
                (after, limit),
            ).fetchall())

        return await self.db.read(work)

    async def last_position(self) -> int:
        def work(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT max(position) FROM events").fetchone()
            return int(row[0] or 0)

        return await self.db.read(work)

    async def wait_for_append(self, after: int, timeout: float) -> None:
        # Taken before the read: a commit that lands while it runs resolves it.
        next_append = self._next_append
        if await self.last_position() > after:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(next_append), timeout)

    async def get_command(self, command_id: str) -> StoredCommand | None:
        def work(conn: sqlite3.Connection) -> StoredCommand | None:
            return _stored_command(conn, command_id)

        return await self.db.read(work)

    async def check(self) -> None:
        await self.db.read(lambda conn: conn.execute("SELECT 1 FROM events LIMIT 1").fetchall())

    async def close(self) -> None:
        await self.db.close()


def _stored_command(conn: sqlite3.Connection, command_id: str) -> StoredCommand | None:
    row = conn.execute(
        "SELECT command_hash, stream_id, version, position FROM commands WHERE command_id = ?",
        (command_id,),
    ).fetchone()
    if row is None:
        return None
    return StoredCommand(command_id, row[0], CommandResult(command_id, row[1], row[2], row[3]))


def _in_clause(count: int) -> str:
    return ",".join("?" * count)


def _append_batch(conn: sqlite3.Connection, requests: list[AppendRequest]) -> list[Any]:
    """Append many commands' events with a handful of statements for the whole group."""
    outcomes: list[Any] = []
    # A command id the handler generated (no hash) cannot have been seen before.
    command_ids = list({r.command_id for r in requests if r.command_hash})
    stored = {
        row[0]: row[1:]
        for row in conn.execute(
            "SELECT command_id, command_hash, stream_id, version, position FROM commands "  # nosec B608 # fixed column lists and checked collection names; values are ? parameters
            f"WHERE command_id IN ({_in_clause(len(command_ids))})",
            command_ids,
        )
    } if command_ids else {}
    stream_ids = list({r.stream_id for r in requests})
    heads: dict[str, int] = dict(
        conn.execute(
            "SELECT stream_id, max(version) FROM events "  # nosec B608 # fixed column lists and checked collection names; values are ? parameters
            f"WHERE stream_id IN ({_in_clause(len(stream_ids))}) GROUP BY stream_id",
            stream_ids,
        ).fetchall()
    )
    last = conn.execute("SELECT max(position) FROM events").fetchone()[0] or 0
    now = utc_now().isoformat()
    event_rows: list[tuple[Any, ...]] = []
    command_rows: list[tuple[Any, ...]] = []
    for request in requests:
        seen = stored.get(request.command_id)
        if seen is not None:
            if seen[0] != request.command_hash:
                outcomes.append(IdempotencyKeyReused(request.command_id))
            else:
                stream_id, version, position = seen[1:]
                outcomes.append(
                    CommandResult(request.command_id, stream_id, version, position, replayed=True)
                )
            continue
        current = heads.get(request.stream_id, 0)
        if current != request.expected_version:
            outcomes.append(
                ConcurrencyConflict(request.stream_id, request.expected_version, current)
            )
            continue
        metadata = _dumps(request.metadata)
        for event in request.events:
            current += 1
            last += 1
            event_rows.append((
                event.event_id, request.stream_id, request.stream_type, current, last,
                event.type, event.schema_version, _dumps(event.data), metadata, now,
            ))
        heads[request.stream_id] = current
        stored[request.command_id] = (request.command_hash, request.stream_id, current, last)
        command_rows.append(
            (request.command_id, request.command_hash, request.stream_id, current, last, now)
        )
        outcomes.append(CommandResult(request.command_id, request.stream_id, current, last))
    conn.executemany(
        f"INSERT INTO events ({EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # nosec B608 # fixed column lists and checked collection names; values are ? parameters
        event_rows,
    )
    conn.executemany(
        "INSERT INTO commands (command_id, command_hash, stream_id, version, position, "
        "recorded_at) VALUES (?, ?, ?, ?, ?, ?)",
        command_rows,
    )
    return outcomes


class SqliteRelayState:
    """The relay's position in the command DB; one leader per file, by an OS file lock.

    The lock dies with its process, so a standby relay takes over from a crashed one.
    """

    def __init__(self, store: SqliteEventStore, name: str = "relay", poll: float = 0.5):
        self.db = store.db
        self.name = name
        self.poll = poll
        self.lock_path = store.db.path.with_suffix(f".{name}.lock")

    async def position(self) -> int:
        def work(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT position FROM relay WHERE name = ?", (self.name,))
            found = row.fetchone()
            return int(found[0]) if found else 0

        return await self.db.read(work)

    async def save(self, position: int) -> None:
        await self.db.submit(_save_relay_positions, (self.name, position))

    @contextlib.asynccontextmanager
    async def lead(self) -> AsyncIterator[None]:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(self.poll)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock


def _save_relay_positions(conn: sqlite3.Connection, items: list[tuple[str, int]]) -> list[Any]:
    # max(): a deposed leader finishing late never moves the position back.
    conn.executemany(
        "INSERT INTO relay (name, position) VALUES (?, ?) ON CONFLICT (name) "
        "DO UPDATE SET position = max(position, excluded.position)",
        items,
    )
    return [None] * len(items)


# ----------------------------------------------------------------- view store

_VIEW_STORE_SCHEMA = [
    """
    CREATE TABLE IF NOT EXISTS checkpoints (
        projection TEXT NOT NULL,
        partition INTEGER NOT NULL,
        position INTEGER NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (projection, partition)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        projection TEXT NOT NULL,
        partition INTEGER NOT NULL,
        stream_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        envelope TEXT NOT NULL,
        error TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        is_cause INTEGER NOT NULL,
        parked_at TEXT NOT NULL,
        UNIQUE (projection, position)
    );
    CREATE INDEX IF NOT EXISTS dead_letters_by_stream
        ON dead_letters (projection, stream_id, position);
    """,
    """
    CREATE TABLE IF NOT EXISTS lease_owners (
        owner TEXT PRIMARY KEY,
        seen_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS leases (
        partition INTEGER PRIMARY KEY,
        owner TEXT NOT NULL,
        expires_at REAL NOT NULL
    );
    """,
]


# Leases compare wall-clock times of the processes sharing the file: one machine.
def _heartbeat(owner: str, ttl: float, conn: sqlite3.Connection) -> list[str]:
    now = time.time()
    conn.execute(
        "INSERT INTO lease_owners (owner, seen_at) VALUES (?, ?) "
        "ON CONFLICT (owner) DO UPDATE SET seen_at = excluded.seen_at",
        (owner, now),
    )
    # Owners gone for long are forgotten; the recent ones are the live ones.
    conn.execute("DELETE FROM lease_owners WHERE seen_at < ?", (now - 10 * ttl,))
    rows = conn.execute(
        "SELECT owner FROM lease_owners WHERE seen_at > ? ORDER BY owner", (now - ttl,)
    )
    return [row[0] for row in rows]


def _claim(
    owner: str, wanted: int, partitions: int, ttl: float, conn: sqlite3.Connection
) -> set[int]:
    now = time.time()
    rows = conn.execute("SELECT partition, owner, expires_at FROM leases")
    keep, release = plan_claim(owner, wanted, partitions, {r[0]: (r[1], r[2]) for r in rows}, now)
    conn.executemany(
        "DELETE FROM leases WHERE partition = ? AND owner = ?", [(p, owner) for p in release]
    )
    conn.executemany(
        "INSERT INTO leases (partition, owner, expires_at) VALUES (?, ?, ?) "
        "ON CONFLICT (partition) DO UPDATE SET owner = excluded.owner, "
        "expires_at = excluded.expires_at",
        [(p, owner, now + ttl) for p in sorted(keep)],
    )
    return keep


def _release(owner: str, conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM leases WHERE owner = ?", (owner,))
    conn.execute("DELETE FROM lease_owners WHERE owner = ?", (owner,))

def _table(collection: str) -> str:
    return f'"view_{collection}"'


def _json_path(field: str, value: Any = None) -> str:
    return "$." + ".".join(filter_path(field, value))


class SqliteUnitOfWork(BufferedUnitOfWork):
    def __init__(self, conn: sqlite3.Connection, known: set[str]) -> None:
        super().__init__(known)
        self.conn = conn

    def load(self, collection: str, doc_ids: list[str]) -> dict[str, dict[str, Any]]:
        rows = self.conn.execute(
            f"SELECT id, doc FROM {_table(collection)} WHERE id IN ({_in_clause(len(doc_ids))})",  # nosec B608 # fixed column lists and checked collection names; values are ? parameters
            doc_ids,
        )
        return {row[0]: orjson.loads(row[1]) for row in rows}

    def load_checkpoint(self, projection: str, partition: int) -> int:
        row = self.conn.execute(
            "SELECT position FROM checkpoints WHERE projection = ? AND partition = ?",
            (projection, partition),
        ).fetchone()
        return int(row[0]) if row else 0

    def load_parked_streams(self, projection: str) -> set[str]:
        rows = self.conn.execute(
            "SELECT DISTINCT stream_id FROM dead_letters WHERE projection = ?", (projection,)
        )
        return {row[0] for row in rows}

    def load_dead_letters(self, projection: str, stream_id: str) -> list[DeadLetter]:
        rows = self.conn.execute(
            f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters "  # nosec B608 # fixed column lists and checked collection names; values are ? parameters
            "WHERE projection = ? AND stream_id = ? ORDER BY position",
            (projection, stream_id),
        ).fetchall()
        return [_dead_letter(row) for row in rows]

    def flush(self) -> None:
        conn = self.conn
        for collection in self.cleared:
            conn.execute(f"DELETE FROM {_table(collection)}")  # nosec B608 # fixed column lists and checked collection names; values are ? parameters
        upserts, deletes = self.changes()
        for collection, docs in upserts.items():
            conn.executemany(
                f"INSERT INTO {_table(collection)} (id, doc) VALUES (?, ?) "  # nosec B608 # fixed column lists and checked collection names; values are ? parameters
                "ON CONFLICT (id) DO UPDATE SET doc = excluded.doc",
                [(doc_id, _dumps(doc)) for doc_id, doc in docs],
            )
        for collection, doc_ids in deletes.items():
            conn.executemany(
                f"DELETE FROM {_table(collection)} WHERE id = ?", [(i,) for i in doc_ids]  # nosec B608 # fixed column lists and checked collection names; values are ? parameters
            )
        if self.removed:
            conn.executemany(
                "DELETE FROM dead_letters WHERE id = ?", [(i,) for i in self.removed]
            )
        if self.failures:
            conn.executemany(
                "UPDATE dead_letters SET error = ?, attempts = attempts + 1, is_cause = 1 "
                "WHERE id = ?",
                self.failures,
            )
        if self.parked:
            conn.executemany(
                "INSERT INTO dead_letters (projection, partition, stream_id, position, "
                "envelope, error, attempts, is_cause, parked_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (p, part, e.stream_id, e.position, _dumps(e.to_dict()), err, n, int(c), at)
                    for p, part, e, err, n, c, at in self.parked
                ],
            )
        if self.checkpoints:
            now = utc_now().isoformat()
            conn.executemany(
                "INSERT INTO checkpoints (projection, partition, position, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (projection, partition) "
                "DO UPDATE SET position = excluded.position, updated_at = excluded.updated_at",
                [(p, part, pos, now) for (p, part), pos in self.checkpoints.items()],
            )


class SqliteViewStore:
    """The query DB on one SQLite file: one table of JSON documents per collection."""

    def __init__(self, path: Path, *, synchronous: str = "FULL") -> None:
        _migrate(path, _VIEW_STORE_SCHEMA)
        self.db = Database(path, synchronous=synchronous)
        self.collections: dict[str, Collection] = {}

    @classmethod
    def from_url(cls, url: str, *, synchronous: str = "FULL") -> SqliteViewStore:
        return cls(path_from_url(url), synchronous=synchronous)

    async def setup(self, collections: Sequence[Collection]) -> None:
        statements = []
        for collection in collections:
            self.collections[collection.name] = collection
            table = _table(collection.name)
            statements.append(
                f"CREATE TABLE IF NOT EXISTS {table} (id TEXT PRIMARY KEY, doc TEXT NOT NULL) "
                "WITHOUT ROWID;"
            )
            for field in collection.indexed:
                path = _json_path(field)
                index = f'"ix_{collection.name}_{field.replace(".", "_")}"'
                statements.append(
                    f"CREATE INDEX IF NOT EXISTS {index} ON {table} "
                    f"(json_extract(doc, '{path}'), id);"
                )
        script = "\n".join(statements)
        await asyncio.to_thread(_run_script, self.db.path, f"BEGIN IMMEDIATE; {script} COMMIT;")

    async def run(self, work: Callable[[SqliteUnitOfWork], T]) -> T:
        result: T = await self.db.submit(self._run_units, work)
        return result

    def _run_units(
        self, conn: sqlite3.Connection, works: list[Callable[[SqliteUnitOfWork], Any]]
    ) -> list[Any]:
        outcomes: list[Any] = []
        known = set(self.collections)  # read only: one copy serves the group
        for work in works:
            uow = SqliteUnitOfWork(conn, known)
            try:
                result = work(uow)
            except Exception as error:
                # Nothing was written yet: the unit of work buffers until flush.
                outcomes.append(error)
                continue
            uow.flush()
            outcomes.append(result)
        return outcomes

    async def get(self, collection: str, doc_id: str) -> dict[str, Any] | None:
        self._known(collection)

        def work(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute(
                f"SELECT doc FROM {_table(collection)} WHERE id = ?", (doc_id,)  # nosec B608 # fixed column lists and checked collection names; values are ? parameters
            ).fetchone()
            return orjson.loads(row[0]) if row else None

        return await self.db.read(work)

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
        indexed = set(self._known(collection).indexed)
        clauses: list[str] = []
        params: list[Any] = []
        for field, value in filters.items():
            path = _json_path(field, value)
            # A literal path (validated above) lets SQLite use the expression index.
            literal = field in indexed
            extract = f"json_extract(doc, '{path}')" if literal else "json_extract(doc, ?)"
            json_type = f"json_type(doc, '{path}')" if literal else "json_type(doc, ?)"
            if value is None:
                # An explicit null only, as on every store; a missing field is no match.
                clauses.append(f"{json_type} = 'null'")
                params += [] if literal else [path]
            elif isinstance(value, bool):
                # json_extract gives 1/0 for true/false: compare the JSON type instead.
                clauses.append(f"{json_type} = ?")
                params += ([] if literal else [path]) + ["true" if value else "false"]
            elif isinstance(value, (int, float)):
                clauses.append(f"{extract} = ? AND {json_type} IN ('integer', 'real')")
                params += ([] if literal else [path]) + [value] + ([] if literal else [path])
            else:
                clauses.append(f"{extract} = ?")
                params += ([] if literal else [path]) + [value]
        if after is not None:
            clauses.append("id < ?" if descending else "id > ?")
            params.append(decode_cursor(after))
        if id_range is not None:
            # A range on the primary key: a tenant's documents without a scan.
            clauses.append("id >= ? AND id < ?")
            params += list(id_range)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        params.append(limit + 1)
        order = "DESC" if descending else "ASC"
        sql = f"SELECT id, doc FROM {_table(collection)} {where} ORDER BY id {order} LIMIT ?"  # nosec B608 # fixed column lists and checked collection names; values are ? parameters

        def work(conn: sqlite3.Connection) -> Page:
            rows, cursor = page_rows(conn.execute(sql, params).fetchall(), limit, itemgetter(0))
            return Page([orjson.loads(row[1]) for row in rows], cursor)

        return await self.db.read(work)

    def _known(self, collection: str) -> Collection:
        return known_collection(self.collections, collection)

    async def checkpoints(self) -> dict[tuple[str, int], int]:
        def work(conn: sqlite3.Connection) -> dict[tuple[str, int], int]:
            rows = conn.execute("SELECT projection, partition, position FROM checkpoints")
            return {(row[0], row[1]): row[2] for row in rows}

        return await self.db.read(work)

    async def list_dead_letters(self, projection: str | None = None) -> list[DeadLetter]:
        def work(conn: sqlite3.Connection) -> list[DeadLetter]:
            sql = f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters"  # nosec B608 # fixed column lists and checked collection names; values are ? parameters
            if projection is None:
                rows = conn.execute(sql + " ORDER BY projection, position").fetchall()
            else:
                rows = conn.execute(
                    sql + " WHERE projection = ? ORDER BY position", (projection,)
                ).fetchall()
            return [_dead_letter(row) for row in rows]

        return await self.db.read(work)

    async def get_dead_letter(self, dead_letter_id: int) -> DeadLetter | None:
        def work(conn: sqlite3.Connection) -> DeadLetter | None:
            row = conn.execute(
                f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE id = ?",  # nosec B608 # fixed column lists and checked collection names; values are ? parameters
                (dead_letter_id,),
            ).fetchone()
            return _dead_letter(row) if row else None

        return await self.db.read(work)

    async def check(self) -> None:
        await self.db.read(lambda c: c.execute("SELECT 1 FROM checkpoints LIMIT 1").fetchall())

    async def heartbeat(self, owner: str, ttl: float) -> list[str]:
        live: list[str] = await self.db.submit(run_each, partial(_heartbeat, owner, ttl))
        return live

    async def claim_partitions(
        self, owner: str, wanted: int, partitions: int, ttl: float
    ) -> set[int]:
        work = partial(_claim, owner, wanted, partitions, ttl)
        held: set[int] = await self.db.submit(run_each, work)
        return held

    async def release_partitions(self, owner: str) -> None:
        await self.db.submit(run_each, partial(_release, owner))

    async def leases(self) -> dict[int, str]:
        def work(conn: sqlite3.Connection) -> dict[int, str]:
            rows = conn.execute(
                "SELECT partition, owner FROM leases WHERE expires_at > ? ORDER BY partition",
                (time.time(),),
            )
            return {row[0]: row[1] for row in rows}

        return await self.db.read(work)

    async def close(self) -> None:
        await self.db.close()
