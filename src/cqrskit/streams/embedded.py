"""The embedded stream: the event store's own log, followed in process.

Nothing is published: the log already is the stream. Subscribers read it from
their checkpoint and wait for the store to say it grew.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from cqrskit.messages import Envelope, partition_of
from cqrskit.ports import EventStore

# A subscriber also polls, so that appends made by another process (a CLI, a
# second server on the same file) are seen without a notification.
POLL_SECONDS = 0.5


class EmbeddedStream:
    def __init__(self, store: EventStore, *, batch_size: int = 1000) -> None:
        self.store = store
        self.batch_size = batch_size

    partitions = 1
    needs_relay = False

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """The log is the stream: nothing to do."""

    async def subscribe(
        self, partition: int, partitions: int, after: int, *, consumer: str | None = None
    ) -> AsyncIterator[list[Envelope]]:
        while True:
            batch = await self.store.read_all(after, self.batch_size)
            if not batch:
                await self.store.wait_for_append(after, POLL_SECONDS)
                continue
            after = batch[-1].position
            if partitions > 1:
                batch = [e for e in batch if partition_of(e.stream_id, partitions) == partition]
                if not batch:
                    continue
            yield batch

    async def close(self) -> None:
        pass
