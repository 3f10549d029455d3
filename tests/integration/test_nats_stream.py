"""The NATS JetStream stream against a real broker: partitions, order, duplicates
dropped by the broker, redelivery of unacknowledged batches, refusals."""

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats
import pytest
from nats_helpers import (
    NATS_HOST,
    NATS_PORT,
    NATS_SERVER,
    NATS_START,
    collect,
    delete_stream,
    free_port,
    make_envelopes,
    stream_messages,
    stream_url,
    unique_names,
    wait_until,
)

from cqrskit.errors import CqrskitError, Unavailable
from cqrskit.messages import Envelope, partition_of
from cqrskit.streams import nats as nats_stream
from cqrskit.streams.nats import NatsStream, NatsUrl

OpenStream = Callable[..., NatsStream]


@pytest.fixture
async def open_stream(require_service: Any) -> AsyncIterator[OpenStream]:
    """NatsStreams on one fresh stream of the shared broker; deleted at the end.

    Keyword arguments become URL parameters (partitions=4, batch=10, ...).
    """
    require_service("NATS", NATS_HOST, NATS_PORT, start=NATS_START)
    name, subject = unique_names()
    opened: list[NatsStream] = []

    def factory(**params: Any) -> NatsStream:
        stream = NatsStream.from_url(stream_url(NATS_SERVER, name, subject, **params))
        opened.append(stream)
        return stream

    yield factory
    for stream in opened:
        await stream.close()
    await delete_stream(NATS_SERVER, name)


def positions(events: list[Envelope]) -> list[int]:
    return [e.position for e in events]


# ------------------------------------------------------------------ URL


def test_url_defaults_and_parameters() -> None:
    url = NatsUrl.parse("nats://127.0.0.1:4222")
    assert (url.server, url.stream, url.subject, url.partitions) == (
        "nats://127.0.0.1:4222", "CQRSKIT", "cqrskit.events", 8)
    assert (url.duplicate_window, url.ack_wait, url.batch) == (120.0, 30.0, 256)
    url = NatsUrl.parse(
        "nats://u:p@nats.example:4223?stream=S1&subject=a.b&partitions=3"
        "&duplicate_window=60&ack_wait=5&batch=10"
    )
    assert (url.server, url.stream, url.subject, url.partitions) == (
        "nats://u:p@nats.example:4223", "S1", "a.b", 3)
    assert url.address == "nats://nats.example:4223"  # what messages show: no password
    assert (url.duplicate_window, url.ack_wait, url.batch) == (60.0, 5.0, 10)


@pytest.mark.parametrize("bad", [
    "http://127.0.0.1:4222",
    "nats://",
    "nats://h:4222?partitions=x",
    "nats://h:4222?partitions=0",
    "nats://h:4222?stream=a.b",
    "nats://h:4222?subject=a.*",
    "nats://h:4222?batch=0",
    "nats://h:4222?colour=red",
])
def test_bad_urls_are_refused(bad: str) -> None:
    with pytest.raises(CqrskitError):
        NatsUrl.parse(bad)


async def test_unreachable_broker_is_unavailable() -> None:
    stream = NatsStream.from_url(f"nats://{NATS_HOST}:{free_port()}?stream=NOPE")
    started = time.monotonic()
    with pytest.raises(Unavailable, match=r"NATS at nats://127\.0\.0\.1:.*connecting"):
        await stream.publish(make_envelopes(3))
    with pytest.raises(Unavailable):
        await anext(aiter(stream.subscribe(0, 8, 0)))
    assert time.monotonic() - started < 5
    await stream.close()


# ------------------------------------------------------- publish/subscribe


