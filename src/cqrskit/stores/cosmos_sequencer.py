"""Global positions for the Cosmos DB event store: one shared sequence of claims.

Cosmos DB has no sequence across partitions, and the events container is
partitioned by stream. So a command's events are stored first, without a
position, in one transactional batch with the command's outbox document (the
"command" document `c.<command id>`, status `pending`); afterwards the
sequencer gives them their positions. All processes share one sequence, kept in
one logical partition (`log` in the container `log`):

- `head` `{n, last}`: claims 1..n are finished and positions 1..last are
  readable. Readers never look beyond `last`, so a reader cannot skip a
  position that is still being stamped: positions are gap-safe.
- `k.<n>`: claim n, the commands it numbers, in order, from position `first`.
  Its id makes claims exclusive: only one process can create claim n, and a
  claim n + 1 is only made by someone who read `head` at n, i.e. after claim n
  was finished. That orders all claims, and with them all positions.
- `m.<hash of stream and command>`: a marker per numbered command, created in
  the same transactional batch as its claim, so a command cannot be numbered
  twice: a second claim of it fails as a whole on the marker.

Before a claim, the markers of its commands are read (after reading `head`):
any process may be numbering the same command at the same moment (a follower's
sweep, a duplicate of the command sent to another process), and a command
already numbered is answered from its marker instead.

Finishing a claim stamps `position` on each event, marks the outbox document
`sequenced`, writes the idempotency record (container `commands`) and moves
`head` on (compare-and-swap on its ETag). Every step writes the same values
whoever does it, so anyone who finds a claim unfinished (its maker crashed)
finishes it.

Per stream, positions follow versions: a command is numbered only after the
commands before it in its stream. Normally the appender numbers its own
commands right after storing them (and answers with the position). Others take
over commands left pending for `GRACE` seconds (a crashed appender): the
sweep, run by whoever follows the log, and an appender whose stream has a
pending predecessor.

On the stand-in, transactional batches are not atomic (operations run in order
and stop at the first failure, keeping the ones before it). Everything here is
ordered so that the check that can fail comes first: the claim document
before its markers. Because markers are read after `head` and before each
claim, on a store whose reads are not stale (the stand-in; Cosmos with Strong
consistency) a marker never fails after its claim; on Cosmos with weaker
consistency it can, and there the batch is atomic.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from azure.cosmos.aio import ContainerProxy
from azure.cosmos.exceptions import CosmosBatchOperationError

from cqrskit.errors import Unavailable
from cqrskit.stores.cosmos import (
    IF_MATCH,
    ServerClock,
    bounded,
    is_conflict,
    is_precondition_failed,
    query,
    read_or_none,
    safe_id,
)

log = logging.getLogger(__name__)

LOG_PARTITION = "log"
HEAD_ID = "head"
# A claim and its markers are one transactional batch: at most 100 operations.
MAX_CLAIM = 90
# How long a command's own appender has to number it before a sweep, or a later
# command of its stream, does it instead: saves duplicate work, not needed for safety.
GRACE = 2.0
# Claims and markers expire (Cosmos TTL) after a week: far beyond any stale read.
RETENTION_SECONDS = 7 * 24 * 3600


def event_doc_id(version: int) -> str:
    """The event document's id: unique per stream, so (stream, version) is unique."""
    return f"e.{version:010d}"


def outbox_doc_id(command_id: str) -> str:
    return "c." + safe_id(command_id)


def _claim_id(n: int) -> str:
    return f"k.{n:012d}"


@dataclass(frozen=True, slots=True)
class Entry:
    """One command's events in its stream, waiting for (or given) positions."""

    stream_id: str
    command_id: str
    command_hash: str
    first_version: int
    last_version: int
    created_at: float

    @property
    def key(self) -> tuple[str, str]:
        return (self.stream_id, self.command_id)

    @property
    def count(self) -> int:
        return self.last_version - self.first_version + 1

    @property
    def marker_id(self) -> str:
        digest = hashlib.blake2b(
            f"{self.stream_id}\0{self.command_id}".encode(), digest_size=16
        ).hexdigest()
        return f"m.{digest}"

    @classmethod
    def from_outbox(cls, doc: dict[str, Any]) -> Entry:
        return cls(
            doc["stream_id"], doc["command_id"], doc["command_hash"],
            int(doc["first_version"]), int(doc["last_version"]), float(doc["created_at"]),
        )


