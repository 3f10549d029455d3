"""append: commands per second through the library API (CommandHandler) on SQLite.

Cases: InsertRecord (a new aggregate each) and UpdateRecord (existing aggregates,
already in the handler's aggregate cache), with 1 and 8 concurrent clients, at
`sqlite_synchronous` FULL (the default) and NORMAL. Each client awaits one
command at a time; the clients share one event loop, as requests do in a server.

Baselines, in the same run and with the same synchronous setting: raw sqlite3
committing one row per transaction (what one client's command at a time could
at best do) and 1000 rows per transaction (the ceiling group commit can approach).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Literal

from benchmarks import raw_sqlite
from benchmarks.common import Measurement, Size, payload
from cqrskit.bootstrap import Runtime, open_runtime
from cqrskit.config import Settings
from cqrskit.domains.records import InsertRecord, UpdateRecord

NAME = "append"
SYNCHRONOUS = ("FULL", "NORMAL")
CLIENTS = (1, 8)
Kind = Literal["insert", "update"]
KINDS: tuple[Kind, ...] = ("insert", "update")

_PAYLOADS = [payload(i) for i in range(256)]


def per_row_case(synchronous: str) -> str:
    return f"raw sqlite3 · 1 row/tx · {synchronous}"


def batch_case(synchronous: str) -> str:
    return f"raw sqlite3 · 1000 rows/tx · {synchronous}"


def case_name(kind: Kind, clients: int, synchronous: str) -> str:
    noun = "client" if clients == 1 else "clients"
    return f"{kind} · {clients} {noun} · {synchronous}"


async def insert_records(rt: Runtime, count: int, clients: int) -> list[str]:
    """Create `count` records with `clients` concurrent clients; return their ids."""
    ids: list[str] = []

    async def client(share: int) -> None:
        for i in range(share):
            result = await rt.commands.handle(InsertRecord(data=_PAYLOADS[i % len(_PAYLOADS)]))
            ids.append(result.stream_id)

    shares = [count // clients + (k < count % clients) for k in range(clients)]
    await asyncio.gather(*(client(share) for share in shares))
    return ids


async def commands_per_second(
    rt: Runtime, kind: Kind, clients: int, commands: int, ids: list[str]
) -> float:
    """Time `commands` commands from `clients` clients; updates go round-robin over `ids`
    so that no two clients touch the same aggregate (no conflicts, no retries)."""
    per_client = commands // clients

    async def client(k: int) -> None:
        handle = rt.commands.handle
        for i in range(per_client):
            data = _PAYLOADS[(k + i) % len(_PAYLOADS)]
            if kind == "insert":
                await handle(InsertRecord(data=data))
            else:
                await handle(UpdateRecord(id=ids[(k + i * clients) % len(ids)], data=data))

    start = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    return per_client * clients / (time.perf_counter() - start)


async def _measure(
    directory: Path, kind: Kind, clients: int, synchronous: str, size: Size
) -> float:
    rt = await open_runtime(Settings(data_dir=directory, sqlite_synchronous=synchronous))
    try:
        # Warm up (imports, pydantic, SQLite caches); for updates, create the aggregates
        # and leave them in the aggregate cache, as a busy server would have them.
        warm = size.append_streams if kind == "update" else min(100, size.append_commands)
        ids = await insert_records(rt, warm, clients=8)
        return await commands_per_second(rt, kind, clients, size.append_commands, ids)
    finally:
        await rt.close()


def run(size: Size, workdir: Path) -> list[Measurement]:
    results: list[Measurement] = []
    for synchronous in SYNCHRONOUS:
        per_row, batch = per_row_case(synchronous), batch_case(synchronous)
        for case, rows, per_tx in (
            (per_row, size.append_commands, 1),
            (batch, size.batch_baseline_rows, 1000),
        ):
            path = workdir / "raw.db"
            rate = raw_sqlite.insert_rate(
                path, rows=rows, per_transaction=per_tx, synchronous=synchronous
            )
            _remove(path)
            results.append(Measurement(NAME, case, rate, "rows/s"))
        for kind in KINDS:
            for clients in CLIENTS:
                directory = workdir / f"{kind}-{clients}-{synchronous}"
                rate = asyncio.run(_measure(directory, kind, clients, synchronous, size))
                shutil.rmtree(directory)
                # One client commits one command at a time: compare with one row per
                # transaction. Concurrent clients are group-committed: compare with batches.
                baseline = per_row if clients == 1 else batch
                results.append(
                    Measurement(NAME, case_name(kind, clients, synchronous), rate, "cmd/s",
                                baseline=baseline)
                )
    return results


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
