"""Group commit: one writer thread runs the writes of many callers in one transaction.

Shared by the SQL adapters (it knows no driver: a `Backend` says how to connect
and run a transaction). Callers hand their work over once per event-loop
iteration, so the callers woken together by the last commit land in the same
group instead of trickling in one by one.

A batch handler runs many items of one kind inside the open transaction and
returns one outcome per item: a result, or an exception meant for that item's
caller alone, raised before the item wrote anything. If the handler itself
raises, the group rolls back and each item is run again on its own, so one bad
item cannot sink the others.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from cqrskit.errors import Unavailable
from cqrskit.ports import AppendRequest

log = logging.getLogger(__name__)

C = TypeVar("C")
F = TypeVar("F")
BatchHandler = Callable[[C, list[Any]], list[Any]]
MAX_GROUP = 512


class Backend(Protocol[C]):
    name: str

    def connect(self) -> C: ...

    def usable(self, conn: C) -> bool: ...

    def begin(self, conn: C) -> None: ...

    def commit(self, conn: C) -> None: ...

    def rollback(self, conn: C) -> None: ...

    def close(self, conn: C) -> None: ...

    def translate(self, error: Exception) -> Exception:
        """The error to give callers when a transaction failed as a whole."""
        ...


def run_each(conn: C, works: list[Callable[[C], Any]]) -> list[Any]:
    """A batch handler for small one-off jobs (leases) in the group's transaction."""
    return [work(conn) for work in works]


def next_group(
    pending: list[tuple[AppendRequest, F]], limit: int
) -> tuple[list[tuple[AppendRequest, F]], list[tuple[AppendRequest, F]]]:
    """Split a queue of appends into the group to send now and what stays queued, in order.

    A group is judged as one, so a request on a stream (or with a command id) that an
    earlier request still queued also has must see that one stored: it stays queued
    for a later group, and so does everything behind it on the same stream or command
    id, so their order holds. A group holds at most `limit` requests.
    """
    group: list[tuple[AppendRequest, F]] = []
    rest: list[tuple[AppendRequest, F]] = []
    seen: set[str] = set()
    for item in pending:
        keys = ("s:" + item[0].stream_id, "c:" + item[0].command_id)
        if len(group) < limit and not any(key in seen for key in keys):
            group.append(item)
        else:
            rest.append(item)
        seen.update(keys)
    return group, rest


@dataclass(slots=True)
class _Job(Generic[C]):
    handler: BatchHandler[C]
    item: Any
    future: asyncio.Future[Any]


class GroupCommitter(Generic[C]):
    def __init__(self, backend: Backend[C], *, on_commit: Callable[[], None] | None = None):
        self.backend = backend
        self._on_commit = on_commit
        self._jobs: queue.SimpleQueue[list[_Job[C]] | None] = queue.SimpleQueue()
        self._pending: list[_Job[C]] = []
        self._closed = False
        self._conn: C | None = None  # connected by the writer thread, on first use
        self._thread = threading.Thread(
            target=self._loop, name=f"writer-{backend.name}", daemon=True
        )
        self._thread.start()

    async def submit(self, handler: BatchHandler[C], item: Any) -> Any:
        """Have `handler` process `item` in the next group-committed transaction."""
        if self._closed:
            raise Unavailable(f"{self.backend.name} is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._hand_over)
        self._pending.append(_Job(handler, item, future))
        return await future

    def _hand_over(self) -> None:
        jobs, self._pending = self._pending, []
        if jobs:
            self._jobs.put(jobs)

    def _loop(self) -> None:
        stop = False
        while not stop:
            jobs = self._jobs.get()
            if jobs is None:
                break
            while len(jobs) < MAX_GROUP:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                jobs.extend(more)
            self._run_group(jobs)
        if self._conn is not None:
            self.backend.close(self._conn)

    def _connection(self) -> C:
        if self._conn is None or not self.backend.usable(self._conn):
            if self._conn is not None:
                self.backend.close(self._conn)
                self._conn = None
            self._conn = self.backend.connect()
        return self._conn

    def _run_group(self, jobs: list[_Job[C]]) -> None:
        outcomes: list[Any] = []
        try:
            conn = self._connection()
            self.backend.begin(conn)
            start = 0
            while start < len(jobs):
                handler = jobs[start].handler
                end = start + 1
                # ==, not `is`: a bound method (`self._run_units`) is a new object
                # at each submit, but equal to the others of the same instance.
                while end < len(jobs) and jobs[end].handler == handler:
                    end += 1
                outcomes.extend(handler(conn, [job.item for job in jobs[start:end]]))
                start = end
            self.backend.commit(conn)
        except Exception as error:
            self._rollback()
            if len(jobs) > 1:
                for job in jobs:
                    self._run_group([job])
                return
            outcomes = [self.backend.translate(error)]
        if self._on_commit is not None:
            self._on_commit()
        jobs[0].future.get_loop().call_soon_threadsafe(_settle_all, jobs, outcomes)

    def _rollback(self) -> None:
        if self._conn is None:
            return
        try:
            self.backend.rollback(self._conn)
        except Exception as error:
            log.warning("rollback on %s failed (%s); reconnecting", self.backend.name, error)
            self.backend.close(self._conn)
            self._conn = None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Jobs submitted in this loop iteration are handed over before the stop.
        self._hand_over()
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)


def _settle_all(jobs: list[_Job[Any]], outcomes: list[Any]) -> None:
    for job, outcome in zip(jobs, outcomes, strict=True):
        if job.future.done():
            continue
        if isinstance(outcome, Exception):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)
