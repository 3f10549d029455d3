"""The command route's cheaper paths answer as the full ones did.

- `Deadlines`: one timer for every request's time limit (limits.RequestTimeout);
- `BodyLimit`: a body framed by Content-Length is not counted again;
- `PlainCommandRoute`: commands with valid (or no) headers skip FastAPI's header
  parameters; an invalid header still gets the documented route's 422
  (over HTTP: tests/integration/test_command_headers.py).
"""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Message, Receive, Scope, Send

from cqrskit.api.errors import BodyLimit
from cqrskit.api.limits import Deadlines, RequestTimeout
from cqrskit.api.routes import headers_valid

# ----------------------------------------------------------------- Deadlines


async def _sleeper(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "done"


async def test_a_task_past_its_deadline_is_cancelled_and_one_in_time_is_not() -> None:
    deadlines = Deadlines()
    slow = asyncio.create_task(_sleeper(5))
    quick = asyncio.create_task(_sleeper(0.01))
    deadlines.watch(slow, 0.05)
    deadlines.watch(quick, 0.05)
    assert await quick == "done"
    assert not deadlines.unwatch(quick, 0)
    with pytest.raises(asyncio.CancelledError):
        await slow
    assert deadlines.unwatch(slow, 0)  # its deadline cancelled it
    assert len(deadlines) == 0


async def test_a_shorter_deadline_set_later_still_fires_on_time() -> None:
    deadlines = Deadlines()
    long_wait = asyncio.create_task(_sleeper(5))
    short_wait = asyncio.create_task(_sleeper(5))
    deadlines.watch(long_wait, 3)  # the timer is set for this one first
    deadlines.watch(short_wait, 0.05)
    started = asyncio.get_running_loop().time()
    with pytest.raises(asyncio.CancelledError):
        await short_wait
    assert asyncio.get_running_loop().time() - started < 1
    assert deadlines.unwatch(short_wait, 0)
    assert not long_wait.done()
    long_wait.cancel()
    assert not deadlines.unwatch(long_wait, 0)  # cancelled, but not by its deadline


def test_deadlines_work_on_each_new_event_loop() -> None:
    deadlines = Deadlines()

    async def one_loop() -> None:
        # A timer left on the first loop must not stand in for this loop's.
        keep = asyncio.create_task(_sleeper(5))
        deadlines.watch(keep, 30)
        task = asyncio.create_task(_sleeper(5))
        deadlines.watch(task, 0.05)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2)
        assert deadlines.unwatch(task, 0)
        keep.cancel()
        deadlines.unwatch(keep, 0)

    asyncio.run(one_loop())
    asyncio.run(one_loop())


async def test_request_timeout_lets_other_cancellations_through() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(5)

    timeout = RequestTimeout(app, seconds=10, consistency_seconds=0)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/api/query/list", "method": "GET", "headers": []}
    task = asyncio.create_task(timeout(scope, _no_body, send))
    await asyncio.sleep(0.01)
    task.cancel()  # the client went away: no 504, the cancellation goes on
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sent == []
    assert len(timeout.deadlines) == 0


async def test_request_timeout_answers_504_when_the_deadline_passes() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(5)

    timeout = RequestTimeout(app, seconds=0.05, consistency_seconds=0)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/api/query/list", "method": "GET", "headers": []}
    await asyncio.wait_for(timeout(scope, _no_body, send), 2)
    assert sent[0]["status"] == 504
    assert len(timeout.deadlines) == 0
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


# ----------------------------------------------------------------- BodyLimit


async def _through_body_limit(headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> int:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})

    remaining = list(chunks)

    async def receive() -> Message:
        body = remaining.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(remaining)}

    statuses: list[int] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = {"type": "http", "path": "/x", "method": "POST", "headers": headers}
    try:
        await BodyLimit(app, limit=1024)(scope, receive, send)
    except Exception as error:  # the HTTPException FastAPI's handlers turn into a 413
        return int(getattr(error, "status_code", 500))
    return statuses[0]


async def test_a_declared_length_with_chunked_framing_is_still_counted() -> None:
    # Transfer-Encoding overrides Content-Length: the declared length says nothing.
    headers = [(b"content-length", b"10"), (b"transfer-encoding", b"chunked")]
    assert await _through_body_limit(headers, [b"x" * 1000, b"x" * 1000]) == 413
    assert await _through_body_limit([], [b"x" * 1000, b"x" * 1000]) == 413
    assert await _through_body_limit([(b"content-length", b"2000")], [b"x" * 2000]) == 413
    assert await _through_body_limit([(b"content-length", b"1000")], [b"x" * 1000]) == 200


# ----------------------------------------------------------------- command headers


@pytest.mark.parametrize(("headers", "valid"), [
    ([], True),
    ([(b"idempotency-key", b"order-1:a.b_c")], True),
    ([(b"x-correlation-id", b"abc"), (b"idempotency-key", b"k")], True),
    ([(b"idempotency-key", b"-starts-with-dash")], False),
    ([(b"idempotency-key", b"")], False),
    ([(b"idempotency-key", b"k" * 129)], False),
    ([(b"idempotency-key", b"ok"), (b"idempotency-key", b"not ok")], False),
    ([(b"x-correlation-id", "caf\u00e9".encode("latin-1"))], False),
    ([(b"Idempotency-Key", b"bad key")], False),
])
def test_headers_valid_agrees_with_the_documented_route(
    headers: list[tuple[bytes, bytes]], valid: bool
) -> None:
    assert headers_valid({"headers": headers}) is valid
