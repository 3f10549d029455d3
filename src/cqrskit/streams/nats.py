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
so the broker drops a re-publish inside the duplicate window. A whole relay
batch (up to `PUBLISH_WINDOW` events) is enqueued at once and its
acknowledgements are awaited together, and `publish` returns only when the
broker acknowledged every one. Order: the stream must hold each partition's events in position
order, or a subscriber (which drops what is at or below the last position it
gave out) would lose the late ones. So a batch is written in order on one
connection that never reconnects by itself, and any failure closes that
connection: the broker then received a prefix of the batch, never a batch with
a hole, and the caller's retry sends the whole batch again from its start
(the prefix is dropped as duplicates). Two publishers sending the same events
(a deposed relay) still give first copies in order. A copy re-published after
the duplicate window is stored again, later in the stream; subscribers drop it.
One case this does not cover: a broker that refuses one message and stores the
ones after it (a stream `max_msg_size` an operator set, say) leaves a hole; once
the refused event can be stored it lands behind them, and subscribers drop it.
Leave the stream without per-message limits (as created here).

Subscribing. `subscribe(..., consumer="name")` uses a durable pull consumer
filtered on `<subject>.<partition>`, with a pull request kept open so that the
next batch arrives while the caller works on this one (`_Puller`). It yields a
batch, and acknowledges it (all messages up to its last, without waiting for
the broker) only when the caller comes back for the next one: an async
generator resumes after the caller's `async for` body has finished, i.e. after
the caller has committed the batch with its checkpoint. A subscriber that stops
cleanly waits for the broker to confirm its last acknowledgement, so the next
one resumes exactly after it. A crash before that leaves the batch
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
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

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
from cqrskit.streams.wire import check_partition, decode, encode, parse_query

log = logging.getLogger(__name__)

# Names NATS accepts in subjects, stream and consumer names without escaping.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SUBJECT = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")

# Publishes in flight per wait for acknowledgements: a relay batch (1000 events by
# default) goes out whole and is waited for once. (nats-py allows 4000 in flight.)
PUBLISH_WINDOW = 1024
# An ephemeral consumer the broker has not heard from for this long is removed.
EPHEMERAL_IDLE_SECONDS = 300.0
# A subscriber's open pull request lasts this long before it is renewed; a waiting
# subscriber checks its connection this often.
_PULL_EXPIRES_SECONDS = 5.0
_PULL_CHECK_SECONDS = 0.25
# How long after its expiry a lingering request that brought messages is taken as
# ended when no status came (see `_Puller.take`).
_PULL_SILENT_END_SECONDS = 0.5


