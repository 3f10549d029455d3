"""The FastAPI application: the reference's App Service API."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from cqrskit.api import errors
from cqrskit.api.operations import operations_router
from cqrskit.api.routes import domain_router
from cqrskit.bootstrap import Runtime, load_domains, open_runtime
from cqrskit.config import Settings
from cqrskit.errors import Unavailable
from cqrskit.registry import Registry

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None, registry: Registry | None = None, *, role: str = "serve"
) -> FastAPI:
    """Build the app; the stores are opened when it starts and closed when it stops.

    `role="serve"` also runs the update processor and relay in this process;
    `role="api"` only handles commands and queries (the rest run as other processes).
    """
    settings = settings or Settings()
    registry = registry or Registry(load_domains(settings.domains))
    holder: dict[str, Runtime] = {}

    def runtime() -> Runtime:
        try:
            return holder["runtime"]
        except KeyError:
            raise Unavailable("the service is starting or stopping") from None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = await open_runtime(settings, registry, role=role)
        rt.start()
        holder["runtime"] = rt
        log.info("cqrskit ready: command DB %s, query DB %s, stream %s",
                 settings.command_db_url, settings.query_db_url, settings.stream)
        try:
            yield
        finally:
            del holder["runtime"]
            await rt.close()

    app = FastAPI(
        title="cqrskit",
        summary="Commands in, events through a durable stream, queries out.",
        version="0.1.0",
        lifespan=lifespan,
    )
    errors.install(app)
    app.add_middleware(errors.BodyLimit, limit=settings.max_body_bytes)
    for domain in registry.domains:
        app.include_router(domain_router(domain, runtime))
    app.include_router(operations_router(runtime))
    return app
