"""HTTP routes derived from the registry: one typed route per command and per query.

No `from __future__ import annotations` here: FastAPI reads the endpoint
signatures built below at runtime, with the command and query classes in them.
"""

from collections.abc import Callable
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import BaseModel

from cqrskit.api.errors import error_responses
from cqrskit.bootstrap import Runtime
from cqrskit.messages import IDENTIFIER_PATTERN, Command, CommandResult
from cqrskit.registry import Domain
from cqrskit.registry import Query as QueryModel

RuntimeRef = Callable[[], Runtime]

IdempotencyKey = Annotated[
    str | None,
    Header(
        pattern=IDENTIFIER_PATTERN,
        description="Your id for this command. Sending it again returns the first answer "
        "and changes nothing.",
    ),
]
CorrelationId = Annotated[str | None, Header(pattern=IDENTIFIER_PATTERN)]
ConsistencyTokenHeader = Annotated[
    str | None,
    Header(
        max_length=40,
        description="A command's consistency_token: wait (bounded) until the views include "
        "that command. The X-Consistency response header says fresh or stale.",
    ),
]


class CommandAccepted(BaseModel):
    id: str
    command_id: str
    version: int
    consistency_token: str


def accepted(result: CommandResult) -> Response:
    headers = {"Location": f"/api/commands/{result.command_id}"}
    if result.replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(
        orjson.dumps(result.to_dict()), 202, headers, media_type="application/json"
    )


def _command_route(router: APIRouter, command_type: type[Command], runtime: RuntimeRef) -> None:
    async def endpoint(
        request: Request,
        command: command_type,  # type: ignore[valid-type]
        idempotency_key: IdempotencyKey = None,
        x_correlation_id: CorrelationId = None,
    ) -> Response:
        metadata: dict[str, Any] = {}
        if x_correlation_id:
            metadata["correlation_id"] = x_correlation_id
        traceparent = request.headers.get("traceparent")
        if traceparent:
            metadata["traceparent"] = traceparent[:64]
        result = await runtime().commands.handle(
            command, command_id=idempotency_key, metadata=metadata
        )
        return accepted(result)

    router.add_api_route(
        f"/command/{command_type.name}",
        endpoint,
        methods=["POST"],
        status_code=202,
        response_model=CommandAccepted,
        summary=f"Command: {command_type.name}",
        description=(command_type.__doc__ or "").strip(),
        name=f"command_{command_type.name}",
        responses=error_responses(
            _400="the body is not valid JSON",
            _404="the aggregate does not exist",
            _409="conflict: a business rule, a stale expected_version, "
                 "or an Idempotency-Key reused for another command",
            _413="the body is larger than the configured limit",
            _415="the body was not sent as application/json",
            _422="the body does not match the schema",
            _503="a store cannot be reached; retry later",
        ),
    )


def _query_route(router: APIRouter, query_type: type[QueryModel], runtime: RuntimeRef) -> None:
    async def endpoint(
        response: Response,
        query: Annotated[query_type, Query()],  # type: ignore[valid-type]
        x_consistency_token: ConsistencyTokenHeader = None,
    ) -> Any:
        answer = await runtime().queries.handle(query, x_consistency_token)
        if answer.fresh is not None:
            response.headers["X-Consistency"] = "fresh" if answer.fresh else "stale"
        return answer.result

    router.add_api_route(
        f"/query/{query_type.name}",
        endpoint,
        methods=["GET"],
        response_model=query_type.result,
        summary=f"Query: {query_type.name}",
        description=(query_type.__doc__ or "").strip(),
        name=f"query_{query_type.name}",
        responses=error_responses(
            _400="a bad consistency token, cursor or filter",
            _404="not found",
            _422="the parameters do not match the schema",
            _503="a store cannot be reached; retry later",
        ),
    )


def domain_router(domain: Domain, runtime: RuntimeRef) -> APIRouter:
    router = APIRouter(prefix=domain.prefix, tags=[domain.name])
    for command_type, _ in domain.commands.values():
        _command_route(router, command_type, runtime)
    for query_type in domain.queries.values():
        _query_route(router, query_type, runtime)
    return router
