"""What the broker-backed streams (NATS, Kafka) share: reading a stream URL's query
parameters, and an event's form on the wire (its envelope as JSON)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

import orjson

from cqrskit.errors import CqrskitError
from cqrskit.messages import Envelope


def parse_query(
    url: str, query: str, readers: Mapping[str, Callable[[str], Any]], broker: str
) -> dict[str, Any]:
    """The URL's query parameters, each read by its reader; unknown or bad ones refused."""
    params = dict(parse_qsl(query))
    unknown = set(params) - set(readers)
    if unknown:
        raise CqrskitError(f"unknown {broker} URL parameters: {sorted(unknown)}")
    try:
        return {key: readers[key](value) for key, value in params.items()}
    except ValueError as error:
        raise CqrskitError(f"bad {broker} URL {url!r}: {error}") from None


def check_partition(partition: int, partitions: int) -> None:
    if not 0 <= partition < partitions:
        raise CqrskitError(f"partition {partition} is not in 0..{partitions - 1}")


def encode(envelope: Envelope) -> bytes:
    return orjson.dumps(envelope.to_dict())


def decode(data: bytes) -> Envelope:
    return Envelope.from_dict(orjson.loads(data))