# The URL's query parameters and how each is read.
_PARAMETERS: dict[str, Callable[[str], Any]] = {
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
        values = parse_query(url, parts.query, _PARAMETERS, "NATS")
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
    # The publisher's acknowledgements, once it has published.
    acks: _Acks | None = None

    def __post_init__(self) -> None:
        self.js = self.client.jetstream()


class _Acks:
    """The broker's answers to one connection's publishes, counted per window.

    Each publish asks for its answer on `<inbox>.<n>`; one subscription collects them.
    (nats-py's `publish_async` makes a future, a semaphore step and an
    `os.urandom` call per message; here a window of them shares one future.)
    """

    def __init__(self, client: NatsClient) -> None:
        self.client = client
        self.prefix = ""
        self.next = 0
        self.pending: set[str] = set()
        self.done: asyncio.Future[None] | None = None

    async def start(self) -> None:
        self.prefix = self.client.new_inbox()
        await self.client.subscribe(self.prefix + ".*", cb=self._on_ack)

    def window(self) -> asyncio.Future[None]:
        """A new window: its future is done once every reply it asked for came."""
        self.pending = set()
        self.done = asyncio.get_running_loop().create_future()
        return self.done

    def reply_to(self) -> str:
        self.next += 1
        token = str(self.next)
        self.pending.add(token)
        return f"{self.prefix}.{token}"

    def sent(self) -> None:
        """Every publish of the window is enqueued."""
        if not self.pending and self.done is not None and not self.done.done():
            self.done.set_result(None)

    async def _on_ack(self, msg: Msg) -> None:
        token = msg.subject.rpartition(".")[2]
        done = self.done
        if done is None or done.done() or token not in self.pending:
            return  # an answer to an earlier window
        status = msg.headers.get("Status") if msg.headers else None
        if status == "503":
            done.set_exception(nats.js.errors.NoStreamResponseError())
            return
        if b'"error"' in msg.data:
            answer = orjson.loads(msg.data)
            if "error" in answer:
                done.set_exception(nats.js.errors.APIError.from_error(answer["error"]))
                return
        self.pending.discard(token)
        if not self.pending:
            done.set_result(None)


def _unavailable(url: NatsUrl, doing: str, error: BaseException) -> Unavailable:
    detail = str(error) or type(error).__name__
    return Unavailable(f"NATS at {url.address} (stream {url.stream}): {doing} failed: {detail}")


class NatsStream:
    """The `Stream` port on NATS JetStream. Connects on first use."""

    def __init__(
        self, url: NatsUrl, *, connect_timeout: float = 2.0, ack_timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self.ack_timeout = ack_timeout
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
            acks = link.acks
            if acks is None:
                acks = link.acks = _Acks(link.client)
                await acks.start()
            publish, reply_to, subject_of = link.client.publish, acks.reply_to, self.subject_of
            for start in range(0, len(envelopes), PUBLISH_WINDOW):
                window = acks.window()
                # Enqueued one after another, so they go out in position order.
                for e in envelopes[start : start + PUBLISH_WINDOW]:
                    await publish(
                        subject_of(e), encode(e), reply=reply_to(),
                        headers={"Nats-Msg-Id": e.event_id},
                    )
                acks.sent()
                await self._acknowledged(link, window)
        except BaseException as error:
            # Whatever went wrong (even a cancellation), this connection may have
            # sent part of the batch: it must not send anything more.
            await self._drop("publish", link)
            if isinstance(error, nats.errors.Error | OSError | TimeoutError):
                raise _unavailable(self.url, "publishing", error) from error
            raise

    async def _acknowledged(self, link: _Link, window: asyncio.Future[None]) -> None:
        """Wait for every ack of the window; fail at once if the connection closes."""
        closed: asyncio.Future[Any] = asyncio.ensure_future(link.closed.wait())
        try:
            done, _ = await asyncio.wait(
                (window, closed), timeout=self.ack_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            closed.cancel()
        if window in done:
            window.result()  # raises the broker's refusal, if any
            return
        window.cancel()
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
        check_partition(partition, partitions)
        if consumer is not None and not _NAME.match(consumer):
            raise CqrskitError(f"NATS consumer name {consumer!r} must match {_NAME.pattern}")
        own_partitions = partitions == self.url.partitions
        # The stream holds only our subjects: no filter means all partitions.
        filter_subject = f"{self.url.subject}.{partition}" if own_partitions else None

        link = await self._link("subscribe")
        name = await self._open_consumer(link.js, filter_subject, after, consumer)
        puller = _Puller(link, self.url, name)
        acked: Msg | None = None
        last = after
        try:
            await puller.start()
            while True:
                messages = await puller.take()
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
                    await self._ack(messages[-1])  # acknowledges all up to it
                    acked = messages[-1]
        finally:
            if acked is not None:
                await self._confirm_ack(link, acked)
            await puller.stop()
            if consumer is None:
                await self._delete_consumer(link, name)

    async def _open_consumer(
        self, js: JetStreamContext, filter_subject: str | None, after: int,
        durable: str | None,
    ) -> str:
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
        except (nats.errors.Error, OSError, TimeoutError) as error:
            raise _unavailable(self.url, "opening a consumer", error) from error
        return name

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
            at_floor = decode(await _message_data(js, self.url.stream, floor))
        except (nats.js.errors.NotFoundError, ValueError, KeyError):
            return 1
        return floor + 1 if at_floor.position <= after else 1

    async def _check_retained(self, js: JetStreamContext, start: int, after: int) -> None:
        """Refuse to start if events after `after` were removed from the stream."""
        state = (await js.stream_info(self.url.stream)).state
        if state.first_seq <= start or state.messages == 0:
            return  # nothing we would read was removed
        first = decode(await _message_data(js, self.url.stream, state.first_seq))
        if first.position > after + 1:
            raise CqrskitError(
                f"NATS stream {self.url.stream} no longer holds the events after position "
                f"{after} (its oldest is {first.position}); rebuild the projection from the "
                "event store"
            )

    async def _ack(self, msg: Msg) -> None:
        # Sent without waiting for the broker: the caller has committed the batch, so
        # an acknowledgement lost with a connection only brings the batch again,
        # dropped by position. A clean stop confirms the last one (`_confirm_ack`).
        try:
            await msg.ack()
        except (nats.errors.Error, OSError) as error:
            raise _unavailable(self.url, "acknowledging", error) from error

    async def _confirm_ack(self, link: _Link, msg: Msg) -> None:
        """Wait until the broker has the last acknowledgement: the next subscriber then
        resumes exactly after what was committed (see `_resume_at`)."""
        if link.client.is_closed:
            return
        msg._ackd = False  # nats-py refuses a second ack otherwise; the broker answers it
        with contextlib.suppress(Exception):
            await msg.ack_sync(timeout=min(self.ack_timeout, 2.0))

    def _envelope(self, msg: Msg) -> Envelope | None:
        try:
            return decode(msg.data)
        except (ValueError, KeyError, TypeError) as error:
            log.error("skipping a message on %s that is not a cqrskit event: %s",
                      msg.subject, error)
            return None

    async def _delete_consumer(self, link: _Link, name: str) -> None:
        if link.client.is_closed:
            return
        with contextlib.suppress(Exception):
            await link.js.delete_consumer(self.url.stream, name)


class _Puller:
    """Reads a pull consumer, asking for the next batch while the caller is still busy
    with the previous one.

    nats-py's `fetch` asks anew when the caller comes back (a round trip before the
    next batch can start) and takes each message through a task of its own. Here a
    callback collects the messages, and a request is kept open:
    - after handing over a batch, a `no_wait` request asks for what the stream holds
      now; the broker sends it and ends the request (by count, or with a 404 or 408
      status), so a batch is everything that was there, as with `fetch`;
    - when such a request found nothing, a lingering request waits (up to
      `_PULL_EXPIRES_SECONDS`) and `take` returns from its first message on, so a
      quiet stream adds no latency;
    - a lingering request that brought messages is over once it expired, with or
      without the broker's 408; one that brought nothing and got no answer at all
      means the consumer is gone.
    """

    def __init__(self, link: _Link, url: NatsUrl, consumer: str) -> None:
        self.link = link
        self.url = url
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{url.stream}.{consumer}"
        self.batch = url.batch
        self.inbox = ""
        self.sub: Any = None
        self.buffer: list[Msg] = []
        # The open request: whether there is one, whether it lingers, how many messages
        # it may still bring, how many it brought, and when it is over at the latest.
        self.open = False
        self.lingering = False
        self.outstanding = 0
        self.brought = 0
        self.found_nothing = False
        self.expires_at = 0.0
        self.silent_end = 0.0
        self.error: Unavailable | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._closed_watch: asyncio.Future[Any] | None = None

    async def start(self) -> None:
        client = self.link.client
        self.inbox = client.new_inbox()
        try:
            self.sub = await client.subscribe(
                self.inbox, cb=self._on_msg, pending_msgs_limit=4 * self.batch + 64
            )
        except (nats.errors.Error, OSError, TimeoutError) as error:
            raise _unavailable(self.url, "fetching", error) from error
        self._closed_watch = asyncio.ensure_future(self.link.closed.wait())
        self._closed_watch.add_done_callback(lambda _: self._wake())
        await self._request()

    async def stop(self) -> None:
        if self._closed_watch is not None:
            self._closed_watch.cancel()
        if self.sub is not None and not self.link.client.is_closed:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()

    async def take(self) -> list[Msg]:
        """At least one message (waiting as long as it takes), at most a batch."""
        loop = asyncio.get_running_loop()
        while not (self.buffer and (not self.open or self.lingering)):
            if self.error is not None:
                raise self.error
            if self.link.client.is_closed:
                raise Unavailable(f"NATS at {self.url.address}: the connection was closed")
            if self.open and self.brought and loop.time() > self.silent_end:
                # NATS 2.9 sometimes ends a lingering request that delivered messages at
                # its expiry without the 408 (seen under load at 50-100 events/s): it
                # ended all the same, so ask again rather than fail the subscriber.
                self._ended()
            if self.open and loop.time() > self.expires_at:
                # The broker ends every request it holds with a status: this one was
                # dropped, as happens to requests for a consumer deleted meanwhile.
                raise Unavailable(
                    f"NATS at {self.url.address} (stream {self.url.stream}): a pull request "
                    "got no answer (was the consumer deleted?)"
                )
            if not self.open and not self.buffer:
                await self._request()
            self._waiter = loop.create_future()
            # A plain future with a timer, not asyncio.wait_for: on Python 3.11 that can
            # lose a cancellation that races with a result.
            timer = loop.call_later(_PULL_CHECK_SECONDS, self._wake)
            try:
                await self._waiter
            finally:
                timer.cancel()
                self._waiter = None
        taken, self.buffer = self.buffer[: self.batch], self.buffer[self.batch :]
        if not self.open:
            await self._request()  # the next batch comes while the caller works
        return taken

    async def _request(self) -> None:
        """Ask for what the buffer has room for: at once, or lingering if the last
        request found nothing."""
        wanted = self.batch - len(self.buffer)
        if wanted <= 0:
            return
        loop = asyncio.get_running_loop()
        request: dict[str, Any] = {"batch": wanted}
        if self.found_nothing:
            request["expires"] = int(_PULL_EXPIRES_SECONDS * 1e9)
        else:
            request["no_wait"] = True
        try:
            await self.link.client.publish(
                self.next_subject, orjson.dumps(request), reply=self.inbox
            )
        except (nats.errors.Error, OSError) as error:
            raise _unavailable(self.url, "fetching", error) from error
        self.open = True
        self.lingering = self.found_nothing
        self.outstanding = wanted
        self.brought = 0
        # By then the broker has ended the request, unless it dropped it.
        self.expires_at = loop.time() + _PULL_EXPIRES_SECONDS + 2.0
        # A lingering request that brought messages has surely ended by then.
        self.silent_end = (loop.time() + _PULL_EXPIRES_SECONDS + _PULL_SILENT_END_SECONDS
                           if self.lingering else self.expires_at)

    def _ended(self) -> None:
        self.open = False
        self.found_nothing = self.brought == 0

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is None:
            self.buffer.append(msg)
            self.brought += 1
            self.outstanding -= 1
            if self.outstanding <= 0:
                self._ended()
        elif status in ("404", "408"):
            if self.open:
                self._ended()  # nothing (more) to send now, or the request expired
        elif status != "100":  # 100: a heartbeat; anything else: the consumer is gone
            description = msg.headers.get("Description", "") if msg.headers else ""
            self.error = Unavailable(
                f"NATS at {self.url.address} (stream {self.url.stream}): fetching failed: "
                f"{status} {description}".strip()
            )
            self.open = False
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


async def _message_data(js: JetStreamContext, stream: str, seq: int) -> bytes:
    message: Any = await js.get_msg(stream, seq)
    data: bytes = message.data or b""
    return data
