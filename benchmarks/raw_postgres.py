"""Baselines: what psycopg does against this PostgreSQL with no library on top.

Rows are `(id, doc)` with a time-ordered UUID and the same ~300-byte JSON the
workloads send, into `(id text PRIMARY KEY, doc jsonb NOT NULL)`, a fresh table in
a schema of its own. The rows are built before the clock starts.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import psycopg
import uuid_utils

from benchmarks.common import payload
from benchmarks.services import POSTGRES_DSN, postgres_schemas

_CREATE = "CREATE TABLE {s}.docs (id text PRIMARY KEY, doc jsonb NOT NULL)"
_INSERT = "INSERT INTO {s}.docs (id, doc) VALUES (%s, %s::jsonb)"


def _rows(count: int) -> list[tuple[str, str]]:
    return [(str(uuid_utils.uuid7()), orjson.dumps(payload(i)).decode()) for i in range(count)]


def _schema_of(url: str) -> str:
    return url.rpartition("schema=")[2]


def _create(schema: str) -> None:
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(_CREATE.format(s=schema))


async def per_row_rate(rows: int, connections: int) -> float:
    """Rows/s with `connections` async connections, each committing one row per
    transaction (autocommit: one round trip per row)."""
    data = _rows(rows)
    with postgres_schemas(1, "cqrskit_bench_raw") as (url,):
        schema = _schema_of(url)
        _create(schema)
        conns = [await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True)
                 for _ in range(connections)]
        try:
            insert = _INSERT.format(s=schema)

            async def writer(
                conn: psycopg.AsyncConnection[object], share: list[tuple[str, str]]
            ) -> None:
                for row in share:
                    await conn.execute(insert, row)

            start = time.perf_counter()
            await asyncio.gather(*(writer(c, data[k::connections]) for k, c in enumerate(conns)))
            elapsed = time.perf_counter() - start
        finally:
            for conn in conns:
                await conn.close()
    return rows / elapsed


def batch_rate(rows: int, per_transaction: int = 1000) -> float:
    """Rows/s from one connection, `executemany` of `per_transaction` rows per transaction."""
    data = _rows(rows)
    with postgres_schemas(1, "cqrskit_bench_raw") as (url,):
        schema = _schema_of(url)
        _create(schema)
        insert = _INSERT.format(s=schema)
        with psycopg.connect(POSTGRES_DSN) as conn:
            start = time.perf_counter()
            for first in range(0, rows, per_transaction):
                with conn.cursor() as cur:
                    cur.executemany(insert, data[first : first + per_transaction])
                conn.commit()
            elapsed = time.perf_counter() - start
    return rows / elapsed
