"""Wire a runtime from settings: pick adapters by URL, build the handlers.

This is the one place that knows every adapter; the core knows only the ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from dataclasses import dataclass
from typing import Any

from cqrskit.checkpoints import Checkpoints
from cqrskit.command_handler import CommandHandler
from cqrskit.config import Settings
from cqrskit.errors import CqrskitError
from cqrskit.leases import PartitionLeases
from cqrskit.ports import EventStore, RelayState, Stream, ViewStore
from cqrskit.query_handler import QueryHandler
from cqrskit.registry import Domain, Registry
from cqrskit.relay import Relay
from cqrskit.status import StatusSampler, read_status
from cqrskit.telemetry import publish_status
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


_SUPPORTED_DBS = (
    "sqlite:///path, postgresql://user@host:port/database?schema=name or "
    "cosmos://host:port?database=name&key_env=VARIABLE"
)


async def open_event_store(url: str, settings: Settings) -> EventStore:
    if url.startswith("sqlite:///"):
        from cqrskit.stores.sqlite import SqliteEventStore

        return SqliteEventStore.from_url(url, synchronous=settings.sqlite_synchronous)
    if url.startswith(("postgresql://", "postgres://")):
        from cqrskit.stores.postgres import PostgresEventStore

        return await PostgresEventStore.open(url)
    if url.startswith("cosmos://"):
        from cqrskit.stores.cosmos_events import CosmosEventStore

        return await CosmosEventStore.open(url)
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
    elif url.startswith("cosmos://"):
        from cqrskit.stores.cosmos_views import CosmosViewStore

        views = await CosmosViewStore.open(url)
    else:
        raise CqrskitError(f"unsupported query DB URL {url!r}; use {_SUPPORTED_DBS}")
    try:
        await views.setup(registry.collections())
    except BaseException:
        await views.close()
        raise
    return views


def open_stream(spec: str, store: EventStore | None) -> Stream:
    """The stream by URL; the embedded one follows `store`, the command DB's log."""
    if spec == "embedded":
        from cqrskit.streams.embedded import EmbeddedStream

        if store is None:
            raise CqrskitError("the embedded stream is the command DB's log; open it first")
        return EmbeddedStream(store)
    if spec.startswith(("nats://", "tls://")):
        from cqrskit.streams.nats import NatsStream

        return NatsStream.from_url(spec)
    if spec.startswith(("kafka://", "eventhubs://")):
        from cqrskit.streams.kafka import KafkaStream

        return KafkaStream.from_url(spec)
    raise CqrskitError(
        f"unsupported stream {spec!r}; use 'embedded', nats://host:port?partitions=N, "
        "kafka://host:port?partitions=N or eventhubs://<namespace>.servicebus.windows.net"
    )


def relay_state(store: EventStore) -> RelayState:
    """The relay's position and leadership live in the command DB."""
    from cqrskit.stores.sqlite import SqliteEventStore, SqliteRelayState

    if isinstance(store, SqliteEventStore):
        return SqliteRelayState(store)
    if type(store).__module__ == "cqrskit.stores.cosmos_events":
        # Imported only for a Cosmos store: the cosmos extra may not be installed.
        from cqrskit.stores.cosmos_events import CosmosEventStore
        from cqrskit.stores.cosmos_relay import CosmosRelayState

        if not isinstance(store, CosmosEventStore):
            raise TypeError("a cosmos:// stream needs the Cosmos DB event store")
        return CosmosRelayState(store)
    from cqrskit.stores.postgres import PostgresEventStore, PostgresRelayState

    if isinstance(store, PostgresEventStore):
        return PostgresRelayState(store)
    raise CqrskitError(f"no relay state for {type(store).__name__}")


# What a process of each role runs. `serve` runs everything in one process; the
# others are the separate processes of the reference's topology.
ROLES = ("serve", "api", "command-handler", "query-handler", "update-processor", "relay")
PARTS = ("commands", "queries", "processor", "relay")


def role_parts(role: str, settings: Settings) -> frozenset[str]:
    """Which PARTS a process of `role` runs.

    The API handles in process what it does not forward to a handler service.
    """
    if role == "serve":
        return frozenset(PARTS)
    if role == "api":
        local = {"commands": settings.command_handler_url, "queries": settings.query_handler_url}
        return frozenset(part for part, url in local.items() if not url)
    single = {
        "command-handler": "commands", "query-handler": "queries",
        "update-processor": "processor", "relay": "relay",
    }
    if role not in single:
        raise CqrskitError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    return frozenset({single[role]})


def _needs_command_db(parts: frozenset[str], settings: Settings) -> bool:
    # Queries check tokens against the log and read command records; the embedded
    # stream *is* the log, so a processor following it reads the command DB too.
    follows_log = "processor" in parts and settings.stream == "embedded"
    return bool(parts & {"commands", "queries", "relay"}) or follows_log


