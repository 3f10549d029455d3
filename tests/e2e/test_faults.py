"""Faults of the distributed runtime, with the real processes.

Each test runs `cqrskit api`, `relay` and `update-processor` as OS processes on
PostgreSQL and NATS JetStream, drives concurrent inserts and updates of shared
records through the HTTP API, breaks one part on purpose, and ends with the
query DB compared with a replay of the event store (`assert_views_match_log`):
nothing lost, nothing doubled, order per stream kept, every 202 in the log.

- an update processor SIGKILLed with a batch in flight, then a new one started;
- the leading relay SIGKILLed while its position save is stuck (so events it
  published are not checkpointed): the standby takes over and publishes them
  again, the broker drops the copies; then a restarted relay takes over from the
  next leader killed mid-load;
- the NATS server stopped for seconds during load: commands are still accepted
  (the log is the outbox), and everything arrives after it is back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from cqrskit.messages import Envelope
from integration.nats_helpers import PrivateNatsServer, require_nats_binary

from .harness import wait_until
from .topology import (
    NATS_HOST,
    NATS_PORT,
    PROJECTIONS,
    Topology,
    assert_commands_accepted_through_a_broker_outage,
    assert_views_match_log,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def make_topology(
    postgres_dsn: str, postgres_schemas: Callable[..., str], tmp_path: Path,
) -> Iterator[Callable[..., Topology]]:
    """Topologies in schemas and NATS streams of their own; stopped, then both dropped."""
    pytest.importorskip("nats", reason="install the nats extra: pip install -e '.[dev]'")
    made: list[Topology] = []

    def make(**options: Any) -> Topology:
        log_dir = tmp_path / f"topology-{len(made)}"
        log_dir.mkdir()
        topology = Topology(postgres_dsn, postgres_schemas(), log_dir, **options)
        made.append(topology)
        return topology

    try:
        yield make
    finally:
        for topology in made:
            topology.close()


@pytest.fixture
def shared_nats(require_service: Any) -> None:
    require_service("NATS JetStream", NATS_HOST, NATS_PORT, start="nats-server -js")


# ------------------------------------------------- update processor, mid-batch


def _in_flight(topology: Topology) -> dict[str, tuple[int, int]]:
    """Durable consumers (one per partition, for all projections) whose last delivered
    event is beyond a projection's checkpoint: consumer → (delivered position,
    the lowest checkpoint of its partition)."""
    checkpoints = topology.checkpoints()

    async def read(js: Any) -> dict[str, tuple[int, int]]:
        found = {}
        for info in await js.consumers_info(topology.stream):
            seq = info.delivered.stream_seq
            if not seq or not info.config.filter_subject:
                continue
            partition = int(info.config.filter_subject.rpartition(".")[2])
            message = await js.get_msg(topology.stream, seq)
            delivered = Envelope.from_dict(orjson.loads(message.data))
            done = min(checkpoints.get((p, partition), 0) for p in PROJECTIONS)
            if delivered.position > done:
                found[info.name] = (delivered.position, done)
        return found

    result: dict[str, tuple[int, int]] = topology.nats_call(read)
    return result


def test_an_update_processor_killed_mid_batch_is_replaced_without_loss_or_doubles(
    make_topology: Callable[..., Topology], shared_nats: None,
) -> None:
    # Batches of 50: each runner has several batches of the backlog to go through.
    topology = make_topology(stream_params={"batch": 50})
    with topology.explained():
        topology.start("relay")
        topology.start("api")
        topology.wait_ready()

        # A backlog, built while no update processor runs (the load goes on).
        load = topology.load("mid")
        load.wait_accepted(1500)
        wait_until(lambda: topology.stream_messages() >= 1500, timeout=30,
                   what="the relay to publish the backlog")
        backlog = topology.heads()

        first = topology.start("update-processor")
        wait_until(lambda: any(topology.checkpoints().values()), timeout=30, interval=0.005,
                   what="the update processor's first commit")
        topology.kill(first)
        killed_at = len(load.accepted)

        # It died mid-way through the backlog: some batches committed, some
        # partitions not through, and batches fetched from the broker but not
        # committed (delivered beyond the checkpoint).
        checkpoints = topology.checkpoints()
        unfinished = {
            (name, partition): (checkpoints.get((name, partition), 0), head)
            for partition, head in backlog.items() for name in PROJECTIONS
            if checkpoints.get((name, partition), 0) < head
        }
        assert any(checkpoints.values()) and unfinished, (
            f"not killed mid-way: checkpoints {checkpoints}, backlog heads {backlog}"
        )
        in_flight = _in_flight(topology)
        assert in_flight, "no batch was in flight when the processor was killed"

        topology.start("update-processor")
        load.wait_accepted(killed_at + 300)
        load.stop()
        topology.wait_caught_up()
        events = assert_views_match_log(topology, load.accepted)
        print(f"{events} events; killed with {len(unfinished)} of {2 * len(backlog)} runners "
              f"short of the backlog; consumer → (delivered, checkpoint): {in_flight}")


# ---------------------------------------------------------------- the relay


def _leading(topology: Topology, proc: Any) -> list[int]:
    """The positions after which this relay process started publishing, as leader."""
    marker = "relay leading; publishing the event log after position "
    return [int(line.split(marker)[1].split()[0])
            for line in topology.log_of(proc).splitlines() if marker in line]


def _stream_last_position(topology: Topology) -> int:
    """The position of the last event the broker holds in the topology's stream."""
    async def read(js: Any) -> int:
        state = (await js.stream_info(topology.stream)).state
        if not state.messages:
            return 0
        message = await js.get_msg(topology.stream, state.last_seq)
        return Envelope.from_dict(orjson.loads(message.data)).position

    position: int = topology.nats_call(read)
    return position


