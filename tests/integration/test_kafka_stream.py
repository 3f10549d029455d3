"""The Kafka-protocol stream against a real broker (tansu): partitions, order per
stream, copies dropped by position, offsets committed only after the caller
processed a batch, refusals, and the broker going away."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka_helpers import TansuBroker, free_port, require_tansu
from nats_helpers import collect, make_envelopes

from cqrskit.bootstrap import open_stream
from cqrskit.errors import CqrskitError, Unavailable
from cqrskit.messages import Envelope, partition_of

kafka = pytest.importorskip("cqrskit.streams.kafka", reason="install the kafka extra")
KafkaStream = kafka.KafkaStream
KafkaUrl = kafka.KafkaUrl

OpenStream = Callable[..., Any]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    """One tansu (in memory) for the module; every test uses topics of its own."""
    server = TansuBroker(require_tansu(), tmp_path_factory.mktemp("tansu"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def open_kafka(broker: TansuBroker) -> AsyncIterator[OpenStream]:
    """KafkaStreams on one fresh topic; keyword arguments become URL parameters."""
    topic = broker.url().split("topic=")[1].split("&")[0]
    opened: list[Any] = []

    def factory(**params: Any) -> Any:
        stream = KafkaStream.from_url(broker.url(topic, **params))
        opened.append(stream)
        return stream

    yield factory
    for stream in opened:
        await stream.close()


def positions(events: list[Envelope]) -> list[int]:
    return [e.position for e in events]


async def raw_records(stream: Any, partition: int) -> list[Any]:
    """Every record of one partition, read with a plain aiokafka consumer."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    reader = AIOKafkaConsumer(bootstrap_servers=list(stream.url.bootstrap),
                              enable_auto_commit=False)
    await reader.start()
    try:
        tp = TopicPartition(stream.url.topic, partition)
        reader.assign([tp])
        reader.seek(tp, 0)
        records: list[Any] = []
        while True:
            found = await reader.getmany(tp, timeout_ms=500)
            if not found.get(tp):
                return records
            records.extend(found[tp])
    finally:
        await reader.stop()


