"""The distributed topology as real OS processes on PostgreSQL and NATS JetStream.

`cqrskit up --distributed` starts every role (the API forwarding to a command
handler and a query handler) and stops them all on SIGTERM or Ctrl-C; and with the roles
started one by one, killing one of two update processors (SIGKILL, mid-load)
hands its partitions to the other, and the views end equal to a replay of the
event log: nothing lost, nothing doubled.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections import Counter
from pathlib import Path

import httpx
import pytest

from .harness import run_cli, wait_until
from .topology import PARTITIONS, Topology


def test_up_refuses_sqlite_with_the_embedded_stream(tmp_path: Path) -> None:
    result = run_cli("up", "--distributed", env={"CQRSKIT_DATA_DIR": str(tmp_path)})
    assert result.returncode != 0
    assert "cqrskit serve" in result.stderr and "postgresql://" in result.stderr


def _roles_of(up_log: str) -> list[tuple[str, int, str]]:
    """(role, pid, url) of each child, from the lines `cqrskit up` prints once it is up."""
    return [
        (m["role"], int(m["pid"]), m["url"])
        for m in re.finditer(r"^  (?P<role>[a-z-]+) +pid (?P<pid>\d+) *(?P<url>\S*)$", up_log,
                             re.MULTILINE)
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("stop", ["SIGTERM", "Ctrl-C"])
def test_up_distributed_runs_every_role_and_stops_them(topology: Topology, stop: str) -> None:
    up = topology.start("up", "--distributed", "--port", str(topology.port))
    topology.wait_ready()
    up_log = wait_until(
        lambda: (lambda text: text if "Ctrl-C or SIGTERM stops them all" in text else None)(
            topology.logs()),
        timeout=10, interval=0.1, what="cqrskit up to list its roles",
    )
    roles = _roles_of(up_log)
    assert sorted(role for role, _, _ in roles) == [
        "api", "command-handler", "query-handler", "relay", "update-processor",
        "update-processor",
    ], up_log
    assert all(_alive(pid) for _, pid, _ in roles)
    urls = {role: url for role, _, url in roles if url}
    assert urls["api"] == f"http://127.0.0.1:{topology.port}"

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
        assert answer.status_code == 202, answer.text
        token = answer.json()["consistency_token"]
        got = client.get("/api/query/get", params={"id": "up-1"},
                         headers={"X-Consistency-Token": token})
        assert got.status_code == 200 and got.headers["X-Consistency"] == "fresh"
        assert got.json()["data"] == {"n": 1}
        # The API forwards to the handler services and opens no store itself.
        assert client.get("/readyz").json()["checks"] == {
            "command_handler": "ok", "query_handler": "ok"}
        # Its dashboard's status comes from the query handler: every partition, its owner.
        status = wait_until(
            lambda: (lambda r: r.json() if r.status_code == 200 and r.json()["last_position"]
                     and len(r.json()["leases"]) == PARTITIONS else None)(
                client.get("/api/status")),
            timeout=10, interval=0.2, what="the pipeline status through the API",
        )
        assert status["partitions"] == PARTITIONS
        assert {lag["partition"] for lag in status["lags"]} == set(range(PARTITIONS))
        assert set(status["leases"].values()) == set(leases.values())
    # Each handler service answers on its own port, with only its own routes.
    with httpx.Client(base_url=urls["command-handler"], timeout=10) as commands:
        assert commands.get("/readyz").json()["checks"] == {"command_db": "ok"}
        assert commands.get("/api/query/get", params={"id": "up-1"}).status_code == 404
    with httpx.Client(base_url=urls["query-handler"], timeout=10) as queries:
        assert queries.get("/api/query/get", params={"id": "up-1"}).status_code == 200

    if stop == "Ctrl-C":
        # A terminal sends SIGINT to the whole foreground process group: `up` and every child.
        for pid in (up.pid, *(pid for _, pid, _ in roles)):
            os.kill(pid, signal.SIGINT)
    else:
        up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=40) == 0, topology.logs()
    assert not any(_alive(pid) for _, pid, _ in roles)
    # Every child stopped cleanly: the update processors released their leases.
    assert topology.sql("SELECT count(*) FROM {s}.leases") == [(0,)]
    logs = topology.logs(lines=200)
    assert "topology stopped" in logs and "did not stop" not in logs, logs
    assert "Traceback" not in logs, logs


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