async def test_every_event_lands_in_one_partition_in_order(open_stream: OpenStream) -> None:
    stream = open_stream(partitions=4, batch=50)
    events = make_envelopes(700, streams=37)
    await stream.publish(events[:300])  # more than one window of publishes in flight
    await stream.publish(events[300:])
    seen: dict[int, int] = {}
    for partition in range(4):
        expected = [e.position for e in events if partition_of(e.stream_id, 4) == partition]
        consumer = f"p{partition}" if partition % 2 else None  # durable and ephemeral
        got = await collect(stream, partition, 4, 0, len(expected), consumer=consumer)
        assert positions(got) == expected
        for event in got:
            assert event.position not in seen
            seen[event.position] = partition
    assert sorted(seen) == positions(events)
    # What comes out is what went in.
    by_position = {e.position: e for e in events}
    got = await collect(stream, 0, 1, 0, len(events))
    assert [e.to_dict() for e in got] == [by_position[p].to_dict() for p in positions(got)]


async def test_subscriber_sees_later_events_promptly(open_stream: OpenStream) -> None:
    stream = open_stream(partitions=2)
    events = make_envelopes(40)
    reader = asyncio.create_task(collect(stream, 0, 1, 0, len(events), consumer="live"))
    await asyncio.sleep(0.3)  # the subscriber is waiting on an empty stream
    started = time.monotonic()
    for event in events:
        await stream.publish([event])
    got = await reader
    assert positions(got) == positions(events)
    assert time.monotonic() - started < 3


async def test_after_skips_what_the_caller_has(open_stream: OpenStream) -> None:
    stream = open_stream(partitions=1)
    await stream.publish(make_envelopes(50))
    got = await collect(stream, 0, 1, 30, 20)
    assert positions(got) == list(range(31, 51))


async def test_other_partition_counts_read_the_whole_stream(open_stream: OpenStream) -> None:
    stream = open_stream(partitions=4)
    events = make_envelopes(200, streams=23)
    await stream.publish(events)
    for partition in range(3):  # 3 does not divide 4: filtered here, not by subject
        expected = [e.position for e in events if partition_of(e.stream_id, 3) == partition]
        got = await collect(stream, partition, 3, 0, len(expected))
        assert positions(got) == expected


