"""Commands, events, envelopes and consistency tokens: the messages every part exchanges."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar

import orjson
import uuid_utils
from pydantic import AfterValidator, BaseModel, ConfigDict, JsonValue, StringConstraints

# Ids travel in URLs, SQL parameters, broker subjects and document keys; one safe
# alphabet for all of them means no layer ever has to escape an id.
IDENTIFIER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
Identifier = Annotated[str, StringConstraints(pattern=IDENTIFIER_PATTERN)]


# A \u0000 escape not itself escaped (preceded by an even number of backslashes).
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def _storable(value: dict[str, JsonValue]) -> dict[str, JsonValue]:
    # JSON that parses is not always JSON every store can keep: integers beyond 64
    # bits, lone surrogates and NUL characters (PostgreSQL refuses them) are
    # refused here, as a 422, not in the store as a 500.
    try:
        encoded = orjson.dumps(value)
    except orjson.JSONEncodeError as error:
        raise ValueError(f"cannot be stored as JSON: {error}") from None
    if b"\\u0000" in encoded and _NUL_ESCAPE.search(encoded):
        raise ValueError("cannot be stored as JSON: it contains a NUL character (\\u0000)")
    return value


JsonObject = Annotated[dict[str, JsonValue], AfterValidator(_storable)]
"""A JSON object from a client, checked to be storable as it is."""


def new_id() -> str:
    """A time-ordered UUID (v7) as text: unique, and sorts by creation time."""
    return str(uuid_utils.uuid7())


def utc_now() -> datetime:
    return datetime.now(UTC)


class Command(BaseModel):
    """A request to change one aggregate.

    `aggregate_id_field` names the field that holds the aggregate's id. A command
    with `creates = True` may start a new stream; when its id field is empty the
    handler assigns a new id.
    """

    # NaN and infinities are not JSON; they would be stored as null.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: ClassVar[str]
    aggregate_id_field: ClassVar[str] = "id"
    creates: ClassVar[bool] = False

    def target_id(self) -> str | None:
        value = self.__dict__.get(self.aggregate_id_field)
        return None if value is None else str(value)

    def target_version(self) -> int | None:
        """The version the caller expects the aggregate at, if the command has such a field."""
        value = self.__dict__.get("expected_version")
        return None if value is None else int(value)


class Event(BaseModel):
    """Something that happened to an aggregate. `type_name` is its stored name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type_name: ClassVar[str]
    schema_version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "type_name" not in cls.__dict__:
            cls.type_name = cls.__name__


@dataclass(slots=True)
class NewEvent:
    """An event decided by an aggregate, before the store gives it a position."""

    type: str
    data: dict[str, Any]
    schema_version: int = 1
    event_id: str = field(default_factory=new_id)


@dataclass(slots=True)
class Envelope:
    """A stored event with everything needed to route, order and trace it.

    Not frozen: a frozen dataclass's __init__ costs several times more, and
    envelopes are built by the hundred thousand when a projection is rebuilt.
    Treat it as immutable all the same.
    """

    event_id: str
    stream_id: str
    stream_type: str
    version: int
    position: int
    type: str
    schema_version: int
    data: dict[str, Any]
    metadata: dict[str, Any]
    recorded_at: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "stream_id": self.stream_id,
            "stream_type": self.stream_type,
            "version": self.version,
            "position": self.position,
            "type": self.type,
            "schema_version": self.schema_version,
            "data": self.data,
            "metadata": self.metadata,
            "recorded_at": self.recorded_at,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Envelope:
        return cls(
            event_id=d["event_id"],
            stream_id=d["stream_id"],
            stream_type=d["stream_type"],
            version=int(d["version"]),
            position=int(d["position"]),
            type=d["type"],
            schema_version=int(d["schema_version"]),
            data=d["data"],
            metadata=d["metadata"],
            recorded_at=d["recorded_at"],
        )


def stream_hash(stream_id: str) -> int:
    """A stable 32-bit hash of a stream id (the same in every process and language)."""
    return zlib.crc32(stream_id.encode())


def partition_of(stream_id: str, partitions: int) -> int:
    return stream_hash(stream_id) % partitions


@dataclass(slots=True, frozen=True)
class ConsistencyToken:
    """Where a command's last event sits in the log, so a reader can wait for it.

    It carries the stream's hash as well as the position: a partitioned update
    processor keeps one checkpoint per partition, and the hash says which one.
    """

    position: int
    stream_hash: int

    def encode(self) -> str:
        return f"{self.position}.{self.stream_hash:08x}"

    @classmethod
    def decode(cls, token: str) -> ConsistencyToken:
        try:
            position, hashed = token.split(".")
            decoded = cls(int(position), int(hashed, 16))
        except ValueError:
            raise ValueError(f"not a consistency token: {token!r}") from None
        if decoded.position < 0:
            raise ValueError(f"not a consistency token: {token!r}")
        return decoded

    @classmethod
    def for_event(cls, stream_id: str, position: int) -> ConsistencyToken:
        return cls(position, stream_hash(stream_id))

    def partition(self, partitions: int) -> int:
        return self.stream_hash % partitions


@dataclass(slots=True, frozen=True)
class CommandResult:
    """What an accepted command answers: enough to read one's own write."""

    command_id: str
    stream_id: str
    version: int
    position: int
    # True when the command id was seen before and this is the first answer again.
    replayed: bool = False

    @property
    def consistency_token(self) -> str:
        return ConsistencyToken.for_event(self.stream_id, self.position).encode()

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.stream_id,
            "command_id": self.command_id,
            "version": self.version,
            "consistency_token": self.consistency_token,
        }
