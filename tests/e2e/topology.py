"""The distributed topology as real OS processes, for the tests that break it on purpose.

`Topology` runs `cqrskit api`, `relay` and `update-processor` processes on a
PostgreSQL schema and a NATS stream of the test's own (on the shared
nats-server, or on a private one the test may stop), or on any other stream
URL it is given (a Kafka topic). `Load` is clients sending
inserts and updates of shared records from a thread of their own, remembering
every 202. `assert_views_match_log` is the verdict every fault test ends with:
the views equal a replay of the event log, nothing lost, nothing doubled, order
per stream kept, every accepted command in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from cqrskit.messages import ConsistencyToken, partition_of

from .harness import CQRSKIT, DIE_WITH_PARENT, child_env, free_port, wait_until

NATS_HOST, NATS_PORT = "127.0.0.1", 4222
PARTITIONS = 8
PROJECTIONS = ("records", "statistics")


class Topology:
    """Environment for one test's processes: its own schema and NATS stream.

    `nats` is the server every role uses (default: the shared one on 4222);
    `stream_params` are extra query parameters of the stream URL (e.g. batch).
    `stream_url` replaces the NATS stream with another (kafka://...); the NATS
    helpers (`stream_messages`, `nats_call`) are then not for use.
    """

    def __init__(
        self, dsn: str, url: str, log_dir: Path, *, nats: str | None = None,
        stream_params: Mapping[str, Any] | None = None, stream_url: str | None = None,
    ) -> None:
        tag = uuid.uuid4().hex[:10]
        self.dsn = dsn
        self.url = url
        self.schema = url.split("schema=")[1]
        self.nats = nats or f"nats://{NATS_HOST}:{NATS_PORT}"
        self.stream = f"CQRSKIT_T_{tag}"
        self.port = free_port()
        self.log_dir = log_dir
        extra = "".join(f"&{key}={value}" for key, value in (stream_params or {}).items())
        self.stream_url = stream_url
        self.env = {
            "CQRSKIT_COMMAND_DB": url,
            "CQRSKIT_QUERY_DB": url,
            "CQRSKIT_STREAM": stream_url or (
                f"{self.nats}?stream={self.stream}"
                f"&subject=cqrskit_t_{tag}.events&partitions={PARTITIONS}{extra}"
            ),
            "CQRSKIT_HOST": "127.0.0.1",
            "CQRSKIT_PORT": str(self.port),
            "CQRSKIT_LEASE_TTL": "2",
            "CQRSKIT_LEASE_HEARTBEAT": "0.3",
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log_paths: dict[int, Path] = {}
        self.killed: set[int] = set()
        self.loads: list[Load] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        name = "-".join(args).replace("--", "")
        path = self.log_dir / f"{name}-{len(self.procs)}.log"
        with path.open("ab") as log:
            proc = subprocess.Popen(
                [*DIE_WITH_PARENT, CQRSKIT, *args], env=child_env(self.env), stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        self.procs.append(proc)
        self.log_paths[proc.pid] = path
        return proc

    def log_of(self, proc: subprocess.Popen[bytes]) -> str:
        return self.log_paths[proc.pid].read_text(errors="replace")

    def logs(self, lines: int = 30) -> str:
        return "\n".join(
            f"--- {path.name}\n"
            + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            for path in sorted(self.log_dir.glob("*.log"))
        )

    @contextlib.contextmanager
    def explained(self) -> Iterator[None]:
        """On a failure, add the tails of every process's log to the error."""
        try:
            yield
        except Exception as error:
            error.add_note(f"process logs:\n{self.logs()}")
            raise

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL: no shutdown code runs, nothing is released but by the OS."""
        self.killed.add(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def assert_running(self) -> None:
        """Every process the test did not kill is still running."""
        exited = [f"{self.log_paths[p.pid].name} (exit {p.returncode})"
                  for p in self.procs if p.pid not in self.killed and p.poll() is not None]
        assert not exited, f"processes exited: {exited}"

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

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(statement.replace("{s}", self.schema), params).fetchall()

    def leases(self) -> dict[int, str]:
        return dict(self.sql(
            "SELECT partition, owner FROM {s}.leases "
            "WHERE expires_at > extract(epoch FROM clock_timestamp())"
        ))

    def checkpoints(self) -> dict[tuple[str, int], int]:
        rows = self.sql("SELECT projection, partition, position FROM {s}.checkpoints")
        return {(name, partition): position for name, partition, position in rows}

    def relay_position(self) -> int:
        rows = self.sql("SELECT position FROM {s}.relay WHERE name = 'relay'")
        return int(rows[0][0]) if rows else 0

    def heads(self) -> dict[int, int]:
        """The last position of each partition in the event log."""
        heads: dict[int, int] = {}
        for stream_id, position in self.sql(
            "SELECT stream_id, max(position) FROM {s}.events GROUP BY stream_id"
        ):
            partition = partition_of(stream_id, PARTITIONS)
            heads[partition] = max(heads.get(partition, 0), position)
        return heads

    def behind(self) -> dict[tuple[str, int], tuple[int, int]]:
        """(projection, partition) → (checkpoint, head) wherever a checkpoint is short."""
        done = self.checkpoints()
        return {
            (name, partition): (done.get((name, partition), 0), head)
            for partition, head in self.heads().items() for name in PROJECTIONS
            if done.get((name, partition), 0) < head
        }

    def wait_caught_up(self, timeout: float = 60) -> None:
        """Until every projection's checkpoint has reached its partition's last event."""
        wait_until(lambda: not self.behind(), timeout=timeout, interval=0.2,
                   what=f"the views to catch up with the log (behind: {self.behind()})")

    def nats_call(self, call: Any) -> Any:
        """Run `await call(jetstream)` on a fresh connection to this topology's server."""
        import nats

        async def go() -> Any:
            client = await nats.connect(self.nats, allow_reconnect=False,
                                        max_reconnect_attempts=1, connect_timeout=2)
            try:
                return await call(client.jetstream())
            finally:
                await client.close()

        return asyncio.run(go())

    def stream_messages(self) -> int:
        """How many messages the broker holds in this topology's stream."""

        async def count(js: Any) -> int:
            return int((await js.stream_info(self.stream)).state.messages)

        return int(self.nats_call(count))

    def load(self, prefix: str, **options: Any) -> Load:
        """Clients sending commands to this topology's API (started; stopped at close)."""
        load = Load(self.port, prefix, **options)
        self.loads.append(load)
        return load.start()

    def close(self) -> None:
        for load in self.loads:
            with contextlib.suppress(AssertionError):
                load.stop()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

        async def delete(js: Any) -> None:
            await js.delete_stream(self.stream)

        if self.stream_url is None:
            with contextlib.suppress(Exception):
                self.nats_call(delete)


# ------------------------------------------------------------------ load


@dataclass(frozen=True, slots=True)
class Accepted:
    """A command answered 202, and when (time.monotonic()) it was sent and answered."""

    command: str
    command_id: str
    stream_id: str
    version: int
    position: int
    sent: float
    answered: float


class Load:
    """Concurrent clients inserting records and updating them, from a thread of their own.

    About a third of the commands insert a new record; the rest update one of the
    most recently inserted records, which other clients update at the same time,
    so each stream gets several versions whose order shows in the view (every
    update carries distinct data). Every answer must be a 202; anything else
    stops the load and is reported by `stop()`. Bounded by `limit` commands and
    `seconds`, whichever comes first, unless stopped sooner.
    """

    def __init__(
        self, port: int, prefix: str, *, clients: int = 6, limit: int = 20_000,
        seconds: float = 60.0,
    ) -> None:
        self.base_url = f"http://127.0.0.1:{port}"
        self.prefix = prefix
        self.clients = clients
        self.limit = limit
        self.seconds = seconds
        self.accepted: list[Accepted] = []
        self.errors: list[str] = []
        self.records: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Load:
        self._stop.clear()
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(),), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the clients (each finishes its request in flight); fail on any error."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            assert not self._thread.is_alive(), "the load did not stop within 60s"
        assert not self.errors, f"commands not accepted: {self.errors[:5]}"

    def wait_accepted(self, count: int, timeout: float = 60) -> None:
        def enough() -> bool:
            assert not self.errors, f"commands not accepted: {self.errors[:5]}"
            return len(self.accepted) >= count

        wait_until(enough, timeout=timeout, interval=0.02, what=f"{count} accepted commands")

    def between(self, start: float, end: float) -> list[Accepted]:
        """The commands sent at or after `start` and answered by `end`."""
        return [a for a in self.accepted if a.sent >= start and a.answered <= end]

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.clients)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=30, limits=limits) as client:
            deadline = time.monotonic() + self.seconds
            await asyncio.gather(*(self._client(client, n, deadline) for n in range(self.clients)))

    async def _client(self, client: httpx.AsyncClient, n: int, deadline: float) -> None:
        rng = random.Random(n)
        inserted = 0
        while (not self._stop.is_set() and len(self.accepted) < self.limit
               and time.monotonic() < deadline):
            if len(self.records) < self.clients or rng.random() < 0.35:
                command, record = "insert", f"{self.prefix}-{n}-{inserted}"
                inserted += 1
            else:
                command, record = "update", rng.choice(self.records[-3 * self.clients:])
            body = {"id": record, "data": {"client": n, "seq": len(self.accepted),
                                           "nonce": uuid.uuid4().hex[:8]}}
            sent = time.monotonic()
            try:
                response = await client.post(f"/api/command/{command}", json=body)
            except httpx.HTTPError as error:
                self.errors.append(f"{command} {record}: {type(error).__name__}: {error}")
                return
            if response.status_code != 202:
                self.errors.append(f"{command} {record}: {response.status_code} {response.text}")
                return
            answer = response.json()
            self.accepted.append(Accepted(
                command, answer["command_id"], answer["id"], answer["version"],
                ConsistencyToken.decode(answer["consistency_token"]).position,
                sent, time.monotonic(),
            ))
            if command == "insert":
                self.records.append(record)


