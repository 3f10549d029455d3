"""Glue between the Azure Functions host and the cqrskit handlers.

`deploy/azure/function_app.py` declares the functions (triggers, bindings, retry
policies) and hands each trigger's input to a `FunctionsHost`, which builds what
it needs once per worker process, from `Settings` (CQRSKIT_* app settings):

- **HTTP** (`http`): the FastAPI app of the `command-handler` or `query-handler`
  role, the very app `cqrskit command-handler` / `query-handler` serve, reached
  through `azure.functions.AsgiMiddleware`. So the routes, status codes, headers
  and error shape are those of the cqrskit HTTP contract, and the App Service API
  forwards to a Function app exactly as it forwards to those services.
- **Event Hubs batch** (`update_views`): the events the relay published, applied by
  the update processor's `ProjectionRunner` per projection and partition: the view
  changes and the checkpoint commit together and stale events are skipped, so a
  redelivered batch changes nothing (at-least-once delivery, exactly-once effect),
  and failing events are retried, then parked in the dead-letter queue.
- **Relay** (`relay_pass`): one pass of the existing `Relay`, woken by the Cosmos DB
  change feed of the `events` container (see `relay_pass` for why only a wake-up).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import azure.functions as func

from cqrskit import redaction, telemetry
from cqrskit.api.app import create_app
from cqrskit.api.errors import error_response
from cqrskit.bootstrap import Runtime, load_domains, open_runtime, open_stream, open_view_store
from cqrskit.config import Settings
from cqrskit.errors import CqrskitError, Unavailable
from cqrskit.messages import Envelope, partition_of
from cqrskit.ports import ViewStore
from cqrskit.registry import Projection, Registry
from cqrskit.relay import Relay
from cqrskit.streams.wire import decode
from cqrskit.update_processor import ProjectionRunner, RetryPolicy

log = logging.getLogger(__name__)

HTTP_ROLES = ("command-handler", "query-handler")
# A relay pass ends once the log has had nothing new for this long. It outlasts the
# sequencer's sweep (every 2 s, for commands pending over 2 s) so that events whose
# appender died before numbering them are published by the pass that woke for them.
RELAY_QUIET_SECONDS = 5.0
# Most a pass runs; well below host.json's functionTimeout, so a pass ends on its own.
RELAY_BUDGET_SECONDS = 240.0
# How long a wake-up waits for another instance's pass to hand the leadership over.
RELAY_LEAD_WAIT_SECONDS = 30.0


class FunctionsHost:
    """What one Functions worker process opened, built on first use and kept."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        relay_quiet: float = RELAY_QUIET_SECONDS,
        relay_budget: float = RELAY_BUDGET_SECONDS,
        lead_wait: float = RELAY_LEAD_WAIT_SECONDS,
    ) -> None:
        self._settings = settings
        self._registry: Registry | None = None
        self.relay_quiet = relay_quiet
        self.relay_budget = relay_budget
        self.lead_wait = lead_wait
        self._apps: dict[str, func.AsgiMiddleware] = {}
        self._views: ViewStore | None = None
        self._partitions = 0
        self._relay: Runtime | None = None
        self._lock = asyncio.Lock()

    @property
    def settings(self) -> Settings:
        """Read from the app settings on first use, not at import: the host indexes the
        functions by importing function_app.py, possibly before settings are complete."""
        if self._settings is None:
            self._settings = Settings()
            # The worker's log handlers exist by now: no secret reaches them either.
            redaction.protect()
            exporter = telemetry.choose_exporter(self._settings.telemetry)
            # Only when exporting somewhere: OpenTelemetry's providers are global and
            # can be set once per process.
            if exporter != "none":
                telemetry.configure(exporter, "cqrskit-functions")
        return self._settings

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry(load_domains(self.settings.domains))
        return self._registry

    # ------------------------------------------------------------------ HTTP

    async def http(
        self, role: str, request: func.HttpRequest, context: func.Context | None = None
    ) -> func.HttpResponse:
        """Answer `request` with the app of `role`, as that role's HTTP service would."""
        try:
            app = self._apps.get(role) or await self._start_app(role)
        except Exception as error:
            log.error("%s %s: the %s could not start (%s)", request.method, request.url, role,
                      _describe(error), exc_info=not isinstance(error, Unavailable))
            return _http_error(503, "unavailable",
                               f"the {role} could not start its stores; retry later")
        response: func.HttpResponse = await app.handle_async(request, context)
        return response

    async def _start_app(self, role: str) -> func.AsgiMiddleware:
        if role not in HTTP_ROLES:
            raise CqrskitError(f"no HTTP function for role {role!r}; use {HTTP_ROLES}")
        async with self._lock:
            if role not in self._apps:
                # A fresh middleware each attempt: one whose startup failed stays failed.
                app = func.AsgiMiddleware(  # type: ignore[no-untyped-call]
                    create_app(self.settings, self.registry, role=role))
                if not await app.notify_startup():  # type: ignore[no-untyped-call]
                    raise Unavailable(f"the {role} app failed to start (logged above)")
                self._apps[role] = app
            return self._apps[role]

    # ---------------------------------------------------------- update views

    async def update_views(self, bodies: Sequence[bytes]) -> None:
        """Apply a batch of events from the hub to every projection.

        An Event Hubs partition is a cqrskit partition (the relay sends each event
        to partition_of(stream id)), so the events are grouped by that and each
        group goes through the update processor's runner, which commits views and
        checkpoint together. Raises when a store fails: the function's retry policy
        then brings the same batch again, and the host's checkpoint on the hub does
        not move past it.
        """
        views, partitions = await self._views_and_partitions()
        by_partition: dict[int, list[Envelope]] = {}
        for envelope in _decode(bodies):
            by_partition.setdefault(partition_of(envelope.stream_id, partitions), []).append(
                envelope)
        checkpoints = await views.checkpoints()
        for partition, envelopes in sorted(by_partition.items()):
            for projection in self.registry.projections.values():
                stored = checkpoints.get((projection.name, partition), 0)
                await self._apply(projection, partition, envelopes, stored, views)

    async def _apply(
        self, projection: Projection, partition: int, envelopes: Sequence[Envelope],
        stored: int, views: ViewStore,
    ) -> None:
        settings = self.settings
        runner = ProjectionRunner(
            projection, self.registry, views, partition=partition,
            retry=RetryPolicy(settings.retry_attempts, settings.retry_backoff),
        )
        runner.position = stored
        fresh = list(_increasing(envelopes, stored))
        if fresh:
            await runner.process(fresh)

    async def _views_and_partitions(self) -> tuple[ViewStore, int]:
        async with self._lock:
            if self._views is None:
                settings = self.settings
                # The stream is opened only for its partition count (it connects on
                # first use, which never comes): the trigger reads the hub itself.
                stream = open_stream(settings.stream, None)
                self._partitions = stream.partitions
                await stream.close()
                self._views = await open_view_store(
                    settings.query_db_url, settings, self.registry)
            return self._views, self._partitions

    # ------------------------------------------------------------------ relay

    async def relay_pass(self) -> int:
        """Publish the event log from the relay's saved position until it is quiet.

        Why a wake-up and not the change feed's documents themselves: the change
        feed is ordered per logical partition (one stream) only, and an event's
        global position is stamped after it is stored (cqrskit.stores.cosmos_sequencer),
        so the documents delivered may not be numbered yet and come in no global
        order. The relay already publishes the numbered log in position order, gap
        free, and saves its position only after the hub acknowledged; so the trigger
        only wakes it, and it runs until the log has been quiet for `relay_quiet`
        seconds (which covers the numbering that follows the delivered writes). One
        pass at a time: it takes the relay's leadership, as `cqrskit relay` does;
        a wake-up that finds another pass running waits for it to end, then runs
        its own, so no write is left behind by a pass that was just ending.

        Returns the position reached. Raises Unavailable when publishing kept
        failing for the whole budget: the retry policy wakes the relay again.
        """
        relay = await self._open_relay()
        async with contextlib.AsyncExitStack() as stack:
            try:
                async with asyncio.timeout(self.lead_wait):
                    await stack.enter_async_context(relay.state.lead())
            except TimeoutError:
                # Another pass is still running; it sees what woke us.
                log.info("relay: another pass has been running for %gs; it goes on",
                         self.lead_wait)
                return relay.position
            relay.position = await relay.state.position()
            return await self._publish_until_quiet(relay)

    async def _publish_until_quiet(self, relay: Relay) -> int:
        loop = asyncio.get_running_loop()
        failures = relay.failed_publishes
        quiet_since = loop.time()
        try:
            async with asyncio.timeout(self.relay_budget):
                while loop.time() - quiet_since < self.relay_quiet:
                    before = relay.position
                    await relay.step()
                    if relay.position > before:
                        quiet_since = loop.time()
        except TimeoutError:
            # Stopping mid-publish is safe: the position is saved only after an ack.
            if relay.failed_publishes > failures:
                raise Unavailable(
                    f"relay: publishing after position {relay.position} kept failing for "
                    f"{self.relay_budget:g}s") from None
            log.info("relay: pass ended after its %gs budget at position %d; the next "
                     "wake-up goes on", self.relay_budget, relay.position)
        return relay.position

    async def _open_relay(self) -> Relay:
        async with self._lock:
            if self._relay is None:
                runtime = await open_runtime(self.settings, self.registry, role="relay")
                if runtime.relay is None:
                    await runtime.close()
                    raise CqrskitError(
                        f"the relay function publishes to a broker, but CQRSKIT_STREAM is "
                        f"{self.settings.stream!r}; use eventhubs://<namespace>...")
                self._relay = runtime
            relay = self._relay.relay
        if relay is None:
            raise RuntimeError("the relay runtime has no relay")
        return relay

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        """Stop the apps and close the stores (the Functions host has no shutdown hook
        for Python workers; tests and a clean exit use this)."""
        apps, self._apps = self._apps, {}
        for app in apps.values():
            await app.notify_shutdown()  # type: ignore[no-untyped-call]
        if self._views is not None:
            await self._views.close()
            self._views = None
        if self._relay is not None:
            await self._relay.close()
            self._relay = None


