"""Units of work on Cosmos DB: one commit point, then idempotent writes.

Cosmos DB has no transaction across partitions, and a view store's unit of work
touches documents in many (every view document is its own partition, and the
checkpoints and dead letters are elsewhere). So a commit has two phases:

1. The commit point. The units run against the store as it is (reads go to
   Cosmos, writes are buffered); their changes become one journal entry, written
   into the `head` document of the `projection_state` container with a
   compare-and-swap on its ETag, together with the next sequence number `seq`.
   Only one writer can move the head from one ETag to the next, so commits are
   serialised across processes, like the SQL stores' transactions; a writer
   whose head moved meanwhile runs its units again on the new state.
2. Applying it. Each document the entry changes is written with `seq`, the
   per-document "last applied" guard: a write happens only if the stored
   document's `seq` is lower (read, compare, replace with If-Match). View
   documents go first, dead letters next, checkpoints last, so a reader who sees
   a checkpoint sees the views it covers. Deletes leave a tombstone (with a TTL)
   so a late writer cannot bring a deleted document back.

A crash between the two phases leaves the entry in the head; the next writer (in
any process) applies it again before its own units run, and the guard makes
that change nothing that was already applied. A writer that stalls and applies
an old entry after others moved on changes nothing either: every document it
would touch already carries a higher or equal `seq`. So duplicates and replays
of a unit's effects are harmless, and a unit is all-or-nothing as seen after
recovery, as the ViewStore port promises.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

import orjson
from azure.cosmos.aio import ContainerProxy
from azure.cosmos.exceptions import CosmosHttpResponseError

from cqrskit.messages import Envelope
from cqrskit.ports import DeadLetter
from cqrskit.stores.cosmos import (
    IF_MATCH,
    bounded,
    is_conflict,
    is_not_found,
    is_precondition_failed,
    query,
    read_or_none,
)
from cqrskit.stores.unit_of_work import DELETED, BufferedUnitOfWork

log = logging.getLogger(__name__)
T = TypeVar("T")

# Tombstones live a day (Cosmos TTL): far longer than any writer stalls.
TOMBSTONE_TTL = 24 * 3600
CHECKPOINTS = "checkpoints"
DEAD_LETTERS = "dead_letters"
_MAX_SAFE_INT = 2**53

# What a writer knew of a stored document: its ETag and seq, ABSENT, or None (unknown).
ABSENT = "absent"
Hint = tuple[str, int] | str | None


# ------------------------------------------------------------ document bodies


def _exact_in_json(value: Any) -> bool:
    """True when Cosmos gives `value` back as it is: it keeps numbers as doubles, so
    integers beyond 2^53 would be rounded and whole floats come back as integers."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return True
    if isinstance(value, int):
        return -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT
    if isinstance(value, float):
        return not (math.isfinite(value) and value.is_integer())
    if isinstance(value, dict):
        return all(_exact_in_json(v) for v in value.values())
    if isinstance(value, list):
        return all(_exact_in_json(v) for v in value)
    return True


def view_body(doc_id: str, doc: dict[str, Any]) -> dict[str, Any]:
    """A view document as stored: the document under `doc` (queried there), plus an
    exact JSON copy in `raw` when Cosmos would not give the document back as it is."""
    body: dict[str, Any] = {"id": doc_id, "doc": doc}
    if not _exact_in_json(doc):
        body["raw"] = orjson.dumps(doc).decode()
    return body


def view_doc(stored: dict[str, Any]) -> dict[str, Any] | None:
    if stored.get("deleted"):
        return None
    raw = stored.get("raw")
    doc: dict[str, Any] = orjson.loads(raw) if raw is not None else stored["doc"]
    return doc


def checkpoint_id(projection: str, partition: int) -> str:
    return f"cp.{projection}.{partition}"


def dead_letter_doc_id(number: int) -> str:
    return f"dl.{number}"


def dead_letter_body(letter: DeadLetter) -> dict[str, Any]:
    return {
        "id": dead_letter_doc_id(letter.id), "pk": DEAD_LETTERS, "number": letter.id,
        "projection": letter.projection, "partition": letter.partition,
        "stream_id": letter.stream_id, "position": letter.position,
        "envelope": orjson.dumps(letter.envelope.to_dict()).decode(), "error": letter.error,
        "attempts": letter.attempts, "is_cause": letter.is_cause, "parked_at": letter.parked_at,
    }


