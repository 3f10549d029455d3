"""Handle a command end to end: load the aggregate, decide, append atomically."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import replace
from typing import Any

import orjson

from cqrskit.aggregate import Aggregate
from cqrskit.errors import CommandRejected, ConcurrencyConflict, IdempotencyKeyReused, NotFound
from cqrskit.messages import Command, CommandResult, Event, NewEvent, new_id
from cqrskit.ports import AppendRequest, EventStore
from cqrskit.registry import Registry
from cqrskit.telemetry import (
    command_duration,
    commands,
    events_appended,
    operation,
    step_span,
    trace_headers,
)
from cqrskit.tenancy import is_default, local, scoped

log = logging.getLogger(__name__)

# A conflict on a command that named no expected version is retried against the
# fresh state: the caller asked for "apply this", not "apply this at version N".
MAX_ATTEMPTS = 5


def command_hash(command: Command) -> str:
    """A digest of what the command asks, to tell a retry from a reused id."""
    fields = command.model_dump(mode="json")
    try:
        body = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        # An integer beyond 64 bits in a field a domain left unbounded: the slower
        # encoder digests it all the same (the domain's own rules judge the value).
        body = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(command.name.encode() + b"\0" + body, digest_size=16).hexdigest()


class AggregateCache:
    """Recently used aggregates, so a command does not re-read its stream.

    Safe across processes: a stale entry only makes the append fail with a
    concurrency conflict, and a conflict evicts the entry and retries.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[str, Aggregate] = OrderedDict()

    def get(self, stream_id: str) -> Aggregate | None:
        aggregate = self._entries.get(stream_id)
        if aggregate is not None:
            self._entries.move_to_end(stream_id)
        return aggregate

    def put(self, aggregate: Aggregate, stream_id: str) -> None:
        """Cache under its stored stream id (a tenant's carries the tenant's prefix)."""
        if self.size <= 0:
            return
        current = self._entries.get(stream_id)
        if current is not None and current.version > aggregate.version:
            return  # a slow read finished after a newer state was cached
        self._entries[stream_id] = aggregate
        self._entries.move_to_end(stream_id)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def evict(self, stream_id: str) -> None:
        self._entries.pop(stream_id, None)


