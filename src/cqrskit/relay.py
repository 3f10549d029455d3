"""The relay: follows the event log and publishes it to the broker.

The event log is the outbox: a command's events are durable once appended, and
the relay carries them to the stream afterwards. It reads a batch after its
saved position, publishes it, and saves the batch's last position only once
`Stream.publish` returned, i.e. once the broker acknowledged every event. So the
saved position never passes an unpublished event. The save runs while the next
batch is read and published (one save at a time, each awaited before the next
starts or the relay goes idle), so the saved position may trail the broker by a
batch. A crash between publish and save sends the batch again on restart; the
broker drops the copies by event id, and subscribers drop what they have seen by
position.

When publishing fails (the broker is down), the relay logs, waits (doubling, up
to a cap) and sends the same batch again, for as long as it takes: events are
never skipped. Commands are still accepted meanwhile; they wait in the log.

Only one relay publishes at a time: `run()` first waits for the leadership
(`RelayState.lead()`); a standby takes over when the leader dies. When the
store fails (reading the log, saving the position), the relay gives up the
leadership, waits and competes for it again, reading the position afresh.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from cqrskit.errors import Unavailable
from cqrskit.messages import Envelope
from cqrskit.ports import EventStore, RelayState, Stream
from cqrskit.telemetry import batch_span, events_published

log = logging.getLogger(__name__)

# How long a relay that stops leading waits for its position save in flight.
SAVE_GRACE_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential delays: first, first * 2, ... up to `maximum` seconds."""

    first: float = 0.1
    maximum: float = 10.0

    def delay(self, failures: int) -> float:
        return float(min(self.maximum, self.first * 2 ** max(0, failures - 1)))


class Relay:
    def __init__(
        self,
        store: EventStore,
        stream: Stream,
        state: RelayState,
        *,
        batch_size: int = 1000,
        idle_wait: float = 0.5,
        backoff: Backoff = Backoff(),
    ) -> None:
        self.store = store
        self.stream = stream
        self.state = state
        self.batch_size = batch_size
        self.idle_wait = idle_wait
        self.backoff = backoff
        # Where the relay has got to (published and saved); for tests and health.
        self.position = 0
        self.leading = False
        self.failed_publishes = 0
        # The position save in flight, overlapping the next read and publish.
        self._saving: asyncio.Future[None] | None = None

    async def run(self) -> None:
        """Lead and relay, forever; recover from store failures by competing again."""
        failures = 0
        while True:
            try:
                async with self.state.lead():
                    self.leading = True
                    failures = 0
                    await self._follow()
            except Exception as error:
                failures += 1
                delay = self.backoff.delay(failures)
                log.error("relay stopped at position %d (%s); leading again in %.1fs",
                          self.position, _describe(error), delay,
                          exc_info=not isinstance(error, Unavailable))
                await asyncio.sleep(delay)
            finally:
                self.leading = False

    async def _follow(self) -> None:
        self.position = await self.state.position()
        log.info("relay leading; publishing the event log after position %d", self.position)
        try:
            while True:
                await self.step()
        finally:
            await self._settle_save()

    async def step(self) -> int:
        """Publish the next batch after `position` (or wait for one); return the position.

        The batch's position is saved in the background while the next step reads and
        publishes; a step that finds nothing new waits for that save first.
        """
        batch = await self.store.read_all(self.position, self.batch_size)
        if not batch:
            await self._saved()
            await self.store.wait_for_append(self.position, self.idle_wait)
            return self.position
        with batch_span("relay publish", batch, {}):
            await self._publish(batch)
        events_published.add(len(batch))
        await self._saved()  # one save at a time; a failed one fails this step
        self._saving = asyncio.ensure_future(self.state.save(batch[-1].position))
        self.position = batch[-1].position
        return self.position

    async def _settle_save(self) -> None:
        """Leaving (a store failure, deposed, stopped): give the save in flight a moment,
        so that the next leader need not publish its batch again; a save not made only
        means that."""
        saving, self._saving = self._saving, None
        if saving is None:
            return
        done, _ = await asyncio.wait({saving}, timeout=SAVE_GRACE_SECONDS)
        if not done:
            saving.cancel()
        elif not saving.cancelled() and (error := saving.exception()) is not None:
            log.warning("relay: saving position %d failed: %s", self.position,
                        _describe(error))

    async def _saved(self) -> None:
        """Wait for the save in flight, if any; raise its error."""
        saving, self._saving = self._saving, None
        if saving is not None:
            await saving

    async def _publish(self, batch: Sequence[Envelope]) -> None:
        """Publish until the broker acknowledged the whole batch."""
        failures = 0
        while True:
            try:
                await self.stream.publish(batch)
            except Exception as error:
                failures += 1
                self.failed_publishes += 1
                delay = self.backoff.delay(failures)
                # Anything but Unavailable is unexpected (e.g. an event over the
                # broker's size limit): it gets a traceback, and is retried all the same.
                log.warning(
                    "relay: publishing positions %d..%d failed (attempt %d): %s; "
                    "retrying in %.1fs", batch[0].position, batch[-1].position, failures,
                    _describe(error), delay, exc_info=not isinstance(error, Unavailable),
                )
                await asyncio.sleep(delay)
                continue
            if failures:
                log.info("relay: published positions %d..%d after %d failed attempts",
                         batch[0].position, batch[-1].position, failures)
            return


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
