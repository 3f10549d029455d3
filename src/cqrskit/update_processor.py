"""Consume the event stream, run projections, checkpoint, retry and dead-letter.

Guarantees, per projection and partition:
- a batch's view changes and its checkpoint commit in one transaction, and the
  checkpoint is read inside that transaction, so a replayed or duplicated event
  changes nothing (at-least-once delivery, exactly-once effect);
- events of one stream are applied in version order: once an event of a stream
  is parked in the dead-letter queue, the later events of that stream are parked
  behind it, while other streams go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import logging
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial

from cqrskit.checkpoints import Checkpoints
from cqrskit.errors import NotFound, Unavailable
from cqrskit.messages import Envelope
from cqrskit.ports import DeadLetter, Stream, UnitOfWork, ViewStore
from cqrskit.registry import Projection, Registry
from cqrskit.telemetry import batch_span, events_projected
from cqrskit.tenancy import documents_read, for_projection

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 3
    backoff_seconds: float = 0.1

    def delay(self, attempt: int) -> float:
        return float(self.backoff_seconds * 2 ** (attempt - 1))


class _EventFailed(Exception):
    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(str(error))
        self.index = index
        self.error = error


class _ProjectionFailed(Exception):
    """One of a partition's projections failed on an event (see `PartitionRunner`)."""

    def __init__(self, runner: int, failed: _EventFailed) -> None:
        super().__init__(str(failed))
        self.runner = runner
        self.failed = failed


class _CheckpointBehind(Exception):
    """The stored checkpoint is behind what this runner read (a rebuild reset it)."""

    def __init__(self, checkpoint: int, projection: str = "") -> None:
        super().__init__(f"checkpoint moved back to {checkpoint}")
        self.checkpoint = checkpoint
        self.projection = projection


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _upcast(registry: Registry, envelope: Envelope) -> Envelope:
    """The event at the schema version the code knows. A stream may hand the same
    envelopes to several projections (the embedded one reads once for all of them),
    so an upcaster that changes the data it is given in place gets a copy: only old
    events pay for it."""
    if registry.schema_versions.get(envelope.type, 0) > envelope.schema_version:
        envelope = replace(envelope, data=copy.deepcopy(envelope.data))
    return registry.upcast(envelope)


def _apply(projection: Projection, envelope: Envelope, uow: UnitOfWork) -> None:
    """Apply one event; a tenant's event sees its plain ids and its own documents only."""
    envelope, views = for_projection(envelope, uow)
    projection.apply(envelope, views)


