"""Where each projection has got to, and waiting for it to get somewhere.

Update processors in this process report their progress here at once; progress
made by other processes is picked up by polling the query DB while someone waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from cqrskit.messages import ConsistencyToken
from cqrskit.ports import ViewStore


class Checkpoints:
    def __init__(self, views: ViewStore, *, partitions: int = 1, poll_seconds: float = 0.05):
        self.views = views
        self.partitions = partitions
        self.poll_seconds = poll_seconds
        self.positions: dict[tuple[str, int], int] = {}
        self._changed = asyncio.Event()
        self._reading: asyncio.Future[None] | None = None
        self._read_started = float("-inf")

    def advance(self, projection: str, partition: int, position: int) -> None:
        key = (projection, partition)
        if position > self.positions.get(key, 0):
            self.positions[key] = position
            self._changed.set()

    def reset(self, projection: str) -> None:
        for key in [k for k in self.positions if k[0] == projection]:
            del self.positions[key]

    async def refresh(self, max_age: float | None = None) -> dict[tuple[str, int], int]:
        """Take the stored checkpoints as the truth: a rebuild may have moved one back.

        Callers share reads, so a crowd of waiting queries does not take the CPU a
        busy processor needs to catch up: without `max_age` a caller joins the
        first read that started after it asked; with it, any read that young does.
        """
        loop = asyncio.get_running_loop()
        asked = loop.time()
        oldest = asked if max_age is None else asked - max_age
        while self._read_started < oldest or self._reading is not None:
            if self._reading is None:
                self._read_started = loop.time()
                self._reading = asyncio.ensure_future(self._read())
            started = self._read_started
            await asyncio.shield(self._reading)
            if started >= oldest:
                break
        return self.positions

    async def _read(self) -> None:
        try:
            self.positions = await self.views.checkpoints()
            self._changed.set()
        finally:
            self._reading = None

    def reached(self, projections: Iterable[str], token: ConsistencyToken) -> bool:
        partition = token.partition(self.partitions)
        return all(self.positions.get((p, partition), 0) >= token.position for p in projections)

    async def wait(
        self, projections: Iterable[str], token: ConsistencyToken, timeout: float
    ) -> bool:
        """Wait until every named projection has processed the token; False on timeout."""
        projections = list(projections)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Always ask the store once: memory may be ahead of a rebuild elsewhere.
        await self.refresh()
        while not self.reached(projections, token):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, self.poll_seconds))
            except TimeoutError:
                await self.refresh(max_age=self.poll_seconds)
        return True
