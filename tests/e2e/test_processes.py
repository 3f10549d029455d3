"""The distributed topology as real OS processes on PostgreSQL and NATS JetStream.

`cqrskit up --distributed` starts and stops every role; and with the roles
started one by one, killing one of two update processors (SIGKILL, mid-load)
hands its partitions to the other, and the views end equal to a replay of the
event log: nothing lost, nothing doubled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .harness import _DIE_WITH_PARENT, CQRSKIT, child_env, free_port, run_cli, wait_until

NATS_HOST, NATS_PORT = "127.0.0.1", 4222
PARTITIONS = 8


class Topology:
    """Environment for one test's processes: its own schema and NATS stream."""

    def __init__(self, dsn: str, url: str, log_dir: Path) -> None:
        tag = uuid.uuid4().hex[:10]
        self.dsn = dsn
        self.schema = url.split("schema=")[1]
        self.stream = f"CQRSKIT_T_{tag}"
        self.port = free_port()
        self.log_dir = log_dir
        self.env = {
            "CQRSKIT_COMMAND_DB": url,
            "CQRSKIT_QUERY_DB": url,
            "CQRSKIT_STREAM": (
                f"nats://{NATS_HOST}:{NATS_PORT}?stream={self.stream}"
                f"&subject=cqrskit_t_{tag}.events&partitions={PARTITIONS}"
            ),
            "CQRSKIT_HOST": "127.0.0.1",
            "CQRSKIT_PORT": str(self.port),
            "CQRSKIT_LEASE_TTL": "2",
            "CQRSKIT_LEASE_HEARTBEAT": "0.3",
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        name = "-".join(args).replace("--", "")
        log = (self.log_dir / f"{name}-{len(self.procs)}.log").open("ab")
        proc = subprocess.Popen(
            [CQRSKIT, *args], env=child_env(self.env), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=_DIE_WITH_PARENT,
        )
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:])
            for path in sorted(self.log_dir.glob("*.log"))
        )

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            try:
                with self.client() as client:
                    return client.get("/readyz").status_code == 200
            except httpx.TransportError:
                return False

        try:
            wait_until(ready, timeout=timeout, interval=0.2, what="the API's /readyz")
        except AssertionError:
            raise AssertionError(self.logs()) from None

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(statement.replace("{s}", self.schema)).fetchall()

    def leases(self) -> dict[int, str]:
        return dict(self.sql(  # type: ignore[arg-type]
            "SELECT partition, owner FROM {s}.leases "
            "WHERE expires_at > extract(epoch FROM clock_timestamp())"
        ))

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(Exception):
            asyncio.run(_delete_stream(self.stream))


async def _delete_stream(name: str) -> None:
    import nats

    client = await nats.connect(f"nats://{NATS_HOST}:{NATS_PORT}", allow_reconnect=False)
    try:
        await client.jetstream().delete_stream(name)
    finally:
        await client.close()


@pytest.fixture
def topology(
    postgres_dsn: str, postgres_schemas: Callable[..., str], require_service: Any,
    tmp_path: Path,
) -> Iterator[Topology]:
    """Processes in a schema and NATS stream of their own; stopped, then both dropped."""
    pytest.importorskip("nats", reason="install the nats extra: pip install -e '.[dev]'")
    require_service("NATS JetStream", NATS_HOST, NATS_PORT, start="nats-server -js")
    topo = Topology(postgres_dsn, postgres_schemas(), tmp_path)
    try:
        yield topo
    finally:
        topo.close()


def test_up_refuses_sqlite_with_the_embedded_stream(tmp_path: Path) -> None:
    result = run_cli("up", "--distributed", env={"CQRSKIT_DATA_DIR": str(tmp_path)})
    assert result.returncode != 0
    assert "cqrskit serve" in result.stderr and "postgresql://" in result.stderr


