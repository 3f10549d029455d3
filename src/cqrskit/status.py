"""How far the read side lags behind the write side, read from the stores.

One snapshot serves `cqrskit status`, the dashboard and the lag metrics. It
costs two reads of the query DB and one bounded read of the log, whatever the
number of projections and partitions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cqrskit.messages import Envelope, partition_of
from cqrskit.ports import EventStore, ViewStore
from cqrskit.registry import Registry
from cqrskit.tenancy import tenant_of

log = logging.getLogger(__name__)

# Events read past the oldest checkpoint to count the lag exactly; further
# behind than this, the count is estimated from the log's last position.
WINDOW = 2000


@dataclass(frozen=True, slots=True)
class Lag:
    projection: str
    partition: int
    checkpoint: int
    events: int
    seconds: float
    exact: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "projection": self.projection, "partition": self.partition,
            "checkpoint": self.checkpoint, "events": self.events,
            "seconds": round(self.seconds, 3), "exact": self.exact,
        }


@dataclass(frozen=True, slots=True)
class Status:
    last_position: int
    partitions: int
    lags: list[Lag]
    dead_letters: dict[str, int]
    leases: dict[int, str]
    recent: list[Envelope] = field(default_factory=list)
    # The same counts per tenant, so that each tenant can be shown only its own.
    dead_letters_by_tenant: dict[str, dict[str, int]] = field(default_factory=dict)
    taken_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_dict(self) -> dict[str, Any]:
        return {
            "last_position": self.last_position,
            "partitions": self.partitions,
            "lags": [lag.to_dict() for lag in self.lags],
            "dead_letters": self.dead_letters,
            "leases": {str(p): owner for p, owner in sorted(self.leases.items())},
            "recent": [_summary(e) for e in self.recent],
            "dead_letters_by_tenant": self.dead_letters_by_tenant,
            "taken_at": self.taken_at.isoformat(),
        }


def _summary(envelope: Envelope) -> dict[str, Any]:
    return {
        "position": envelope.position, "type": envelope.type,
        "stream_id": envelope.stream_id, "version": envelope.version,
        "recorded_at": envelope.recorded_at,
    }


async def read_status(
    registry: Registry, store: EventStore, views: ViewStore, partitions: int,
    *, recent: int = 10,
) -> Status:
    """Checkpoints against the log: events and seconds behind, per projection and partition."""
    last = await store.last_position()
    checkpoints = await views.checkpoints()
    keys = [(name, p) for name in registry.projections for p in range(partitions)]
    oldest = min((checkpoints.get(key, 0) for key in keys), default=last)
    window = await store.read_all(oldest, WINDOW) if oldest < last else []
    complete = len(window) < WINDOW or (bool(window) and window[-1].position >= last)
    now = datetime.now(UTC)
    lags = [
        _lag(name, p, checkpoints.get((name, p), 0), window, complete, last, partitions, now)
        for name, p in keys
    ]
    letters = await views.list_dead_letters()
    counts = dict.fromkeys(registry.projections, 0)
    by_tenant: dict[str, dict[str, int]] = {}
    for letter in letters:
        counts[letter.projection] = counts.get(letter.projection, 0) + 1
        tenant = by_tenant.setdefault(tenant_of(letter.stream_id), {})
        tenant[letter.projection] = tenant.get(letter.projection, 0) + 1
    # A complete window already ends with the log's last events: no second read then.
    if complete and len(window) >= recent:
        tail = window[len(window) - recent:]
    else:
        tail = await store.read_all(max(0, last - recent), recent) if recent else []
    leases = await views.leases()
    return Status(last, partitions, lags, counts, leases, list(reversed(tail)), by_tenant)


def _lag(
    projection: str, partition: int, checkpoint: int, window: list[Envelope], complete: bool,
    last: int, partitions: int, now: datetime,
) -> Lag:
    behind = [
        e for e in window
        if e.position > checkpoint and partition_of(e.stream_id, partitions) == partition
    ]
    if complete:
        return Lag(projection, partition, checkpoint, len(behind), _age(behind, now), True)
    # Past the window: assume the rest of the log spreads evenly over the partitions,
    # and give at least the age of the window's last event.
    seen_until = window[-1].position if window else checkpoint
    rest = max(0, last - max(seen_until, checkpoint)) // partitions
    seconds = _age(behind or window[-1:], now)
    return Lag(projection, partition, checkpoint, len(behind) + rest, seconds, False)


def _age(events: list[Envelope], now: datetime) -> float:
    """Seconds since the first of these events was recorded (0 for none)."""
    if not events:
        return 0.0
    return max(0.0, (now - datetime.fromisoformat(events[0].recorded_at)).total_seconds())


class StatusSampler:
    """Reads the status every `interval` seconds, for every viewer at once.

    `read` returns a snapshot as JSON-ready dict: from the stores in a process
    that has them, or from a query handler service in an API that forwards.
    """

    def __init__(
        self, read: Callable[[], Awaitable[dict[str, Any]]], interval: float = 1.0
    ) -> None:
        self.read = read
        self.interval = interval
        self.latest: dict[str, Any] | None = None
        self._changed = asyncio.Condition()

    async def run(self) -> None:
        while True:
            try:
                self.latest = await self.read()
            except Exception as error:
                log.warning("could not read the pipeline status: %s: %s",
                            type(error).__name__, error)
            else:
                async with self._changed:
                    self._changed.notify_all()
            await asyncio.sleep(self.interval)

    async def updates(self) -> AsyncIterator[dict[str, Any]]:
        """The latest snapshot now, then each new one as it is read."""
        if self.latest is not None:
            yield self.latest
        while True:
            async with self._changed:
                await self._changed.wait()
            if self.latest is not None:
                yield self.latest
