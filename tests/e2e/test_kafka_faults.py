"""Faults of the distributed runtime on the Kafka-protocol stream, with the real processes.

The same verdict as on NATS (`assert_views_match_log`: nothing lost, nothing
doubled, order per stream kept, every 202 in the log), with `cqrskit api`,
`relay` and two `update-processor`s on PostgreSQL and a tansu broker of the
test's own (`kafka://`, the stand-in for Event Hubs' Kafka endpoint):

- an update processor SIGKILLed in the middle of a batch (held there by the gate
  projection of tests/e2e/gate_domain.py) while it works through a backlog: two
  processors take over and the batch it held is read again (its offset was
  never committed);
- the broker SIGKILLed under load and started again on the same storage
  (tansu on S3, served by moto: what it acknowledged survives its restart, as on
  a durable broker): commands are accepted meanwhile, the relay's publishes fail
  and are retried, and the views catch up.

tansu in memory would come back empty after a restart: the events the relay
had published and nobody had read yet would be gone for good, a loss no client
can repair. The restart test therefore needs the S3 storage; with memory
storage only a broker that stays down can be tested, and the first test covers
that the subscribers resume from their committed offsets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cqrskit.messages import ConsistencyToken, partition_of
from integration.kafka_helpers import S3Server, TansuBroker, require_tansu

from .harness import wait_until
from .topology import (
    PARTITIONS,
    PROJECTIONS,
    Accepted,
    Topology,
    assert_commands_accepted_through_a_broker_outage,
    assert_views_match_log,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def tansu(tmp_path: Path) -> Iterator[TansuBroker]:
    """A tansu of the test's own, in memory."""
    broker = TansuBroker(require_tansu(), tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()  # nothing to keep; a graceful stop waits for its clients


@pytest.fixture
def durable_tansu(tmp_path: Path) -> Iterator[TansuBroker]:
    """A tansu of the test's own whose storage (S3 on moto) survives its restarts."""
    binary = require_tansu(s3=True)
    s3 = S3Server(tmp_path)
    s3.start()
    broker = TansuBroker(binary, tmp_path, s3=s3)
    try:
        broker.start()
        yield broker
    finally:
        broker.kill()
        s3.stop()


@pytest.fixture
def make_topology(
    postgres_dsn: str, postgres_schemas: Callable[..., str], tmp_path: Path,
) -> Iterator[Callable[..., Topology]]:
    """Topologies in schemas of their own on a Kafka topic of their own; stopped at the end."""
    made: list[Topology] = []

    def make(broker: TansuBroker, **params: Any) -> Topology:
        log_dir = tmp_path / f"topology-{len(made)}"
        log_dir.mkdir()
        url = broker.url(partitions=PARTITIONS, **params)
        topology = Topology(postgres_dsn, postgres_schemas(), log_dir, stream_url=url)
        made.append(topology)
        return topology

    try:
        yield make
    finally:
        for topology in made:
            topology.close()


def _gate_position(topology: Topology, record: str) -> int:
    rows = topology.sql("SELECT position FROM {s}.events WHERE stream_id = %s", (record,))
    return int(rows[0][0])


def test_an_update_processor_killed_mid_batch_is_replaced_without_loss_or_doubles(
    tansu: TansuBroker, make_topology: Callable[..., Topology], tmp_path: Path,
) -> None:
    # Batches of 50: each runner has several batches of the backlog to go through.
    topology = make_topology(tansu, batch=50)
    # The gate projection (tests/e2e/gate_domain.py) holds the batch that holds the
    # record inserted with "gate": true, while the gate file exists: the processor
    # is then certainly in the middle of a batch it fetched and has not committed.
    gate = tmp_path / "gate"
    gate.touch()
    topology.env.update(CQRSKIT_DOMAINS="cqrskit.domains.records,gate_domain",
                        CQRSKIT_TEST_GATE_FILE=str(gate))
    with topology.explained():
        topology.start("relay")
        topology.start("api")
        topology.wait_ready()

        # A backlog, published while no update processor runs (the load goes on),
        # with the gate record in its middle.
        load = topology.load("mid")
        load.wait_accepted(700)
        with topology.client() as client:
            answer = client.post("/api/command/insert",
                                 json={"id": "gate-1", "data": {"gate": True}})
        assert answer.status_code == 202, answer.text
        load.wait_accepted(1500)
        published = max(a.position for a in load.accepted[:1500])
        wait_until(lambda: topology.relay_position() >= published, timeout=30,
                   what="the relay to publish the backlog")
        backlog = topology.heads()

        victim = topology.start("update-processor")
        wait_until(lambda: Path(f"{gate}.held").exists(), timeout=30, interval=0.01,
                   what="the update processor to reach the gate record")
        topology.kill(victim)
        gate.unlink()  # the processors started next pass it
        killed_at = len(load.accepted)

        # Killed mid-way through the backlog: some batches committed, not all.
        checkpoints = topology.checkpoints()
        unfinished = {
            key: (checkpoints.get(key, 0), head)
            for partition, head in backlog.items() for key in
            ((name, partition) for name in PROJECTIONS) if checkpoints.get(key, 0) < head
        }
        assert any(checkpoints.values()) and unfinished, (
            f"not killed mid-way: checkpoints {checkpoints}, backlog heads {backlog}"
        )
        gate_at = _gate_position(topology, "gate-1")
        gate_partition = partition_of("gate-1", PARTITIONS)
        assert checkpoints.get(("gate", gate_partition), 0) < gate_at

        # Two processors share the partitions now; the batch the killed one held is
        # read again from the last committed offset.
        topology.start("update-processor")
        topology.start("update-processor")
        load.wait_accepted(killed_at + 300)
        load.stop()
        topology.wait_caught_up()
        wait_until(lambda: topology.checkpoints().get(("gate", gate_partition), 0) >= gate_at,
                   timeout=30, what="the gate projection to pass the gate record")
        assert topology.sql("SELECT id FROM {s}.view_gate_passed WHERE id = 'gate-1'")
        accepted = [*load.accepted, _accepted_gate(topology, answer.json())]
        events = assert_views_match_log(topology, accepted)
        print(f"{events} events; killed with {len(unfinished)} of {2 * len(backlog)} runners "
              f"short of the backlog, the gate projection holding position {gate_at}")


def _accepted_gate(topology: Topology, answer: dict[str, Any]) -> Accepted:
    """The gate insert as the load would have recorded it (for the verdict)."""
    position = ConsistencyToken.decode(answer["consistency_token"]).position
    return Accepted("insert", answer["command_id"], answer["id"], answer["version"],
                    position, 0.0, 0.0)


# ------------------------------------------------------------- the broker


def test_commands_are_accepted_while_the_broker_is_down_and_the_views_catch_up_after(
    durable_tansu: TansuBroker, make_topology: Callable[..., Topology],
) -> None:
    # Publishes fail after 2 s without an answer, so the relay's retries show.
    topology = make_topology(durable_tansu, ack_timeout=2)
    events, during = assert_commands_accepted_through_a_broker_outage(
        topology, "broker", stop=durable_tansu.kill, start=durable_tansu.start, outage=4
    )
    print(f"{events} events, {during} accepted while the broker was down")
