"""The servers the distributed workloads need (PostgreSQL, NATS JetStream): where they
are, unique schemas and streams per run, and cleaning them up afterwards."""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import nats
import psycopg

POSTGRES_DSN = os.environ.get("CQRSKIT_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
NATS_SERVER = os.environ.get("CQRSKIT_BENCH_NATS", "nats://127.0.0.1:4222")


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _tag() -> str:
    return uuid.uuid4().hex[:10]


def drop_schemas(*schemas: str) -> None:
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '10s'")
        for schema in schemas:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@contextlib.contextmanager
def postgres_schemas(count: int, prefix: str = "cqrskit_bench") -> Iterator[list[str]]:
    """`count` store URLs, each in a schema of its own, dropped at the end."""
    schemas = [f"{prefix}_{_tag()}" for _ in range(count)]
    try:
        yield [f"{POSTGRES_DSN}?schema={schema}" for schema in schemas]
    finally:
        drop_schemas(*schemas)


@dataclass(frozen=True, slots=True)
class NatsStreamName:
    stream: str
    subject: str

    def url(self, partitions: int) -> str:
        return (f"{NATS_SERVER}?stream={self.stream}&subject={self.subject}"
                f"&partitions={partitions}")


async def delete_stream(name: str) -> None:
    with contextlib.suppress(Exception):
        client = await nats.connect(NATS_SERVER, allow_reconnect=False, max_reconnect_attempts=1)
        try:
            await client.jetstream().delete_stream(name)
        finally:
            await client.close()


@contextlib.asynccontextmanager
async def nats_stream() -> AsyncIterator[NatsStreamName]:
    """A JetStream stream name and subject no other run uses; the stream is deleted at the end."""
    tag = _tag()
    name = NatsStreamName(f"CQRSKIT_BENCH_{tag}", f"cqrskit_bench_{tag}.events")
    try:
        yield name
    finally:
        await delete_stream(name.stream)
