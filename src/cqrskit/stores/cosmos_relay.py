"""The relay's state in the Cosmos DB command DB: its position and its leader lease.

Both live in the `log` container (partition `relay`) of the event store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from azure.cosmos.aio import ContainerProxy
from azure.cosmos.exceptions import CosmosHttpResponseError

from cqrskit.errors import Unavailable
from cqrskit.stores.cosmos import (
    IF_MATCH,
    is_conflict,
    is_not_found,
    is_precondition_failed,
    read_or_none,
    safe_id,
    translated,
)
from cqrskit.stores.cosmos_events import CosmosEventStore

log = logging.getLogger(__name__)

_RELAY_PARTITION = "relay"


@dataclass
class _Leadership:
    owner: str
    etag: str
    expires_at: float
    deposed: bool = False
    task: asyncio.Task[Any] | None = field(default=None, repr=False)


class CosmosRelayState:
    """The relay's position and its leader lease, in the `log` container.

    Leadership is a lease document with an owner and an expiry, taken and renewed
    with ETag conditions (compare-and-swap). The leader renews it every third of
    its `ttl`; a leader that cannot renew (another took the lease, or the store is
    unreachable until the lease lapsed) is deposed: its `lead()` body is cancelled
    and the relay competes again. A deposed leader that published late only sends
    duplicates (the broker drops them by event id), and `save` never moves the
    position back.
    """

    def __init__(
        self, store: CosmosEventStore, name: str = "relay", *, ttl: float = 10.0,
        poll: float = 1.0,
    ) -> None:
        self.store = store
        self.name = name
        self.ttl = ttl
        self.poll = poll
        self.position_id = f"relay.{safe_id(name)}"
        self.lease_id = f"leader.{safe_id(name)}"

    @property
    def _container(self) -> ContainerProxy:
        return self.store.log

    async def position(self) -> int:
        async with translated(self.store.what):
            doc = await read_or_none(self._container, self.position_id, _RELAY_PARTITION)
        return int(doc["position"]) if doc else 0

    async def save(self, position: int) -> None:
        body = {"id": self.position_id, "pk": _RELAY_PARTITION, "position": position}
        async with translated(self.store.what):
            while True:
                doc = await read_or_none(self._container, self.position_id, _RELAY_PARTITION)
                if doc is not None and int(doc["position"]) >= position:
                    return  # a deposed leader finishing late never moves it back
                try:
                    if doc is None:
                        await self._container.create_item(body)
                    else:
                        await self._container.replace_item(
                            self.position_id, body, etag=doc["_etag"], match_condition=IF_MATCH
                        )
                    return
                except CosmosHttpResponseError as error:
                    if not (is_conflict(error) or is_precondition_failed(error)):
                        raise

    @contextlib.asynccontextmanager
    async def lead(self) -> AsyncIterator[None]:
        leadership = await self._acquire(uuid.uuid4().hex)
        leadership.task = asyncio.current_task()
        keeper = asyncio.create_task(self._keep(leadership), name=f"{self.name}-lease")
        try:
            yield
        except asyncio.CancelledError:
            task = leadership.task
            if leadership.deposed and task is not None and task.uncancel() == 0:
                raise Unavailable(f"the {self.name} lost its leader lease") from None
            raise
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            await self._release(leadership)

    def _lease(self, owner: str, expires_at: float) -> dict[str, Any]:
        return {"id": self.lease_id, "pk": _RELAY_PARTITION, "owner": owner,
                "expires_at": expires_at}

    async def _acquire(self, owner: str) -> _Leadership:
        clock = self.store.clock
        async with translated(self.store.what):
            while True:
                doc = await read_or_none(self._container, self.lease_id, _RELAY_PARTITION)
                if doc is not None:
                    clock.observe(doc)
                expires = clock.now() + self.ttl
                try:
                    if doc is None:
                        taken = await self._container.create_item(self._lease(owner, expires))
                    elif float(doc["expires_at"]) <= clock.now():
                        taken = await self._container.replace_item(
                            self.lease_id, self._lease(owner, expires), etag=doc["_etag"],
                            match_condition=IF_MATCH,
                        )
                    else:
                        await asyncio.sleep(self.poll)
                        continue
                except CosmosHttpResponseError as error:
                    if is_conflict(error) or is_precondition_failed(error):
                        continue
                    raise
                return _Leadership(owner, taken["_etag"], expires)

    async def _keep(self, leadership: _Leadership) -> None:
        clock = self.store.clock
        while True:
            await asyncio.sleep(self.ttl / 3)
            expires = clock.now() + self.ttl
            try:
                renewed = await self._container.replace_item(
                    self.lease_id, self._lease(leadership.owner, expires),
                    etag=leadership.etag, match_condition=IF_MATCH,
                )
            except Exception as error:
                lost = is_precondition_failed(error) or is_not_found(error)
                if not lost and clock.now() < leadership.expires_at:
                    log.warning("%s: renewing the leader lease failed (%s); retrying",
                                self.name, error)
                    continue
                log.error("%s: lost the leader lease; stepping down", self.name)
                leadership.deposed = True
                if leadership.task is not None:
                    leadership.task.cancel()
                return
            leadership.etag, leadership.expires_at = renewed["_etag"], expires

    async def _release(self, leadership: _Leadership) -> None:
        """Let a standby take over at once instead of after the ttl."""
        if leadership.deposed:
            return
        with contextlib.suppress(Exception):
            await self._container.replace_item(
                self.lease_id, self._lease(leadership.owner, 0.0), etag=leadership.etag,
                match_condition=IF_MATCH,
            )