class CommandHandler:
    def __init__(self, store: EventStore, registry: Registry, *, cache_size: int = 10_000) -> None:
        self.store = store
        self.registry = registry
        self.cache = AggregateCache(cache_size)
        self._aggregates = {
            command_type: aggregate
            for domain in registry.domains
            for command_type, aggregate in domain.commands.values()
        }

    async def handle(
        self,
        command: Command,
        *,
        command_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        tenant: str | None = None,
    ) -> CommandResult:
        """Decide and store the command's events; return where they landed.

        A `command_id` seen before returns the first result and stores nothing.
        A `tenant` other than the default one gets its own streams and command
        ids (cqrskit.tenancy); the result then names the stored, prefixed ids.
        """
        with operation(f"command {command.name}", commands, command_duration,
                       {"command": command.name}) as span:
            if is_default(tenant):
                result = await self._handle(command, command_id, metadata, tenant)
            else:
                result = await self._handle_for_tenant(command, command_id, metadata, tenant)
            span.set_attributes({"cqrskit.stream_id": result.stream_id,
                                 "cqrskit.position": result.position})
            return result

    async def _handle_for_tenant(
        self, command: Command, command_id: str | None, metadata: dict[str, Any] | None,
        tenant: str | None,
    ) -> CommandResult:
        """As _handle; errors name the ids the tenant sent, not the stored ones."""
        try:
            return await self._handle(command, command_id, metadata, tenant)
        except ConcurrencyConflict as error:
            raise ConcurrencyConflict(
                local(error.stream_id), error.expected, error.current) from None
        except IdempotencyKeyReused as error:
            raise IdempotencyKeyReused(local(error.command_id)) from None

    async def _handle(
        self, command: Command, command_id: str | None, metadata: dict[str, Any] | None,
        tenant: str | None,
    ) -> CommandResult:
        aggregate_type = self._aggregates.get(type(command))
        if aggregate_type is None:
            raise CommandRejected(f"no aggregate handles {type(command).__name__}")
        if command_id is not None:
            command_id = scoped(tenant, command_id)
            digest = command_hash(command)
            stored = await self.store.get_command(command_id)
            if stored is not None:
                if stored.command_hash != digest:
                    raise IdempotencyKeyReused(command_id)
                return replace(stored.result, replayed=True)
        else:
            # A fresh id cannot come back with another command: no digest needed.
            command_id, digest = scoped(tenant, new_id()), ""
        # The events carry this command's span as their parent: the update
        # processors, in any process, continue the trace from there.
        metadata = {
            "command_id": command_id,
            "correlation_id": command_id,
            "causation_id": command_id,
            **(metadata or {}),
            **trace_headers(),
        }
        if tenant is not None:
            metadata["tenant"] = tenant
        local_id = command.target_id()
        new_stream = local_id is None
        if local_id is None:  # also tells mypy that local_id is a str after it
            if not command.creates:
                raise CommandRejected(
                    f"{command.name} needs the field {command.aggregate_id_field!r}"
                )
            local_id = new_id()
        # The aggregate knows the id its caller sent; the store, the tenant's stream.
        stream_id = scoped(tenant, local_id)
        expected = command.target_version()

        for attempt in range(1, MAX_ATTEMPTS + 1):
            aggregate, events = await self._decide(
                aggregate_type, stream_id, local_id, new_stream, command, expected
            )
            if not events:
                return CommandResult(command_id, stream_id, aggregate.version, 0)
            request = AppendRequest(
                stream_id=stream_id,
                stream_type=aggregate.stream_type,
                expected_version=aggregate.version,
                events=[
                    NewEvent(e.type_name, e.model_dump(mode="json"), e.schema_version)
                    for e in events
                ],
                metadata=metadata,
                command_id=command_id,
                command_hash=digest,
            )
            try:
                with step_span("append", {
                    "cqrskit.stream_id": stream_id, "cqrskit.events": len(events),
                }):
                    result = await self.store.append(request)
            except ConcurrencyConflict:
                self.cache.evict(stream_id)
                if expected is not None or attempt == MAX_ATTEMPTS:
                    raise
                log.debug("conflict on %s, attempt %d; retrying", stream_id, attempt)
                continue
            except BaseException:
                self.cache.evict(stream_id)
                raise
            if result.replayed:
                # A concurrent duplicate stored first: our decision was not stored.
                self.cache.evict(stream_id)
            else:
                events_appended.add(len(events), {"stream_type": aggregate.stream_type})
                for event in events:
                    aggregate.evolve(event)
                self.cache.put(aggregate, stream_id)
            return result
        raise AssertionError("unreachable")

    async def _decide(
        self,
        aggregate_type: type[Aggregate],
        stream_id: str,
        local_id: str,
        new_stream: bool,
        command: Command,
        expected: int | None,
    ) -> tuple[Aggregate, list[Event]]:
        if new_stream:
            aggregate = aggregate_type(local_id)
            return aggregate, _check_and_decide(aggregate, command, expected)
        cached = self.cache.get(stream_id)
        if isinstance(cached, aggregate_type):
            try:
                return cached, _check_and_decide(cached, command, expected)
            except (ConcurrencyConflict, CommandRejected, NotFound):
                # Another process may have moved the stream on: refuse only on
                # state read from the store.
                self.cache.evict(stream_id)
        aggregate = await self._read(aggregate_type, stream_id, local_id)
        return aggregate, _check_and_decide(aggregate, command, expected)

    async def _read(
        self, aggregate_type: type[Aggregate], stream_id: str, local_id: str
    ) -> Aggregate:
        aggregate = aggregate_type(local_id)
        envelopes = await self.store.read_stream(stream_id)
        if envelopes and envelopes[0].stream_type != aggregate.stream_type:
            raise NotFound(f"no {aggregate.stream_type} with id {stream_id!r}")
        for envelope in envelopes:
            envelope = self.registry.upcast(envelope)
            aggregate.evolve_stored(envelope.type, envelope.data)
        if aggregate.version:
            # An aggregate that does not exist yet is not cached: another process
            # may create it at any moment.
            self.cache.put(aggregate, stream_id)
        return aggregate


def _check_and_decide(aggregate: Aggregate, command: Command, expected: int | None) -> list[Event]:
    if expected is not None and aggregate.version != expected:
        raise ConcurrencyConflict(aggregate.id, expected, aggregate.version)
    return aggregate.decide(command)
