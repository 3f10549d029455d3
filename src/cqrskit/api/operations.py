"""Routes for operators: health, readiness, command status, dead letters."""

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, Response

from cqrskit.api.auth import request_tenant
from cqrskit.api.errors import error_response, error_responses
from cqrskit.api.routes import QueriesRef
from cqrskit.errors import NotFound
from cqrskit.messages import IDENTIFIER_PATTERN
from cqrskit.ports import DeadLetter, ViewStore
from cqrskit.registry import Registry
from cqrskit.tenancy import local, tenant_of
from cqrskit.update_processor import retry_dead_letters, skip_dead_letter

DeadLetterId = Annotated[int, Path(ge=1, le=2**62)]
# What /readyz reports: one entry per store or handler service, "ok" or why not.
Readiness = Callable[[], Awaitable[dict[str, str]]]
ViewsRef = Callable[[], ViewStore]


def health_router(readiness: Readiness) -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", summary="The stores and handler services this process uses answer",
                responses={503: {"description": "something this process needs is failing; "
                                 "`checks` says what"}})
    async def readyz() -> JSONResponse:
        checks = await readiness()
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "not_ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    @router.get("/metrics", summary="This process's metrics, in Prometheus text format",
                response_class=Response)
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return router


def command_status_router(queries: QueriesRef) -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get(
        "/api/commands/{command_id}", response_model=dict[str, Any],
        summary="Whether a command's events have reached the views",
        responses=error_responses(_404="no command with this id was accepted",
                                  _503="a store cannot be reached; retry later"),
    )
    async def command_status(
        request: Request, command_id: Annotated[str, Path(pattern=IDENTIFIER_PATTERN)],
    ) -> Response:
        return await queries().command_status(command_id, request)

    return router


def _shown(dead_letter: DeadLetter, tenant: str | None) -> dict[str, Any]:
    """A dead letter as its tenant's admin sees it: the stream id it knows."""
    shown = dead_letter.to_dict()
    if tenant is not None:
        shown["stream_id"] = local(shown["stream_id"])
        shown["tenant"] = tenant
    return shown


async def _own_dead_letter(views: ViewStore, dead_letter_id: int, tenant: str | None) -> None:
    """404 unless the dead letter exists and belongs to the caller's tenant.

    An admin of one tenant sees and touches only that tenant's dead letters; with
    authentication off (one party) and in the CLI (which opens the DB itself), all.
    """
    dead_letter = await views.get_dead_letter(dead_letter_id)
    if dead_letter is None or (tenant is not None and tenant_of(dead_letter.stream_id) != tenant):
        raise NotFound(f"no dead letter with id {dead_letter_id}")


def dead_letters_router(registry: Registry, views: ViewsRef) -> APIRouter:
    """Dead letters, served by a process that has the query DB open."""
    router = APIRouter(tags=["operations"])

    @router.get("/api/dead-letters", summary="Parked events", responses=error_responses(
        _404="no projection of that name", _503="a store cannot be reached; retry later"))
    async def list_dead_letters(
        request: Request,
        projection: Annotated[str | None, Query(pattern=r"^[a-z][a-z0-9_]{0,62}$")] = None,
    ) -> dict[str, Any]:
        if projection is not None:
            registry.projection(projection)
        letters = await views().list_dead_letters(projection)
        tenant = request_tenant(request)
        if tenant is not None:
            letters = [d for d in letters if tenant_of(d.stream_id) == tenant]
        return {"items": [_shown(d, tenant) for d in letters]}

    @router.post(
        "/api/dead-letters/{dead_letter_id}/retry",
        summary="Re-apply the parked events of this dead letter's stream, oldest first",
        responses=error_responses(
            _404="no dead letter with this id",
            _409="the head event failed again; it stays parked",
            _503="a store cannot be reached; retry later",
        ),
    )
    async def retry(request: Request, dead_letter_id: DeadLetterId) -> Response:
        await _own_dead_letter(views(), dead_letter_id, request_tenant(request))
        outcome = await retry_dead_letters(registry, views(), dead_letter_id)
        if outcome.error is not None:
            return error_response(
                409, "retry_failed",
                f"the head event of the stream failed again: {outcome.error}",
                applied=outcome.applied, remaining=outcome.remaining,
            )
        return JSONResponse({"applied": outcome.applied, "remaining": outcome.remaining})

    @router.post(
        "/api/dead-letters/{dead_letter_id}/skip", summary="Drop one parked event for good",
        responses=error_responses(_404="no dead letter with this id",
                                  _503="a store cannot be reached; retry later"),
    )
    async def skip(request: Request, dead_letter_id: DeadLetterId) -> dict[str, Any]:
        tenant = request_tenant(request)
        await _own_dead_letter(views(), dead_letter_id, tenant)
        dead_letter = await skip_dead_letter(views(), dead_letter_id)
        return {"skipped": _shown(dead_letter, tenant)}

    return router


def dead_letters_elsewhere_router() -> APIRouter:
    """An API that forwards queries has no query DB: say where dead letters are managed."""
    router = APIRouter()

    @router.api_route(
        "/api/dead-letters{rest:path}", methods=["GET", "POST"], include_in_schema=False
    )
    async def elsewhere(rest: str) -> Response:
        return error_response(
            404, "not_served_here",
            "this API forwards queries to CQRSKIT_QUERY_HANDLER_URL and does not open the "
            "query DB; manage dead letters with `cqrskit dead-letters list|retry|skip` "
            "where CQRSKIT_QUERY_DB is set",
        )

    return router
