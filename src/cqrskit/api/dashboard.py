"""The live dashboard at `/`, and the pipeline status it shows.

The page is static HTML, CSS and JavaScript shipped in the package (no build
step, no CDN); it follows `/api/status/stream`, server-sent events carrying the
same snapshot as `/api/status`.
"""

from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from cqrskit.api.auth import ADMIN, Principal, request_principal
from cqrskit.api.errors import error_responses
from cqrskit.errors import NotFound, Unavailable
from cqrskit.status import StatusSampler
from cqrskit.tenancy import DEFAULT, local, tenant_of

SamplerRef = Callable[[], StatusSampler]

_STATIC = resources.files("cqrskit.api") / "static"
_ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


def dashboard_router(sampler: SamplerRef, status_dependencies: list[Any]) -> APIRouter:
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((_STATIC / "dashboard.html").read_text())

    @router.get("/dashboard/{asset}", include_in_schema=False)
    async def asset(asset: str) -> Response:
        if asset not in _ASSETS:
            raise NotFound(f"no dashboard file {asset!r}; the dashboard is at /")
        return Response((_STATIC / asset).read_bytes(), media_type=_ASSETS[asset])

    @router.get(
        "/api/status", tags=["operations"], dependencies=status_dependencies,
        summary="Lag per projection and partition, dead letters, leases, recent events",
        responses=error_responses(_503="the status has not been read yet; retry in a second"),
    )
    async def status(request: Request) -> dict[str, Any]:
        latest = sampler().latest
        if latest is None:
            raise Unavailable("the pipeline status has not been read yet; retry in a second")
        return visible_status(latest, request_principal(request))

    @router.get(
        "/api/status/stream", tags=["operations"], dependencies=status_dependencies,
        summary="The same status as server-sent events, one each time it is read",
        response_class=StreamingResponse,
    )
    async def status_stream(request: Request) -> StreamingResponse:
        updates = sampler().updates()
        principal = request_principal(request)

        async def events() -> AsyncIterator[bytes]:
            async for snapshot in updates:
                yield b"data: " + orjson.dumps(visible_status(snapshot, principal)) + b"\n\n"

        # no-transform/X-Accel-Buffering: proxies must pass each event on at once.
        headers = {"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return router


def visible_status(snapshot: dict[str, Any], principal: Principal | None) -> dict[str, Any]:
    """The status as `principal` may see it.

    Lag, positions and leases name no tenant's data and are shown to everyone who
    may read. Recent events and dead-letter counts are a tenant's own: a caller
    sees only its tenant's, with the ids as it knows them. The whole snapshot goes
    to authentication off and to the default tenant's `admin` principals (the
    operators, and the key a forwarding API reads the handler's status with).
    """
    if principal is None or (principal.tenant == DEFAULT and ADMIN in principal.scopes):
        return snapshot
    tenant = principal.tenant
    recent = [
        {**event, "stream_id": local(event["stream_id"])}
        for event in snapshot["recent"] if tenant_of(event["stream_id"]) == tenant
    ]
    own = snapshot.get("dead_letters_by_tenant", {}).get(tenant, {})
    return {
        **snapshot,
        "recent": recent,
        "dead_letters": {name: own.get(name, 0) for name in snapshot["dead_letters"]},
        "dead_letters_by_tenant": {tenant: own},
    }