def dead_letter_of(stored: dict[str, Any]) -> DeadLetter | None:
    if stored.get("deleted"):
        return None
    return DeadLetter(
        id=int(stored["number"]), projection=stored["projection"],
        partition=int(stored["partition"]), stream_id=stored["stream_id"],
        position=int(stored["position"]),
        envelope=Envelope.from_dict(orjson.loads(stored["envelope"])), error=stored["error"],
        attempts=int(stored["attempts"]), is_cause=bool(stored["is_cause"]),
        parked_at=stored["parked_at"],
    )


def hint_of(stored: dict[str, Any] | None) -> Hint:
    return ABSENT if stored is None else (stored["_etag"], int(stored.get("seq", 0)))


# ------------------------------------------------------------------ entries


@dataclass(slots=True)
class JournalEntry:
    """The changes of one commit, as final values; applying it twice changes nothing."""

    seq: int
    clears: list[str] = field(default_factory=list)
    # (collection, id) → the document, or None to delete it
    docs: dict[tuple[str, str], dict[str, Any] | None] = field(default_factory=dict)
    # number → the dead letter's body, or None to remove it
    dead_letters: dict[int, dict[str, Any] | None] = field(default_factory=dict)
    # (projection, partition) → position
    checkpoints: dict[tuple[str, int], tuple[int, str]] = field(default_factory=dict)
    # (container, id) → what the writer read of it, to skip a read when applying
    hints: dict[tuple[str, str], Hint] = field(default_factory=dict)

    def encode(self) -> str:
        """JSON text: stored as a string, so Cosmos cannot round the numbers in it."""
        return orjson.dumps({
            "seq": self.seq, "clears": self.clears,
            "docs": [[c, i, d] for (c, i), d in self.docs.items()],
            "dead_letters": [[n, d] for n, d in self.dead_letters.items()],
            "checkpoints": [[p, part, pos, at] for (p, part), (pos, at) in
                            self.checkpoints.items()],
            "hints": [[c, i, h] for (c, i), h in self.hints.items()],
        }).decode()

    @classmethod
    def decode(cls, text: str) -> JournalEntry:
        data = orjson.loads(text)
        return cls(
            seq=int(data["seq"]), clears=list(data["clears"]),
            docs={(c, i): d for c, i, d in data["docs"]},
            dead_letters={int(n): d for n, d in data["dead_letters"]},
            checkpoints={(p, int(part)): (int(pos), at)
                         for p, part, pos, at in data["checkpoints"]},
            hints={(c, i): ((h[0], int(h[1])) if isinstance(h, list) else h)
                   for c, i, h in data["hints"]},
        )


# ----------------------------------------------------------- the transaction


class Reads(Protocol):
    """What a transaction reads from the store: the view store does."""

    async def read_view(self, collection: str, doc_id: str) -> dict[str, Any] | None: ...

    async def read_state(self, doc_id: str, partition: str) -> dict[str, Any] | None: ...

    async def query_dead_letters(self, projection: str) -> list[DeadLetter]: ...


def _copy(doc: dict[str, Any]) -> dict[str, Any]:
    # Units get their own copy: a unit that mutates a document and then fails must
    # not leave the change behind for the next unit of the same commit.
    copied: dict[str, Any] = orjson.loads(orjson.dumps(doc))
    return copied