# --------------------------------------------------------------- verdict


async def _read_everything(url: str) -> tuple[list[Any], dict[str, Any], dict[str, Any], list[Any]]:
    from cqrskit.domains import records
    from cqrskit.registry import Registry
    from cqrskit.stores.postgres import PostgresEventStore, PostgresViewStore
    from replays import records_view, statistics_view, whole_log

    store = await PostgresEventStore.open(url, pool_size=2)
    views = await PostgresViewStore.open(url, pool_size=2)
    try:
        await views.setup(Registry([records.domain]).collections())
        log = await whole_log(store)
        return (log, await records_view(views), await statistics_view(views),
                await views.list_dead_letters())
    finally:
        await views.close()
        await store.close()


def assert_views_match_log(topology: Topology, accepted: list[Accepted]) -> int:
    """The query DB equals a replay of the event store; return how many events there are.

    - records view == replay_records(log) and statistics == replay_statistics(log):
      every event applied once (a lost one or a double shows in the counts or the
      data), and in order per stream (every update carries distinct data, so an
      update applied out of order leaves the wrong data and version);
    - the log itself: versions of each stream are 1..n in position order;
    - every 202-accepted command is in the log at the stream, version and
      position it was answered with, and nothing else is (no command was left
      unanswered in these tests, so the log holds exactly the accepted ones);
    - no dead letters, and the broker holds each event once (NATS drops re-published
      copies; a Kafka topic keeps them, and subscribers drop them by position);
    - every process the test did not kill is still running.
    """
    from replays import replay_records, replay_statistics

    topology.assert_running()
    log, records_view, statistics_view, dead_letters = asyncio.run(
        _read_everything(topology.url)
    )
    versions: dict[str, int] = {}
    for event in log:
        versions[event.stream_id] = versions.get(event.stream_id, 0) + 1
        assert event.version == versions[event.stream_id], (
            f"stream {event.stream_id} has version {event.version} at position "
            f"{event.position}, expected {versions[event.stream_id]}"
        )
    by_place = {(e.stream_id, e.version): e for e in log}
    for command in accepted:
        event = by_place.get((command.stream_id, command.version))
        assert event is not None, f"accepted {command} is not in the log"
        assert event.position == command.position, (command, event)
        assert event.metadata.get("command_id") == command.command_id, (command, event)
    assert len(log) == len(accepted), (
        f"the log holds {len(log)} events for {len(accepted)} accepted commands"
    )
    assert not dead_letters, f"{len(dead_letters)} dead letters: " + "; ".join(
        f"{d.projection} {d.envelope.type} {d.stream_id} v{d.envelope.version} "
        f"(position {d.position}): {d.error}" for d in dead_letters[:5]
    )

    expected_records = replay_records(log)
    missing = expected_records.keys() - records_view.keys()
    extra = records_view.keys() - expected_records.keys()
    wrong = [k for k in expected_records.keys() & records_view.keys()
             if expected_records[k] != records_view[k]]
    assert not (missing or extra or wrong), (
        f"records view differs from the replay: {len(missing)} missing {sorted(missing)[:5]}, "
        f"{len(extra)} extra {sorted(extra)[:5]}, {len(wrong)} different: "
        + "; ".join(f"{k}: view {records_view[k]} replay {expected_records[k]}"
                    for k in wrong[:3])
    )
    assert statistics_view == replay_statistics(log), (
        f"statistics view {statistics_view} != replay {replay_statistics(log)}"
    )
    if topology.stream_url is None:
        assert topology.stream_messages() == len(log), (
            f"the broker holds {topology.stream_messages()} messages for {len(log)} events"
        )
    return len(log)