def _decode(bodies: Iterable[bytes]) -> Iterator[Envelope]:
    for index, body in enumerate(bodies):
        try:
            yield decode(body)
        except Exception as error:
            # Not something the relay wrote (it only sends envelopes), so no retry can
            # apply it; holding the partition back for it would stop every view.
            log.error("update_views: event %d of the batch is not a cqrskit envelope (%s): "
                      "%r; skipped", index, _describe(error), body[:200])


def _increasing(envelopes: Iterable[Envelope], after: int) -> Iterator[Envelope]:
    """The envelopes past `after` whose positions increase; the rest are copies.

    A relay retry or a deposed leader publishes a batch again behind its first
    copy, so a copy always follows an event with a higher position; this is the
    Kafka subscriber's rule (streams/kafka.py), applied to the trigger's batch.
    """
    last = after
    for envelope in envelopes:
        if envelope.position > last:
            last = envelope.position
            yield envelope


def _http_error(status: int, code: str, message: str) -> func.HttpResponse:
    """The cqrskit error shape, for answers given before the app could run."""
    response = error_response(status, code, message, {"Retry-After": "1"})
    headers: dict[str, Any] = dict(response.headers)
    return func.HttpResponse(bytes(response.body), status_code=status, headers=headers,
                             mimetype="application/json")


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
