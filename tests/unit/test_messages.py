"""Consistency tokens, partitioning, command targets, results and envelopes."""

from typing import ClassVar

import pytest

from cqrskit.command_handler import AggregateCache, command_hash
from cqrskit.domains.records import DeleteRecord, InsertRecord, Record, UpdateRecord
from cqrskit.messages import (
    Command,
    CommandResult,
    ConsistencyToken,
    Envelope,
    Event,
    partition_of,
    stream_hash,
)
from cqrskit.update_processor import RetryPolicy


@pytest.mark.parametrize(
    ("position", "hashed"), [(0, 0), (1, 1), (42, 0xDEADBEEF), (2**53, 0xFFFFFFFF)]
)
def test_consistency_token_round_trip(position: int, hashed: int) -> None:
    token = ConsistencyToken(position, hashed)
    encoded = token.encode()
    assert ConsistencyToken.decode(encoded) == token
    assert encoded == f"{position}.{hashed:08x}"


@pytest.mark.parametrize(
    "garbage",
    ["", "abc", "12", "1.2.3", "x.0000000a", "5.zz", "-1.0000000a", ".", "1.", ".ff"],
)
def test_consistency_token_rejects_garbage(garbage: str) -> None:
    with pytest.raises(ValueError, match="not a consistency token"):
        ConsistencyToken.decode(garbage)


def test_consistency_token_for_event_carries_the_stream_hash() -> None:
    token = ConsistencyToken.for_event("abc", 17)
    assert token == ConsistencyToken(17, 891568578)
    assert token.partition(4) == partition_of("abc", 4) == 2
    assert token.partition(1) == 0


def test_partition_of_is_stable_and_in_range() -> None:
    # crc32 values: the same in every process, interpreter and language.
    assert stream_hash("abc") == 891568578
    assert stream_hash("record-1") == 952624784
    assert partition_of("abc", 4) == 2
    assert partition_of("record-1", 7) == 952624784 % 7
    ids = [f"stream-{i}" for i in range(200)]
    for partitions in (1, 3, 16):
        first = [partition_of(i, partitions) for i in ids]
        assert first == [partition_of(i, partitions) for i in ids]
        assert set(first) == set(range(partitions))


def test_command_target_id_and_version() -> None:
    assert InsertRecord(data={}).target_id() is None
    assert InsertRecord(id="r-1", data={}).target_id() == "r-1"
    assert InsertRecord(id="r-1", data={}).target_version() is None
    assert UpdateRecord(id="r-1", data={}).target_version() is None
    assert UpdateRecord(id="r-1", data={}, expected_version=3).target_version() == 3
    assert DeleteRecord(id="r-1", expected_version=1).target_version() == 1


def test_command_target_id_follows_aggregate_id_field() -> None:
    class Transfer(Command):
        name: ClassVar[str] = "transfer"
        aggregate_id_field: ClassVar[str] = "account"
        account: int
        id: str = "not-the-target"

    assert Transfer(account=12).target_id() == "12"
    assert Transfer(account=12).target_version() is None


def test_event_type_name_defaults_to_the_class_name() -> None:
    class Happened(Event):
        pass

    class Renamed(Event):
        type_name: ClassVar[str] = "renamed.v1"

    assert Happened.type_name == "Happened"
    assert Renamed.type_name == "renamed.v1"
    assert Happened.schema_version == 1


def test_command_result_token_and_dict() -> None:
    result = CommandResult("c-1", "abc", version=3, position=17)
    assert ConsistencyToken.decode(result.consistency_token) == ConsistencyToken(17, 891568578)
    assert result.to_dict() == {
        "id": "abc", "command_id": "c-1", "version": 3,
        "consistency_token": result.consistency_token,
    }
    assert result.replayed is False


def test_envelope_dict_round_trip() -> None:
    envelope = Envelope(
        event_id="e", stream_id="s", stream_type="t", version=2, position=9, type="X",
        schema_version=1, data={"a": [1, 2]}, metadata={"command_id": "c"},
        recorded_at="2024-01-01T00:00:00+00:00",
    )
    assert Envelope.from_dict(envelope.to_dict()) == envelope


def test_command_hash_tells_a_retry_from_a_different_command() -> None:
    one = InsertRecord(id="r-1", data={"a": 1, "b": 2})
    assert command_hash(one) == command_hash(InsertRecord(id="r-1", data={"b": 2, "a": 1}))
    assert command_hash(one) != command_hash(InsertRecord(id="r-1", data={"a": 2, "b": 2}))
    assert command_hash(one) != command_hash(InsertRecord(id="r-2", data={"a": 1, "b": 2}))
    assert command_hash(UpdateRecord(id="r", data={})) != command_hash(
        UpdateRecord(id="r", data={}, expected_version=1)
    )

    class Archive(Command):
        name: ClassVar[str] = "archive"
        id: str

    class Restore(Command):
        name: ClassVar[str] = "restore"
        id: str

    # Same fields, different command: the name is part of the digest.
    assert command_hash(Archive(id="r")) != command_hash(Restore(id="r"))


def test_aggregate_cache_evicts_least_recently_used() -> None:
    cache = AggregateCache(2)
    a, b, c = Record("a"), Record("b"), Record("c")
    cache.put(a, "a")
    cache.put(b, "b")
    assert cache.get("a") is a  # a is now the most recently used
    cache.put(c, "c")
    assert cache.get("b") is None
    assert cache.get("a") is a and cache.get("c") is c
    cache.evict("a")
    assert cache.get("a") is None
    disabled = AggregateCache(0)
    disabled.put(a, "a")
    assert disabled.get("a") is None


def test_retry_policy_backs_off_exponentially() -> None:
    policy = RetryPolicy(attempts=4, backoff_seconds=0.5)
    assert [policy.delay(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