@dataclass
class Runtime:
    """What one process opened and built; a part its role does not run is None."""

    settings: Settings
    registry: Registry
    role: str = "serve"
    store: EventStore | None = None
    views: ViewStore | None = None
    stream: Stream | None = None
    checkpoints: Checkpoints | None = None
    commands: CommandHandler | None = None
    queries: QueryHandler | None = None
    processor: UpdateProcessor | None = None
    relay: Relay | None = None
    leases: PartitionLeases | None = None
    status: StatusSampler | None = None
    _tasks: tuple[asyncio.Task[None], ...] = ()

    def start(self) -> None:
        """Start what this process's role runs in the background: processor, leases, relay,
        and the status reads behind the dashboard and the lag metrics."""
        if self.role == "serve" and self.processor is not None:
            self.processor.start()
        runs = {"leases": self.leases, "relay": self.relay, "status": self.status}
        self._tasks = tuple(
            asyncio.create_task(part.run(), name=name)
            for name, part in runs.items() if part is not None
        )

    async def read_status(self) -> dict[str, Any]:
        """The pipeline status from the stores, also handed to the lag gauges."""
        if self.store is None or self.views is None or self.stream is None:
            raise RuntimeError("the status needs the command DB, the query DB and the stream")
        status = await read_status(self.registry, self.store, self.views, self.stream.partitions)
        publish_status(status)
        return status.to_dict()

    def describe(self) -> str:
        """What this process opened, for a log line."""
        opened = [
            f"command DB {self.settings.command_db_url}" if self.store else "",
            f"query DB {self.settings.query_db_url}" if self.views else "",
            f"stream {self.settings.stream}" if self.stream else "",
        ]
        return ", ".join(filter(None, opened)) or "no stores"

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.leases is not None:
            # Stop the runners, then hand the partitions over without waiting for the ttl.
            try:
                await self.leases.release()
            except Exception as error:
                log.warning("could not release the partition leases: %s", error)
        if self.processor is not None:
            await self.processor.stop()
        for part in (self.stream, self.views, self.store):
            if part is not None:
                await part.close()


async def open_runtime(
    settings: Settings, registry: Registry | None = None, *, role: str = "serve"
) -> Runtime:
    """Open the stores and stream `role` needs and build its parts; nothing is started yet.

    `role` (one of ROLES) says which parts run (`role_parts`); a store none of
    them needs is not opened.
    """
    parts = role_parts(role, settings)
    registry = registry or Registry(load_domains(settings.domains))
    runtime = Runtime(settings=settings, registry=registry, role=role)
    try:
        if _needs_command_db(parts, settings):
            runtime.store = await open_event_store(settings.command_db_url, settings)
        if parts & {"queries", "processor"}:
            runtime.views = await open_view_store(settings.query_db_url, settings, registry)
        if parts & {"queries", "processor", "relay"}:
            # A stream object connects on first use: queries only read its partition count.
            runtime.stream = open_stream(settings.stream, runtime.store)
    except BaseException:
        await runtime.close()
        raise
    _build_parts(runtime, parts)
    return runtime


def _build_parts(runtime: Runtime, parts: frozenset[str]) -> None:
    settings, registry = runtime.settings, runtime.registry
    store, views, stream = runtime.store, runtime.views, runtime.stream
    if "commands" in parts:
        if store is None:
            raise RuntimeError("commands need the command DB")
        runtime.commands = CommandHandler(
            store, registry, cache_size=settings.aggregate_cache_size
        )
    if views is not None and stream is not None:
        runtime.checkpoints = Checkpoints(views, partitions=stream.partitions)
    if "queries" in parts:
        if store is None or views is None or runtime.checkpoints is None:
            raise RuntimeError("queries need the command DB, the query DB and the stream")
        runtime.queries = QueryHandler(
            registry, views, store, runtime.checkpoints,
            consistency_timeout=settings.consistency_timeout,
        )
        runtime.status = StatusSampler(runtime.read_status, settings.status_interval)
    if "processor" in parts:
        if views is None or stream is None:
            raise RuntimeError("the update processor needs the query DB and the stream")
        runtime.processor = UpdateProcessor(
            registry, views, stream, partitions=stream.partitions,
            owned=range(stream.partitions),
            retry=RetryPolicy(settings.retry_attempts, settings.retry_backoff),
            checkpoints=runtime.checkpoints,
        )
        if runtime.role == "update-processor":
            runtime.leases = PartitionLeases(
                views, stream.partitions, runtime.processor.assign,
                ttl=settings.lease_ttl, heartbeat_seconds=settings.lease_heartbeat,
            )
    if "relay" in parts and stream is not None and stream.needs_relay:
        if store is None:
            raise RuntimeError("the relay needs the command DB")
        runtime.relay = Relay(store, stream, relay_state(store))
