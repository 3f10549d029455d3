"""HTTP routes derived from the registry: one typed route per command and per query.

No `from __future__ import annotations` here: FastAPI reads the endpoint
signatures built below at runtime, with the command and query classes in them.
"""

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, StringConstraints, TypeAdapter, ValidationError
from starlette.routing import Match
from starlette.types import Scope

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


# The command headers FastAPI validates against IDENTIFIER_PATTERN, as they arrive.
CHECKED_HEADERS = (b"idempotency-key", b"x-correlation-id")
_identifier = TypeAdapter(Annotated[str, StringConstraints(pattern=IDENTIFIER_PATTERN)])


def headers_valid(scope: Scope) -> bool:
    """Whether every Idempotency-Key and X-Correlation-ID the request carries (if
    any) passes the same pydantic check as the documented route's header parameters."""
    for name, value in scope["headers"]:
        if name.lower() in CHECKED_HEADERS:
            try:
                _identifier.validate_python(value.decode("latin-1"))
            except ValidationError:
                return False
    return True


class PlainCommandRoute(APIRoute):
    """A command route without header parameters, for requests whose headers are valid.

    FastAPI's per-parameter header handling costs about 22 µs a command (of about
    290 µs: docs/benchmarks.md); the service reads the headers itself. A request with an
    invalid header does not match here and goes on to the documented route, whose
    422 names the header along with any body errors, exactly as before.
    """

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is Match.FULL and not headers_valid(scope):
            return Match.NONE, {}
        return match, child_scope


class CommandAccepted(BaseModel):
    id: str
    command_id: str
    version: int
    consistency_token: str


def _command_route(router: APIRouter, command_type: type[Command], commands: CommandsRef) -> None:
    # Matched first, while the headers are valid: the same answer, less work.
    async def plain_endpoint(
        request: Request,
        command: command_type,  # type: ignore[valid-type]
    ) -> Response:
        return await commands().handle(command, request)

    router.add_api_route(
        f"/command/{command_type.name}", plain_endpoint, methods=["POST"], status_code=202,
        include_in_schema=False, name=f"command_{command_type.name}_plain",
        route_class_override=PlainCommandRoute,
    )

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