def assert_commands_accepted_through_a_broker_outage(
    topology: Topology, prefix: str, *, stop: Callable[[], None], start: Callable[[], None],
    outage: float,
) -> tuple[int, int]:
    """The relay, the API and two update processors under load; the broker is stopped
    (`stop`) for `outage` seconds, then started again. Commands go on being accepted
    meanwhile, the relay's publishes fail and are retried, and the views catch up and
    equal the log. Returns the events in the log and the commands accepted during the
    outage."""
    with topology.explained():
        relay = topology.start("relay")
        topology.start("api")
        topology.start("update-processor")
        topology.start("update-processor")
        topology.wait_ready()
        load = topology.load(prefix)
        load.wait_accepted(500)
        wait_until(lambda: any(topology.checkpoints().values()), timeout=30,
                   what="the views to start following")

        stop()
        stopped = time.monotonic()
        time.sleep(outage)
        restarting = time.monotonic()
        during = load.between(stopped, restarting)
        start()

        load.wait_accepted(len(load.accepted) + 500)
        load.stop()
        # Commands went on being accepted while the broker was down.
        assert len(during) >= 50, (
            f"only {len(during)} commands accepted in {outage}s of outage"
        )
        assert "relay: publishing positions" in topology.log_of(relay)
        topology.wait_caught_up()
        return assert_views_match_log(topology, load.accepted), len(during)
