"""What the routes hand a validated request to: the handlers in process, or a forwarder.

A route validates the body, parameters and headers itself, then asks a
`CommandService` or `QueryService` for the HTTP answer. The in-process services
here call the core handlers; `cqrskit.api.forwarding` passes the same request
on to a handler service over HTTP. Either way the client sees the same answer.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson
from fastapi import Request, Response
from pydantic import TypeAdapter

from cqrskit.api.auth import request_tenant
from cqrskit.command_handler import CommandHandler
from cqrskit.messages import Command, CommandResult
from cqrskit.query_handler import QueryHandler
from cqrskit.registry import Query
from cqrskit.tenancy import public_result

JSON = "application/json"


class CommandService(Protocol):
    async def handle(self, command: Command, request: Request) -> Response:
        """Answer a command route's request (body and headers already validated)."""
        ...


class QueryService(Protocol):
    async def query(self, query: Query, request: Request) -> Response:
        """Answer a query route's request (parameters and headers already validated)."""
        ...

    async def command_status(self, command_id: str, request: Request) -> Response:
        """Answer GET /api/commands/{command_id}."""
        ...


def accepted(result: CommandResult) -> Response:
    # A tenant's stored ids carry its prefix; its caller sees the ids it knows.
    answer = public_result(result.to_dict())
    headers = {"Location": f"/api/commands/{answer['command_id']}"}
    if result.replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(orjson.dumps(answer), 202, headers, media_type=JSON)


class LocalCommands:
    """Commands handled in this process."""

    def __init__(self, handler: CommandHandler) -> None:
        self.handler = handler

    async def handle(self, command: Command, request: Request) -> Response:
        metadata: dict[str, Any] = {}
        correlation_id = request.headers.get("x-correlation-id")
        if correlation_id:
            metadata["correlation_id"] = correlation_id
        traceparent = request.headers.get("traceparent")
        if traceparent:
            metadata["traceparent"] = traceparent[:64]
        result = await self.handler.handle(
            command, command_id=request.headers.get("idempotency-key"), metadata=metadata,
            tenant=request_tenant(request),
        )
        return accepted(result)


class LocalQueries:
    """Queries and command status served in this process."""

    def __init__(self, handler: QueryHandler) -> None:
        self.handler = handler
        self._results: dict[type[Query], TypeAdapter[Any]] = {}

    async def query(self, query: Query, request: Request) -> Response:
        answer = await self.handler.handle(
            query, request.headers.get("x-consistency-token"), request_tenant(request)
        )
        headers = {}
        if answer.fresh is not None:
            headers["X-Consistency"] = "fresh" if answer.fresh else "stale"
        return Response(self._json(type(query), answer.result), 200, headers, media_type=JSON)

    def _json(self, query_type: type[Query], result: Any) -> bytes:
        """The result as its declared type, the way FastAPI serialises a response_model."""
        adapter = self._results.get(query_type)
        if adapter is None:
            adapter = self._results[query_type] = TypeAdapter(query_type.result)
        return adapter.dump_json(adapter.validate_python(result), by_alias=True)

    async def command_status(self, command_id: str, request: Request) -> Response:
        status = await self.handler.command_status(command_id, request_tenant(request))
        return Response(orjson.dumps(status), 200, media_type=JSON)
