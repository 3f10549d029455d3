"""The Kafka stream against a real Azure Event Hubs namespace (`pytest -m azure`).

Runs only when CQRSKIT_TEST_AZURE_EVENTHUBS_URL names an existing event hub
(`eventhubs://<namespace>.servicebus.windows.net?topic=<hub>&partitions=<N>`)
and CQRSKIT_EVENTHUBS_CONNECTION_STRING holds its connection string; skipped
otherwise. The hub keeps earlier runs' events, so this run's events carry
positions above anything sent before (from the clock), and the subscriber,
which drops what is at or below its checkpoint, sees exactly this run's.
"""

from __future__ import annotations

import os
import time
import uuid

import pytest
from nats_helpers import collect, make_envelopes

from cqrskit.messages import partition_of

pytestmark = pytest.mark.azure

URL = "CQRSKIT_TEST_AZURE_EVENTHUBS_URL"


async def test_events_reach_their_partition_in_order_through_event_hubs() -> None:
    url = os.environ.get(URL)
    if not url or not os.environ.get("CQRSKIT_EVENTHUBS_CONNECTION_STRING"):
        pytest.skip(f"live Azure suite: set {URL} and CQRSKIT_EVENTHUBS_CONNECTION_STRING "
                    "to run it")
    pytest.importorskip("aiokafka", reason="install the kafka extra: pip install -e '.[dev]'")
    from cqrskit.streams.kafka import KafkaStream

    stream = KafkaStream.from_url(url)
    try:
        first = int(time.time() * 1000) * 1000
        sent = make_envelopes(200, streams=16, first=first)
        await stream.publish(sent)
        group = f"cqrskit-live-{uuid.uuid4().hex[:8]}"
        for partition in range(stream.partitions):
            mine = [e for e in sent if partition_of(e.stream_id, stream.partitions) == partition]
            if not mine:
                continue
            got = await collect(stream, partition, stream.partitions, first - 1, len(mine),
                                timeout=120, consumer=group)
            assert [e.event_id for e in got] == [e.event_id for e in mine]
    finally:
        await stream.close()