def test_a_killed_relay_is_replaced_by_the_standby_which_publishes_the_unsaved_events_again(
    make_topology: Callable[..., Topology], shared_nats: None,
) -> None:
    import psycopg

    topology = make_topology()
    with topology.explained():
        leader = topology.start("relay")
        wait_until(lambda: _leading(topology, leader), timeout=30, what="the relay to lead")
        standby = topology.start("relay")
        topology.start("api")
        topology.start("update-processor")
        topology.wait_ready()
        wait_until(lambda: "relay running" in topology.log_of(standby), timeout=30,
                   what="the standby relay to start")
        load = topology.load("relay")
        load.wait_accepted(300)
        assert not _leading(topology, standby), "two relays lead at once"

        # Hold the relay's position row: the leader publishes a batch, the broker
        # acknowledges it, and its save waits. Killed now, it leaves events in the
        # broker beyond the saved position.
        with psycopg.connect(topology.dsn) as lock:
            lock.execute(f"LOCK TABLE {topology.schema}.relay IN EXCLUSIVE MODE")
            saved = topology.relay_position()
            wait_until(lambda: _stream_last_position(topology) > saved, timeout=30,
                       what="the leader to publish past its saved position")
            wait_until(lambda: topology.sql(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE %s", (f"%{topology.schema}.relay%",))[0][0] > 0,
                timeout=30, what="the leader's save to wait for the lock")
            topology.kill(leader)
            published = _stream_last_position(topology)
            # The standby leads from the saved position, which is behind what the
            # broker holds: it publishes (published - saved] a second time.
            wait_until(lambda: _leading(topology, standby), timeout=30,
                       what="the standby to take over")
            assert _leading(topology, standby) == [saved] and saved < published
            lock.rollback()

        # The killed relay comes back as the standby; the leader is killed mid-load.
        restarted = topology.start("relay")
        wait_until(lambda: "relay running" in topology.log_of(restarted), timeout=30,
                   what="the restarted relay to start")
        load.wait_accepted(len(load.accepted) + 300)
        assert not _leading(topology, restarted), "two relays lead at once"
        topology.kill(standby)
        wait_until(lambda: _leading(topology, restarted), timeout=30,
                   what="the restarted relay to take over")
        load.wait_accepted(len(load.accepted) + 300)
        load.stop()

        last = max(a.position for a in load.accepted)
        wait_until(lambda: topology.relay_position() == last == _stream_last_position(topology),
                   timeout=30, what="the relay to publish everything")
        topology.wait_caught_up()
        events = assert_views_match_log(topology, load.accepted)
        print(f"{events} events; the standby published {saved}..{published} again")


# ------------------------------------------------------------ the NATS server


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PrivateNatsServer]:
    """A nats-server of this test's own (JetStream, store in tmp_path), started; stopped
    at the end."""
    require_nats_binary()
    server = PrivateNatsServer(tmp_path / "nats-store")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_commands_are_accepted_while_nats_is_down_and_the_views_catch_up_after(
    private_nats: PrivateNatsServer, make_topology: Callable[..., Topology],
) -> None:
    topology = make_topology(nats=private_nats.url)
    events, during = assert_commands_accepted_through_a_broker_outage(
        topology, "nats", stop=private_nats.stop, start=private_nats.start, outage=3
    )
    print(f"{events} events, {during} accepted while NATS was down")