def test_up_distributed_runs_every_role_and_stops_them_on_sigterm(topology: Topology) -> None:
    up = topology.start("up", "--distributed", "--port", str(topology.port))
    topology.wait_ready()
    leases = wait_until(
        lambda: (lambda held: held if len(held) == PARTITIONS
                 and sorted(Counter(held.values()).values()) == [4, 4] else None)(
            topology.leases()),
        timeout=30, interval=0.2, what="two update processors with four partitions each",
    )
    assert len(set(leases.values())) == 2
    listing = run_cli("leases", env=topology.env)
    assert listing.returncode == 0, listing.stderr
    assert all(owner in listing.stdout for owner in leases.values())
    with topology.client() as client:
        answer = client.post("/api/command/insert", json={"id": "up-1", "data": {"n": 1}})
        assert answer.status_code in (200, 201, 202), answer.text
        token = answer.json()["consistency_token"]
        got = client.get("/api/query/get", params={"id": "up-1"},
                         headers={"X-Consistency-Token": token})
        assert got.status_code == 200 and got.headers["X-Consistency"] == "fresh"

    up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=40) == 0, topology.logs()
    # Every child stopped cleanly: the update processors released their leases.
    assert topology.sql("SELECT count(*) FROM {s}.leases") == [(0,)]
    assert "topology stopped" in topology.logs()


async def _load(
    port: int, prefix: str, count: int, accepted: list[str], halfway: asyncio.Event
) -> None:
    """Insert `count` records from 8 concurrent clients; remember the accepted ids."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(count):
        queue.put_nowait(n)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            rid = f"{prefix}-{queue.get_nowait()}"
            answer = await client.post("/api/command/insert", json={"id": rid, "data": {}})
            assert answer.status_code < 300, answer.text
            accepted.append(rid)
            if len(accepted) >= count // 3:
                halfway.set()

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(8)))


def test_a_killed_update_processor_hands_its_partitions_over(topology: Topology) -> None:
    topology.start("relay")
    topology.start("api")
    first = topology.start("update-processor")
    second = topology.start("update-processor")
    topology.wait_ready()
    wait_until(
        lambda: len(topology.leases()) == PARTITIONS
        and sorted(Counter(topology.leases().values()).values()) == [4, 4],
        timeout=30, interval=0.2, what="two update processors with four partitions each",
    )
    owners = set(topology.leases().values())
    first_owner = next(o for o in owners if o.split(":")[1] == str(first.pid))

    accepted: list[str] = []

    async def load_and_kill() -> None:
        halfway = asyncio.Event()
        loading = asyncio.create_task(_load(topology.port, "k", 1500, accepted, halfway))
        await halfway.wait()
        os.kill(first.pid, signal.SIGKILL)  # mid-load: no shutdown code runs
        await loading

    asyncio.run(load_and_kill())
    first.wait()

    # The dead process's leases expire (ttl 2s) and the survivor takes all eight.
    survivor = wait_until(
        lambda: (lambda held: set(held.values()) if len(held) == PARTITIONS
                 and first_owner not in held.values() else None)(topology.leases()),
        timeout=30, interval=0.2, what="the survivor to own every partition",
    )
    assert len(survivor) == 1 and second.poll() is None

    events = topology.sql("SELECT count(*) FROM {s}.events")[0][0]
    assert events == len(accepted) == 1500

    def caught_up() -> bool:
        totals = topology.sql("SELECT doc FROM {s}.view_stats_totals WHERE id = 'all'")
        return bool(totals) and totals[0][0]["total"] >= events

    wait_until(caught_up, timeout=60, interval=0.3, what="the views to catch up")
    # The views equal a replay of the log: every record once, the statistics
    # counting each event once, no dead letters.
    streams = dict(topology.sql("SELECT stream_id, max(version) FROM {s}.events GROUP BY 1"))
    records = dict(topology.sql("SELECT id, (doc->>'version')::int FROM {s}.view_records"))
    assert records == streams
    assert set(records) == set(accepted)
    totals = topology.sql("SELECT doc FROM {s}.view_stats_totals WHERE id = 'all'")[0][0]
    assert totals["total"] == events
    by_day = topology.sql("SELECT sum((doc->>'total')::int) FROM {s}.view_stats_by_day")
    assert by_day == [(events,)]
    assert topology.sql("SELECT count(*) FROM {s}.dead_letters") == [(0,)]
    positions = dict(topology.sql(
        "SELECT projection || '/' || partition, position FROM {s}.checkpoints"
    ))
    assert len(positions) == 2 * PARTITIONS  # both projections, every partition
