"""HTTP routes derived from the registry: one typed route per command and per query.

No `from __future__ import annotations` here: FastAPI reads the endpoint
signatures built below at runtime, with the command and query classes in them.
"""

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import BaseModel

from cqrskit.api.errors import error_responses
from cqrskit.api.services import CommandService, QueryService
from cqrskit.messages import IDENTIFIER_PATTERN, Command
from cqrskit.registry import Domain
from cqrskit.registry import Query as QueryModel

# The services are set while the app runs; a route asks for them per request.
CommandsRef = Callable[[], CommandService]
QueriesRef = Callable[[], QueryService]

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


def _command_route(router: APIRouter, command_type: type[Command], commands: CommandsRef) -> None:
    # The headers are parameters so that they are validated and published; the
    # service reads them from the request.
    async def endpoint(
        request: Request,
        command: command_type,  # type: ignore[valid-type]
        idempotency_key: IdempotencyKey = None,
        x_correlation_id: CorrelationId = None,
    ) -> Response:
        return await commands().handle(command, request)

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


def _query_route(router: APIRouter, query_type: type[QueryModel], queries: QueriesRef) -> None:
    async def endpoint(
        request: Request,
        query: Annotated[query_type, Query()],  # type: ignore[valid-type]
        x_consistency_token: ConsistencyTokenHeader = None,
    ) -> Response:
        return await queries().query(query, request)

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


def domain_router(
    domain: Domain, commands: CommandsRef | None, queries: QueriesRef | None
) -> APIRouter:
    """The domain's command routes (if `commands`) and query routes (if `queries`)."""
    router = APIRouter(prefix=domain.prefix, tags=[domain.name])
    if commands is not None:
        for command_type, _ in domain.commands.values():
            _command_route(router, command_type, commands)
    if queries is not None:
        for query_type in domain.queries.values():
            _query_route(router, query_type, queries)
    return router
