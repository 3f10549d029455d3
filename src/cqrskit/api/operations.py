"""Routes for operators: health, readiness, command status, dead letters."""

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse, Response

from cqrskit.api.errors import error_response
from cqrskit.api.routes import RuntimeRef
from cqrskit.messages import IDENTIFIER_PATTERN
from cqrskit.update_processor import retry_dead_letters, skip_dead_letter

DeadLetterId = Annotated[int, Path(ge=1, le=2**62)]


def operations_router(runtime: RuntimeRef) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz", tags=["operations"], summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", tags=["operations"], summary="The stores answer")
    async def readyz() -> JSONResponse:
        checks: dict[str, str] = {}
        rt = runtime()
        for name, store in (("command_db", rt.store), ("query_db", rt.views)):
            try:
                await store.check()
                checks[name] = "ok"
            except Exception as error:
                checks[name] = f"failing: {type(error).__name__}: {error}"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "not_ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    @router.get(
        "/api/commands/{command_id}", tags=["operations"],
        summary="Whether a command's events have reached the views",
    )
    async def command_status(
        command_id: Annotated[str, Path(pattern=IDENTIFIER_PATTERN)],
    ) -> dict[str, Any]:
        return await runtime().queries.command_status(command_id)

    @router.get("/api/dead-letters", tags=["operations"], summary="Parked events")
    async def list_dead_letters(
        projection: Annotated[str | None, Query(pattern=r"^[a-z][a-z0-9_]{0,62}$")] = None,
    ) -> dict[str, Any]:
        rt = runtime()
        if projection is not None:
            rt.registry.projection(projection)
        letters = await rt.views.list_dead_letters(projection)
        return {"items": [d.to_dict() for d in letters]}

    @router.post(
        "/api/dead-letters/{dead_letter_id}/retry", tags=["operations"],
        summary="Re-apply the parked events of this dead letter's stream, oldest first",
        responses={409: {"description": "the head event failed again; it stays parked"}},
    )
    async def retry(dead_letter_id: DeadLetterId) -> Response:
        rt = runtime()
        outcome = await retry_dead_letters(rt.registry, rt.views, dead_letter_id)
        if outcome.error is not None:
            return error_response(
                409, "retry_failed",
                f"the head event of the stream failed again: {outcome.error}",
                applied=outcome.applied, remaining=outcome.remaining,
            )
        return JSONResponse({"applied": outcome.applied, "remaining": outcome.remaining})

    @router.post(
        "/api/dead-letters/{dead_letter_id}/skip", tags=["operations"],
        summary="Drop one parked event for good",
    )
    async def skip(dead_letter_id: DeadLetterId) -> dict[str, Any]:
        dead_letter = await skip_dead_letter(runtime().views, dead_letter_id)
        return {"skipped": dead_letter.to_dict()}

    return router
