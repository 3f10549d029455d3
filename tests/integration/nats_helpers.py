"""Helpers for the tests that talk to NATS JetStream: unique streams, envelopes,
collecting subscriptions, and a private nats-server that a test may stop."""

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import nats
import pytest

from cqrskit.messages import Envelope, new_id
from cqrskit.ports import Stream
from cqrskit.streams.nats import NatsStream

NATS_HOST = "127.0.0.1"
NATS_PORT = 4222
NATS_SERVER = f"nats://{NATS_HOST}:{NATS_PORT}"
NATS_START = (
    "nats-server -js -a 127.0.0.1 -p 4222 -sd /var/lib/nats-server "
    "(or: docker run -d -p 4222:4222 nats -js)"
)
NATS_BINARY = shutil.which("nats-server") or "/usr/sbin/nats-server"


def require_nats_binary() -> None:
    """Skip the calling test when there is no nats-server binary to start a private
    server with (fail it under CQRSKIT_REQUIRE_SERVICES=1)."""
    if not os.access(NATS_BINARY, os.X_OK):
        reason = f"no nats-server binary at {NATS_BINARY}"
        if os.environ.get("CQRSKIT_REQUIRE_SERVICES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def unique_names() -> tuple[str, str]:
    """A stream name and subject no other test run uses."""
    tag = uuid.uuid4().hex[:10]
    return f"CQRSKIT_T_{tag}", f"cqrskit_t_{tag}.events"


def stream_url(server: str, name: str, subject: str, **params: Any) -> str:
    query = "".join(f"&{key}={value}" for key, value in params.items())
    return f"{server}?stream={name}&subject={subject}{query}"


async def delete_stream(server: str, name: str) -> None:
    """Remove a test's stream from the broker (if the broker still answers)."""
    with contextlib.suppress(Exception):
        client = await nats.connect(server, allow_reconnect=False, max_reconnect_attempts=1)
        try:
            await client.jetstream().delete_stream(name)
        finally:
            await client.close()


async def stream_messages(server: str, name: str) -> int:
    """How many messages the broker holds in the stream."""
    client = await nats.connect(server, allow_reconnect=False, max_reconnect_attempts=1)
    try:
        info = await client.jetstream().stream_info(name)
        return int(info.state.messages)
    finally:
        await client.close()


def make_envelopes(count: int, *, streams: int = 20, first: int = 1) -> list[Envelope]:
    """Events at positions first.. spread over `streams` aggregates, versions in order."""
    versions: Counter[str] = Counter()
    envelopes = []
    for position in range(first, first + count):
        stream_id = f"agg-{position % streams}"
        versions[stream_id] += 1
        envelopes.append(Envelope(
            new_id(), stream_id, "thing", versions[stream_id], position, "Happened", 1,
            {"n": position}, {"command_id": f"c{position}"}, "2024-01-01T00:00:00+00:00",
        ))
    return envelopes


async def collect(
    stream: NatsStream | Stream, partition: int, partitions: int, after: int, count: int,
    *, timeout: float = 10, **options: Any,
) -> list[Envelope]:
    """Read batches until `count` events came; fail if they do not come in time."""
    events: list[Envelope] = []

    async def read() -> None:
        batches: Any = stream.subscribe(partition, partitions, after, **options)
        async with contextlib.aclosing(batches):
            async for batch in batches:
                events.extend(batch)
                if len(events) >= count:
                    return

    try:
        await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        raise AssertionError(f"got {len(events)} of {count} events in {timeout}s") from None
    return events


async def wait_until(condition: Any, timeout: float = 10, what: str = "condition") -> None:
    """Poll a sync or async predicate until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, f"{what} did not hold within {timeout}s"
        await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((NATS_HOST, 0))
        return int(sock.getsockname()[1])


class PrivateNatsServer:
    """A nats-server of the test's own, on a free port with its store in a tmp dir:
    the one a test may stop and restart (never the shared one)."""

    def __init__(self, store_dir: Path) -> None:
        self.store_dir = store_dir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{NATS_HOST}:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [NATS_BINARY, "-js", "-a", NATS_HOST, "-p", str(self.port),
             "-sd", str(self.store_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection((NATS_HOST, self.port), timeout=0.5):
                    return
            except OSError:
                assert self.process.poll() is None, "nats-server exited at start"
                assert time.monotonic() < deadline, "nats-server did not start in 10s"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
