"""Per-caller rate limits (429 with Retry-After) and a time limit per request (504).

Rate limits are kept in this process's memory: the embedded default has no
shared store to count in, so N API processes together allow N times the rate.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cqrskit.api.auth import Authenticator, Principal
from cqrskit.api.errors import error_response
from cqrskit.config import Settings

log = logging.getLogger(__name__)

# Routes that run for as long as the client listens; the time limit is not for them.
STREAMING_PATHS = ("/api/status/stream",)
# Buckets kept at most; beyond it the least recently used is dropped (which only
# gives that caller a full bucket again), so many callers cannot exhaust memory.
MAX_CALLERS = 100_000


class TokenBuckets:
    """A token bucket per key: `burst` requests at once, refilled at `rate` a second.

    Hand-written (a few lines) rather than `limits` or pyrate-limiter: those count
    in windows or through storage backends with awaits and locks, while this is
    one synchronous step on the event loop, gives the exact wait for Retry-After,
    and bounds its table by dropping buckets idle long enough to be full again.
    """

    def __init__(
        self, rate: float, burst: int, *, max_keys: int = MAX_CALLERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self.clock = clock
        # key -> (tokens, when counted), least recently used first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        """0 when `key` may make a request now (and it is counted), else the seconds
        until it may."""
        now = self.clock()
        self._drop_full(now)
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self._buckets[key] = (tokens - 1 if wait == 0 else tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait

    def _drop_full(self, now: float) -> None:
        # A bucket that has refilled is the same as no bucket; the idlest come first.
        while self._buckets:
            key, (tokens, at) = next(iter(self._buckets.items()))
            if tokens + (now - at) * self.rate < self.burst:
                return
            del self._buckets[key]


class RateLimited(Exception):
    def __init__(self, wait: float, rate: float, burst: int) -> None:
        self.retry_after = max(1, math.ceil(wait))
        super().__init__(
            f"too many requests: this caller may make {rate:g} a second (bursts of {burst}); "
            f"retry in {self.retry_after} s"
        )


class RateLimiter:
    """Route dependencies that authenticate the caller (Authenticator.requires) and
    then count the request in the caller's bucket for that scope: the authenticated
    subject, or the client address when authentication is off."""

    def __init__(self, settings: Settings, auth: Authenticator, *, enabled: bool = True) -> None:
        self.auth = auth
        self.rate = settings.rate_limit
        self.burst = settings.rate_burst
        on = enabled and self.rate > 0
        self.buckets = TokenBuckets(self.rate, self.burst) if on else None

    def check(self, key: str) -> None:
        if self.buckets is None:
            return
        wait = self.buckets.take(key)
        if wait > 0:
            raise RateLimited(wait, self.rate, self.burst)

    def requires(self, scope: str) -> list[Any]:
        authenticate = self.auth.requires(scope)
        if self.buckets is None:
            return authenticate
        if authenticate:
            principal_of = authenticate[0].dependency

            # Depends as the default, not in Annotated: with postponed annotations FastAPI
            # could not resolve the closure variable `principal_of` from a string.
            async def by_principal(principal: Principal = Depends(principal_of)) -> None:
                self.check(f"{scope} subject:{principal.subject}")

            return [Depends(by_principal)]

        async def by_address(request: Request) -> None:
            client = request.client.host if request.client else "unknown"
            self.check(f"{scope} address:{client}")

        return [Depends(by_address)]


async def _rate_limited(request: Request, exc: Exception) -> Response:
    retry_after = exc.retry_after if isinstance(exc, RateLimited) else 1
    return error_response(429, "rate_limited", str(exc),
                          headers={"Retry-After": str(retry_after)})


def install(app: FastAPI) -> None:
    app.add_exception_handler(RateLimited, _rate_limited)


class Deadlines:
    """Cancel tasks that outlive their deadline, with one timer for all of them.

    What `asyncio.timeout` does, without a timer of its own per request: under
    uvloop, creating and cancelling a timer costs about 4 µs, and a request that
    ends in time (nearly all of them) needs none. The one timer is set for the
    earliest deadline in flight; when it fires it cancels what is overdue and is
    set again for the next.
    """

    def __init__(self) -> None:
        # Task -> its deadline (loop time), or None once it was cancelled for it.
        self._deadlines: dict[asyncio.Task[Any], float | None] = {}
        self._alarm: asyncio.TimerHandle | None = None
        self._alarm_at = math.inf
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._deadlines)

    def watch(self, task: asyncio.Task[Any], seconds: float) -> None:
        loop = task.get_loop()
        deadline = loop.time() + seconds
        self._deadlines[task] = deadline
        # A new loop (a test's, or after a restart) needs its own timer.
        if deadline < self._alarm_at or loop is not self._loop:
            self._set_alarm(loop, deadline)

    def unwatch(self, task: asyncio.Task[Any], cancelling: int) -> bool:
        """Stop watching `task`; True if its deadline cancelled it, and that
        cancellation alone (taken back, as `asyncio.timeout` does)."""
        if self._deadlines.pop(task, 0.0) is not None:
            return False
        return task.uncancel() <= cancelling

    def _set_alarm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._alarm is not None:
            self._alarm.cancel()
        self._alarm = loop.call_at(when, self._expire)
        self._alarm_at, self._loop = when, loop

    def _expire(self) -> None:
        loop = asyncio.get_running_loop()
        self._alarm, self._alarm_at = None, math.inf
        now, next_at = loop.time(), math.inf
        for task, deadline in list(self._deadlines.items()):
            if deadline is None or task.get_loop() is not loop:
                continue
            if deadline <= now:
                self._deadlines[task] = None
                task.cancel()
            else:
                next_at = min(next_at, deadline)
        if next_at < math.inf:
            self._set_alarm(loop, next_at)


class RequestTimeout:
    """Answer 504 when a request runs longer than its time limit.

    504 rather than 503: the service did not refuse the request (503 here means a
    store is unreachable, retry), it ran out of time waiting on its stores or
    handler services, so what became of it is unknown. A command may even have
    been committed: the answer says so and how to find out.
    """

    def __init__(self, app: ASGIApp, seconds: float, consistency_seconds: float) -> None:
        self.app = app
        self.seconds = seconds
        self.consistency_seconds = consistency_seconds
        self.deadlines = Deadlines()

    def _limit(self, scope: Scope) -> float:
        # A read-your-writes wait is bounded by CQRSKIT_CONSISTENCY_TIMEOUT on its own.
        for name, _ in scope["headers"]:
            if name == b"x-consistency-token":
                return self.seconds + self.consistency_seconds
        return self.seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if scope["type"] != "http" or scope["path"] in STREAMING_PATHS or task is None:
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        limit = self._limit(scope)
        cancelling = task.cancelling()
        self.deadlines.watch(task, limit)
        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if not self.deadlines.unwatch(task, cancelling):
                raise  # cancelled for another reason: the client left, or shutdown
        except BaseException:
            self.deadlines.unwatch(task, cancelling)
            raise
        else:
            self.deadlines.unwatch(task, cancelling)
            return
        # Cancelled by its deadline.
        log.warning("%s %s ran longer than %g s; answered 504",
                    scope["method"], scope["path"], limit)
        if not started:
            await self._answer(scope, limit)(scope, receive, send)

    def _answer(self, scope: Scope, limit: float) -> Response:
        message = f"the request did not finish within {limit:g} s"
        extra: dict[str, Any] = {}
        if scope["method"] == "POST":
            key = next((v.decode("latin-1") for n, v in scope["headers"]
                        if n == b"idempotency-key"), None)
            extra["outcome"] = "unknown"
            message += (
                "; the command may or may not have been applied. "
                + (f"Look it up with GET /api/commands/{key}, or send it again with the "
                   f"same Idempotency-Key ({key}): that is applied at most once"
                   if key else
                   "Send commands with an Idempotency-Key header: a command sent again "
                   "with the same key is applied at most once, and GET /api/commands/{key} "
                   "says whether it was")
            )
            if key:
                extra["command_id"] = key
        return error_response(504, "timeout", message, headers={"Retry-After": "1"}, **extra)