class Transaction:
    """The units of work committed together: what they changed, and what they read.

    Units run one after another, in a worker thread; their reads come back to the
    event loop through `call`. A unit sees the changes of the units before it.
    """

    def __init__(
        self, reads: Reads, loop: asyncio.AbstractEventLoop, collections: set[str],
        seq: int, next_dead_letter: int,
    ) -> None:
        self.reads = reads
        self.loop = loop
        self.collections = collections
        self.seq = seq
        self.next_dead_letter = next_dead_letter
        self.docs: dict[tuple[str, str], Any] = {}
        self.cleared: list[str] = []
        self.checkpoints: dict[tuple[str, int], int] = {}
        self.checkpoints_read: dict[tuple[str, int], int] = {}
        self.dead_letters: dict[int, DeadLetter | None] = {}
        self.dead_letters_read: dict[str, list[DeadLetter]] = {}
        self.hints: dict[tuple[str, str], Hint] = {}

    def call(self, work: Awaitable[T]) -> T:
        """Run a read on the event loop from the unit's thread, and wait for it."""
        return asyncio.run_coroutine_threadsafe(_awaited(work), self.loop).result()

    # -- reads, from the unit's thread

    def load(self, collection: str, doc_ids: list[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        remote: list[str] = []
        for doc_id in doc_ids:
            key = (collection, doc_id)
            if key in self.docs:
                if self.docs[key] is not DELETED:
                    found[doc_id] = _copy(self.docs[key])
            elif collection not in self.cleared:
                remote.append(doc_id)
        if remote:
            stored = self.call(bounded(self.reads.read_view(collection, i) for i in remote))
            for doc_id, doc in zip(remote, stored, strict=True):
                self.hints.setdefault((f"view_{collection}", doc_id), hint_of(doc))
                value = None if doc is None else view_doc(doc)
                if value is not None:
                    found[doc_id] = value
        return found

    def load_checkpoint(self, projection: str, partition: int) -> int:
        key = (projection, partition)
        if key in self.checkpoints:
            return self.checkpoints[key]
        if key not in self.checkpoints_read:
            stored = self.call(self.reads.read_state(checkpoint_id(*key), CHECKPOINTS))
            self.hints[("state", checkpoint_id(*key))] = hint_of(stored)
            self.checkpoints_read[key] = int(stored["position"]) if stored else 0
        return self.checkpoints_read[key]

    def dead_letters_of(self, projection: str) -> list[DeadLetter]:
        """The projection's dead letters as the units before this one left them."""
        if projection not in self.dead_letters_read:
            self.dead_letters_read[projection] = self.call(
                self.reads.query_dead_letters(projection)
            )
        letters = {d.id: d for d in self.dead_letters_read[projection]}
        for number, letter in self.dead_letters.items():
            if letter is None:
                letters.pop(number, None)
            elif letter.projection == projection:
                letters[number] = letter
        return sorted(letters.values(), key=lambda d: d.position)

    # -- after a unit succeeded, on the event loop

    async def merge(self, unit: CosmosUnitOfWork) -> None:
        for collection in unit.cleared:
            for key in [k for k in self.docs if k[0] == collection]:
                del self.docs[key]
            if collection not in self.cleared:
                self.cleared.append(collection)
        upserts, deletes = unit.changes()
        for collection, docs in upserts.items():
            for doc_id, doc in docs:
                self.docs[(collection, doc_id)] = doc
        for collection, doc_ids in deletes.items():
            for doc_id in doc_ids:
                self.docs[(collection, doc_id)] = DELETED
        for checkpoint, position in unit.checkpoints.items():
            current = self.checkpoints.get(checkpoint, self.checkpoints_read.get(checkpoint))
            if position != current:
                self.checkpoints[checkpoint] = position
        for number in unit.removed:
            self.dead_letters[number] = None
        for error, number in unit.failures:
            letter = await self._dead_letter(number)
            if letter is not None:
                self.dead_letters[number] = replace(
                    letter, error=error, attempts=letter.attempts + 1, is_cause=True
                )
        for projection, partition, envelope, error, attempts, is_cause, at in unit.parked:
            self.next_dead_letter += 1
            self.dead_letters[self.next_dead_letter] = DeadLetter(
                id=self.next_dead_letter, projection=projection, partition=partition,
                stream_id=envelope.stream_id, position=envelope.position, envelope=envelope,
                error=error, attempts=attempts, is_cause=is_cause, parked_at=at,
            )

    async def _dead_letter(self, number: int) -> DeadLetter | None:
        if number in self.dead_letters:
            return self.dead_letters[number]
        for letters in self.dead_letters_read.values():
            for letter in letters:
                if letter.id == number:
                    return letter
        stored = await self.reads.read_state(dead_letter_doc_id(number), DEAD_LETTERS)
        return None if stored is None else dead_letter_of(stored)

    def entry(self, now: str) -> JournalEntry | None:
        """The commit's changes; None when the units changed nothing."""
        if not (self.docs or self.cleared or self.checkpoints or self.dead_letters):
            return None
        docs = {key: (None if doc is DELETED else doc) for key, doc in self.docs.items()}
        hints = {
            key: hint for key, hint in self.hints.items()
            if (key[0] == "state") or (key[0].removeprefix("view_"), key[1]) in docs
        }
        return JournalEntry(
            seq=self.seq, clears=list(self.cleared), docs=docs,
            dead_letters={n: (None if d is None else dead_letter_body(d))
                          for n, d in self.dead_letters.items()},
            checkpoints={key: (pos, now) for key, pos in self.checkpoints.items()},
            hints=hints,
        )


async def _awaited(work: Awaitable[T]) -> T:
    return await work


class CosmosUnitOfWork(BufferedUnitOfWork):
    """One unit: buffered like the SQL stores' units, reading through its transaction."""

    def __init__(self, transaction: Transaction) -> None:
        super().__init__(transaction.collections)
        self.transaction = transaction

    def load(self, collection: str, doc_ids: list[str]) -> dict[str, dict[str, Any]]:
        return self.transaction.load(collection, doc_ids)

    def load_checkpoint(self, projection: str, partition: int) -> int:
        return self.transaction.load_checkpoint(projection, partition)

    def load_parked_streams(self, projection: str) -> set[str]:
        return {d.stream_id for d in self.transaction.dead_letters_of(projection)}

    def load_dead_letters(self, projection: str, stream_id: str) -> list[DeadLetter]:
        return [d for d in self.transaction.dead_letters_of(projection)
                if d.stream_id == stream_id]


# ------------------------------------------------------------------- applying


async def put_guarded(
    container: ContainerProxy, doc_id: str, partition: str, body: dict[str, Any] | None,
    seq: int, hint: Hint,
) -> None:
    """Write `body` (None: a tombstone) with `seq`, unless the stored document already
    has this seq or a later one. `hint` saves the read when it is still right."""
    state = hint
    while True:
        if state is None:
            state = hint_of(await read_or_none(container, doc_id, partition))
            if hint is not None and isinstance(state, tuple) and state[1] < seq:
                # Changed since the unit read it, yet by no later commit: the unit read
                # a stale replica (another process's write not visible to it yet).
                log.error(
                    "%s %s changed after commit %d read it: its value may miss an update. "
                    "Several processes write views: give the account Strong consistency, "
                    "then rebuild the projection", container.id, doc_id, seq,
                )
                hint = None
        try:
            if not isinstance(state, tuple):  # absent
                if body is None:
                    return  # nothing to delete
                await container.create_item({**body, "seq": seq})
                return
            etag, stored_seq = state
            if stored_seq >= seq:
                return  # this entry, or a later one, is there already
            new = {**body, "seq": seq} if body is not None else _tombstone(doc_id, partition, seq)
            await container.replace_item(doc_id, new, etag=etag, match_condition=IF_MATCH)
            return
        except CosmosHttpResponseError as error:
            if not (is_conflict(error) or is_precondition_failed(error) or is_not_found(error)):
                raise
            state = None  # somebody wrote it meanwhile: read and judge again


def _tombstone(doc_id: str, partition: str, seq: int) -> dict[str, Any]:
    body: dict[str, Any] = {"id": doc_id, "deleted": True, "seq": seq, "ttl": TOMBSTONE_TTL}
    if partition != doc_id:
        body["pk"] = partition
    return body


async def clear_guarded(container: ContainerProxy, seq: int, written: set[str]) -> None:
    """Tombstone every document of a view container written before `seq`, except those
    the same entry writes afterwards (`written`): a tombstone with this seq would make
    their own write look done already."""
    docs = await query(
        container,
        "SELECT c.id, c._etag, c.seq FROM c WHERE NOT IS_DEFINED(c.deleted) AND c.seq < @seq",
        {"@seq": seq},
    )
    await bounded(
        put_guarded(container, d["id"], d["id"], None, seq, (d["_etag"], int(d["seq"])))
        for d in docs if d["id"] not in written
    )

