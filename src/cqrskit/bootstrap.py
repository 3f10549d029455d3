"""Wire a runtime from settings: pick adapters by URL, build the handlers.

This is the one place that knows every adapter; the core knows only the ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from dataclasses import dataclass

from cqrskit.checkpoints import Checkpoints
from cqrskit.command_handler import CommandHandler
from cqrskit.config import Settings
from cqrskit.errors import CqrskitError
from cqrskit.leases import PartitionLeases
from cqrskit.ports import EventStore, RelayState, Stream, ViewStore
from cqrskit.query_handler import QueryHandler
from cqrskit.registry import Domain, Registry
from cqrskit.relay import Relay
from cqrskit.update_processor import RetryPolicy, UpdateProcessor

log = logging.getLogger(__name__)


def load_domains(spec: str) -> list[Domain]:
    """Import `module` or `module:attribute` for each comma-separated entry."""
    domains = []
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        module_name, _, attribute = entry.partition(":")
        module = importlib.import_module(module_name)
        domain = getattr(module, attribute or "domain", None)
        if not isinstance(domain, Domain):
            raise CqrskitError(f"{entry!r} does not name a cqrskit Domain")
        domains.append(domain)
    return domains


_SUPPORTED_DBS = "sqlite:///path or postgresql://user@host:port/database?schema=name"


async def open_event_store(url: str, settings: Settings) -> EventStore:
    if url.startswith("sqlite:///"):
        from cqrskit.stores.sqlite import SqliteEventStore

        return SqliteEventStore.from_url(url, synchronous=settings.sqlite_synchronous)
    if url.startswith(("postgresql://", "postgres://")):
        from cqrskit.stores.postgres import PostgresEventStore

        return await PostgresEventStore.open(url)
    raise CqrskitError(f"unsupported command DB URL {url!r}; use {_SUPPORTED_DBS}")


async def open_view_store(url: str, settings: Settings, registry: Registry) -> ViewStore:
    if url.startswith("sqlite:///"):
        from cqrskit.stores.sqlite import SqliteViewStore

        # NORMAL whatever the command DB uses: views commit with their checkpoint and
        # are rebuilt from the log, so a power cut only re-applies the last batches.
        views: ViewStore = SqliteViewStore.from_url(url, synchronous="NORMAL")
    elif url.startswith(("postgresql://", "postgres://")):
        from cqrskit.stores.postgres import PostgresViewStore

        views = await PostgresViewStore.open(url)
    else:
        raise CqrskitError(f"unsupported query DB URL {url!r}; use {_SUPPORTED_DBS}")
    try:
        await views.setup(registry.collections())
    except BaseException:
        await views.close()
        raise
    return views


def open_stream(spec: str, store: EventStore) -> Stream:
    if spec == "embedded":
        from cqrskit.streams.embedded import EmbeddedStream

        return EmbeddedStream(store)
    if spec.startswith(("nats://", "tls://")):
        from cqrskit.streams.nats import NatsStream

        return NatsStream.from_url(spec)
    raise CqrskitError(
        f"unsupported stream {spec!r}; use 'embedded' or nats://host:port?partitions=N"
    )


def relay_state(store: EventStore) -> RelayState:
    """The relay's position and leadership live in the command DB."""
    from cqrskit.stores.sqlite import SqliteEventStore, SqliteRelayState

    if isinstance(store, SqliteEventStore):
        return SqliteRelayState(store)
    from cqrskit.stores.postgres import PostgresEventStore, PostgresRelayState

    if isinstance(store, PostgresEventStore):
        return PostgresRelayState(store)
    raise CqrskitError(f"no relay state for {type(store).__name__}")


# Which parts of the pipeline a process runs besides handling commands and queries:
# `serve` runs the processor over every partition and the relay; `api` neither;
# `update-processor` the processor over leased partitions; `relay` only the relay.
ROLES = ("serve", "api", "update-processor", "relay")


@dataclass
class Runtime:
    settings: Settings
    registry: Registry
    store: EventStore
    views: ViewStore
    stream: Stream
    checkpoints: Checkpoints
    commands: CommandHandler
    queries: QueryHandler
    processor: UpdateProcessor
    relay: Relay | None = None
    role: str = "serve"
    leases: PartitionLeases | None = None
    _relay_task: asyncio.Task[None] | None = None
    _leases_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start what this process's role runs: processor, leases, relay."""
        if self.role == "serve":
            self.processor.start()
        if self.leases is not None:
            self._leases_task = asyncio.create_task(self.leases.run(), name="leases")
        if self.relay is not None and self.role in ("serve", "relay"):
            self._relay_task = asyncio.create_task(self.relay.run(), name="relay")

    async def close(self) -> None:
        for task in (self._relay_task, self._leases_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.leases is not None:
            # Stop the runners, then hand the partitions over without waiting for the ttl.
            try:
                await self.leases.release()
            except Exception as error:
                log.warning("could not release the partition leases: %s", error)
        await self.processor.stop()
        await self.stream.close()
        await self.views.close()
        await self.store.close()


async def open_runtime(
    settings: Settings, registry: Registry | None = None, *, role: str = "serve"
) -> Runtime:
    """Open the stores and stream and build the handlers; nothing is started yet.

    `role` (one of ROLES) says what `Runtime.start` runs besides the handlers.
    """
    if role not in ROLES:
        raise CqrskitError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    registry = registry or Registry(load_domains(settings.domains))
    store = await open_event_store(settings.command_db_url, settings)
    try:
        views = await open_view_store(settings.query_db_url, settings, registry)
    except BaseException:
        await store.close()
        raise
    stream = open_stream(settings.stream, store)
    partitions = stream.partitions
    checkpoints = Checkpoints(views, partitions=partitions)
    retry = RetryPolicy(settings.retry_attempts, settings.retry_backoff)
    processor = UpdateProcessor(
        registry, views, stream, partitions=partitions, owned=range(partitions),
        retry=retry, checkpoints=checkpoints,
    )
    leases = None
    if role == "update-processor":
        leases = PartitionLeases(
            views, partitions, processor.assign,
            ttl=settings.lease_ttl, heartbeat_seconds=settings.lease_heartbeat,
        )
    return Runtime(
        settings=settings,
        registry=registry,
        store=store,
        views=views,
        stream=stream,
        checkpoints=checkpoints,
        commands=CommandHandler(store, registry, cache_size=settings.aggregate_cache_size),
        queries=QueryHandler(
            registry, views, store, checkpoints,
            consistency_timeout=settings.consistency_timeout,
        ),
        processor=processor,
        relay=Relay(store, stream, relay_state(store)) if stream.needs_relay else None,
        role=role,
        leases=leases,
    )
