"""Serve queries from the views, waiting (bounded) for a client's own writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cqrskit.checkpoints import Checkpoints
from cqrskit.errors import CqrskitError, InvalidRequest, NotFound
from cqrskit.messages import ConsistencyToken, stream_hash
from cqrskit.ports import EventStore, ViewStore
from cqrskit.registry import Query, Registry
from cqrskit.telemetry import operation, queries, query_duration
from cqrskit.tenancy import TenantViews, public_result, scoped


@dataclass(slots=True, frozen=True)
class Answer:
    result: Any
    # None: no token was sent; True: the views had caught up; False: timed out.
    fresh: bool | None


def _header(fresh: bool) -> str:
    return "fresh" if fresh else "stale"


class QueryHandler:
    def __init__(
        self,
        registry: Registry,
        views: ViewStore,
        store: EventStore,
        checkpoints: Checkpoints,
        *,
        consistency_timeout: float = 5.0,
    ) -> None:
        self.registry = registry
        self.views = views
        self.store = store
        self.checkpoints = checkpoints
        self.consistency_timeout = consistency_timeout

    async def handle(
        self, query: Query, consistency_token: str | None = None, tenant: str | None = None
    ) -> Answer:
        """Run the query; with a `tenant`, on that tenant's documents only (cqrskit.tenancy)."""
        with operation(f"query {query.name}", queries, query_duration, {"query": query.name}):
            return await self._handle(query, consistency_token, tenant)

    async def _handle(
        self, query: Query, consistency_token: str | None, tenant: str | None
    ) -> Answer:
        fresh = None
        if consistency_token:
            fresh = await self._wait(query, self._decode(consistency_token))
        views = self.views if tenant is None else TenantViews(self.views, tenant)
        try:
            result = await query.run(views)
        except CqrskitError as error:
            if fresh is not None:
                error.headers = {**(error.headers or {}), "X-Consistency": _header(fresh)}
            if fresh is False and isinstance(error, NotFound):
                error.args = (
                    f"{error}; the views had not caught up with the consistency token "
                    f"within {self.consistency_timeout:g}s, so it may yet appear",
                )
            raise
        return Answer(result, fresh)

    @staticmethod
    def _decode(consistency_token: str) -> ConsistencyToken:
        try:
            return ConsistencyToken.decode(consistency_token)
        except ValueError as error:
            raise InvalidRequest(
                f"{error}; send the consistency_token a command returned"
            ) from None

    async def _wait(self, query: Query, token: ConsistencyToken) -> bool:
        """True once every view the query reads holds the token's write."""
        if not self.checkpoints.reached(query.reads, token):
            last = await self.store.last_position()
            if token.position > last:
                raise InvalidRequest(
                    f"consistency token {token.encode()} is ahead of the event log "
                    f"(last position {last}); it was not issued by this service"
                )
        if not await self.checkpoints.wait(query.reads, token, self.consistency_timeout):
            return False
        # A parked event counts as processed; the view does not hold it.
        for name in query.reads:
            for parked in await self.views.list_dead_letters(name):
                if stream_hash(parked.stream_id) == token.stream_hash and (
                    parked.position <= token.position
                ):
                    return False
        return True

    async def command_status(self, command_id: str, tenant: str | None = None) -> dict[str, Any]:
        """Whether a command's events have reached each view, from the checkpoints.

        A `tenant` finds only its own commands: another tenant's id is not found.
        """
        stored = await self.store.get_command(scoped(tenant, command_id))
        if stored is None:
            raise NotFound(f"no command with id {command_id!r} was accepted")
        result = stored.result
        token = ConsistencyToken.for_event(result.stream_id, result.position)
        positions = await self.views.checkpoints()
        partition = token.partition(self.checkpoints.partitions)
        projections: dict[str, str] = {}
        for name in self.registry.projections:
            if positions.get((name, partition), 0) < result.position:
                projections[name] = "pending"
                continue
            parked = await self.views.list_dead_letters(name)
            blocked = any(
                d.stream_id == result.stream_id and d.position <= result.position for d in parked
            )
            projections[name] = "parked" if blocked else "projected"
        states = set(projections.values())
        overall = "projected" if states <= {"projected"} else (
            "parked" if "parked" in states else "pending"
        )
        return {
            **public_result(result.to_dict()),
            "position": result.position,
            "status": overall,
            "projections": projections,
        }
