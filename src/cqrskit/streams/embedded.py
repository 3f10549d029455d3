"""The embedded stream: the event store's own log, followed in process.

Nothing is published: the log already is the stream. Subscribers read it from
their checkpoint and wait for the store to say it grew.

Subscribers at the same position share one read: every projection follows the
log, and they are usually woken by the same append, so each batch would otherwise
be read and decoded once per projection.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence

from cqrskit.messages import Envelope, partition_of
from cqrskit.ports import EventStore

# A subscriber also polls, so that appends made by another process (a CLI, a
# second server on the same file) are seen without a notification.
POLL_SECONDS = 0.5
# Recent reads kept for other subscribers at the same position. The update processor
# reads once per partition for all its projections, so sharing is for the odd second
# subscriber (a rebuild beside it, another processor); each read holds up to a batch
# of envelopes in memory (16 of them were 40 MiB in a rebuild).
RECENT_READS = 2


class EmbeddedStream:
    def __init__(self, store: EventStore, *, batch_size: int = 1000) -> None:
        self.store = store
        self.batch_size = batch_size
        self._recent: OrderedDict[int, asyncio.Future[list[Envelope]]] = OrderedDict()

    partitions = 1
    needs_relay = False

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """The log is the stream: nothing to do."""

    async def subscribe(
        self, partition: int, partitions: int, after: int, *, consumer: str | None = None
    ) -> AsyncIterator[list[Envelope]]:
        while True:
            batch = await self._read(after)
            if not batch:
                await self.store.wait_for_append(after, POLL_SECONDS)
                continue
            after = batch[-1].position
            if partitions > 1:
                batch = [e for e in batch if partition_of(e.stream_id, partitions) == partition]
                if not batch:
                    continue
            yield batch

    async def _read(self, after: int) -> list[Envelope]:
        """The log after `after`, read once for every subscriber that asks for it.

        A batch read earlier may be shorter than what the log holds now; that is
        still the log's next events in order (positions have no gaps), and the
        subscriber asks again from its end. An empty read or a failed one is not
        kept: the next subscriber reads for itself.
        """
        read = self._recent.get(after)
        if read is None:
            read = asyncio.ensure_future(self.store.read_all(after, self.batch_size))
            self._recent[after] = read
            while len(self._recent) > RECENT_READS:
                self._recent.popitem(last=False)
            read.add_done_callback(lambda done: self._keep_if_useful(after, done))
        # Shielded: one subscriber cancelled must not cancel the read for the others.
        return list(await asyncio.shield(read))

    def _keep_if_useful(self, after: int, read: asyncio.Future[list[Envelope]]) -> None:
        useless = read.cancelled() or read.exception() is not None or not read.result()
        if useless and self._recent.get(after) is read:
            del self._recent[after]

    async def close(self) -> None:
        pass
