"""The Kafka-protocol stream: Apache Kafka, or Azure Event Hubs through its Kafka endpoint.

URLs:
- `kafka://host:9092[,host2:9092]?topic=cqrskit-events&partitions=8` (plaintext);
- `eventhubs://<namespace>.servicebus.windows.net?topic=<event hub>&partitions=8`:
  port 9093, SASL_SSL, mechanism PLAIN, user name `$ConnectionString` and the
  namespace's connection string as the password, read from the environment
  variable CQRSKIT_EVENTHUBS_CONNECTION_STRING (never from the URL, never logged).

| parameter | default | meaning |
|---|---|---|
| `topic` | `cqrskit-events` | the topic (on Event Hubs: the event hub), created if missing |
| `partitions` | `8` | partition = crc32(stream id) mod this; Kafka partition N = ours |
| `group` | `cqrskit` | prefix of the consumer groups: `<group>.<consumer>` (see below) |
| `batch` | `256` | most events a subscriber takes at once |
| `batch_bytes` | `65536` | most bytes of one partition's events per produce request |
| `idempotence` | `true` | Kafka's idempotent producer (`false` where the broker refuses it) |
| `ack_timeout` | `10` | seconds a publish waits for the broker before it fails (and is retried) |

An existing topic with another partition count is refused, since events would
land in the wrong partitions.

Publishing. Each event is one record: key = stream id, value = the envelope as
JSON, header `event_id`; its partition is chosen here (`partition_of`), never by
the client's partitioner, so the update processor's partition N is the topic's
partition N and leases and checkpoints work unchanged. `publish` returns once
the broker acknowledged every record (acks=all). Order: a subscriber drops what
is at or below the last position it gave out, so each partition must hold its
events in position order, never with a hole. So a batch goes out in waves: a
wave is at most one record batch per partition (Kafka appends a record batch
whole or not at all), and the next wave is sent only once the broker has
acknowledged the whole previous one. On any failure the producer is dropped
without flushing what it still holds: each partition then holds a prefix of
what was meant for it, and the caller's retry sends the whole batch again.
Unlike NATS, Kafka does not drop those copies: its idempotent producer only
removes the duplicates of its own retries, within one producer session, and a
retry after a failure is a new session. Subscribers drop the copies by position
(first copies are in order; copies come later with lower positions).

Subscribing. A subscriber reads one partition through `assign()`: the partition
leases decide who reads what, so Kafka's group rebalancing is not used, and the
consumer group only keeps offsets (`<group>.<consumer>`, the partition being
Kafka's own key; the consumer name `<consumer>-<partition>` loses its suffix; the
update processor's consumer is `views-<crc32 of its projection names>`).
It starts at the group's committed offset, or at the beginning of the partition;
the caller's checkpoint (`after`) is the truth and the offset only a hint: what
is at or below `after` is dropped. If the record just before the committed
offset lies beyond `after`, the checkpoint went back (a rebuild) and reading
starts from the beginning. A batch's offset is committed only when the caller
comes back for the next batch, i.e. after it committed the batch with its
checkpoint; a crash before that brings the batch again, and the caller's
checkpoint makes the second delivery change nothing.

A topic has no order across its partitions, so a subscriber must read it with
its own partition count; other counts are refused (replay the event log for a
rebuild instead). A topic keeps events only for its retention time (Event Hubs
Standard: at most 7 days): if records were removed and the broker cannot show
that none of them is still needed (no committed offset at or after the
partition's first record, and that record lies beyond `after`), `subscribe`
refuses rather than skip events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiokafka import (  # type: ignore[import-untyped]
    AIOKafkaConsumer,
    AIOKafkaProducer,
    TopicPartition,
)
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from aiokafka.errors import (  # type: ignore[import-untyped]
    KafkaError,
    OffsetOutOfRangeError,
    TopicAlreadyExistsError,
)
from aiokafka.helpers import create_ssl_context  # type: ignore[import-untyped]

from cqrskit.errors import CqrskitError, Unavailable
from cqrskit.messages import Envelope, partition_of
from cqrskit.streams.wire import check_partition, decode, encode, parse_query

log = logging.getLogger(__name__)

CONNECTION_STRING_ENV = "CQRSKIT_EVENTHUBS_CONNECTION_STRING"
EVENTHUBS_PORT = 9093
# How long a subscriber waits on an empty partition before asking again.
_FETCH_WAIT_MS = 1000


def _boolean(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"{value!r} is not true or false")


# The URL's query parameters and how each is read.
_PARAMETERS: dict[str, Callable[[str], Any]] = {
    "topic": str, "partitions": int, "group": str, "batch": int, "batch_bytes": int,
    "idempotence": _boolean, "ack_timeout": float,
}


@dataclass(frozen=True, slots=True)
class KafkaUrl:
    bootstrap: tuple[str, ...]
    eventhubs: bool = False
    topic: str = "cqrskit-events"
    partitions: int = 8
    group: str = "cqrskit"
    batch: int = 256
    batch_bytes: int = 65536
    idempotence: bool = True
    ack_timeout: float = 10.0

    @classmethod
    def parse(cls, url: str) -> KafkaUrl:
        parts = urlsplit(url)
        if parts.scheme not in ("kafka", "eventhubs") or not parts.netloc:
            raise CqrskitError(
                f"not a Kafka URL: {url!r} (expected kafka://host:port?... or "
                "eventhubs://<namespace>.servicebus.windows.net?...)"
            )
        if "@" in parts.netloc:
            raise CqrskitError(
                f"no credentials in a Kafka URL; Event Hubs reads its connection string "
                f"from {CONNECTION_STRING_ENV}"
            )
        values = parse_query(url, parts.query, _PARAMETERS, "Kafka")
        eventhubs = parts.scheme == "eventhubs"
        servers = tuple(server for server in parts.netloc.split(",") if server)
        if eventhubs:
            # The Kafka endpoint of a namespace is always on 9093.
            servers = tuple(s if ":" in s else f"{s}:{EVENTHUBS_PORT}" for s in servers)
        parsed = cls(bootstrap=servers, eventhubs=eventhubs, **values)
        parsed._validate()
        return parsed

    def _validate(self) -> None:
        if not self.topic or len(self.topic) > 249:
            raise CqrskitError("the Kafka topic name must have 1 to 249 characters")
        if not 1 <= self.partitions <= 4096:
            raise CqrskitError("Kafka partitions must be between 1 and 4096")
        if not self.group or self.batch < 1 or self.batch_bytes < 1024:
            raise CqrskitError("Kafka group must be set, batch >= 1, batch_bytes >= 1024")
        if self.ack_timeout <= 0:
            raise CqrskitError("Kafka ack_timeout must be positive")
        if any(":" not in server for server in self.bootstrap):
            raise CqrskitError("every Kafka bootstrap server needs host:port")

    @property
    def address(self) -> str:
        """Where the broker is, for messages and logs (there are no credentials in it)."""
        scheme = "eventhubs" if self.eventhubs else "kafka"
        return f"{scheme}://{','.join(self.bootstrap)}"


def _unavailable(url: KafkaUrl, doing: str, error: BaseException) -> Unavailable:
    detail = str(error) or type(error).__name__
    return Unavailable(f"Kafka at {url.address} (topic {url.topic}): {doing} failed: {detail}")


def group_of(url: KafkaUrl, consumer: str, partition: int) -> str:
    """The consumer group of a durable subscriber: one per consumer, whatever its partitions.

    Kafka keys committed offsets by group, topic and partition, so the partition
    needs no group of its own: `views-1a2b3c4d-3` on partition 3 commits in
    `<group>.views-1a2b3c4d`. Fewer groups also keep within Event Hubs' quotas.
    """
    suffix = f"-{partition}"
    base = consumer[: -len(suffix)] if consumer.endswith(suffix) else consumer
    return f"{url.group}.{base}"


class KafkaStream:
    """The `Stream` port on a Kafka-protocol broker. Connects on first use."""

    def __init__(
        self, url: KafkaUrl, *, connect_timeout: float = 5.0, ack_timeout: float | None = None,
    ) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self.ack_timeout = url.ack_timeout if ack_timeout is None else ack_timeout
        self._producer: Any = None
        self._topic_checked = False
        self._lock = asyncio.Lock()

    needs_relay = True

    @classmethod
    def from_url(cls, url: str, **options: float) -> KafkaStream:
        return cls(KafkaUrl.parse(url), **options)

    @property
    def partitions(self) -> int:
        return self.url.partitions

    # ------------------------------------------------------------ connections

    def _client_options(self) -> dict[str, Any]:
        """What every client (producer, consumer, admin) needs to reach the broker."""
        options: dict[str, Any] = {
            "bootstrap_servers": list(self.url.bootstrap),
            "client_id": "cqrskit",
            "request_timeout_ms": 30_000,
            # Event Hubs closes idle connections after 240 s: close them first.
            "connections_max_idle_ms": 180_000,
            "metadata_max_age_ms": 180_000,
        }
        if self.url.eventhubs:
            secret = os.environ.get(CONNECTION_STRING_ENV, "")
            if not secret:
                raise CqrskitError(
                    f"{CONNECTION_STRING_ENV} is not set: Event Hubs needs the namespace's "
                    "connection string (Endpoint=sb://...;SharedAccessKeyName=...;"
                    "SharedAccessKey=...)"
                )
            options.update(
                security_protocol="SASL_SSL", sasl_mechanism="PLAIN",
                sasl_plain_username="$ConnectionString", sasl_plain_password=secret,
                ssl_context=create_ssl_context(),
            )
        return options

    async def _ensure_topic(self) -> None:
        """Create the topic with our partition count if missing; refuse another count."""
        async with self._lock:
            if self._topic_checked:
                return
            admin = AIOKafkaAdminClient(**self._client_options())
            try:
                await asyncio.wait_for(admin.start(), self.connect_timeout)
                # Create first: reading the metadata of a missing topic makes some
                # brokers create it with their default partition count.
                await self._create_topic(admin)
                found = await admin.describe_topics([self.url.topic])
            except (KafkaError, OSError, TimeoutError) as error:
                raise _unavailable(self.url, "checking the topic", error) from error
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(admin.close(), 2.0)
            count = len(found[0]["partitions"]) if found and not found[0]["error_code"] else 0
            if count != self.url.partitions:
                raise CqrskitError(
                    f"Kafka topic {self.url.topic} at {self.url.address} has {count} "
                    f"partitions, but this process is configured with partitions="
                    f"{self.url.partitions}; events would go to the wrong partitions"
                )
            self._topic_checked = True

    async def _create_topic(self, admin: Any) -> None:
        """Ask for the topic; whether or not the broker obliges, its partition count,
        read next, decides (an event hub made by the deployment, a key without the
        right to create one, a broker without the admin API)."""
        try:
            response = await admin.create_topics(
                [NewTopic(self.url.topic, self.url.partitions, 1)]
            )
        except KafkaError as error:
            log.info("Kafka topic %s not created: %s", self.url.topic, error)
            return
        for _, code, message in response.topic_errors:
            if code == TopicAlreadyExistsError.errno:
                return
            if code:
                log.info("Kafka topic %s not created (error %d: %s)",
                         self.url.topic, code, message)
                return
        log.info("created Kafka topic %s with %d partitions",
                 self.url.topic, self.url.partitions)

    async def _start_producer(self) -> Any:
        await self._ensure_topic()
        async with self._lock:
            if self._producer is not None:
                return self._producer
            producer = AIOKafkaProducer(
                **self._client_options(),
                acks="all",
                enable_idempotence=self.url.idempotence,
                max_batch_size=self.url.batch_bytes,
                linger_ms=0,
            )
            try:
                await asyncio.wait_for(producer.start(), self.connect_timeout)
            except BaseException as error:
                await _abandon(producer)
                if isinstance(error, KafkaError | OSError | TimeoutError):
                    raise _unavailable(self.url, "connecting", error) from error
                raise
            self._producer = producer
            return producer

    async def close(self) -> None:
        async with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            try:
                # A clean stop waits for what is still queued: nothing, after publish.
                await asyncio.wait_for(producer.stop(), 5.0)
            except Exception:
                await _abandon(producer)

    # ------------------------------------------------------------- publishing

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Send the events; return once the broker acknowledged all of them (see the
        module doc for why they go in waves)."""
        if not envelopes:
            return
        producer = await self._start_producer()
        try:
            partitions = self.url.partitions
            wave: dict[int, Any] = {}
            for envelope in envelopes:
                partition = partition_of(envelope.stream_id, partitions)
                builder = wave.get(partition)
                if builder is None or not self._append(builder, envelope):
                    if builder is not None:  # this partition's batch is full
                        await self._send_wave(producer, wave)
                        wave = {}
                    builder = wave[partition] = producer.create_batch()
                    # The first record of a batch always fits, whatever its size.
                    self._append(builder, envelope)
            await self._send_wave(producer, wave)
        except BaseException as error:
            # Whatever went wrong (even a cancellation), this producer may hold records
            # it has not sent yet: it must send nothing more.
            async with self._lock:
                if self._producer is producer:
                    self._producer = None
                # A broker that lost its topics would otherwise recreate ours with its
                # default partition count on the next send: check (create) it again.
                self._topic_checked = False
            await _abandon(producer)
            if isinstance(error, KafkaError | OSError | TimeoutError):
                raise _unavailable(self.url, "publishing", error) from error
            raise

    @staticmethod
    def _append(builder: Any, envelope: Envelope) -> bool:
        appended = builder.append(
            timestamp=None, key=envelope.stream_id.encode(),
            value=encode(envelope),
            headers=[("event_id", envelope.event_id.encode())],
        )
        return appended is not None

    async def _send_wave(self, producer: Any, wave: dict[int, Any]) -> None:
        """One record batch per partition; return when the broker acknowledged all."""
        if not wave:
            return
        async with asyncio.timeout(self.ack_timeout):
            acks = [
                await producer.send_batch(builder, self.url.topic, partition=partition)
                for partition, builder in wave.items()
            ]
            await asyncio.gather(*acks)

    # ------------------------------------------------------------ subscribing

    async def subscribe(
        self, partition: int, partitions: int, after: int, *, consumer: str | None = None
    ) -> AsyncIterator[list[Envelope]]:
        """Batches of one partition with position > `after`, in order (see the module doc)."""
        check_partition(partition, partitions)
        if partitions != self.url.partitions:
            raise CqrskitError(
                f"the Kafka topic {self.url.topic} has {self.url.partitions} partitions and "
                f"no order across them, so it cannot be read as {partitions}; replay the "
                "event log instead (CQRSKIT_STREAM=embedded)"
            )
        if consumer is not None and not 0 < len(consumer) <= 200:
            raise CqrskitError("a Kafka consumer name must have 1 to 200 characters")
        await self._ensure_topic()
        group = group_of(self.url, consumer, partition) if consumer is not None else None
        reader = AIOKafkaConsumer(
            **self._client_options(),
            group_id=group,
            enable_auto_commit=False,
            # Never jump silently: records removed under a reader are an error.
            auto_offset_reset="none",
            max_partition_fetch_bytes=4 * self.url.batch_bytes,
        )
        tp = TopicPartition(self.url.topic, partition)
        try:
            try:
                await asyncio.wait_for(reader.start(), self.connect_timeout)
                reader.assign([tp])
                reader.seek(tp, await self._start_offset(reader, tp, after, group))
            except (KafkaError, OSError, TimeoutError) as error:
                raise _unavailable(self.url, "opening a consumer", error) from error
            last = after
            while True:
                records = await self._fetch(reader, tp)
                batch = []
                for record in records:
                    envelope = self._envelope(record)
                    # At or below `last`: read again after a restart, or a copy.
                    if envelope is None or envelope.position <= last:
                        continue
                    batch.append(envelope)
                    last = envelope.position
                if batch:
                    yield batch
                # Back here only after the caller finished with the batch.
                if group is not None and records:
                    await self._commit(reader, tp, records[-1].offset + 1)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader.stop(), 5.0)

    async def _start_offset(self, reader: Any, tp: Any, after: int, group: str | None) -> int:
        """Where to start reading: after the committed offset if the checkpoint agrees."""
        first = (await reader.beginning_offsets([tp]))[tp]
        committed = await reader.committed(tp) if group is not None else None
        if committed is not None and committed > first:
            before = await self._record_at(reader, tp, committed - 1)
            if before is not None and before.position <= after:
                return int(committed)
            # The checkpoint is behind what the group committed (a rebuild reset
            # it): read from the first record.
        elif committed is not None and committed == first:
            return int(first)  # every removed record was read and committed
        if first > 0:
            # Records were removed (retention) that may not have been read: refuse
            # unless they all lie at or below the checkpoint.
            oldest = await self._record_at(reader, tp, first)
            if oldest is not None and oldest.position > after:
                raise CqrskitError(
                    f"Kafka topic {self.url.topic} partition {tp.partition} no longer holds "
                    f"all events after position {after} (its oldest is {oldest.position}); "
                    "rebuild the projection from the event store"
                )
        return int(first)

    async def _record_at(self, reader: Any, tp: Any, offset: int) -> Envelope | None:
        reader.seek(tp, offset)
        found = await reader.getmany(tp, timeout_ms=self.ack_timeout * 1000, max_records=1)
        records = found.get(tp, [])
        return self._envelope(records[0]) if records else None

    async def _fetch(self, reader: Any, tp: Any) -> list[Any]:
        try:
            found = await reader.getmany(
                tp, timeout_ms=_FETCH_WAIT_MS, max_records=self.url.batch
            )
        except OffsetOutOfRangeError as error:
            raise CqrskitError(
                f"Kafka topic {self.url.topic} partition {tp.partition}: the next records "
                "were removed before this subscriber read them (retention); rebuild the "
                "projection from the event store"
            ) from error
        except (KafkaError, OSError) as error:
            raise _unavailable(self.url, "fetching", error) from error
        records: list[Any] = found.get(tp, [])
        return records

    async def _commit(self, reader: Any, tp: Any, offset: int) -> None:
        # The caller committed the batch with its checkpoint; a commit lost here only
        # brings the batch again, dropped by position.
        try:
            await reader.commit({tp: offset})
        except (KafkaError, OSError) as error:
            raise _unavailable(self.url, "committing an offset", error) from error

    def _envelope(self, record: Any) -> Envelope | None:
        try:
            return decode(record.value)
        except (ValueError, KeyError, TypeError) as error:
            log.error("skipping a record at offset %s of %s that is not a cqrskit event: %s",
                      record.offset, self.url.topic, error)
            return None


async def _abandon(producer: Any) -> None:
    """Stop a producer without sending what it still holds.

    aiokafka's stop() first flushes every queued record, which never ends while
    the broker is away (an idempotent producer never gives a batch up). So stop
    its sender task and close its connections instead; what it held is dropped
    (the caller sends the whole batch again).
    """
    producer._closed = True  # what stop() sets; no stop() will come to flush
    task = getattr(getattr(producer, "_sender", None), "sender_task", None)
    if task is not None:
        task.cancel()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(producer.client.close(), 2.0)
    if task is not None:
        # It waits for its requests in flight, which fail now that connections closed.
        await asyncio.wait({task}, timeout=2.0)
