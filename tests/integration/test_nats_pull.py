"""A NATS subscriber's lingering pull request: events that trickle in more slowly than
a request lasts are all delivered, with no restart of the subscriber."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats_helpers import (
    NATS_HOST,
    NATS_PORT,
    NATS_SERVER,
    NATS_START,
    delete_stream,
    make_envelopes,
    stream_url,
    unique_names,
)

from cqrskit.messages import Envelope
from cqrskit.streams import nats as nats_stream
from cqrskit.streams.nats import NatsStream


@pytest.fixture
async def stream(require_service: Any) -> AsyncIterator[NatsStream]:
    require_service("NATS", NATS_HOST, NATS_PORT, start=NATS_START)
    name, subject = unique_names()
    opened = NatsStream.from_url(stream_url(NATS_SERVER, name, subject, partitions=1))
    yield opened
    await opened.close()
    await delete_stream(NATS_SERVER, name)


async def test_a_lingering_request_that_brought_events_then_expired_is_renewed(
    stream: NatsStream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nats_stream, "_PULL_EXPIRES_SECONDS", 1.0)
    # Slower than a request lasts: each lingering request brings a few, then expires.
    got = await _trickled(stream, "trickle", count=10, interval=0.4)
    assert [e.position for e in got] == list(range(1, 11))


async def _trickled(
    stream: NatsStream, consumer: str, *, count: int, interval: float
) -> list[Envelope]:
    """Publish `count` events one at a time, `interval` s apart, while a subscriber
    takes them; what it got (each batch within 5 s, or the test fails)."""
    got: list[Envelope] = []

    async def trickle() -> None:
        for position in range(1, count + 1):
            await stream.publish(make_envelopes(1, first=position))
            await asyncio.sleep(interval)

    batches = stream.subscribe(0, 1, 0, consumer=consumer)
    async with contextlib.aclosing(batches):
        publishing = asyncio.create_task(trickle())
        try:
            while len(got) < count:
                got.extend(await asyncio.wait_for(anext(aiter(batches)), 5))
        finally:
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
    return got


async def test_a_lingering_request_that_expired_without_a_status_is_renewed(
    stream: NatsStream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load, NATS 2.9 was seen ending a lingering request that had delivered
    messages without sending its 408; the subscriber then failed with "got no answer"
    and restarted a second later. Here the 408s of such requests are dropped."""
    monkeypatch.setattr(nats_stream, "_PULL_EXPIRES_SECONDS", 1.0)
    receive = nats_stream._Puller._on_msg
    dropped = 0

    async def without_408(puller: Any, msg: Any) -> None:
        nonlocal dropped
        status = msg.headers.get("Status") if msg.headers else None
        if status == "408" and puller.lingering and puller.brought:
            dropped += 1
            return
        await receive(puller, msg)

    monkeypatch.setattr(nats_stream._Puller, "_on_msg", without_408)
    # Without the fix: Unavailable ("got no answer") 3 s into a request.
    got = await _trickled(stream, "silent", count=12, interval=0.3)
    assert [e.position for e in got] == list(range(1, 13))
    assert dropped >= 2  # the case did happen, more than once
