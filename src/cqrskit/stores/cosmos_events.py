"""The Cosmos DB event store (command DB).

Containers, in the database the URL names:

- `events`, partition key `/stream_id`: one document per event, id `e.<version>`
  (so a stream's version is unique: optimistic concurrency is a 409 on create),
  and one per command, id `c.<command id>`: the outbox entry the sequencer
  numbers. A command's events and its outbox document are written in one
  transactional batch: all or nothing.
- `commands`, partition key `/id`: the idempotency record of a command id.
- `log`, partition key `/pk`: the global sequence (`cosmos_sequencer`), and the
  relay's position and leader lease (`cosmos_relay`).

Event data and metadata are stored as JSON text: Cosmos keeps numbers as
doubles, which would round integers beyond 2^53 and turn 1.0 into 1.

An append of a command whose id the client chose first reserves the id (a
create in `commands`, 409 if taken), stores the events, then numbers them. A
reservation left pending by an appender that stopped is taken over after
`TAKEOVER_SECONDS`. When the new attempt targets the same stream, the outbox
document's id (`c.<command id>`) already makes the two attempts exclusive. When
it targets another stream (the handler generates a new stream id per attempt),
the old stream is first fenced: a `fence` document takes the version slot the
stopped appender meant to write, so its late batch fails on its first
operation and stores nothing, even on the stand-in whose batches are not atomic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import orjson
from azure.cosmos.aio import ContainerProxy
from azure.cosmos.exceptions import CosmosBatchOperationError, CosmosHttpResponseError

from cqrskit.errors import ConcurrencyConflict, CqrskitError, IdempotencyKeyReused, Unavailable
from cqrskit.messages import CommandResult, Envelope, utc_now
from cqrskit.ports import AppendRequest, StoredCommand
from cqrskit.stores.cosmos import (
    IF_MATCH,
    CosmosAccount,
    CosmosUrl,
    ServerClock,
    ensure_container,
    is_conflict,
    is_not_found,
    is_precondition_failed,
    open_database,
    query,
    read_or_none,
    safe_id,
    translated,
    unavailable,
)
from cqrskit.stores.cosmos_sequencer import (
    Entry,
    Sequencer,
    event_doc_id,
    outbox_doc_id,
)
from cqrskit.stores.group_commit import next_group

log = logging.getLogger(__name__)

# A reservation older than this whose events are not stored is taken over.
TAKEOVER_SECONDS = 5.0
# Commands sent together: each its own batch (streams are partitions), one claim.
MAX_GROUP = 64
# How often a follower looks at the head for appends made by other processes,
# and how often it sweeps for commands whose appender stopped.
POLL_SECONDS = 0.1
SWEEP_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class _Reservation:
    etag: str


@dataclass(frozen=True, slots=True)
class _Written:
    """A command whose events are stored and wait for positions."""

    entry: Entry
    fresh: bool  # stored by this call a moment ago
    replayed: bool  # stored before, by an earlier attempt of this command id
    # An earlier command of the stream may still wait for its positions.
    after_pending: bool


_Pending = tuple[AppendRequest, "asyncio.Future[CommandResult]"]


def _envelope(doc: dict[str, Any]) -> Envelope:
    return Envelope(
        doc["event_id"], doc["stream_id"], doc["stream_type"], int(doc["version"]),
        int(doc.get("position", 0)), doc["type"], int(doc["schema_version"]),
        orjson.loads(doc["data"]), orjson.loads(doc["metadata"]), doc["recorded_at"],
    )


def _translate(error: BaseException, what: str) -> BaseException:
    return unavailable(error, what) or error


class CosmosEventStore:
    """The command DB on Cosmos DB. Open with `await CosmosEventStore.open(url)`."""

    def __init__(
        self, url: CosmosUrl, account: CosmosAccount, events: ContainerProxy,
        commands: ContainerProxy, log_container: ContainerProxy,
    ) -> None:
        self.url = url
        self.account = account
        self.events = events
        self.commands = commands
        self.log = log_container
        self.clock = ServerClock()
        self.sequencer = Sequencer(events, commands, log_container, self.clock)
        self.what = f"the Cosmos DB event store {url.database} at {url.endpoint}"
        self._pending: list[_Pending] = []
        self._sender: asyncio.Task[None] | None = None
        self._appended = asyncio.Event()
        self._last_sweep = float("-inf")
        self._closed = False

    @classmethod
    async def open(cls, url: str) -> CosmosEventStore:
        parsed = CosmosUrl.parse(url)
        account = await open_database(parsed)
        try:
            events = await ensure_container(
                account.database, "events", "/stream_id", unindexed=("data", "metadata")
            )
            commands = await ensure_container(account.database, "commands", "/id")
            log_container = await ensure_container(account.database, "log", "/pk", ttl=True)
            store = cls(parsed, account, events, commands, log_container)
            async with translated(store.what):
                await store.sequencer.ensure_head()
        except BaseException:
            await account.close()
            raise
        return store

    def _usable(self) -> None:
        if self._closed:
            raise Unavailable(f"{self.what} is closed")

    # ----------------------------------------------------------------- append

    async def append(self, request: AppendRequest) -> CommandResult:
        self._usable()
        if not request.events:
            raise CqrskitError("an append needs at least one event")
        future: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        if self._sender is None or self._sender.done():
            # Its first step runs in the next loop iteration: everything appended in
            # this one goes in the first group.
            self._sender = asyncio.create_task(self._send_pending(), name="cosmos-append")
        return await future

    async def _send_pending(self) -> None:
        while self._pending:
            group, self._pending = next_group(self._pending, MAX_GROUP)
            try:
                await self._append_group(group)
            except BaseException as error:
                for _, future in group:
                    if not future.done():
                        future.set_exception(_translate(error, self.what))
                if not isinstance(error, Exception):
                    raise

    async def _append_group(self, group: list[_Pending]) -> None:
        outcomes = await asyncio.gather(
            *(self._write(request) for request, _ in group), return_exceptions=True
        )
        written = [o for o in outcomes if isinstance(o, _Written)]
        positions: dict[tuple[str, str], int] = {}
        failure: BaseException | None = None
        try:
            # Commands an earlier attempt stored first, then the ones stored just now,
            # each after any earlier command of its stream: positions follow versions.
            stored = [w.entry for w in written if not w.fresh]
            if stored:
                positions.update(await self.sequencer.sequence(stored))
            fresh = [w for w in written if w.fresh]
            await asyncio.gather(*(
                self.sequencer.await_predecessors(w.entry.stream_id, w.entry.first_version)
                for w in fresh if w.after_pending
            ))
            if fresh:
                positions.update(await self.sequencer.sequence([w.entry for w in fresh]))
        except Exception as error:
            # The events are stored; the sweep numbers them later, and a retry of the
            # command id answers with them.
            failure = _translate(error, self.what)
        self._appended.set()
        for (request, future), outcome in zip(group, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, _Written):
                if failure is not None:
                    future.set_exception(failure)
                    continue
                entry = outcome.entry
                last = positions[entry.key] + entry.count - 1
                future.set_result(CommandResult(
                    request.command_id, entry.stream_id, entry.last_version, last,
                    replayed=outcome.replayed,
                ))
            elif isinstance(outcome, BaseException):
                future.set_exception(_translate(outcome, self.what))
            else:
                future.set_result(outcome)

    async def _write(self, request: AppendRequest) -> Any:
        """Store one command's events: a `_Written`, or the final answer (a replayed
        result, or the error that refuses it)."""
        reservation = None
        if request.command_hash:
            reserved = await self._reserve(request)
            if not isinstance(reserved, _Reservation):
                return reserved
            reservation = reserved
        return await self._store(request, reservation)

    async def _store(self, request: AppendRequest, reservation: _Reservation | None) -> Any:
        stream_id, expected = request.stream_id, request.expected_version
        after_pending = False
        if expected > 0:
            # Event `expected` exists and `expected + 1` can be created: then the stream
            # was at exactly `expected` (events are never removed).
            previous = await read_or_none(self.events, event_doc_id(expected), stream_id)
            if previous is None:
                return await self._conflict(request, reservation)
            # Numbered in version order: if the event before has no position yet, its
            # command is numbered first (see Sequencer.await_predecessors).
            after_pending = "position" not in previous
        now = self.clock.now()
        recorded_at = utc_now().isoformat()
        metadata = orjson.dumps(request.metadata).decode()
        docs: list[dict[str, Any]] = [
            {
                "id": event_doc_id(version), "stream_id": stream_id, "kind": "event",
                "version": version, "event_id": event.event_id,
                "stream_type": request.stream_type, "type": event.type,
                "schema_version": event.schema_version,
                "data": orjson.dumps(event.data).decode(), "metadata": metadata,
                "recorded_at": recorded_at, "command_id": request.command_id,
            }
            for version, event in enumerate(request.events, start=expected + 1)
        ]
        last_version = expected + len(request.events)
        docs.append({
            "id": outbox_doc_id(request.command_id), "stream_id": stream_id, "kind": "command",
            "command_id": request.command_id, "command_hash": request.command_hash,
            "first_version": expected + 1, "last_version": last_version,
            "status": "pending", "created_at": now,
        })
        try:
            # The first event goes first: on a conflict nothing is written, even on
            # the stand-in, whose batches keep the operations before a failing one.
            await self.events.execute_item_batch(
                [("create", (doc,)) for doc in docs], partition_key=stream_id
            )
        except CosmosBatchOperationError as error:
            if not is_conflict(error):
                raise
            return await self._after_collision(request, reservation)
        entry = Entry(stream_id, request.command_id, request.command_hash, expected + 1,
                      last_version, now)
        return _Written(entry, fresh=True, replayed=False, after_pending=after_pending)

    async def _after_collision(self, request: AppendRequest, reservation: _Reservation | None
                               ) -> Any:
        """The batch hit an existing document: an event (a conflict) or this command's
        outbox document (it was stored before, or fenced off by a takeover)."""
        mine = await read_or_none(
            self.events, outbox_doc_id(request.command_id), request.stream_id
        )
        if mine is None:
            slot = await read_or_none(
                self.events, event_doc_id(request.expected_version + 1), request.stream_id
            )
            if slot is not None and slot.get("kind") == "fence" and (
                slot.get("command_id") == request.command_id
            ):
                log.warning("command %s was taken over by another appender; answering as it "
                            "does", request.command_id)
                return await self._write(request)
            return await self._conflict(request, reservation)
        if mine["command_hash"] != request.command_hash:
            return IdempotencyKeyReused(request.command_id)
        return await self._stored(mine)

    async def _stored(self, outbox: dict[str, Any]) -> Any:
        """The answer for a command whose events were stored by an earlier attempt."""
        if outbox["status"] == "sequenced":
            await self.sequencer.ensure_visible(int(outbox["last_position"]))
            return CommandResult(
                outbox["command_id"], outbox["stream_id"], int(outbox["last_version"]),
                int(outbox["last_position"]), replayed=True,
            )
        return _Written(Entry.from_outbox(outbox), fresh=False, replayed=True, after_pending=True)

    async def _conflict(self, request: AppendRequest, reservation: _Reservation | None
                        ) -> ConcurrencyConflict:
        current = await self._head_version(request.stream_id)
        if reservation is not None:
            await self._release(request.command_id, reservation)
        return ConcurrencyConflict(request.stream_id, request.expected_version, current)

    async def _head_version(self, stream_id: str) -> int:
        found = await query(
            self.events,
            "SELECT TOP 1 VALUE c.version FROM c WHERE c.stream_id = @stream "
            "AND c.kind = 'event' ORDER BY c.version DESC",
            {"@stream": stream_id}, partition=stream_id,
        )
        return int(found[0]) if found else 0

    # ----------------------------------------------------------- idempotency

    async def _reserve(self, request: AppendRequest) -> Any:
        """Reserve the command id: a `_Reservation`, or the answer if it is taken."""
        command_id = request.command_id
        record_id = safe_id(command_id)
        waits = 0
        while True:
            now = self.clock.now()
            record = {
                "id": record_id, "command_id": command_id,
                "command_hash": request.command_hash, "stream_id": request.stream_id,
                "expected_version": request.expected_version, "state": "pending",
                "claimed_at": now,
            }
            try:
                created = await self.commands.create_item(record)
                self.clock.observe(created)
                return _Reservation(created["_etag"])
            except CosmosHttpResponseError as error:
                if not is_conflict(error):
                    raise
            found = await read_or_none(self.commands, record_id, record_id)
            if found is None:
                continue  # released by an attempt that conflicted: try again
            if found["command_hash"] != request.command_hash:
                return IdempotencyKeyReused(command_id)
            if found["state"] == "done":
                await self.sequencer.ensure_visible(int(found["position"]))
                return CommandResult(command_id, found["stream_id"], int(found["version"]),
                                     int(found["position"]), replayed=True)
            outbox = await read_or_none(
                self.events, outbox_doc_id(command_id), found["stream_id"]
            )
            if outbox is not None:
                return await self._stored(outbox)
            if now - float(found["claimed_at"]) < TAKEOVER_SECONDS:
                # Its appender is at work: normally done in milliseconds.
                waits += 1
                await asyncio.sleep(min(0.01 * waits, 0.25))
                continue
            if found["stream_id"] != request.stream_id and not await self._fence(found):
                continue  # its events were stored meanwhile: look again
            try:
                replaced = await self.commands.replace_item(
                    record_id, record, etag=found["_etag"], match_condition=IF_MATCH
                )
            except CosmosHttpResponseError as error:
                if is_precondition_failed(error) or is_not_found(error):
                    continue
                raise
            log.warning("took over command id %s, reserved %.0fs ago and never stored",
                        command_id, now - float(found["claimed_at"]))
            return _Reservation(replaced["_etag"])

    async def _fence(self, record: dict[str, Any]) -> bool:
        """Take the version slot a stopped appender meant to write; False if its events
        are there after all."""
        version = int(record["expected_version"]) + 1
        fence = {
            "id": event_doc_id(version), "stream_id": record["stream_id"], "kind": "fence",
            "version": version, "command_id": record["command_id"],
        }
        try:
            await self.events.create_item(fence)
            return True
        except CosmosHttpResponseError as error:
            if not is_conflict(error):
                raise
        # Taken: by our fence (another taker got here first), by another command (the
        # stopped appender's batch can never land there either), or by its own events.
        slot = await read_or_none(self.events, fence["id"], record["stream_id"])
        return not (slot is not None and slot.get("kind") == "event" and (
            slot.get("command_id") == record["command_id"]
        ))

    async def _release(self, command_id: str, reservation: _Reservation) -> None:
        """Free a reservation whose command was refused: the id was never used."""
        with contextlib.suppress(CosmosHttpResponseError):
            await self.commands.delete_item(
                safe_id(command_id), partition_key=safe_id(command_id),
                etag=reservation.etag, match_condition=IF_MATCH,
            )

    async def get_command(self, command_id: str) -> StoredCommand | None:
        self._usable()
        async with translated(self.what):
            record_id = safe_id(command_id)
            found = await read_or_none(self.commands, record_id, record_id)
            if found is None:
                return None
            if found["state"] == "done":
                await self.sequencer.ensure_visible(int(found["position"]))
                result = CommandResult(command_id, found["stream_id"], int(found["version"]),
                                       int(found["position"]))
                return StoredCommand(command_id, found["command_hash"], result)
            # Reserved: its events may be stored and not numbered yet (the appender
            # stopped). Then it was accepted: number it and answer, or a retry would be
            # judged against a stream that already holds its own events.
            outbox = await read_or_none(
                self.events, outbox_doc_id(command_id), found["stream_id"]
            )
            if outbox is None:
                return None
            stored = await self._stored(outbox)
            if isinstance(stored, _Written):
                entry = stored.entry
                await self.sequencer.await_predecessors(entry.stream_id, entry.first_version)
                first = (await self.sequencer.sequence([entry]))[entry.key]
                stored = CommandResult(command_id, entry.stream_id, entry.last_version,
                                       first + entry.count - 1)
        result = CommandResult(command_id, stored.stream_id, stored.version, stored.position)
        return StoredCommand(command_id, outbox["command_hash"], result)

    # ------------------------------------------------------------------ reads

    async def read_stream(self, stream_id: str) -> list[Envelope]:
        """The stream in version order; an event not numbered yet has position 0."""
        self._usable()
        async with translated(self.what):
            docs = await query(
                self.events,
                "SELECT * FROM c WHERE c.stream_id = @stream AND c.kind = 'event' "
                "ORDER BY c.version",
                {"@stream": stream_id}, partition=stream_id,
            )
        return [_envelope(doc) for doc in docs]

    async def read_all(self, after: int, limit: int) -> list[Envelope]:
        self._usable()
        async with translated(self.what):
            upper = min(await self.sequencer.last_position(), after + limit)
            if upper <= after:
                return []
            docs = await query(
                self.events,
                "SELECT * FROM c WHERE c.kind = 'event' AND c.position > @after "
                "AND c.position <= @upper ORDER BY c.position",
                {"@after": after, "@upper": upper},
            )
        # Every position up to the head is stamped; a replica that lags may still miss
        # one: hand out the unbroken run only, the rest comes with the next read.
        envelopes: list[Envelope] = []
        for doc in docs:
            if doc["position"] != after + len(envelopes) + 1:
                break
            envelopes.append(_envelope(doc))
        return envelopes

    async def last_position(self) -> int:
        self._usable()
        async with translated(self.what):
            return await self.sequencer.last_position()

    async def wait_for_append(self, after: int, timeout: float) -> None:
        """Wake on appends of this process at once, of others within POLL_SECONDS.

        Followers of the log also sweep now and then: commands whose appender died
        between storing and numbering them get their positions here.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._appended.clear()
        while True:
            if await self.last_position() > after:
                return
            if loop.time() - self._last_sweep > SWEEP_SECONDS:
                self._last_sweep = loop.time()
                async with translated(self.what):
                    if await self.sequencer.sweep():
                        continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._appended.wait(), min(POLL_SECONDS, remaining))

    async def check(self) -> None:
        await self.last_position()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sender is not None:
            # The appends already queued are still sent.
            await asyncio.gather(self._sender, return_exceptions=True)
        await self.account.close()
