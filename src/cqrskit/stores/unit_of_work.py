"""The buffering half of a unit of work, shared by the SQL view stores.

Every change is kept in memory and written with a few set-based statements at
the end (`flush`), so applying a batch costs a handful of round trips however
many events it holds. Reads see the buffered changes first: a batch that
creates and then updates a document reads its own writes. A store subclasses
it with the reads it cannot answer from memory and with `flush`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cqrskit.errors import CqrskitError
from cqrskit.messages import Envelope, utc_now
from cqrskit.ports import DeadLetter

DELETED: Any = object()
MISSING: Any = object()


class BufferedUnitOfWork:
    def __init__(self, known: set[str]) -> None:
        self.known = known
        self.docs: dict[tuple[str, str], Any] = {}
        self.dirty: set[tuple[str, str]] = set()
        self.checkpoints: dict[tuple[str, int], int] = {}
        # (projection, partition, envelope, error, attempts, is_cause, parked_at)
        self.parked: list[tuple[str, int, Envelope, str, int, bool, str]] = []
        self.removed: list[int] = []
        self.failures: list[tuple[str, int]] = []
        self.cleared: list[str] = []

    # -- what a store answers from the database

    def load(self, collection: str, doc_ids: list[str]) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def load_checkpoint(self, projection: str, partition: int) -> int:
        raise NotImplementedError

    def load_parked_streams(self, projection: str) -> set[str]:
        raise NotImplementedError

    def load_dead_letters(self, projection: str, stream_id: str) -> list[DeadLetter]:
        raise NotImplementedError

    # -- the UnitOfWork port

    def _check(self, collection: str) -> None:
        if collection not in self.known:
            raise CqrskitError(f"collection {collection!r} is not declared by any projection")

    def prefetch(self, collection: str, doc_ids: Iterable[str]) -> None:
        self._check(collection)
        wanted = [i for i in set(doc_ids) if (collection, i) not in self.docs]
        if not wanted or collection in self.cleared:
            return
        found = self.load(collection, wanted)
        for doc_id in wanted:
            self.docs[(collection, doc_id)] = found.get(doc_id, MISSING)

    def get(self, collection: str, doc_id: str) -> dict[str, Any] | None:
        key = (collection, doc_id)
        doc = self.docs.get(key)
        if doc is None:
            self._check(collection)
            if collection in self.cleared:
                return None
            doc = self.load(collection, [doc_id]).get(doc_id, MISSING)
            self.docs[key] = doc
        return None if doc is DELETED or doc is MISSING else doc

    def put(self, collection: str, doc_id: str, doc: dict[str, Any]) -> None:
        self._check(collection)
        self.docs[(collection, doc_id)] = doc
        self.dirty.add((collection, doc_id))

    def delete(self, collection: str, doc_id: str) -> None:
        self._check(collection)
        self.docs[(collection, doc_id)] = DELETED
        self.dirty.add((collection, doc_id))

    def checkpoint(self, projection: str, partition: int) -> int:
        key = (projection, partition)
        if key not in self.checkpoints:
            self.checkpoints[key] = self.load_checkpoint(projection, partition)
        return self.checkpoints[key]

    def set_checkpoint(self, projection: str, partition: int, position: int) -> None:
        self.checkpoints[(projection, partition)] = position

    def parked_streams(self, projection: str) -> set[str]:
        return self.load_parked_streams(projection) | {
            p[2].stream_id for p in self.parked if p[0] == projection
        }

    def park(
        self, projection: str, partition: int, envelope: Envelope, error: str, *,
        attempts: int, is_cause: bool,
    ) -> None:
        self.parked.append(
            (projection, partition, envelope, error, attempts, is_cause, utc_now().isoformat())
        )

    def dead_letters(self, projection: str, stream_id: str) -> list[DeadLetter]:
        return [
            d for d in self.load_dead_letters(projection, stream_id) if d.id not in self.removed
        ]

    def remove_dead_letter(self, dead_letter_id: int) -> None:
        self.removed.append(dead_letter_id)

    def record_failure(self, dead_letter_id: int, error: str) -> None:
        self.failures.append((error, dead_letter_id))

    def clear(self, collection: str) -> None:
        self._check(collection)
        self.cleared.append(collection)
        for key in [k for k in self.docs if k[0] == collection]:
            del self.docs[key]
            self.dirty.discard(key)

    # -- for flush

    def changes(self) -> tuple[dict[str, list[tuple[str, Any]]], dict[str, list[str]]]:
        """Documents to upsert and ids to delete, by collection."""
        upserts: dict[str, list[tuple[str, Any]]] = {}
        deletes: dict[str, list[str]] = {}
        for collection, doc_id in self.dirty:
            doc = self.docs[(collection, doc_id)]
            if doc is DELETED:
                deletes.setdefault(collection, []).append(doc_id)
            else:
                upserts.setdefault(collection, []).append((doc_id, doc))
        return upserts, deletes