async def committed(stream: Any, group: str, partition: int) -> int | None:
    """The offset a consumer group committed for one partition."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    reader = AIOKafkaConsumer(bootstrap_servers=list(stream.url.bootstrap), group_id=group,
                              enable_auto_commit=False)
    await reader.start()
    try:
        tp = TopicPartition(stream.url.topic, partition)
        reader.assign([tp])
        offset = await reader.committed(tp)
        return None if offset is None else int(offset)
    finally:
        await reader.stop()


# ------------------------------------------------------------------ URL


def test_url_defaults_and_parameters() -> None:
    url = KafkaUrl.parse("kafka://127.0.0.1:9092")
    assert (url.bootstrap, url.topic, url.partitions, url.group) == (
        ("127.0.0.1:9092",), "cqrskit-events", 8, "cqrskit")
    assert (url.batch, url.batch_bytes, url.idempotence, url.eventhubs, url.ack_timeout) == (
        256, 65536, True, False, 10.0)
    url = KafkaUrl.parse(
        "kafka://k1:9092,k2:9093?topic=t&partitions=3&group=views&batch=10"
        "&batch_bytes=2048&idempotence=false&ack_timeout=2.5"
    )
    assert url.bootstrap == ("k1:9092", "k2:9093")
    assert (url.topic, url.partitions, url.group, url.batch, url.batch_bytes) == (
        "t", 3, "views", 10, 2048)
    assert url.idempotence is False and url.ack_timeout == 2.5


def test_eventhubs_url_uses_sasl_ssl_with_the_connection_string_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=S3CR3T"
    stream = KafkaStream.from_url("eventhubs://ns.servicebus.windows.net?topic=events&partitions=4")
    assert stream.url.bootstrap == ("ns.servicebus.windows.net:9093",)
    assert stream.url.address == "eventhubs://ns.servicebus.windows.net:9093"
    monkeypatch.delenv(kafka.CONNECTION_STRING_ENV, raising=False)
    with pytest.raises(CqrskitError, match="CQRSKIT_EVENTHUBS_CONNECTION_STRING is not set"):
        stream._client_options()
    monkeypatch.setenv(kafka.CONNECTION_STRING_ENV, secret)
    options = stream._client_options()
    assert options["bootstrap_servers"] == ["ns.servicebus.windows.net:9093"]
    assert (options["security_protocol"], options["sasl_mechanism"]) == ("SASL_SSL", "PLAIN")
    assert options["sasl_plain_username"] == "$ConnectionString"
    assert options["sasl_plain_password"] == secret
    assert options["ssl_context"] is not None
    assert "S3CR3T" not in repr(stream.url)


@pytest.mark.parametrize("bad", [
    "http://127.0.0.1:9092",
    "kafka://",
    "kafka://host",  # no port
    "kafka://user:pw@host:9092",  # credentials never go in the URL
    "kafka://h:9092?partitions=x",
    "kafka://h:9092?partitions=0",
    "kafka://h:9092?batch=0",
    "kafka://h:9092?idempotence=maybe",
    "kafka://h:9092?ack_timeout=0",
    "kafka://h:9092?colour=red",
])
def test_bad_urls_are_refused(bad: str) -> None:
    with pytest.raises(CqrskitError):
        KafkaUrl.parse(bad)


def test_open_stream_picks_the_kafka_stream_by_url() -> None:
    assert isinstance(open_stream("kafka://127.0.0.1:9092?partitions=4", None), KafkaStream)
    stream = open_stream("eventhubs://ns.servicebus.windows.net?partitions=4", None)
    assert isinstance(stream, KafkaStream) and stream.partitions == 4


async def test_unreachable_broker_is_unavailable() -> None:
    require_tansu()
    stream = KafkaStream.from_url(f"kafka://127.0.0.1:{free_port()}?topic=nope",
                                  connect_timeout=2.0)
    started = time.monotonic()
    with pytest.raises(Unavailable, match=r"Kafka at kafka://127\.0\.0\.1:\d+ .*failed"):
        await stream.publish(make_envelopes(3))
    with pytest.raises(Unavailable):
        await anext(aiter(stream.subscribe(0, 8, 0)))
    assert time.monotonic() - started < 10
    await stream.close()


# ------------------------------------------------------- publish/subscribe


async def test_every_event_lands_in_its_partition_in_order(open_kafka: OpenStream) -> None:
    stream = open_kafka(partitions=4, batch=50, batch_bytes=4096)
    events = make_envelopes(700, streams=37)
    # Small record batches: each publish goes out in several waves.
    await stream.publish(events[:300])
    await stream.publish(events[300:])
    by_position = {e.position: e for e in events}
    for partition in range(4):
        expected = [e.position for e in events if partition_of(e.stream_id, 4) == partition]
        consumer = f"p-{partition}" if partition % 2 else None  # durable and not
        got = await collect(stream, partition, 4, 0, len(expected), consumer=consumer)
        assert positions(got) == expected
        assert [e.to_dict() for e in got] == [by_position[p].to_dict() for p in expected]
        # The record itself: key = stream id, the event id in a header, in this partition.
        records = await raw_records(stream, partition)
        assert [r.key.decode() for r in records] == [by_position[p].stream_id for p in expected]
        assert [dict(r.headers)["event_id"].decode() for r in records] == [
            by_position[p].event_id for p in expected]


async def test_subscriber_sees_later_events_promptly(open_kafka: OpenStream) -> None:
    stream = open_kafka(partitions=1)
    events = make_envelopes(40)
    await stream.publish(events[:1])  # the topic exists; the reader then waits on it
    reader = asyncio.create_task(collect(stream, 0, 1, 0, len(events), consumer="live-0"))
    await asyncio.sleep(0.5)
    started = time.monotonic()
    for event in events[1:]:
        await stream.publish([event])
    got = await reader
    assert positions(got) == positions(events)
    assert time.monotonic() - started < 5


async def test_after_skips_what_the_caller_has(open_kafka: OpenStream) -> None:
    stream = open_kafka(partitions=1)
    await stream.publish(make_envelopes(50))
    assert positions(await collect(stream, 0, 1, 30, 20)) == list(range(31, 51))


async def test_copies_are_stored_and_dropped_by_position(open_kafka: OpenStream) -> None:
    """Kafka keeps a re-published batch (a relay that crashed before saving its
    position); the subscriber drops the copies, positions keep increasing."""
    stream = open_kafka(partitions=2)
    events = make_envelopes(100)
    await stream.publish(events[:60])
    await stream.publish(events[:60])  # the whole batch again
    copies = [Envelope(**{**e.to_dict(), "event_id": e.event_id + "-late"}) for e in events[10:30]]
    await stream.publish(copies)  # a deposed relay, late
    await stream.publish(events[60:])
    stored = sum([len(await raw_records(stream, p)) for p in range(2)])
    assert stored == 100 + 60 + 20  # nothing was de-duplicated by the broker
    for partition in range(2):
        expected = [e.position for e in events if partition_of(e.stream_id, 2) == partition]
        got = await collect(stream, partition, 2, 0, len(expected), consumer=f"dup-{partition}")
        assert positions(got) == expected


# ------------------------------------------------- offsets and resume


async def first_batch(stream: Any, after: int, consumer: str) -> list[Envelope]:
    """Take one batch and stop without coming back, so without committing it: what a
    processor killed after the fetch and before its view commit leaves behind."""
    batches = stream.subscribe(0, 1, after, consumer=consumer)
    async with contextlib.aclosing(batches):
        batch: list[Envelope] = await asyncio.wait_for(anext(aiter(batches)), 10)
        return batch


async def test_offsets_are_committed_only_after_the_batch_was_processed(
    open_kafka: OpenStream,
) -> None:
    stream = open_kafka(partitions=1, batch=10)
    await stream.publish(make_envelopes(35))

    # Fetched, never processed: nothing committed, and the same batch comes again.
    assert positions(await first_batch(stream, 0, "proj-0")) == list(range(1, 11))
    assert await committed(stream, "cqrskit.proj", 0) is None
    assert positions(await first_batch(stream, 0, "proj-0")) == list(range(1, 11))

    # Processed (the caller came back for the next batch): its offset is committed,
    # the next batch's is not until the caller comes back again.
    batches = stream.subscribe(0, 1, 0, consumer="proj-0")
    async with contextlib.aclosing(batches):
        assert positions(await anext(aiter(batches))) == list(range(1, 11))
        assert await committed(stream, "cqrskit.proj", 0) is None
        assert positions(await anext(aiter(batches))) == list(range(11, 21))
        assert await committed(stream, "cqrskit.proj", 0) == 10
    assert await committed(stream, "cqrskit.proj", 0) == 10

    # The caller committed 11..20 with its checkpoint but died before coming back:
    # they are read again after the committed offset and dropped by position.
    assert positions(await first_batch(stream, 20, "proj-0")) == list(range(21, 31))
    got = await collect(stream, 0, 1, 20, 15, consumer="proj-0")
    assert positions(got) == list(range(21, 36))


async def test_checkpoint_moved_back_reads_from_the_start(open_kafka: OpenStream) -> None:
    """A rebuild resets the checkpoint below what the consumer group committed."""
    stream = open_kafka(partitions=1, batch=10)
    await stream.publish(make_envelopes(30))
    got = await collect(stream, 0, 1, 0, 30, consumer="rebuilt-0")
    batches = stream.subscribe(0, 1, 30, consumer="rebuilt-0")
    async with contextlib.aclosing(batches):  # commits what collect had not
        await stream.publish(make_envelopes(1, first=31))
        assert positions(await anext(aiter(batches))) == [31]
        assert len(got) == 30
    assert await committed(stream, "cqrskit.rebuilt", 0) == 30
    assert positions(await collect(stream, 0, 1, 0, 31, consumer="rebuilt-0")) == list(
        range(1, 32))
    assert positions(await collect(stream, 0, 1, 12, 19, consumer="rebuilt-0")) == list(
        range(13, 32))


async def test_another_partition_count_is_refused(open_kafka: OpenStream) -> None:
    stream = open_kafka(partitions=4)
    await stream.publish(make_envelopes(5))
    with pytest.raises(CqrskitError, match=r"has 4 partitions.*partitions=8"):
        await open_kafka(partitions=8).publish(make_envelopes(5))
    with pytest.raises(CqrskitError, match="no order across them"):
        await anext(aiter(stream.subscribe(0, 1, 0)))


# ------------------------------------------------------------ broker down


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[TansuBroker]:
    server = TansuBroker(require_tansu(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_broker_down_is_unavailable_and_publishing_works_again_after(
    private_broker: TansuBroker,
) -> None:
    url = private_broker.url(partitions=2, ack_timeout=2)
    stream = KafkaStream.from_url(url, connect_timeout=2.0)
    try:
        await stream.publish(make_envelopes(10))
        private_broker.kill()
        started = time.monotonic()
        with pytest.raises(Unavailable, match=r"Kafka at kafka://127\.0\.0\.1"):
            await stream.publish(make_envelopes(10, first=11))
        assert time.monotonic() - started < 10
        private_broker.start()  # memory storage: it comes back empty
        await stream.publish(make_envelopes(10, first=11))
        reader = KafkaStream.from_url(url)
        try:
            got = await collect(reader, 0, 2, 0, 1, timeout=10)
        finally:
            await reader.close()
        assert got and got[0].position >= 11
    finally:
        await stream.close()