class ProjectionRunner:
    """Applies one projection to one partition of the stream."""

    def __init__(
        self,
        projection: Projection,
        registry: Registry,
        views: ViewStore,
        *,
        partition: int = 0,
        retry: RetryPolicy = RetryPolicy(),
        checkpoints: Checkpoints | None = None,
        consumer: str | None = None,
    ) -> None:
        self.projection = projection
        self.consumer = consumer
        self.registry = registry
        self.views = views
        self.partition = partition
        self.retry = retry
        self.checkpoints = checkpoints
        self.position = 0

    @property
    def name(self) -> str:
        return self.projection.name

    async def follow(
        self, stream: Stream, partitions: int, *, until: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Apply the stream from the stored checkpoint on; return once past `until`."""
        try:
            await self._follow(stream, partitions, until, progress)
        finally:
            if self.checkpoints is not None:
                self.checkpoints.unfollow(self.name, self.partition)

    async def _follow(
        self, stream: Stream, partitions: int, until: int | None,
        progress: Callable[[int], None] | None,
    ) -> None:
        while True:
            stored = (await self.views.checkpoints()).get((self.name, self.partition), 0)
            self.position = stored
            if until is not None and stored >= until:
                return
            try:
                batches = stream.subscribe(
                    self.partition, partitions, stored, consumer=self.consumer
                )
                async for batch in batches:
                    await self.process(batch)
                    if progress is not None:
                        progress(self.position)
                    if until is not None and self.position >= until:
                        return
            except _CheckpointBehind as moved:
                log.info("%s/%d: checkpoint reset to %d; following from there",
                         self.name, self.partition, moved.checkpoint)
                if self.checkpoints is not None:
                    self.checkpoints.reset(self.name)

    async def process(self, batch: Sequence[Envelope]) -> None:
        """Apply a batch in one transaction; around a failing event, in pieces."""
        while batch:
            try:
                await self._commit(batch)
                return
            except _EventFailed as failed:
                batch = await self._past_failure(batch, failed)

    async def _past_failure(
        self, batch: Sequence[Envelope], failed: _EventFailed
    ) -> Sequence[Envelope]:
        """Commit what precedes the event that failed (its first attempt), retry or park
        that event, and return the rest of the batch."""
        index = failed.index
        if index:
            await self._commit(batch[:index])
        await self._retry_or_park(batch[index], failed.error)
        return batch[index + 1 :]

    async def _commit(self, batch: Sequence[Envelope]) -> None:
        after = self.position
        attributes = {"cqrskit.projection": self.name, "cqrskit.partition": self.partition}
        with batch_span(f"update views {self.name}", batch, attributes):
            position = await self.views.run(lambda uow: self._apply(uow, batch, after))
        # A redelivered event at or below the checkpoint changed nothing: not counted.
        fresh = sum(1 for envelope in batch if envelope.position > after)
        events_projected.add(fresh, {"projection": self.name})
        self._advanced(position)

    def _advanced(self, position: int) -> None:
        self.position = position
        if self.checkpoints is not None:
            self.checkpoints.advance(self.name, self.partition, position)

    def _apply(self, uow: UnitOfWork, batch: Sequence[Envelope], after: int) -> int:
        stored = uow.checkpoint(self.name, self.partition)
        if stored < after:
            raise _CheckpointBehind(stored, self.name)
        parked = uow.parked_streams(self.name)
        self._prefetch(uow, batch, stored)
        for index, envelope in enumerate(batch):
            if envelope.position <= stored:
                continue
            if envelope.stream_id in parked:
                uow.park(
                    self.name, self.partition, envelope,
                    "queued behind an earlier event of this stream in the dead-letter queue",
                    attempts=0, is_cause=False,
                )
                continue
            if self.projection.handles(envelope.type):
                try:
                    _apply(self.projection, _upcast(self.registry, envelope), uow)
                except Exception as error:
                    raise _EventFailed(index, error) from error
        position = max(stored, batch[-1].position)
        uow.set_checkpoint(self.name, self.partition, position)
        return position

    def _prefetch(self, uow: UnitOfWork, batch: Sequence[Envelope], stored: int) -> None:
        wanted: dict[str, set[str]] = {}
        for envelope in batch:
            if envelope.position > stored and self.projection.handles(envelope.type):
                for collection, doc_id in documents_read(self.projection, envelope):
                    wanted.setdefault(collection, set()).add(doc_id)
        for collection, doc_ids in wanted.items():
            uow.prefetch(collection, doc_ids)

    async def _retry_or_park(self, envelope: Envelope, error: Exception) -> None:
        for attempt in range(1, self.retry.attempts):
            log.warning(
                "%s failed on %s %s v%d (position %d), attempt %d of %d: %s",
                self.name, envelope.type, envelope.stream_id, envelope.version,
                envelope.position, attempt, self.retry.attempts, describe(error),
            )
            await asyncio.sleep(self.retry.delay(attempt))
            try:
                await self._commit([envelope])
                return
            except _EventFailed as failed:
                error = failed.error
        log.error(
            "%s parked %s %s v%d (position %d) after %d attempts: %s",
            self.name, envelope.type, envelope.stream_id, envelope.version,
            envelope.position, self.retry.attempts, describe(error), exc_info=error,
        )
        after = self.position

        def park(uow: UnitOfWork) -> int:
            stored = uow.checkpoint(self.name, self.partition)
            if stored < after:
                raise _CheckpointBehind(stored, self.name)
            if stored >= envelope.position:
                return stored
            uow.park(self.name, self.partition, envelope, describe(error),
                     attempts=self.retry.attempts, is_cause=True)
            uow.set_checkpoint(self.name, self.partition, envelope.position)
            return envelope.position

        self._advanced(await self.views.run(park))


class PartitionRunner:
    """Applies every projection to one partition: one subscription, and one unit of work
    per batch for all of them.

    A runner per projection would fetch, decode and commit each batch once per
    projection; this one reads it once and commits all projections' views and
    checkpoints together (each projection still skips what its own checkpoint has
    passed, so they may start from different places). When a projection fails on an
    event, the unit is undone and each projection takes the batch on its own
    (`ProjectionRunner.process`: retries, dead letters), the others unaffected by
    the failing one's view changes; the partition's next batch waits for that.
    """

    def __init__(self, runners: Sequence[ProjectionRunner], partition: int) -> None:
        self.runners = list(runners)
        self.partition = partition
        self.views = self.runners[0].views
        self.checkpoints = self.runners[0].checkpoints

    @property
    def name(self) -> str:
        return ", ".join(runner.name for runner in self.runners)

    @property
    def position(self) -> int:
        """Where the slowest projection has got to: the subscription resumes after it."""
        return min(runner.position for runner in self.runners)

    @property
    def consumer(self) -> str:
        """The durable subscription's name. One projection keeps the name its own runner
        had; several get one named after the set (a stream may serve other registries)."""
        if len(self.runners) == 1:
            return f"{self.runners[0].name}-{self.partition}"
        names = ",".join(sorted(runner.name for runner in self.runners))
        return f"views-{zlib.crc32(names.encode()):08x}-{self.partition}"

    async def follow(self, stream: Stream, partitions: int) -> None:
        """Apply the stream to every projection from its stored checkpoint on, forever."""
        try:
            await self._follow(stream, partitions)
        finally:
            if self.checkpoints is not None:
                for runner in self.runners:
                    self.checkpoints.unfollow(runner.name, self.partition)

    async def _follow(self, stream: Stream, partitions: int) -> None:
        while True:
            stored = await self.views.checkpoints()
            for runner in self.runners:
                runner.position = stored.get((runner.name, self.partition), 0)
            try:
                batches = stream.subscribe(
                    self.partition, partitions, self.position, consumer=self.consumer
                )
                async for batch in batches:
                    await self.process(batch)
            except _CheckpointBehind as moved:
                log.info("%s/%d: checkpoint reset to %d; following from there",
                         moved.projection, self.partition, moved.checkpoint)
                if self.checkpoints is not None:
                    self.checkpoints.reset(moved.projection)

    async def process(self, batch: Sequence[Envelope]) -> None:
        """All projections in one unit of work; on an event that fails, one by one."""
        runners = [runner for runner in self.runners if runner.position < batch[-1].position]
        if not runners:
            return
        afters = [runner.position for runner in runners]

        def apply_all(uow: UnitOfWork) -> list[int]:
            positions = []
            for k, (runner, after) in enumerate(zip(runners, afters, strict=True)):
                try:
                    positions.append(runner._apply(uow, batch, after))
                except _EventFailed as failed:
                    raise _ProjectionFailed(k, failed) from failed
            return positions

        try:
            with contextlib.ExitStack() as spans:
                # A span per projection, as when each committed alone; they share the commit.
                for runner in runners:
                    attributes = {"cqrskit.projection": runner.name,
                                  "cqrskit.partition": self.partition}
                    spans.enter_context(
                        batch_span(f"update views {runner.name}", batch, attributes)
                    )
                positions = await self.views.run(apply_all)
        except _ProjectionFailed as failure:
            # The unit was undone. The failing projection counts this as the event's
            # first attempt; every projection then takes the batch on its own.
            for k, runner in enumerate(runners):
                rest = batch
                if k == failure.runner:
                    rest = await runner._past_failure(batch, failure.failed)
                await runner.process(rest)
            return
        for runner, after, position in zip(runners, afters, positions, strict=True):
            # A redelivered event at or below the checkpoint changed nothing: not counted.
            fresh = sum(1 for envelope in batch if envelope.position > after)
            events_projected.add(fresh, {"projection": runner.name})
            runner._advanced(position)


class UpdateProcessor:
    """Runs every projection of the registry over the partitions it owns.

    Two modes: `start()` runs the fixed `owned` partitions (`cqrskit serve` owns
    them all); or `PartitionLeases` calls `assign()` whenever the partitions this
    process holds change, and runners start and stop with them.
    """

    def __init__(
        self,
        registry: Registry,
        views: ViewStore,
        stream: Stream,
        *,
        partitions: int = 1,
        owned: Sequence[int] = (0,),
        retry: RetryPolicy = RetryPolicy(),
        checkpoints: Checkpoints | None = None,
        restart_seconds: float = 1.0,
    ) -> None:
        self.registry = registry
        self.views = views
        self.stream = stream
        self.partitions = partitions
        self.fixed = list(owned)
        self.retry = retry
        self.checkpoints = checkpoints
        self.restart_seconds = restart_seconds
        self._tasks: dict[int, list[asyncio.Task[None]]] = {}

    @property
    def owned(self) -> list[int]:
        """The partitions this processor is running now."""
        return sorted(self._tasks)

    def start(self) -> None:
        """Run the fixed partitions given at construction."""
        for partition in self.fixed:
            self._start_partition(partition)

    async def assign(self, partitions: Iterable[int]) -> None:
        """Run exactly these partitions: stop the lost ones first, then start the gained."""
        wanted = set(partitions)
        for partition in sorted(set(self._tasks) - wanted):
            await self._stop_partition(partition)
        for partition in sorted(wanted - set(self._tasks)):
            self._start_partition(partition)

    def _start_partition(self, partition: int) -> None:
        if partition in self._tasks or not self.registry.projections:
            return
        runner = PartitionRunner(
            [self._runner(projection, partition)
             for projection in self.registry.projections.values()],
            partition,
        )
        self._tasks[partition] = [
            asyncio.create_task(self._supervise(runner), name=f"projection-{partition}")
        ]

    def _runner(self, projection: Projection, partition: int) -> ProjectionRunner:
        return ProjectionRunner(
            projection, self.registry, self.views, partition=partition, retry=self.retry,
            checkpoints=self.checkpoints, consumer=f"{projection.name}-{partition}",
        )

    async def _stop_partition(self, partition: int) -> None:
        tasks = self._tasks.pop(partition, [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _supervise(self, runner: PartitionRunner) -> None:
        while True:
            try:
                await runner.follow(self.stream, self.partitions)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # Asked to stop, but a library turned the cancellation into an
                    # error (nats-py can, inside its own wait_for): stop all the same.
                    return
                # A store or the broker out of reach is expected now and then: one
                # line each time; anything else is unexpected and gets a traceback.
                log.error(
                    "projections %s (partition %d) stopped at position %d (%s); "
                    "restarting in %.1fs", runner.name, runner.partition, runner.position,
                    describe(error), self.restart_seconds,
                    exc_info=not isinstance(error, Unavailable),
                )
                await asyncio.sleep(self.restart_seconds)

    async def stop(self) -> None:
        for partition in list(self._tasks):
            await self._stop_partition(partition)


# ------------------------------------------------------- operator actions


async def rebuild(
    projection: Projection,
    registry: Registry,
    views: ViewStore,
    stream: Stream,
    until: int,
    *,
    retry: RetryPolicy = RetryPolicy(),
    progress: Callable[[int], None] | None = None,
) -> int:
    """Empty the projection's views and replay the log into them up to `until`.

    The replay reads the whole log as partition 0 of 1. Checkpoints the
    projection has in other partitions (from a partitioned stream) are set to
    where the replay ended, so processors resume after it; they must not run
    during the rebuild, since they would apply their partitions a second time.
    """
    others = {
        partition for name, partition in await views.checkpoints()
        if name == projection.name and partition != 0
    }

    def reset(uow: UnitOfWork) -> None:
        for collection in projection.collections:
            uow.clear(collection.name)
        for stream_id in uow.parked_streams(projection.name):
            for dead_letter in uow.dead_letters(projection.name, stream_id):
                uow.remove_dead_letter(dead_letter.id)
        uow.set_checkpoint(projection.name, 0, 0)

    await views.run(reset)
    runner = ProjectionRunner(projection, registry, views, retry=retry)
    with _fewer_collections():
        await runner.follow(stream, 1, until=until, progress=progress)

    def resume_after(uow: UnitOfWork) -> None:
        for partition in others:
            uow.set_checkpoint(projection.name, partition, runner.position)

    if others:
        await views.run(resume_after)
    return runner.position


# A rebuild holds a batch of envelopes, events and documents at a time (thousands of
# objects per 1,000 events), nearly all freed by reference counting. At the default
# threshold (700 more objects allocated than freed) the cyclic collector ran about ten
# times per batch, each time walking the batch's live objects and promoting them, and
# took 30-40 % of a rebuild's CPU. Above a batch's worth, it runs every few batches;
# whatever cyclic garbage a projection makes is still collected, so memory stays flat.
REBUILD_GC_THRESHOLD = 50_000
_gc_lock = threading.Lock()
_gc_holders = 0
_gc_saved = gc.get_threshold()


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """Raise the collector's first threshold while any rebuild runs; restore it after
    the last one (rebuilds may overlap, in one event loop or in several threads)."""
    global _gc_holders, _gc_saved
    with _gc_lock:
        if _gc_holders == 0:
            _gc_saved = gc.get_threshold()
            # 0: the process turned automatic collection off; it stays off.
            first = max(REBUILD_GC_THRESHOLD, _gc_saved[0]) if _gc_saved[0] else 0
            gc.set_threshold(first, *_gc_saved[1:])
        _gc_holders += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_holders -= 1
            if _gc_holders == 0:
                gc.set_threshold(*_gc_saved)


@dataclass(frozen=True, slots=True)
class RetryOutcome:
    applied: int
    remaining: int
    error: str | None


async def retry_dead_letters(
    registry: Registry, views: ViewStore, dead_letter_id: int
) -> RetryOutcome:
    """Re-apply the parked events of the dead letter's stream, oldest first.

    Stops at the first event that fails again; it stays at the head of the queue.
    """
    first = await _dead_letter(views, dead_letter_id)
    projection = registry.projection(first.projection)
    applied = 0
    while True:

        def step(uow: UnitOfWork) -> int | None:
            """Apply the head of the stream's queue; return how many are left behind it."""
            queued = uow.dead_letters(projection.name, first.stream_id)
            if not queued:
                return None
            head = queued[0]
            try:
                _apply(projection, registry.upcast(head.envelope), uow)
            except Exception as error:
                raise _EventFailed(head.id, error) from error
            uow.remove_dead_letter(head.id)
            return len(queued) - 1

        try:
            remaining = await views.run(step)
        except _EventFailed as failed:
            message = describe(failed.error)
            await views.run(partial(_record_failure, dead_letter_id=failed.index, error=message))
            left = await views.list_dead_letters(projection.name)
            return RetryOutcome(
                applied, sum(d.stream_id == first.stream_id for d in left), message
            )
        if remaining is None:
            return RetryOutcome(applied, 0, None)
        applied += 1
        if remaining == 0:
            return RetryOutcome(applied, 0, None)


def _record_failure(uow: UnitOfWork, *, dead_letter_id: int, error: str) -> None:
    uow.record_failure(dead_letter_id, error)


async def skip_dead_letter(views: ViewStore, dead_letter_id: int) -> DeadLetter:
    """Drop one parked event for good; the projection will never apply it."""
    dead_letter = await _dead_letter(views, dead_letter_id)
    await views.run(lambda uow: uow.remove_dead_letter(dead_letter.id))
    log.warning("dead letter %d skipped: %s %s v%d for %s", dead_letter.id,
                dead_letter.envelope.type, dead_letter.stream_id, dead_letter.envelope.version,
                dead_letter.projection)
    return dead_letter


async def _dead_letter(views: ViewStore, dead_letter_id: int) -> DeadLetter:
    dead_letter = await views.get_dead_letter(dead_letter_id)
    if dead_letter is None:
        raise NotFound(f"no dead letter with id {dead_letter_id}")
    return dead_letter
