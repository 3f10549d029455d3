"""append_postgres: commands per second through CommandHandler on PostgreSQL.

InsertRecord (a new aggregate each) with 1, 8 and 64 concurrent clients, the
clients being coroutines in one event loop that each await one command at a time
(as requests do in a server). The command DB and query DB are PostgreSQL, each in
a fresh schema of its own (dropped afterwards); the update processor is not
running, as in the SQLite `append` workload.

Baselines, in the same run, psycopg with no library on top inserting the same
~300-byte JSON rows: one row per transaction from 1 and from 8 connections (what
one command at a time could at best do), and `executemany` of 1000 rows per
transaction (the ceiling group commit can approach). 1 client is compared with
1 connection, 8 clients with 8 connections, 64 clients with `executemany`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from benchmarks import raw_postgres
from benchmarks.append import commands_per_second, insert_records
from benchmarks.common import Measurement, Size
from benchmarks.services import postgres_schemas
from cqrskit.bootstrap import open_runtime
from cqrskit.config import Settings

NAME = "append_postgres"
CLIENTS = (1, 8, 64)
PER_ROW_1 = "raw psycopg · 1 row/tx · 1 connection"
PER_ROW_8 = "raw psycopg · 1 row/tx · 8 connections"
BATCH = "raw psycopg · executemany 1000 rows/tx"
BASELINES = {1: PER_ROW_1, 8: PER_ROW_8, 64: BATCH}


def case_name(clients: int) -> str:
    return f"insert · {clients} client{'s' if clients > 1 else ''}"


async def _measure(clients: int, size: Size) -> float:
    with postgres_schemas(2) as (command_db, query_db):
        rt = await open_runtime(Settings(command_db=command_db, query_db=query_db))
        try:
            await insert_records(rt, min(200, size.append_commands), clients=8)  # warm up
            return await commands_per_second(rt, "insert", clients, size.append_commands, [])
        finally:
            await rt.close()


def run(size: Size, workdir: Path) -> list[Measurement]:
    del workdir  # everything lives in PostgreSQL
    results = [
        Measurement(NAME, PER_ROW_1, asyncio.run(
            raw_postgres.per_row_rate(max(200, size.append_commands // 4), 1)), "rows/s"),
        Measurement(NAME, PER_ROW_8, asyncio.run(
            raw_postgres.per_row_rate(size.append_commands, 8)), "rows/s"),
        Measurement(NAME, BATCH, raw_postgres.batch_rate(size.batch_baseline_rows), "rows/s"),
    ]
    for clients in CLIENTS:
        rate = asyncio.run(_measure(clients, size))
        results.append(Measurement(NAME, case_name(clients), rate, "cmd/s",
                                   baseline=BASELINES[clients]))
    # The yardstick for 8 clients is the batched ceiling as well.
    eight = results[-2].value
    results.append(Measurement(NAME, "insert · 8 clients (vs executemany)", eight, "cmd/s",
                               baseline=BATCH))
    return results