async def test_a_refused_publish_fails_and_the_retry_sends_the_batch_again(
    open_stream: OpenStream, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = open_stream(partitions=1)
    events = make_envelopes(20)
    subject_of = stream.subject_of
    # The last event goes where no stream listens: the broker answers "no responders".
    # (A refusal in the middle of a window leaves the events after it stored: see the
    # module docstring.)
    monkeypatch.setattr(stream, "subject_of", lambda e: (
        "nowhere.at.all" if e.position == 20 else subject_of(e)
    ))
    with pytest.raises(Unavailable, match="publishing failed"):
        await stream.publish(events)
    assert "publish" not in stream._links  # the connection that failed is dropped
    assert await stream_messages(NATS_SERVER, stream.url.stream) == 19
    monkeypatch.setattr(stream, "subject_of", subject_of)
    await stream.publish(events)  # the retry: the first copies are dropped as duplicates
    assert await stream_messages(NATS_SERVER, stream.url.stream) == 20
    assert positions(await collect(stream, 0, 1, 0, 20)) == positions(events)


async def test_broker_drops_duplicate_publishes(open_stream: OpenStream) -> None:
    stream = open_stream(partitions=4)
    events = make_envelopes(300)
    await stream.publish(events)
    await stream.publish(events)  # a relay that crashed before saving its position
    again = random.Random(7).sample(events, 50)
    await stream.publish(sorted(again, key=lambda e: e.position))
    assert await stream_messages(NATS_SERVER, stream.url.stream) == len(events)
    got = await collect(stream, 0, 1, 0, len(events))
    assert positions(got) == positions(events)


async def test_late_copies_are_dropped_by_position(open_stream: OpenStream) -> None:
    """Copies the broker stores again (published after the duplicate window) come
    later in the stream; the subscriber drops them, positions keep increasing."""
    stream = open_stream(partitions=1)
    events = make_envelopes(30)
    await stream.publish(events[:20])
    copies = [Envelope(**{**e.to_dict(), "event_id": e.event_id + "-copy"}) for e in events[5:20]]
    await stream.publish(copies)
    await stream.publish(events[20:])
    assert await stream_messages(NATS_SERVER, stream.url.stream) == 45
    got = await collect(stream, 0, 1, 0, 30, consumer="c")
    assert positions(got) == positions(events)


# ------------------------------------------------- acknowledgement and resume


async def first_batch(stream: NatsStream, after: int, consumer: str) -> list[Envelope]:
    """Take one batch and stop without coming back (so without acknowledging it)."""
    batches = stream.subscribe(0, 1, after, consumer=consumer)
    async with contextlib.aclosing(batches):
        return await asyncio.wait_for(anext(aiter(batches)), 5)


async def consumer_start(stream: NatsStream, consumer: str) -> int:
    """The stream sequence the durable consumer was last (re)created at."""
    client = await nats.connect(NATS_SERVER)
    try:
        info = await client.jetstream().consumer_info(stream.url.stream, consumer)
        return int(info.config.opt_start_seq or 0)
    finally:
        await client.close()


async def test_unacknowledged_batch_comes_again_on_resume(open_stream: OpenStream) -> None:
    stream = open_stream(partitions=1, batch=10, ack_wait=60)
    await stream.publish(make_envelopes(35))

    # A subscriber that takes a batch and stops (crashes) before committing it.
    assert positions(await first_batch(stream, 0, "proj-0")) == list(range(1, 11))
    # It comes again at once (not after ack_wait) and first (not behind newer events).
    assert positions(await first_batch(stream, 0, "proj-0")) == list(range(1, 11))

    # Commit the first batch (come back for the next: that acknowledges it), then stop.
    batches = stream.subscribe(0, 1, 0, consumer="proj-0")
    async with contextlib.aclosing(batches):
        assert positions(await anext(aiter(batches))) == list(range(1, 11))
        assert positions(await anext(aiter(batches))) == list(range(11, 21))

    # The caller committed 11..20 but died before acknowledging them: they are
    # delivered again and dropped against its checkpoint; positions keep increasing.
    assert positions(await first_batch(stream, 20, "proj-0")) == list(range(21, 31))
    assert await consumer_start(stream, "proj-0") == 11  # after the acknowledged floor
    # Resuming several times without progress loses nothing either.
    assert positions(await first_batch(stream, 20, "proj-0")) == list(range(21, 31))
    # The dropped copies were acknowledged on the way: this time it starts at 21.
    assert await consumer_start(stream, "proj-0") == 21
    got = await collect(stream, 0, 1, 20, 15, consumer="proj-0")
    assert positions(got) == list(range(21, 36))


async def consumer_state(stream: NatsStream, consumer: str) -> tuple[int, int]:
    """(the last stream sequence delivered, the acknowledged floor) of a durable consumer."""
    client = await nats.connect(NATS_SERVER)
    try:
        info = await client.jetstream().consumer_info(stream.url.stream, consumer)
        delivered = info.delivered.stream_seq if info.delivered else 0
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        return int(delivered or 0), int(floor or 0)
    finally:
        await client.close()


async def test_the_next_batch_arrives_while_the_caller_works_and_is_acknowledged_after(
    open_stream: OpenStream,
) -> None:
    """A pull request stays open while the caller has a batch: the next one is already
    delivered when it comes back. The acknowledgement waits for the caller."""
    stream = open_stream(partitions=1, batch=10)
    await stream.publish(make_envelopes(35))
    batches = stream.subscribe(0, 1, 0, consumer="ahead")
    async with contextlib.aclosing(batches):
        assert positions(await anext(aiter(batches))) == list(range(1, 11))
        # The caller "commits" batch 1: meanwhile 11..20 are delivered, nothing is acked.
        await wait_until(
            lambda: consumer_state(stream, "ahead"), what="the next batch delivered",
        )
        assert await consumer_state(stream, "ahead") == (20, 0)
        assert positions(await anext(aiter(batches))) == list(range(11, 21))
        await wait_until(lambda: _floor_is(stream, "ahead", 10), what="batch 1 acknowledged")
        assert await consumer_state(stream, "ahead") == (30, 10)
        assert positions(await anext(aiter(batches))) == list(range(21, 31))  # acks 20
    # Stopping cleanly confirms the last acknowledgement sent: the floor is exact at once.
    assert (await consumer_state(stream, "ahead"))[1] == 20


async def _floor_is(stream: NatsStream, consumer: str, floor: int) -> bool:
    return (await consumer_state(stream, consumer))[1] == floor


async def delete_consumer(stream: NatsStream, consumer: str) -> None:
    client = await nats.connect(NATS_SERVER)
    try:
        await client.jetstream().delete_consumer(stream.url.stream, consumer)
    finally:
        await client.close()


async def test_a_consumer_deleted_under_a_subscriber_fails_it(
    open_stream: OpenStream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nats_stream, "_PULL_EXPIRES_SECONDS", 0.3)
    stream = open_stream(partitions=1)
    await stream.publish(make_envelopes(3))
    batches = stream.subscribe(0, 1, 0, consumer="gone")
    async with contextlib.aclosing(batches):
        assert len(await anext(aiter(batches))) == 3
        waiting = asyncio.ensure_future(anext(aiter(batches)))
        await asyncio.sleep(0.2)  # waiting for more, in an open pull request
        await delete_consumer(stream, "gone")
        with pytest.raises(Unavailable, match="409"):
            await asyncio.wait_for(waiting, 5)
    # Deleted while the caller had a batch and no request was open: the broker ignores
    # the next request; the subscriber notices when that should have ended.
    await stream.publish(make_envelopes(2, first=4))
    batches = stream.subscribe(0, 1, 3, consumer="gone")
    async with contextlib.aclosing(batches):
        assert positions(await anext(aiter(batches))) == [4, 5]
        await asyncio.sleep(0.2)  # the request for more found nothing and ended
        await delete_consumer(stream, "gone")
        with pytest.raises(Unavailable, match="no answer"):
            await asyncio.wait_for(anext(aiter(batches)), 10)


async def test_checkpoint_moved_back_reads_from_the_start(open_stream: OpenStream) -> None:
    """A rebuild resets the checkpoint below what the consumer acknowledged."""
    stream = open_stream(partitions=1, batch=10)
    await stream.publish(make_envelopes(30))
    assert len(await collect(stream, 0, 1, 0, 30, consumer="rebuilt")) == 30
    got = await collect(stream, 0, 1, 0, 30, consumer="rebuilt")
    assert positions(got) == list(range(1, 31))
    got = await collect(stream, 0, 1, 12, 18, consumer="rebuilt")
    assert positions(got) == list(range(13, 31))


async def test_removed_events_are_refused_not_skipped(open_stream: OpenStream) -> None:
    stream = open_stream(partitions=1)
    await stream.publish(make_envelopes(10))
    client = await nats.connect(NATS_SERVER)
    try:
        await client.jetstream().delete_msg(stream.url.stream, 1)  # an operator's limit
    finally:
        await client.close()
    with pytest.raises(CqrskitError, match="no longer holds the events after position 0"):
        await collect(stream, 0, 1, 0, 9)
    assert positions(await collect(stream, 0, 1, 1, 9)) == list(range(2, 11))


async def test_another_partition_count_is_refused(open_stream: OpenStream) -> None:
    await open_stream(partitions=4).publish(make_envelopes(5))
    with pytest.raises(CqrskitError, match="partitions=8"):
        await open_stream(partitions=8).publish(make_envelopes(5))


async def test_closed_connection_fails_the_subscriber(open_stream: OpenStream) -> None:
    stream = open_stream(partitions=1)
    await stream.publish(make_envelopes(5))
    batches = stream.subscribe(0, 1, 0, consumer="dies")
    async with contextlib.aclosing(batches):
        assert len(await anext(aiter(batches))) == 5
        await stream._links["subscribe"].client.close()
        with pytest.raises(Unavailable):
            await asyncio.wait_for(anext(aiter(batches)), 5)
    # A new subscription connects again and resumes after what was acknowledged.
    await stream.publish(make_envelopes(5, first=6))
    assert positions(await collect(stream, 0, 1, 5, 5, consumer="dies")) == list(range(6, 11))
