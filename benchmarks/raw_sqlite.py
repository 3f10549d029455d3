"""Baselines: what the stdlib sqlite3 driver does on this machine with no library on top.

Rows are `(id, doc)` with a time-ordered UUID and the same ~300-byte JSON the
workloads send, in WAL mode with the synchronous setting of the case compared.
The rows are built before the clock starts: only SQLite work is timed.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import orjson
import uuid_utils

from benchmarks.common import payload


def _rows(count: int) -> list[tuple[str, str]]:
    return [(str(uuid_utils.uuid7()), orjson.dumps(payload(i)).decode()) for i in range(count)]


def insert_rate(path: Path, *, rows: int, per_transaction: int, synchronous: str) -> float:
    """Rows per second inserted into a fresh `(id TEXT PRIMARY KEY, doc TEXT) WITHOUT ROWID`
    table, committing every `per_transaction` rows."""
    data = _rows(rows)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("CREATE TABLE docs (id TEXT PRIMARY KEY, doc TEXT NOT NULL) WITHOUT ROWID")
        insert = "INSERT INTO docs (id, doc) VALUES (?, ?)"
        start = time.perf_counter()
        if per_transaction == 1:
            for row in data:
                conn.execute("BEGIN")
                conn.execute(insert, row)
                conn.execute("COMMIT")
        else:
            for first in range(0, rows, per_transaction):
                conn.execute("BEGIN")
                conn.executemany(insert, data[first : first + per_transaction])
                conn.execute("COMMIT")
        elapsed = time.perf_counter() - start
    finally:
        conn.close()
    return rows / elapsed