class Sequencer:
    def __init__(
        self, events: ContainerProxy, commands: ContainerProxy, log_container: ContainerProxy,
        clock: ServerClock,
    ) -> None:
        self.events = events
        self.commands = commands
        self.log = log_container
        self.clock = clock
        self.last_seen = 0

    async def ensure_head(self) -> None:
        try:
            await self.log.create_item({"id": HEAD_ID, "pk": LOG_PARTITION, "n": 0, "last": 0})
        except Exception as error:
            if not is_conflict(error):
                raise

    async def head(self) -> dict[str, Any]:
        head = await read_or_none(self.log, HEAD_ID, LOG_PARTITION)
        if head is None:
            raise Unavailable("the event log's head document is missing; reopen the store")
        self.last_seen = max(self.last_seen, int(head["last"]))
        return dict(head)

    async def last_position(self) -> int:
        return int((await self.head())["last"])

    # ------------------------------------------------------------ numbering

    async def sequence(self, entries: Sequence[Entry]) -> dict[tuple[str, str], int]:
        """Give the entries positions, in this order; return each one's first position.

        Any process may be numbering the same commands at the same time (a follower's
        sweep, a duplicate of the command in another process): the markers decide.
        """
        results: dict[tuple[str, str], int] = {}
        todo = list(entries)
        while todo:
            head = await self.head()
            # Read after `head`: a claim of one of these made before the head read shows
            # its marker (made in the same batch); one made after it collides with ours
            # on the claim's id. So a claim never meets a marker, even where batches
            # are not atomic.
            for marker in await self._markers(todo[:MAX_CLAIM]):
                results[marker["key"]] = int(marker["first"])
            todo = [e for e in todo if e.key not in results]
            chunk = todo[:MAX_CLAIM]
            if not chunk:
                break
            claim = self._claim(int(head["n"]) + 1, int(head["last"]) + 1, chunk)
            try:
                await self._create_claim(claim, chunk)
            except CosmosBatchOperationError as error:
                if not is_conflict(error):
                    raise
                if error.error_index == 0:
                    # Someone else made claim n first: finish it, then try again after it.
                    other = await read_or_none(self.log, claim["id"], LOG_PARTITION)
                    if other is not None:
                        await self.finish(other)
                        results.update(_firsts(other))
                        todo = [e for e in todo if e.key not in results]
                # Otherwise a marker exists (possible only where reads can be stale):
                # the next round reads it.
                continue
            await self.finish(claim)
            results.update(_firsts(claim))
            todo = todo[len(chunk):]
        return {e.key: results[e.key] for e in entries}

    async def _markers(self, entries: Sequence[Entry]) -> list[dict[str, Any]]:
        """The markers of those entries that were numbered already, with their key."""
        by_id = {e.marker_id: e.key for e in entries}
        found = await query(
            self.log,
            "SELECT c.id, c.first FROM c WHERE c.pk = @pk AND ARRAY_CONTAINS(@ids, c.id)",
            {"@pk": LOG_PARTITION, "@ids": list(by_id)}, partition=LOG_PARTITION,
        )
        return [{**marker, "key": by_id[marker["id"]]} for marker in found]

    def _claim(self, n: int, first: int, chunk: Sequence[Entry]) -> dict[str, Any]:
        rows = []
        position = first
        for entry in chunk:
            rows.append([entry.stream_id, entry.command_id, entry.command_hash,
                         entry.first_version, entry.last_version, position])
            position += entry.count
        return {
            "id": _claim_id(n), "pk": LOG_PARTITION, "kind": "claim", "n": n, "first": first,
            "last": position - 1, "entries": rows, "created_at": self.clock.now(),
            "ttl": RETENTION_SECONDS,
        }

    async def _create_claim(self, claim: dict[str, Any], chunk: Sequence[Entry]) -> None:
        operations: list[Any] = [("create", (claim,))]
        for entry, row in zip(chunk, claim["entries"], strict=True):
            first = int(row[5])
            operations.append(("create", ({
                "id": entry.marker_id, "pk": LOG_PARTITION, "kind": "marker", "n": claim["n"],
                "first": first, "last": first + entry.count - 1, "ttl": RETENTION_SECONDS,
            },)))
        await self.log.execute_item_batch(operations, partition_key=LOG_PARTITION)

    # ------------------------------------------------------------- finishing

    async def finish(self, claim: dict[str, Any]) -> None:
        """Stamp the claim's positions and move the head past it; safe to repeat."""
        await bounded(self._stamp(row) for row in claim["entries"])
        await self._advance(int(claim["n"]), int(claim["last"]))

    async def _stamp(self, row: list[Any]) -> None:
        stream_id, command_id, command_hash, first_version, last_version, first = row
        await bounded(
            self.events.patch_item(
                event_doc_id(version), partition_key=stream_id,
                patch_operations=[{"op": "set", "path": "/position",
                                   "value": first + version - first_version}],
            )
            for version in range(first_version, last_version + 1)
        )
        last = first + last_version - first_version
        await self.events.patch_item(
            outbox_doc_id(command_id), partition_key=stream_id, patch_operations=[
                {"op": "set", "path": "/status", "value": "sequenced"},
                {"op": "set", "path": "/first_position", "value": first},
                {"op": "set", "path": "/last_position", "value": last},
            ],
        )
        # The idempotency record, final: what a replay of the command answers.
        await self.commands.upsert_item({
            "id": safe_id(command_id), "command_id": command_id, "command_hash": command_hash,
            "stream_id": stream_id, "state": "done", "version": last_version, "position": last,
        })

    async def _advance(self, n: int, last: int) -> None:
        while True:
            head = await self.head()
            if int(head["n"]) >= n:
                return
            try:
                await self.log.replace_item(
                    HEAD_ID, {"id": HEAD_ID, "pk": LOG_PARTITION, "n": n, "last": last},
                    etag=head["_etag"], match_condition=IF_MATCH,
                )
            except Exception as error:
                if is_precondition_failed(error):
                    continue
                raise
            self.last_seen = max(self.last_seen, last)
            return

    async def ensure_visible(self, position: int) -> None:
        """Return once `head` has passed `position`, finishing the claim that holds it."""
        while True:
            head = await self.head()
            if int(head["last"]) >= position:
                return
            claim = await read_or_none(self.log, _claim_id(int(head["n"]) + 1), LOG_PARTITION)
            if claim is None:
                raise Unavailable(f"position {position} is past the event log's head")
            await self.finish(claim)

    # -------------------------------------------------------- taking over

    async def await_predecessors(self, stream_id: str, before_version: int) -> None:
        """Return once the stream's commands before `before_version` have positions.

        Their appender numbers them within moments; one left pending for `GRACE`
        seconds is numbered here.
        """
        while True:
            pending = await self._pending(stream_id, before_version)
            if not pending:
                return
            if min(self.clock.now() - e.created_at for e in pending) > GRACE:
                await self.sequence(pending)
                continue
            await asyncio.sleep(0.01)

    async def _pending(self, stream_id: str, before_version: int) -> list[Entry]:
        docs = await query(
            self.events,
            "SELECT * FROM c WHERE c.stream_id = @stream AND c.kind = 'command' "
            "AND c.status = 'pending' AND c.last_version < @version",
            {"@stream": stream_id, "@version": before_version}, partition=stream_id,
        )
        return sorted((Entry.from_outbox(d) for d in docs), key=lambda e: e.first_version)

    async def sweep(self) -> int:
        """Finish a claim left unfinished and number commands left pending; return how
        many commands were numbered. Run by the processes that follow the log."""
        head = await self.head()
        stuck = await read_or_none(self.log, _claim_id(int(head["n"]) + 1), LOG_PARTITION)
        if stuck is not None and self.clock.now() - float(stuck["created_at"]) > GRACE:
            log.warning("finishing claim %d left unfinished by its maker", stuck["n"])
            await self.finish(stuck)
        docs = await query(
            self.events,
            "SELECT * FROM c WHERE c.kind = 'command' AND c.status = 'pending' "
            "AND c.created_at < @cutoff",
            {"@cutoff": self.clock.now() - GRACE},
        )
        if not docs:
            return 0
        entries = sorted(
            (Entry.from_outbox(d) for d in docs), key=lambda e: (e.stream_id, e.first_version)
        )
        log.warning("numbering %d command(s) whose appender stopped before it did", len(entries))
        await self.sequence(entries)
        return len(entries)


def _firsts(claim: dict[str, Any]) -> dict[tuple[str, str], int]:
    return {(row[0], row[1]): int(row[5]) for row in claim["entries"]}
