"""Partition leases: share the stream's partitions among update processor processes.

Every `heartbeat_seconds` a process records that it is alive, counts the live
processes (a heartbeat within `ttl`), and takes its fair share
ceil(partitions / live): it renews its leases, gives up those beyond its share
and claims free or expired ones up to it. A process that dies stops renewing,
its leases expire after `ttl`, and the others take them over; one that joins
makes the others' share shrink, so they give partitions up for it.

Correctness never depends on leases: a view update reads its checkpoint inside
its own transaction, so a partition owned twice for a moment costs duplicate
work, never a wrong view. Leases are for sharing the work. Still, a process
stops its runners for a partition *before* it releases the lease, so that
normally one process at a time reads a partition's durable consumer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping

from cqrskit.errors import CqrskitError
from cqrskit.ports import PartitionLeaseStore

log = logging.getLogger(__name__)

Assign = Callable[[set[int]], Awaitable[None]]


def plan_claim(
    owner: str, wanted: int, partitions: int,
    leases: Mapping[int, tuple[str, float]], now: float,
) -> tuple[set[int], set[int]]:
    """Which partitions `owner` keeps and which of its leases it gives up.

    `leases` maps partition → (owner, expires at). The owner keeps its lowest
    partitions up to `wanted` and tops up with the lowest free or expired ones.
    The SQL adapters run it inside their write transaction.
    """
    held = sorted(p for p, (who, _) in leases.items() if who == owner and p < partitions)
    keep = set(held[:wanted])
    release = set(held[wanted:])
    for partition in range(partitions):
        if len(keep) >= wanted:
            break
        lease = leases.get(partition)
        if partition not in keep and partition not in release and (
            lease is None or lease[1] <= now
        ):
            keep.add(partition)
    return keep, release


def fair_share(partitions: int, live_owners: int) -> int:
    """How many partitions each of `live_owners` processes should hold."""
    return math.ceil(partitions / max(1, live_owners))


def default_owner() -> str:
    """A name that says where the process runs and is unique among restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class PartitionLeases:
    def __init__(
        self,
        store: PartitionLeaseStore,
        partitions: int,
        assign: Assign,
        *,
        owner: str | None = None,
        ttl: float = 10.0,
        heartbeat_seconds: float = 2.0,
    ) -> None:
        if heartbeat_seconds >= ttl:
            raise CqrskitError("the lease heartbeat must be shorter than the lease ttl")
        self.store = store
        self.partitions = partitions
        self.assign = assign
        self.owner = owner or default_owner()
        self.ttl = ttl
        self.heartbeat_seconds = heartbeat_seconds
        self.owned: set[int] = set()
        self.live: list[str] = []

    async def tick(self) -> set[int]:
        """One round: heartbeat, give up the excess, claim up to the fair share."""
        self.live = await self.store.heartbeat(self.owner, self.ttl)
        wanted = fair_share(self.partitions, len(self.live))
        # The store keeps the lowest partitions an owner holds; stop the others
        # here before the store releases them to somebody else.
        keep = set(sorted(self.owned)[:wanted])
        if keep != self.owned:
            await self._set(keep)
        held = await self.store.claim_partitions(self.owner, wanted, self.partitions, self.ttl)
        await self._set(held)
        return held

    async def _set(self, partitions: set[int]) -> None:
        if partitions == self.owned:
            return
        gained, lost = partitions - self.owned, self.owned - partitions
        log.info("%s: owns partitions %s (gained %s, lost %s; %d live owners)",
                 self.owner, sorted(partitions), sorted(gained), sorted(lost), len(self.live))
        self.owned = set(partitions)
        await self.assign(set(partitions))

    async def run(self) -> None:
        """Tick forever; when the store cannot be reached for a ttl, stop everything."""
        loop = asyncio.get_running_loop()
        last_success = loop.time()
        while True:
            try:
                await self.tick()
                last_success = loop.time()
            except Exception as error:
                log.warning("%s: lease round failed: %s", self.owner, error)
                # Our leases have expired by now: others may own the partitions.
                if loop.time() - last_success >= self.ttl:
                    await self._set(set())
            await asyncio.sleep(self.heartbeat_seconds)

    async def release(self) -> None:
        """Stop every runner, then give the leases up so others take over at once."""
        await self._set(set())
        await self.store.release_partitions(self.owner)
