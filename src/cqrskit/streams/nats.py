"""The NATS JetStream stream: events published by the relay, consumed per partition.

URL: `nats://host:4222?stream=CQRSKIT&subject=cqrskit.events&partitions=8`
(`tls://` for TLS; `user:password@` in the address is passed on). Parameters:

| parameter | default | meaning |
|---|---|---|
| `stream` | `CQRSKIT` | the JetStream stream, created if missing (file storage, no limits) |
| `subject` | `cqrskit.events` | events go to `<subject>.<partition>` (stream: `<subject>.*`) |
| `partitions` | `8` | partition = crc32(stream id) mod this; the same in every process |
| `duplicate_window` | `120` | seconds the broker remembers event ids to drop re-publishes |
| `ack_wait` | `30` | seconds before the broker re-sends a delivered, unacknowledged batch |
| `batch` | `256` | most events a subscriber fetches at once |

The partition count is written into the stream's description; a process
configured with another count is refused, since it would route events to the
wrong subjects.

Publishing. Every event goes out as JSON with its event id as `Nats-Msg-Id`,
so the broker drops a re-publish inside the duplicate window. Many publishes
are in flight at once, and `publish` returns only when the broker acknowledged
every one. Order: the stream must hold each partition's events in position
order, or a subscriber (which drops what is at or below the last position it
gave out) would lose the late ones. So a batch is written in order on one
connection that never reconnects by itself, and any failure closes that
connection: the broker then received a prefix of the batch, never a batch with
a hole, and the caller's retry sends the whole batch again from its start
(the prefix is dropped as duplicates). Two publishers sending the same events
(a deposed relay) still give first copies in order. A copy re-published after
the duplicate window is stored again, later in the stream; subscribers drop it.

Subscribing. `subscribe(..., consumer="name")` uses a durable pull consumer
filtered on `<subject>.<partition>`. It yields a batch, and acknowledges it
only when the caller comes back for the next one: an async generator resumes
after the caller's `async for` body has finished, i.e. after the caller has
committed the batch with its checkpoint. A crash before that leaves the batch
unacknowledged, so the broker delivers it again (at-least-once); the caller's
checkpoint, read in the same transaction as its writes, makes the second
delivery change nothing (exactly-once effect). Each subscribe recreates the
consumer at its acknowledged floor, so a batch left unacknowledged comes back
at once and in order, rather than after `ack_wait` and behind newer events;
if the caller's checkpoint is behind that floor (a rebuild reset it), the
consumer starts again from the beginning of the stream. One subscriber per
consumer name at a time (the partition leases see to that).

Without a consumer name, an ephemeral consumer reads the partition from the
start of the stream, and is deleted when the subscriber stops.

The stream keeps every event. If an operator sets limits on it and events the
subscriber still needs were removed, `subscribe` refuses rather than skip them.
The broker refuses messages over its `max_payload` (1 MiB by default); raise it
on the server if events can be that large, or the relay will retry forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from cqrskit.errors import CqrskitError, Unavailable
from cqrskit.messages import Envelope, partition_of

log = logging.getLogger(__name__)

# Names NATS accepts in subjects, stream and consumer names without escaping.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SUBJECT = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")

# Publishes in flight per round trip: 256 gives about 10x the sequential rate here.
PUBLISH_WINDOW = 256
# An ephemeral consumer the broker has not heard from for this long is removed.
EPHEMERAL_IDLE_SECONDS = 300.0


# The URL's query parameters and how each is read.
_PARAMETERS: dict[str, Any] = {
    "stream": str, "subject": str, "partitions": int, "duplicate_window": float,
    "ack_wait": float, "batch": int,
}


@dataclass(frozen=True, slots=True)
class NatsUrl:
    server: str
    stream: str = "CQRSKIT"
    subject: str = "cqrskit.events"
    partitions: int = 8
    duplicate_window: float = 120.0
    ack_wait: float = 30.0
    batch: int = 256

    @classmethod
    def parse(cls, url: str) -> NatsUrl:
        parts = urlsplit(url)
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise CqrskitError(f"not a NATS URL: {url!r} (expected nats://host:port?...)")
        params = dict(parse_qsl(parts.query))
        unknown = set(params) - set(_PARAMETERS)
        if unknown:
            raise CqrskitError(f"unknown NATS URL parameters: {sorted(unknown)}")
        try:
            values = {key: _PARAMETERS[key](value) for key, value in params.items()}
        except ValueError as error:
            raise CqrskitError(f"bad NATS URL {url!r}: {error}") from None
        parsed = cls(server=f"{parts.scheme}://{parts.netloc}", **values)
        parsed._validate()
        return parsed

    def _validate(self) -> None:
        if not _NAME.match(self.stream):
            raise CqrskitError(f"NATS stream name {self.stream!r} must match {_NAME.pattern}")
        if not _SUBJECT.match(self.subject):
            raise CqrskitError(f"NATS subject {self.subject!r} must be dot-separated names")
        if not 1 <= self.partitions <= 4096:
            raise CqrskitError("NATS partitions must be between 1 and 4096")
        if self.duplicate_window <= 0 or self.ack_wait <= 0 or self.batch < 1:
            raise CqrskitError("NATS duplicate_window, ack_wait and batch must be positive")

    @property
    def address(self) -> str:
        """The server without credentials: for messages and logs."""
        parts = urlsplit(self.server)
        return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")

    @property
    def description(self) -> str:
        # Read back by every process: the partition count must agree everywhere.
        return f"cqrskit events, partitions={self.partitions}"


@dataclass(slots=True)
class _Link:
    """One client connection and its JetStream context."""

    client: NatsClient
    # Set when the connection closes: pending publishes will never be acknowledged.
    closed: asyncio.Event
    js: JetStreamContext = field(init=False)

    def __post_init__(self) -> None:
        self.js = self.client.jetstream()


def _unavailable(url: NatsUrl, doing: str, error: BaseException) -> Unavailable:
    detail = str(error) or type(error).__name__
    return Unavailable(f"NATS at {url.address} (stream {url.stream}): {doing} failed: {detail}")


def _decode(msg: Msg | bytes) -> Envelope:
    data = msg if isinstance(msg, bytes) else msg.data
    return Envelope.from_dict(orjson.loads(data))


class NatsStream:
    """The `Stream` port on NATS JetStream. Connects on first use."""

    def __init__(
        self, url: NatsUrl, *, connect_timeout: float = 2.0, ack_timeout: float = 10.0,
        # nats-py's fetch waits for a full batch until this timeout even after the
        # first message came, so it bounds the added latency of a quiet stream.
        fetch_timeout: float = 0.1,
    ) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self.ack_timeout = ack_timeout
        self.fetch_timeout = fetch_timeout
        # Publishing and subscribing use separate connections, so that dropping the
        # publisher's after a failure leaves running subscriptions alone.
        self._links: dict[str, _Link] = {}
        self._lock = asyncio.Lock()

    needs_relay = True

    @classmethod
    def from_url(cls, url: str, **options: float) -> NatsStream:
        return cls(NatsUrl.parse(url), **options)

    @property
    def partitions(self) -> int:
        return self.url.partitions

    # ------------------------------------------------------------ connections

    async def _link(self, role: str) -> _Link:
        async with self._lock:
            link = self._links.get(role)
            if link is not None and not link.client.is_closed:
                return link
            link = await self._connect(role)
            try:
                await self._ensure_stream(link.js)
            except BaseException:
                await self._close_client(link.client)
                raise
            self._links[role] = link
            return link

    async def _connect(self, role: str) -> _Link:
        closed = asyncio.Event()

        async def on_error(error: Exception) -> None:
            log.debug("NATS %s connection: %s", role, error)

        async def on_closed() -> None:
            log.info("NATS %s connection to %s closed", role, self.url.address)
            closed.set()

        try:
            client = await nats.connect(
                self.url.server,
                name=f"cqrskit-{role}",
                # Never reconnect by itself: a reconnect could send the rest of a
                # batch whose middle was lost (see the module docstring).
                allow_reconnect=False,
                # Bounded: nats-py retries the first connect forever when this is 0.
                max_reconnect_attempts=1,
                reconnect_time_wait=0.1,
                connect_timeout=max(1, round(self.connect_timeout)),
                error_cb=on_error,
                closed_cb=on_closed,
            )
        except (nats.errors.Error, OSError, TimeoutError) as error:
            raise _unavailable(self.url, "connecting", error) from error
        return _Link(client, closed)

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        url = self.url
        try:
            try:
                info = await js.stream_info(url.stream)
            except nats.js.errors.NotFoundError:
                try:
                    await js.add_stream(
                        StreamConfig(
                            name=url.stream, subjects=[f"{url.subject}.*"],
                            description=url.description, storage=StorageType.FILE,
                            retention=RetentionPolicy.LIMITS, discard=DiscardPolicy.OLD,
                            duplicate_window=url.duplicate_window,
                        )
                    )
                    log.info("created NATS stream %s on %s.*", url.stream, url.subject)
                    return
                except nats.js.errors.BadRequestError:
                    info = await js.stream_info(url.stream)  # another process made it first
        except (nats.errors.Error, OSError, TimeoutError) as error:
            raise _unavailable(url, "setting up the stream", error) from error
        if f"{url.subject}.*" not in (info.config.subjects or []):
            raise CqrskitError(
                f"NATS stream {url.stream} holds {info.config.subjects}, "
                f"not {url.subject}.*; use another stream name or subject"
            )
        if info.config.description != url.description:
            raise CqrskitError(
                f"NATS stream {url.stream} is described as {info.config.description!r}, but "
                f"this process is configured with partitions={url.partitions}; every process "
                "must use the same partition count"
            )

    async def _drop(self, role: str, link: _Link) -> None:
        """Close a connection that failed (if nobody replaced it yet)."""
        if self._links.get(role) is link:
            del self._links[role]
        await self._close_client(link.client)

    @staticmethod
    async def _close_client(client: NatsClient) -> None:
        # Closing flushes what is buffered; a hung server must not hang us too.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 2.0)

    async def close(self) -> None:
        async with self._lock:
            links, self._links = self._links, {}
        for link in links.values():
            await self._close_client(link.client)

    # ------------------------------------------------------------- publishing

    def subject_of(self, envelope: Envelope) -> str:
        return f"{self.url.subject}.{partition_of(envelope.stream_id, self.url.partitions)}"

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Send the events in order; return once the broker acknowledged all of them."""
        if not envelopes:
            return
        link = await self._link("publish")
        try:
            for start in range(0, len(envelopes), PUBLISH_WINDOW):
                # Enqueued one after another, so they go out in position order.
                acks = [
                    await link.js.publish_async(
                        self.subject_of(e), orjson.dumps(e.to_dict()),
                        headers={"Nats-Msg-Id": e.event_id},
                    )
                    for e in envelopes[start : start + PUBLISH_WINDOW]
                ]
                await self._acknowledged(link, acks)
        except BaseException as error:
            # Whatever went wrong (even a cancellation), this connection may have
            # sent part of the batch: it must not send anything more.
            await self._drop("publish", link)
            if isinstance(error, nats.errors.Error | OSError | TimeoutError):
                raise _unavailable(self.url, "publishing", error) from error
            raise

    async def _acknowledged(self, link: _Link, acks: list[asyncio.Future[Any]]) -> None:
        """Wait for every ack; fail at once if the connection closes meanwhile."""
        all_acked: asyncio.Future[Any] = asyncio.gather(*acks)
        closed: asyncio.Future[Any] = asyncio.ensure_future(link.closed.wait())
        try:
            done, _ = await asyncio.wait(
                (all_acked, closed), timeout=self.ack_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            closed.cancel()
        if all_acked in done:
            all_acked.result()  # raises the broker's refusal, if any
            return
        all_acked.cancel()
        with contextlib.suppress(BaseException):
            await all_acked
        if closed in done:
            raise nats.errors.ConnectionClosedError()
        raise TimeoutError(f"no acknowledgement within {self.ack_timeout}s")

    # ------------------------------------------------------------ subscribing

    async def subscribe(
        self, partition: int, partitions: int, after: int, *, consumer: str | None = None
    ) -> AsyncIterator[list[Envelope]]:
        """Batches of one partition with position > `after`, in order (see the module doc).

        When `partitions` differs from the stream's own count, the whole stream is
        read and filtered here: slower, still in order.
        """
        if not 0 <= partition < partitions:
            raise CqrskitError(f"partition {partition} is not in 0..{partitions - 1}")
        if consumer is not None and not _NAME.match(consumer):
            raise CqrskitError(f"NATS consumer name {consumer!r} must match {_NAME.pattern}")
        own_partitions = partitions == self.url.partitions
        # The stream holds only our subjects: no filter means all partitions.
        filter_subject = f"{self.url.subject}.{partition}" if own_partitions else None

        link = await self._link("subscribe")
        name, sub = await self._open_consumer(link.js, filter_subject, after, consumer)
        last = after
        try:
            while True:
                messages = await self._fetch(link, sub)
                batch = []
                for msg in messages:
                    envelope = self._envelope(msg)
                    # At or below `last`: a redelivery, or a copy re-published late.
                    if envelope is None or envelope.position <= last:
                        continue
                    if own_partitions or partition_of(envelope.stream_id, partitions) == partition:
                        batch.append(envelope)
                    last = envelope.position
                if batch:
                    yield batch
                # Back here only after the caller finished with the batch.
                if consumer is not None and messages:
                    await self._ack(link, messages[-1])  # acknowledges all up to it
        finally:
            await self._close_consumer(link, name, sub, durable=consumer is not None)

    async def _open_consumer(
        self, js: JetStreamContext, filter_subject: str | None, after: int,
        durable: str | None,
    ) -> tuple[str, JetStreamContext.PullSubscription]:
        stream = self.url.stream
        try:
            start = await self._resume_at(js, durable, after) if durable else 1
            await self._check_retained(js, start, after)
            if durable:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.delete_consumer(stream, durable)
            name = durable or f"cqrskit-{uuid.uuid4().hex}"
            config = ConsumerConfig(
                name=name,
                durable_name=durable,
                filter_subject=filter_subject,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start,
                # A durable subscriber acknowledges a batch with its last message.
                ack_policy=AckPolicy.ALL if durable else AckPolicy.NONE,
                ack_wait=self.url.ack_wait,
                max_ack_pending=max(1000, 2 * self.url.batch),
                inactive_threshold=None if durable else EPHEMERAL_IDLE_SECONDS,
            )
            await js.add_consumer(stream, config)
            sub = await js.pull_subscribe_bind(consumer=name, stream=stream)
        except (nats.errors.Error, OSError, TimeoutError) as error:
            raise _unavailable(self.url, "opening a consumer", error) from error
        return name, sub

    async def _resume_at(self, js: JetStreamContext, durable: str, after: int) -> int:
        """The stream sequence a durable consumer resumes from: after its acknowledged floor.

        Everything up to the floor was committed by some caller. If the message at
        the floor is beyond `after`, the caller's checkpoint went back (a rebuild):
        read from the start instead.
        """
        try:
            info = await js.consumer_info(self.url.stream, durable)
        except nats.js.errors.NotFoundError:
            return 1
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        if floor < 1:
            return 1
        try:
            at_floor = _decode(await _message_data(js, self.url.stream, floor))
        except (nats.js.errors.NotFoundError, ValueError, KeyError):
            return 1
        return floor + 1 if at_floor.position <= after else 1

    async def _check_retained(self, js: JetStreamContext, start: int, after: int) -> None:
        """Refuse to start if events after `after` were removed from the stream."""
        state = (await js.stream_info(self.url.stream)).state
        if state.first_seq <= start or state.messages == 0:
            return  # nothing we would read was removed
        first = _decode(await _message_data(js, self.url.stream, state.first_seq))
        if first.position > after + 1:
            raise CqrskitError(
                f"NATS stream {self.url.stream} no longer holds the events after position "
                f"{after} (its oldest is {first.position}); rebuild the projection from the "
                "event store"
            )

    async def _fetch(self, link: _Link, sub: JetStreamContext.PullSubscription) -> list[Msg]:
        if link.client.is_closed:
            raise Unavailable(f"NATS at {self.url.address}: the connection was closed")
        try:
            return await sub.fetch(self.url.batch, timeout=self.fetch_timeout)
        except (nats.errors.TimeoutError, TimeoutError):
            # nats-py raises either kind when nothing came in time; the builtin one is
            # an OSError, so it must be caught before the clause below.
            return []  # nothing new yet; fetching again re-checks the connection
        except (nats.errors.Error, OSError) as error:
            raise _unavailable(self.url, "fetching", error) from error

    async def _ack(self, link: _Link, msg: Msg) -> None:
        # Waiting for the broker (one round trip per batch) means a subscriber that
        # stops cleanly leaves an exact floor for the next one to resume from.
        try:
            await msg.ack_sync(timeout=self.ack_timeout)
        except (nats.errors.Error, OSError) as error:
            # Unacknowledged, the batch comes again and is dropped as already seen.
            raise _unavailable(self.url, "acknowledging", error) from error

    def _envelope(self, msg: Msg) -> Envelope | None:
        try:
            return _decode(msg)
        except (ValueError, KeyError, TypeError) as error:
            log.error("skipping a message on %s that is not a cqrskit event: %s",
                      msg.subject, error)
            return None

    async def _close_consumer(
        self, link: _Link, name: str, sub: JetStreamContext.PullSubscription, *, durable: bool
    ) -> None:
        if link.client.is_closed:
            return
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
            if not durable:
                await link.js.delete_consumer(self.url.stream, name)


async def _message_data(js: JetStreamContext, stream: str, seq: int) -> bytes:
    message: Any = await js.get_msg(stream, seq)
    data: bytes = message.data or b""
    return data
