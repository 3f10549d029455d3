"""The ports: what the core needs from a command DB, a query DB and an event stream.

Adapters implement these for one technology each (`cqrskit.stores.*`,
`cqrskit.streams.*`); the core only ever talks to these Protocols.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from cqrskit.messages import CommandResult, Envelope, NewEvent

T = TypeVar("T")


@dataclass(slots=True)
class AppendRequest:
    """The events one command decided, to be stored all or nothing.

    `command_hash` is empty when the handler generated `command_id` itself: such
    an id cannot have been used before, so stores may skip the idempotency lookup.
    """

    stream_id: str
    stream_type: str
    expected_version: int
    events: list[NewEvent]
    metadata: dict[str, Any]
    command_id: str
    command_hash: str


@dataclass(slots=True, frozen=True)
class StoredCommand:
    """What the command DB remembers of an accepted command (for idempotency)."""

    command_id: str
    command_hash: str
    result: CommandResult


class EventStore(Protocol):
    """The command DB: an append-only log of events, one stream per aggregate."""

    async def append(self, request: AppendRequest) -> CommandResult:
        """Store the events atomically.

        Raises `ConcurrencyConflict` when the stream is not at `expected_version`
        and `IdempotencyKeyReused` when the command id was used for another
        command. A command id seen before with the same hash returns the first
        result and stores nothing.
        """
        ...

    async def read_stream(self, stream_id: str) -> list[Envelope]: ...

    async def read_all(self, after: int, limit: int) -> list[Envelope]:
        """Events with position > `after`, in position order, at most `limit`."""
        ...

    async def last_position(self) -> int: ...

    async def wait_for_append(self, after: int, timeout: float) -> None:
        """Return once the log may hold events beyond `after`, or after `timeout`."""
        ...

    async def get_command(self, command_id: str) -> StoredCommand | None: ...

    async def check(self) -> None:
        """Raise if the store cannot serve requests (readiness)."""
        ...

    async def close(self) -> None: ...


@dataclass(slots=True, frozen=True)
class DeadLetter:
    """An event a projection could not apply, or one queued behind it in its stream."""

    id: int
    projection: str
    partition: int
    stream_id: str
    position: int
    envelope: Envelope
    error: str
    attempts: int
    is_cause: bool
    parked_at: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "projection": self.projection,
            "partition": self.partition,
            "stream_id": self.stream_id,
            "position": self.position,
            "event_type": self.envelope.type,
            "version": self.envelope.version,
            "error": self.error,
            "attempts": self.attempts,
            "is_cause": self.is_cause,
            "parked_at": self.parked_at,
        }


class ViewWriter(Protocol):
    """What a projection may do to its views while applying events."""

    def get(self, collection: str, doc_id: str) -> dict[str, Any] | None: ...

    def put(self, collection: str, doc_id: str, doc: dict[str, Any]) -> None: ...

    def delete(self, collection: str, doc_id: str) -> None: ...


class UnitOfWork(ViewWriter, Protocol):
    """One transaction on the query DB: view changes, checkpoints and dead letters."""

    def prefetch(self, collection: str, doc_ids: Iterable[str]) -> None:
        """A hint: load these documents in one round trip before they are asked for."""
        ...

    def checkpoint(self, projection: str, partition: int) -> int: ...

    def set_checkpoint(self, projection: str, partition: int, position: int) -> None: ...

    def parked_streams(self, projection: str) -> set[str]: ...

    def park(
        self, projection: str, partition: int, envelope: Envelope, error: str, *,
        attempts: int, is_cause: bool,
    ) -> None: ...

    def dead_letters(self, projection: str, stream_id: str) -> list[DeadLetter]: ...

    def remove_dead_letter(self, dead_letter_id: int) -> None: ...

    def record_failure(self, dead_letter_id: int, error: str) -> None:
        """A retried dead letter failed again: it becomes the cause, one more attempt."""
        ...

    def clear(self, collection: str) -> None: ...


@dataclass(slots=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None


@dataclass(slots=True, frozen=True)
class Collection:
    """A set of JSON documents; `indexed` names top-level fields to index for filters."""

    name: str
    indexed: Sequence[str] = field(default_factory=tuple)


class ViewReader(Protocol):
    """What a query may read: parameterised lookups only."""

    async def get(self, collection: str, doc_id: str) -> dict[str, Any] | None: ...

    async def find(
        self,
        collection: str,
        filters: Mapping[str, Any],
        *,
        after: str | None = None,
        limit: int = 50,
        descending: bool = False,
        id_range: tuple[str, str] | None = None,
    ) -> Page:
        """Documents whose fields equal `filters`, ordered by id, after the cursor.

        A filter key is a dotted path of identifiers (`data.color`). `id_range`
        (low, high) keeps only ids with low <= id < high, compared by code point,
        as a range on the primary key: a tenant's documents (cqrskit.tenancy).
        """
        ...


# ------------------------------------------------------------ partition leases
#
# Leases share the partitions among update processors; they are not what makes
# processing correct (the checkpoint read inside each transaction is), so a
# partition owned twice for a moment costs work, never a wrong view.


class PartitionLeaseStore(Protocol):
    """Partition leases in the query DB; each call is one serialised transaction."""

    async def heartbeat(self, owner: str, ttl: float) -> list[str]:
        """Record that `owner` is alive; return the owners seen within `ttl` seconds."""
        ...

    async def claim_partitions(
        self, owner: str, wanted: int, partitions: int, ttl: float
    ) -> set[int]:
        """Renew the owner's leases, release those beyond `wanted`, claim free or
        expired ones up to `wanted`; return the partitions the owner holds now."""
        ...

    async def release_partitions(self, owner: str) -> None:
        """Give up every lease of `owner` and forget its heartbeat (clean shutdown)."""
        ...

    async def leases(self) -> dict[int, str]:
        """Partition → owner, for the leases that have not expired."""
        ...


class ViewStore(ViewReader, PartitionLeaseStore, Protocol):
    """The query DB."""

    async def setup(self, collections: Sequence[Collection]) -> None: ...

    async def run(self, work: Callable[[UnitOfWork], T]) -> T:
        """Run `work` in one transaction and commit it; roll back if it raises.

        Transactions are serialised against every other writer of the store, so
        a checkpoint read inside `work` is the one that will be overwritten.
        """
        ...

    async def checkpoints(self) -> dict[tuple[str, int], int]: ...

    async def list_dead_letters(self, projection: str | None = None) -> list[DeadLetter]: ...

    async def get_dead_letter(self, dead_letter_id: int) -> DeadLetter | None: ...

    async def check(self) -> None: ...

    async def close(self) -> None: ...


class RelayState(Protocol):
    """Where the relay from the event log to the broker has got to, kept in the command DB.

    Only one relay may publish at a time: `lead()` waits until this process holds
    the leadership and keeps it until the context exits or the process dies (a
    crashed leader's lock goes with its connection, so a standby takes over).
    """

    async def position(self) -> int: ...

    async def save(self, position: int) -> None: ...

    def lead(self) -> AbstractAsyncContextManager[None]: ...


class Stream(Protocol):
    """The event stream between the command DB and the update processors."""

    @property
    def partitions(self) -> int:
        """How many partitions the stream is split into (1 for the embedded log)."""
        ...

    @property
    def needs_relay(self) -> bool:
        """True when events must be published from the log to a broker."""
        ...

    async def publish(self, envelopes: Sequence[Envelope]) -> None: ...

    def subscribe(
        self, partition: int, partitions: int, after: int, *, consumer: str | None = None
    ) -> AsyncIterator[list[Envelope]]:
        """Batches of events of one partition with position > `after`, in order.

        `consumer` names a durable subscription that survives restarts, where
        the broker has such a thing; None reads without leaving state behind.
        """
        ...

    async def close(self) -> None: ...
