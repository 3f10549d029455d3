"""Helpers for the contract tests: append requests, the whole log, replays of it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from cqrskit.messages import NewEvent, new_id
from cqrskit.ports import AppendRequest
from replays import (  # noqa: F401  (re-exported for the contract tests)
    all_docs,
    records_view,
    replay_records,
    replay_statistics,
    statistics_view,
    whole_log,
)

T = TypeVar("T")


def request(
    stream_id: str,
    expected: int,
    *types: str,
    command_id: str | None = None,
    command_hash: str = "h",
    data: dict[str, Any] | None = None,
) -> AppendRequest:
    """An append of one event per type (default one `Happened`) to `stream_id`."""
    command_id = command_id or new_id()
    return AppendRequest(
        stream_id=stream_id,
        stream_type="thing",
        expected_version=expected,
        events=[
            NewEvent(t, data if data is not None else {"type": t, "stream": stream_id})
            for t in types or ("Happened",)
        ],
        metadata={"command_id": command_id},
        command_id=command_id,
        command_hash=command_hash,
    )


async def eventually(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float = 10
) -> T:
    """Poll `probe` until `done(value)`; fail with the last value after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await probe()
        if done(value):
            return value
        assert loop.time() < deadline, f"not reached within {timeout}s; last value: {value!r}"
        await asyncio.sleep(0.02)
