"""eventsourcing: cqrskit's append next to the `eventsourcing` library's, in the same run.

The same workload in both: a new aggregate with one event (its creation), about 300
bytes of JSON data each, N of them, from 1 and from 8 clients, on the same engine.
- `eventsourcing` (9.5, the `bench` extra) is synchronous: its clients are threads
  sharing one `Application`, each calling `app.save(Record(data))` one at a time.
  SQLite: its `eventsourcing.sqlite` module, a file in the work directory, WAL (its
  default) with `synchronous=NORMAL` set on each connection it opens (it has no
  setting for that; the benchmark wraps its connection factory). PostgreSQL: its
  `eventsourcing.postgres` module (psycopg 3), in a schema of its own, dropped after.
- cqrskit: `CommandHandler.handle(InsertRecord)` from 1 and 8 coroutines, exactly as
  the `append` (SQLite, NORMAL) and `append_postgres` workloads measure it.
Each cqrskit case has the eventsourcing case with the same engine and clients as its
baseline, so the ratio is how many times faster cqrskit is. The PostgreSQL cases are
skipped, with the reason printed, when psycopg is missing or the server is unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate
from eventsourcing.sqlite import SQLiteConnection, SQLiteConnectionPool

from benchmarks import append
from benchmarks.common import Measurement, Size, payload

NAME = "eventsourcing"
CLIENTS = (1, 8)
SQLITE = "SQLite NORMAL"
POSTGRES = "PostgreSQL"

_PAYLOADS = [payload(i) for i in range(256)]


def peer_case(clients: int, engine: str) -> str:
    return f"eventsourcing · insert · {clients} client{'s' if clients > 1 else ''} · {engine}"


def cqrskit_case(clients: int, engine: str) -> str:
    return f"cqrskit · insert · {clients} client{'s' if clients > 1 else ''} · {engine}"


class Record(Aggregate):
    """A record with one event: `Record.Created`, carrying the data."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data


def _saves_per_second(app: Application[UUID], clients: int, count: int) -> float:
    """Create `count` Records from `clients` threads, each saving one at a time."""
    for i in range(min(100, count)):  # warm up (imports, statement caches, connections)
        app.save(Record(_PAYLOADS[i % len(_PAYLOADS)]))
    per_client = count // clients

    def client(k: int) -> None:
        save = app.save
        for i in range(per_client):
            save(Record(_PAYLOADS[(k + i) % len(_PAYLOADS)]))

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return per_client * clients / (time.perf_counter() - started)


@contextlib.contextmanager
def _sqlite_synchronous(mode: str) -> Iterator[None]:
    """Make every connection eventsourcing's SQLite pool opens use `synchronous=mode`."""
    original = SQLiteConnectionPool._create_connection

    def create(pool: SQLiteConnectionPool) -> SQLiteConnection:
        connection = original(pool)
        connection._sqlite_conn.execute(f"PRAGMA synchronous={mode}")
        return connection

    with mock.patch.object(SQLiteConnectionPool, "_create_connection", create):
        yield


def _peer_sqlite(path: Path, clients: int, count: int) -> float:
    with _sqlite_synchronous("NORMAL"):
        app: Application[UUID] = Application(env={
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(path),
            "SQLITE_LOCK_TIMEOUT": "30",
        })
        try:
            return _saves_per_second(app, clients, count)
        finally:
            app.close()


def _peer_postgres(dsn: str, clients: int, count: int) -> float:
    import psycopg

    from benchmarks.services import drop_schemas

    url = urlsplit(dsn)
    schema = f"eventsourcing_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        app: Application[UUID] = Application(env={
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": url.path.lstrip("/") or "postgres",
            "POSTGRES_HOST": url.hostname or "127.0.0.1",
            "POSTGRES_PORT": str(url.port or 5432),
            "POSTGRES_USER": url.username or "postgres",
            "POSTGRES_PASSWORD": url.password or "",
            "POSTGRES_SCHEMA": schema,
            "POSTGRES_POOL_SIZE": str(max(clients, 2)),
        })
        try:
            return _saves_per_second(app, clients, count)
        finally:
            app.close()
    finally:
        drop_schemas(schema)


def _postgres_unavailable() -> str | None:
    """Why the PostgreSQL cases cannot run, or None if they can."""
    try:
        import psycopg  # noqa: F401

        from benchmarks.services import POSTGRES_DSN, reachable
    except ImportError as error:
        return f"{error.name} is not installed (pip install -e '.[dev]')"
    url = urlsplit(POSTGRES_DSN)
    host, port = url.hostname or "127.0.0.1", url.port or 5432
    if not reachable(host, port):
        return f"PostgreSQL is not reachable at {host}:{port} (CQRSKIT_BENCH_POSTGRES)"
    return None


def run(size: Size, workdir: Path) -> list[Measurement]:
    count = size.append_commands
    results: list[Measurement] = []
    for clients in CLIENTS:
        path = workdir / f"eventsourcing-{clients}.db"
        rate = _peer_sqlite(path, clients, count)
        append._remove(path)
        results.append(Measurement(NAME, peer_case(clients, SQLITE), rate, "cmd/s"))
        directory = workdir / f"cqrskit-{clients}"
        rate = asyncio.run(append._measure(directory, "insert", clients, "NORMAL", size))
        shutil.rmtree(directory)
        results.append(Measurement(NAME, cqrskit_case(clients, SQLITE), rate, "cmd/s",
                                   baseline=peer_case(clients, SQLITE)))
    reason = _postgres_unavailable()
    if reason is not None:
        print(f"  eventsourcing: skipping the PostgreSQL cases: {reason}", file=sys.stderr)
        return results
    from benchmarks import append_postgres
    from benchmarks.services import POSTGRES_DSN

    for clients in CLIENTS:
        rate = _peer_postgres(POSTGRES_DSN, clients, count)
        results.append(Measurement(NAME, peer_case(clients, POSTGRES), rate, "cmd/s"))
        rate = asyncio.run(append_postgres._measure(clients, size))
        results.append(Measurement(NAME, cqrskit_case(clients, POSTGRES), rate, "cmd/s",
                                   baseline=peer_case(clients, POSTGRES)))
    return results
