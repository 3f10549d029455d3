"""The Cosmos DB view store (query DB).

Containers, in the database the URL names:

- `view_<collection>`, partition key `/id`: one document per view document,
  `{id, doc, seq}` (`raw` too when Cosmos would not keep `doc` exactly; see
  `cosmos_journal.view_body`). Filters are parameterised queries on `doc`;
  a page is the next ids after the cursor (keyset paging, the cursor being the
  last id: it stays valid whatever happens to the container and is the same on
  every store).
- `projection_state`, partition key `/pk`: the commit `head` (partition `head`),
  journal chunks of large commits (each in a partition of its own), checkpoints
  (`checkpoints`), dead letters (`dead_letters`), partition leases and their
  owners (`leases`).

How a unit of work commits without cross-partition transactions is told in
`cosmos_journal`; leases are taken and renewed with ETag conditions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import Any, TypeVar

from azure.cosmos.aio import ContainerProxy
from azure.cosmos.exceptions import CosmosHttpResponseError

from cqrskit.errors import Unavailable
from cqrskit.leases import plan_claim
from cqrskit.messages import utc_now
from cqrskit.ports import Collection, DeadLetter, Page, UnitOfWork
from cqrskit.stores.cosmos import (
    IF_MATCH,
    CosmosAccount,
    CosmosUrl,
    ServerClock,
    bounded,
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
from cqrskit.stores.cosmos_journal import (
    CHECKPOINTS,
    DEAD_LETTERS,
    CosmosUnitOfWork,
    JournalEntry,
    Transaction,
    checkpoint_id,
    clear_guarded,
    dead_letter_doc_id,
    dead_letter_of,
    put_guarded,
    view_body,
    view_doc,
)
from cqrskit.stores.queries import (
    check_limit,
    decode_cursor,
    filter_path,
    known_collection,
    page_rows,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

STATE = "projection_state"
_HEAD = "head"
_LEASES = "leases"
# Entries above this many characters go into chunk documents of their own partitions:
# every commit writes the head twice, and one logical partition serves at most
# 10,000 RU/s, so the head stays small. (A chunk's limit is an item's, 2 MB.)
_INLINE_LIMIT = 16_000
_CHUNK_SIZE = 1_000_000
# A pending entry younger than this is left to the writer that committed it.
_REDO_AFTER = 1.0
# Commit attempts before a unit gives up (each lost to another writer's commit).
_MAX_ATTEMPTS = 100

_Pending = tuple[Callable[[Any], Any], "asyncio.Future[Any]"]


class CosmosViewStore:
    """The query DB on Cosmos DB. Open with `await CosmosViewStore.open(url)`."""

    def __init__(self, url: CosmosUrl, account: CosmosAccount, state: ContainerProxy) -> None:
        self.url = url
        self.account = account
        self.state = state
        self.clock = ServerClock()
        self.what = f"the Cosmos DB view store {url.database} at {url.endpoint}"
        self.collections: dict[str, Collection] = {}
        self.containers: dict[str, ContainerProxy] = {}
        self.writer = uuid.uuid4().hex
        self._pending: list[_Pending] = []
        self._sender: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def open(cls, url: str) -> CosmosViewStore:
        parsed = CosmosUrl.parse(url)
        account = await open_database(parsed)
        try:
            state = await ensure_container(
                account.database, STATE, "/pk", ttl=True, unindexed=("entry", "text", "envelope")
            )
            store = cls(parsed, account, state)
            async with translated(store.what):
                with contextlib.suppress(CosmosHttpResponseError):
                    await state.create_item({
                        "id": _HEAD, "pk": _HEAD, "seq": 0, "entry": None, "chunks": [],
                        "next_dead_letter": 0,
                    })
        except BaseException:
            await account.close()
            raise
        return store

    async def setup(self, collections: Sequence[Collection]) -> None:
        self._usable()
        for collection in collections:
            container = await ensure_container(
                self.account.database, f"view_{collection.name}", "/id", ttl=True,
                unindexed=("raw",),
            )
            self.collections[collection.name] = collection
            self.containers[collection.name] = container

    def _usable(self) -> None:
        if self._closed:
            raise Unavailable(f"{self.what} is closed")

    def _known(self, collection: str) -> ContainerProxy:
        return known_collection(self.containers, collection)

    # ------------------------------------ reads for transactions (cosmos_journal.Reads)

    async def read_view(self, collection: str, doc_id: str) -> dict[str, Any] | None:
        stored: dict[str, Any] | None = await read_or_none(
            self._known(collection), doc_id, doc_id
        )
        return stored

    async def read_state(self, doc_id: str, partition: str) -> dict[str, Any] | None:
        stored: dict[str, Any] | None = await read_or_none(self.state, doc_id, partition)
        return stored

    async def query_dead_letters(self, projection: str | None) -> list[DeadLetter]:
        sql = "SELECT * FROM c WHERE c.pk = @pk AND NOT IS_DEFINED(c.deleted)"
        params: dict[str, Any] = {"@pk": DEAD_LETTERS}
        if projection is not None:
            sql += " AND c.projection = @projection"
            params["@projection"] = projection
        docs = await query(self.state, sql, params, partition=DEAD_LETTERS)
        letters = [letter for letter in map(dead_letter_of, docs) if letter is not None]
        return sorted(letters, key=lambda d: (d.projection, d.position))

    # --------------------------------------------------------------- units

    async def run(self, work: Callable[[UnitOfWork], T]) -> T:
        self._usable()
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((work, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_pending(), name="cosmos-views")
        return await future

    async def _send_pending(self) -> None:
        """Commit the queued units, one group per commit, one commit at a time."""
        while self._pending:
            group, self._pending = self._pending, []
            try:
                outcomes = await self._commit_group([work for work, _ in group])
            except BaseException as error:
                failure = unavailable(error, self.what) or error
                for _, future in group:
                    if not future.done():
                        future.set_exception(failure)
                if not isinstance(error, Exception):
                    raise
                continue
            for (_, future), outcome in zip(group, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    async def _commit_group(self, works: list[Callable[[Any], Any]]) -> list[Any]:
        loop = asyncio.get_running_loop()
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            head = await self._settled_head()
            transaction = Transaction(
                self, loop, set(self.collections), int(head["seq"]) + 1,
                int(head["next_dead_letter"]),
            )
            outcomes: list[Any] = []
            for work in works:
                unit = CosmosUnitOfWork(transaction)
                try:
                    result = await asyncio.to_thread(work, unit)
                except Exception as error:
                    # Nothing of it reached the transaction: units buffer until merged.
                    outcomes.append(unavailable(error, self.what) or error)
                    continue
                await transaction.merge(unit)
                outcomes.append(result)
            entry = transaction.entry(utc_now().isoformat())
            if entry is None:
                return outcomes
            committed = await self._commit(head, entry, transaction.next_dead_letter)
            if committed is None:
                # Another writer committed first: what the units read may be stale.
                await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * attempt)))  # nosec B311 # jitter between commit retries, not a secret
                continue
            await self._apply(entry)
            await self._close(committed)
            return outcomes
        raise Unavailable(f"{self.what}: gave up after {_MAX_ATTEMPTS} contended commits")

    async def _head(self) -> dict[str, Any]:
        head: dict[str, Any] | None = await read_or_none(self.state, _HEAD, _HEAD)
        if head is None:
            raise Unavailable(f"{self.what}: the head document is missing; reopen the store")
        self.clock.observe(head)
        return head

    async def _settled_head(self) -> dict[str, Any]:
        """The head with no entry pending: one left by a writer that stopped (or is
        slow) is applied here first, so the units read a store where it is in."""
        while True:
            head = await self._head()
            if head.get("entry") is None and not head.get("chunks"):
                return head
            age = self.clock.now() - float(head.get("committed_at", 0))
            if head.get("committed_by") != self.writer and age < _REDO_AFTER:
                await asyncio.sleep(0.02)
                continue
            log.info("applying commit %s left pending by writer %s", head["seq"],
                     head.get("committed_by"))
            await self._apply(await self._entry_of(head))
            await self._close(head)

    async def _entry_of(self, head: dict[str, Any]) -> JournalEntry:
        if head.get("entry") is not None:
            return JournalEntry.decode(head["entry"])
        chunks = await bounded(read_or_none(self.state, i, i) for i in head["chunks"])
        if any(chunk is None for chunk in chunks):
            raise Unavailable(f"{self.what}: a journal chunk of commit {head['seq']} is missing")
        return JournalEntry.decode("".join(chunk["text"] for chunk in chunks))

    async def _commit(
        self, head: dict[str, Any], entry: JournalEntry, next_dead_letter: int
    ) -> dict[str, Any] | None:
        """The commit point: move the head to the entry; None if another writer did first."""
        text = entry.encode()
        chunks: list[str] = []
        if len(text) > _INLINE_LIMIT:
            # Written before the head points at them; orphans of a lost race are deleted.
            pieces = [text[i : i + _CHUNK_SIZE] for i in range(0, len(text), _CHUNK_SIZE)]
            chunks = [f"j.{uuid.uuid4().hex}.{n}" for n in range(len(pieces))]
            await bounded(
                self.state.create_item({"id": i, "pk": i, "text": piece, "ttl": 86400})
                for i, piece in zip(chunks, pieces, strict=True)
            )
        body = {
            "id": _HEAD, "pk": _HEAD, "seq": entry.seq, "entry": None if chunks else text,
            "chunks": chunks, "next_dead_letter": next_dead_letter,
            "committed_at": self.clock.now(), "committed_by": self.writer,
        }
        try:
            committed: dict[str, Any] = await self.state.replace_item(
                _HEAD, body, etag=head["_etag"], match_condition=IF_MATCH
            )
        except CosmosHttpResponseError as error:
            if not is_precondition_failed(error):
                raise
            await self._drop_chunks(chunks)
            return None
        return committed

    async def _apply(self, entry: JournalEntry) -> None:
        """Write the entry's changes, each guarded by seq: views, dead letters, then
        checkpoints (a reader who sees a checkpoint then sees what it covers)."""
        seq, hints = entry.seq, entry.hints
        for collection in entry.clears:
            written = {doc_id for (c, doc_id) in entry.docs if c == collection}
            await clear_guarded(self._known(collection), seq, written)
        await bounded(
            put_guarded(
                self._known(c), doc_id, doc_id, None if doc is None else view_body(doc_id, doc),
                seq, hints.get((f"view_{c}", doc_id)),
            )
            for (c, doc_id), doc in entry.docs.items()
        )
        await bounded(
            put_guarded(self.state, dead_letter_doc_id(n), DEAD_LETTERS, body, seq,
                        hints.get(("state", dead_letter_doc_id(n))))
            for n, body in entry.dead_letters.items()
        )
        await bounded(
            put_guarded(
                self.state, checkpoint_id(p, part), CHECKPOINTS,
                {"id": checkpoint_id(p, part), "pk": CHECKPOINTS, "projection": p,
                 "partition": part, "position": position, "updated_at": at},
                seq, hints.get(("state", checkpoint_id(p, part))),
            )
            for (p, part), (position, at) in entry.checkpoints.items()
        )

    async def _close(self, head: dict[str, Any]) -> None:
        """Mark the head's entry applied (if nobody did yet) and drop its chunks."""
        body = {**{k: v for k, v in head.items() if not k.startswith("_")},
                "entry": None, "chunks": []}
        try:
            await self.state.replace_item(_HEAD, body, etag=head["_etag"], match_condition=IF_MATCH)
        except CosmosHttpResponseError as error:
            if not is_precondition_failed(error):
                raise
            return  # another writer closed it
        await self._drop_chunks(head.get("chunks") or [])

    async def _drop_chunks(self, chunks: list[str]) -> None:
        for chunk in chunks:
            with contextlib.suppress(CosmosHttpResponseError):
                await self.state.delete_item(chunk, partition_key=chunk)

    # --------------------------------------------------------------- reads

    async def get(self, collection: str, doc_id: str) -> dict[str, Any] | None:
        self._usable()
        container = self._known(collection)
        async with translated(self.what):
            stored = await read_or_none(container, doc_id, doc_id)
        return None if stored is None else view_doc(stored)

    async def find(
        self,
        collection: str,
        filters: Mapping[str, Any],
        *,
        after: str | None = None,
        limit: int = 50,
        descending: bool = False,
        id_range: tuple[str, str] | None = None,
    ) -> Page:
        check_limit(limit)
        self._usable()
        container = self._known(collection)
        clauses = ["NOT IS_DEFINED(c.deleted)"]
        params: dict[str, Any] = {"@limit": limit + 1}
        for number, (field, value) in enumerate(filters.items()):
            # Segments are identifiers (checked by filter_path); brackets keep words
            # Cosmos SQL reserves (value, select, ...) from being read as keywords.
            path = "c.doc" + "".join(f'["{s}"]' for s in filter_path(field, value))
            clauses.append(f"{path} = @v{number}")
            params[f"@v{number}"] = value
        if after is not None:
            clauses.append("c.id < @after" if descending else "c.id > @after")
            params["@after"] = decode_cursor(after)
        if id_range is not None:
            # Cosmos compares strings by code point and range-indexes c.id.
            clauses.append("c.id >= @low AND c.id < @high")
            params["@low"], params["@high"] = id_range
        order = "DESC" if descending else "ASC"
        sql = (f"SELECT TOP @limit c.id, c.doc, c.raw FROM c WHERE {' AND '.join(clauses)} "  # nosec B608 # fixed clauses; every value is an @parameter
               f"ORDER BY c.id {order}")
        async with translated(self.what):
            rows = await query(container, sql, params)
        rows, cursor = page_rows(rows, limit, itemgetter("id"))
        return Page([doc for doc in map(view_doc, rows) if doc is not None], cursor)

    async def checkpoints(self) -> dict[tuple[str, int], int]:
        self._usable()
        async with translated(self.what):
            docs = await query(
                self.state, "SELECT * FROM c WHERE c.pk = @pk", {"@pk": CHECKPOINTS},
                partition=CHECKPOINTS,
            )
        return {(d["projection"], int(d["partition"])): int(d["position"]) for d in docs}

    async def list_dead_letters(self, projection: str | None = None) -> list[DeadLetter]:
        self._usable()
        async with translated(self.what):
            return await self.query_dead_letters(projection)

    async def get_dead_letter(self, dead_letter_id: int) -> DeadLetter | None:
        self._usable()
        async with translated(self.what):
            stored = await read_or_none(
                self.state, dead_letter_doc_id(dead_letter_id), DEAD_LETTERS
            )
        return None if stored is None else dead_letter_of(stored)

    async def check(self) -> None:
        self._usable()
        async with translated(self.what):
            await self._head()

    # -------------------------------------------------------------- leases

    async def heartbeat(self, owner: str, ttl: float) -> list[str]:
        self._usable()
        async with translated(self.what):
            seen = await self.state.upsert_item({
                "id": "o." + safe_id(owner), "pk": _LEASES, "kind": "owner", "owner": owner,
                "seen_at": self.clock.now(),
            })
            self.clock.observe(seen)
            now = self.clock.now()
            docs = await query(
                self.state, "SELECT * FROM c WHERE c.pk = @pk AND c.kind = 'owner'",
                {"@pk": _LEASES}, partition=_LEASES,
            )
            # Owners gone for long are forgotten; the recent ones are the live ones.
            for doc in docs:
                if float(doc["seen_at"]) < now - 10 * ttl:
                    with contextlib.suppress(CosmosHttpResponseError):
                        await self.state.delete_item(
                            doc["id"], partition_key=_LEASES, etag=doc["_etag"],
                            match_condition=IF_MATCH,
                        )
        return sorted(d["owner"] for d in docs if float(d["seen_at"]) > now - ttl)

    async def _lease_docs(self) -> list[dict[str, Any]]:
        docs: list[dict[str, Any]] = await query(
            self.state, "SELECT * FROM c WHERE c.pk = @pk AND c.kind = 'lease'",
            {"@pk": _LEASES}, partition=_LEASES,
        )
        return docs

    async def claim_partitions(
        self, owner: str, wanted: int, partitions: int, ttl: float
    ) -> set[int]:
        """Like the SQL stores, but each lease is its own compare-and-swap: a partition
        another owner took between our read and our write is simply not ours."""
        self._usable()
        async with translated(self.what):
            now = self.clock.now()
            docs = {int(d["partition"]): d for d in await self._lease_docs()}
            leases = {p: (d["owner"], float(d["expires_at"])) for p, d in docs.items()}
            keep, release = plan_claim(owner, wanted, partitions, leases, now)
            for partition in release:
                with contextlib.suppress(CosmosHttpResponseError):
                    await self.state.delete_item(
                        docs[partition]["id"], partition_key=_LEASES,
                        etag=docs[partition]["_etag"], match_condition=IF_MATCH,
                    )
            held: set[int] = set()
            for partition in sorted(keep):
                lease_id = f"l.{partition}"
                body = {"id": lease_id, "pk": _LEASES, "kind": "lease",
                        "partition": partition, "owner": owner, "expires_at": now + ttl}
                try:
                    if partition in docs:
                        await self.state.replace_item(
                            lease_id, body, etag=docs[partition]["_etag"],
                            match_condition=IF_MATCH,
                        )
                    else:
                        await self.state.create_item(body)
                except CosmosHttpResponseError as error:
                    if not (is_conflict(error) or is_precondition_failed(error)
                            or is_not_found(error)):
                        raise
                    continue
                held.add(partition)
        return held

    async def release_partitions(self, owner: str) -> None:
        self._usable()
        async with translated(self.what):
            for doc in await self._lease_docs():
                if doc["owner"] == owner:
                    with contextlib.suppress(CosmosHttpResponseError):
                        await self.state.delete_item(
                            doc["id"], partition_key=_LEASES, etag=doc["_etag"],
                            match_condition=IF_MATCH,
                        )
            with contextlib.suppress(CosmosHttpResponseError):
                await self.state.delete_item("o." + safe_id(owner), partition_key=_LEASES)

    async def leases(self) -> dict[int, str]:
        self._usable()
        async with translated(self.what):
            docs = await self._lease_docs()
        now = self.clock.now()
        return {
            int(d["partition"]): d["owner"]
            for d in sorted(docs, key=lambda d: int(d["partition"]))
            if float(d["expires_at"]) > now
        }

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sender is not None:
            await asyncio.gather(self._sender, return_exceptions=True)
        await self.account.close()

