"""Where each projection has got to, and waiting for it to get somewhere.

Update processors in this process report their progress here at once; progress
made by other processes is picked up by polling the query DB while someone waits.

A wait normally starts with a read of the stored checkpoints, since memory may be
ahead of a rebuild run by another process. It skips that read when every
checkpoint it waits for is followed by a runner in this process and still short
of the token: then nothing can be answered from memory yet, and what later wakes
the waiter is either that runner's commit (which checked the stored checkpoint
inside its own transaction) or a read of the store by the poll.

Waiting costs next to nothing per waiter: a waiter is parked, ordered by its
position, on the first (projection, partition) it still waits for, and only the
waiters a checkpoint has passed are looked at again when it moves. (Waking every
waiter on every commit made the waiting itself the busiest part of a process
that had fallen behind: thousands of waiters, each woken by every batch.) One
poll of the query DB per interval serves all of them.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

from cqrskit.messages import ConsistencyToken
from cqrskit.ports import ViewStore


@dataclass(slots=True)
class _Waiter:
    projections: list[str]
    partition: int
    position: int
    future: asyncio.Future[bool] = field(repr=False)


class Checkpoints:
    def __init__(self, views: ViewStore, *, partitions: int = 1, poll_seconds: float = 0.05):
        self.views = views
        self.partitions = partitions
        self.poll_seconds = poll_seconds
        self.positions: dict[tuple[str, int], int] = {}
        # The checkpoints a runner of this process follows (it calls `advance`).
        self._followed: set[tuple[str, int]] = set()
        self._reading: asyncio.Future[None] | None = None
        self._read_started = float("-inf")
        # Parked waiters by the (projection, partition) each waits for next: a heap
        # of (position, tie-breaker, waiter).
        self._waiting: dict[tuple[str, int], list[tuple[int, int, _Waiter]]] = {}
        self._parked = 0
        self._order = itertools.count()
        self._poller: asyncio.Task[None] | None = None

    def advance(self, projection: str, partition: int, position: int) -> None:
        """A runner of this process committed the checkpoint `position`."""
        key = (projection, partition)
        self._followed.add(key)
        if position > self.positions.get(key, 0):
            self.positions[key] = position
            if key in self._waiting:
                self._release(key)

    def reset(self, projection: str) -> None:
        for key in [k for k in self.positions if k[0] == projection]:
            del self.positions[key]
        self._followed = {k for k in self._followed if k[0] != projection}

    def unfollow(self, projection: str, partition: int) -> None:
        """This process's runner of the checkpoint stopped (another may take it over)."""
        self._followed.discard((projection, partition))

    def _short_here(self, projections: list[str], token: ConsistencyToken) -> bool:
        """Whether every checkpoint is followed here and memory has it short of the token."""
        partition = token.partition(self.partitions)
        return all(
            (p, partition) in self._followed
            and self.positions.get((p, partition), 0) < token.position
            for p in projections
        )

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
            for key in list(self._waiting):
                self._release(key)
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
        if not self._short_here(projections, token):
            # Memory may be ahead of a rebuild elsewhere: ask the store once.
            await self.refresh()
        if self.reached(projections, token):
            return True
        loop = asyncio.get_running_loop()
        waiter = _Waiter(
            projections, token.partition(self.partitions), token.position, loop.create_future()
        )
        self._park(waiter)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name="checkpoints-poll")
        try:
            return await asyncio.wait_for(waiter.future, timeout)
        except TimeoutError:
            return False
        finally:
            if not waiter.future.done():
                waiter.future.cancel()

    def _park(self, waiter: _Waiter) -> None:
        """Park the waiter on the first of its projections short of its position, or
        wake it. Every projection is checked again each time: one may have gone back."""
        if waiter.future.done():
            return
        for projection in waiter.projections:
            key = (projection, waiter.partition)
            if self.positions.get(key, 0) < waiter.position:
                heap = self._waiting.setdefault(key, [])
                heapq.heappush(heap, (waiter.position, next(self._order), waiter))
                self._parked += 1
                return
        waiter.future.set_result(True)

    def _release(self, key: tuple[str, int]) -> None:
        """Look again at the waiters of `key` that its checkpoint has passed."""
        heap = self._waiting[key]
        reached = self.positions.get(key, 0)
        passed = []
        while heap and heap[0][0] <= reached:
            passed.append(heapq.heappop(heap)[2])
            self._parked -= 1
        if not heap:
            del self._waiting[key]
        for waiter in passed:
            self._park(waiter)

    def _forget_gone(self) -> None:
        """Drop waiters that stopped waiting (timed out, cancelled)."""
        for key, heap in list(self._waiting.items()):
            kept = [entry for entry in heap if not entry[2].future.done()]
            self._parked -= len(heap) - len(kept)
            if kept:
                heapq.heapify(kept)
                self._waiting[key] = kept
            else:
                del self._waiting[key]

    async def _poll(self) -> None:
        """While anyone waits, read the stored checkpoints once per interval for all of
        them: progress made in other processes, or a checkpoint a rebuild moved back."""
        while True:
            await asyncio.sleep(self.poll_seconds)
            self._forget_gone()
            if not self._parked:
                return
            await self.refresh(max_age=self.poll_seconds)
