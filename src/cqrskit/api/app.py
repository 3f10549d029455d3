"""The FastAPI application: the reference's App Service API, and its handler services.

One factory, four HTTP roles:

| role | routes | commands and queries |
|---|---|---|
| `serve` | all | in process, with the update processor and relay |
| `api` | all | in process, or forwarded to CQRSKIT_COMMAND_HANDLER_URL / QUERY_HANDLER_URL |
| `command-handler` | commands, health | in process |
| `query-handler` | queries, command status, health | in process |
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

from cqrskit import redaction, telemetry
from cqrskit.api import errors, headers, limits, request_telemetry
from cqrskit.api.auth import ADMIN, COMMANDS_WRITE, QUERIES_READ, Authenticator
from cqrskit.api.dashboard import dashboard_router
from cqrskit.api.forwarding import Forwarder, open_client
from cqrskit.api.operations import (
    command_status_router,
    dead_letters_elsewhere_router,
    dead_letters_router,
    health_router,
)
from cqrskit.api.routes import domain_router
from cqrskit.api.services import CommandService, LocalCommands, LocalQueries, QueryService
from cqrskit.bootstrap import Runtime, load_domains, open_runtime, role_parts
from cqrskit.config import Settings
from cqrskit.errors import CqrskitError, Unavailable
from cqrskit.ports import ViewStore
from cqrskit.registry import Registry
from cqrskit.status import StatusSampler

log = logging.getLogger(__name__)
T = TypeVar("T")

# Which routes each HTTP role serves.
COMMAND_ROUTES = ("serve", "api", "command-handler")
QUERY_ROUTES = ("serve", "api", "query-handler")
DEAD_LETTER_ROUTES = ("serve", "api")
DASHBOARD = ("serve", "api", "query-handler")
RATE_LIMITED = ("serve", "api")


def _running(service: T | None) -> T:
    if service is None:
        raise Unavailable("the service is starting or stopping")
    return service


@dataclass
class Services:
    """What the routes call; set while the app runs, between start-up and shutdown."""

    runtime: Runtime | None = None
    command_service: CommandService | None = None
    query_service: QueryService | None = None
    forwarders: list[Forwarder] = field(default_factory=list)

    def commands(self) -> CommandService:
        return _running(self.command_service)

    def queries(self) -> QueryService:
        return _running(self.query_service)

    def views(self) -> ViewStore:
        return _running(self.runtime.views if self.runtime else None)

    def status(self) -> StatusSampler:
        return _running(self.runtime.status if self.runtime else None)

    async def readiness(self) -> dict[str, str]:
        """Every store this process opened, and every handler service it forwards to."""
        runtime = _running(self.runtime)
        checks: dict[str, str] = {}
        for name, store in (("command_db", runtime.store), ("query_db", runtime.views)):
            if store is None:
                continue
            try:
                await store.check()
                checks[name] = "ok"
            except Exception as error:
                checks[name] = f"failing: {type(error).__name__}: {error}"
        for forwarder in self.forwarders:
            checks[forwarder.name.replace(" ", "_")] = await forwarder.check()
        return checks


def create_app(
    settings: Settings | None = None, registry: Registry | None = None, *, role: str = "serve"
) -> FastAPI:
    """Build the app for `role`; stores and clients are opened when it starts, closed when
    it stops.

    `serve` also runs the update processor and relay in this process; `api`
    handles commands and queries in process or forwards them (the rest run as
    other processes); `command-handler` and `query-handler` are the services
    an API forwards to.
    """
    settings = settings or Settings()
    registry = registry or Registry(load_domains(settings.domains))
    if role not in COMMAND_ROUTES + QUERY_ROUTES:
        raise CqrskitError(f"{role!r} serves no HTTP; use serve, api, command-handler or "
                           "query-handler")
    local = role_parts(role, settings)
    services = Services()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Now that uvicorn has set up its log handlers: no secret reaches them either.
        redaction.protect()
        async with contextlib.AsyncExitStack() as stack:
            # Last out: the spans of the final requests and batches are sent before the
            # process ends (telemetry.flush says why it cannot wait for atexit).
            stack.callback(telemetry.flush)
            runtime = await open_runtime(settings, registry, role=role)
            stack.push_async_callback(runtime.close)
            _set_services(services, runtime, settings, stack)
            runtime.start()
            log.info("cqrskit %s ready: %s%s", role, runtime.describe(), "".join(
                f"; {f.name} at {f.url}" for f in services.forwarders))
            try:
                yield
            finally:
                services.runtime = services.command_service = services.query_service = None

    app = FastAPI(
        title="cqrskit",
        summary="Commands in, events through a durable stream, queries out.",
        version="0.1.0",
        lifespan=lifespan,
        # Off: request_telemetry makes the request's span and metrics for less.
        telemetry={"tracing": False, "metrics": False, "logs": False,
                   "operation_spans": False},
    )
    errors.install(app)
    limits.install(app)
    app.add_middleware(errors.BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(limits.RequestTimeout, seconds=settings.request_timeout,
                       consistency_seconds=settings.consistency_timeout)
    cors = headers.cors_options(settings)
    if cors is not None:
        app.add_middleware(CORSMiddleware, **cors)  # type: ignore[arg-type]
    # Outside every other layer, Starlette's own error handler included, so that the
    # 500s it writes, and the 413, 429, 504 and CORS answers, get the security headers
    # and are in the request's span and metrics.
    _outermost(app, lambda inner: headers.SecurityHeaders(inner, settings))
    _outermost(app, request_telemetry.RequestTelemetry)
    auth = Authenticator(settings)
    # Authentication, then the caller's rate limit; only where clients call in: the
    # handler services behind an API would see every caller as the API's address.
    guard = limits.RateLimiter(settings, auth, enabled=role in RATE_LIMITED)
    commands = services.commands if role in COMMAND_ROUTES else None
    queries = services.queries if role in QUERY_ROUTES else None
    for domain in registry.domains:
        if commands is not None:
            app.include_router(domain_router(domain, commands, None),
                               dependencies=guard.requires(COMMANDS_WRITE))
        if queries is not None:
            app.include_router(domain_router(domain, None, queries),
                               dependencies=guard.requires(QUERIES_READ))
    # Probes and scrapes stay open: orchestrators and Prometheus call them without
    # credentials, and they reveal only health and counters.
    app.include_router(health_router(services.readiness))
    if queries is not None:
        app.include_router(command_status_router(queries),
                           dependencies=guard.requires(QUERIES_READ))
    if role in DEAD_LETTER_ROUTES:
        if "queries" in local:
            app.include_router(dead_letters_router(registry, services.views),
                               dependencies=guard.requires(ADMIN))
        else:
            app.include_router(dead_letters_elsewhere_router(), dependencies=guard.requires(ADMIN))
    if role in DASHBOARD:
        # The page and its files hold no data and stay open; the status routes need
        # queries:read (so with auth on, the page shows no figures: docs/security.md).
        app.include_router(dashboard_router(services.status, guard.requires(QUERIES_READ)))
    return app


def _outermost(app: FastAPI, wrap: Callable[[ASGIApp], ASGIApp]) -> None:
    """Wrap the middleware stack the app builds; `add_middleware` would put the layer
    inside ServerErrorMiddleware, which writes the 500 answers itself."""
    build = app.build_middleware_stack

    def build_wrapped() -> ASGIApp:
        return wrap(build())

    setattr(app, "build_middleware_stack", build_wrapped)  # noqa: B010 (mypy: method)


def _set_services(
    services: Services, runtime: Runtime, settings: Settings, stack: contextlib.AsyncExitStack
) -> None:
    """In-process services for what the runtime handles; forwarders for what the API forwards."""
    services.runtime = runtime
    services.forwarders = []
    if runtime.commands is not None:
        services.command_service = LocalCommands(runtime.commands)
    if runtime.queries is not None:
        services.query_service = LocalQueries(runtime.queries)
    if runtime.role != "api" or not (settings.command_handler_url or settings.query_handler_url):
        return
    client = open_client(settings.handler_timeout)
    stack.push_async_callback(client.aclose)
    if settings.command_handler_url:
        commands = Forwarder(client, settings.command_handler_url, "command handler")
        services.command_service = commands
        services.forwarders.append(commands)
    if settings.query_handler_url:
        queries = Forwarder(
            client, settings.query_handler_url, "query handler",
            api_key=settings.handler_api_key.get_secret_value()
            if settings.handler_api_key else None,
        )
        services.query_service = queries
        services.forwarders.append(queries)
        # The dashboard's status comes from the query handler, which has the stores.
        runtime.status = StatusSampler(queries.status, settings.status_interval)
