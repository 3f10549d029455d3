"""The Cosmos DB stores against the local stand-in: what the contract suite cannot show.

The contract tests (tests/contract) run the same suite on SQLite, PostgreSQL and
Cosmos. These cover what only Cosmos needs, because it has no transaction across
partitions: a process that stops between the steps of an append (stored but not
numbered, a claim made but not finished, a command id reserved but nothing
stored) or of a view commit (committed but not applied, applied halfway), a
writer that applies an old commit late, and the relay's lease. Each "stopped
process" is a store instance whose remaining steps are never run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from integration_helpers import whole_log

from contract.helpers import request
from contract.test_view_store_contract import counted_batch, counting_registry
from cqrskit.errors import CqrskitError, Unavailable
from cqrskit.messages import CommandResult
from cqrskit.ports import Collection, UnitOfWork
from cqrskit.update_processor import ProjectionRunner

cosmos = pytest.importorskip("cqrskit.stores.cosmos", reason="install the cosmos extra")

from cqrskit.stores import cosmos_events, cosmos_sequencer, cosmos_views  # noqa: E402
from cqrskit.stores.cosmos import CosmosUrl  # noqa: E402
from cqrskit.stores.cosmos_events import CosmosEventStore  # noqa: E402
from cqrskit.stores.cosmos_journal import JournalEntry  # noqa: E402
from cqrskit.stores.cosmos_relay import CosmosRelayState  # noqa: E402
from cqrskit.stores.cosmos_views import CosmosViewStore  # noqa: E402


@pytest.fixture
async def url(cosmos_standin: Any) -> str:
    return str(cosmos_standin.new_url())


@pytest.fixture
async def opened() -> AsyncIterator[list[Any]]:
    stores: list[Any] = []
    yield stores
    for store in reversed(stores):
        await store.close()


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Others take over a stopped appender's work after tenths of a second, not seconds."""
    monkeypatch.setattr(cosmos_sequencer, "GRACE", 0.2)
    monkeypatch.setattr(cosmos_events, "SWEEP_SECONDS", 0.05)
    monkeypatch.setattr(cosmos_events, "TAKEOVER_SECONDS", 0.3)
    monkeypatch.setattr(cosmos_views, "_REDO_AFTER", 0.0)


async def event_store(url: str, opened: list[Any]) -> CosmosEventStore:
    store = await CosmosEventStore.open(url)
    opened.append(store)
    return store


async def view_store(url: str, opened: list[Any], collections: list[Collection]
                     ) -> CosmosViewStore:
    views = await CosmosViewStore.open(url)
    opened.append(views)
    await views.setup(collections)
    return views


# ---------------------------------------------------------------------- URLs


def test_urls_parse_with_defaults_and_never_carry_a_key() -> None:
    parsed = CosmosUrl.parse("cosmos://acct.documents.azure.com?database=prod")
    assert parsed == CosmosUrl("https://acct.documents.azure.com:443/", "prod", None, True)
    local = CosmosUrl.parse("cosmos://127.0.0.1:8081?database=d&tls=false&key_env=MY_KEY")
    assert local == CosmosUrl("http://127.0.0.1:8081/", "d", "MY_KEY", False)
    assert CosmosUrl.parse("cosmos://h").database == "cqrskit"
    for bad, words in (
        ("cosmos://h?key=c2VjcmV0", "key_env"),
        ("cosmos://user:c2VjcmV0@h", "no credentials"),
        ("cosmos://h?tls=maybe", "tls"),
        ("cosmos://h?database=a/b", "database name"),
        ("cosmos://h?key_env=1X", "key_env"),
        ("cosmos://h?nope=1", "unknown"),
        ("postgresql://h", "not a Cosmos DB URL"),
    ):
        with pytest.raises(CqrskitError, match=words) as raised:
            CosmosUrl.parse(bad)
        assert "c2VjcmV0" not in str(raised.value)


async def test_a_missing_key_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CQRSKIT_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(CqrskitError, match="CQRSKIT_TEST_NO_SUCH_KEY"):
        await CosmosEventStore.open("cosmos://127.0.0.1:1?tls=false&key_env=CQRSKIT_TEST_NO_SUCH_KEY")


async def test_an_account_that_does_not_answer_is_unavailable_soon(cosmos_standin: Any) -> None:
    with socket_bound() as port:
        started = time.monotonic()
        with pytest.raises(Unavailable, match="cannot be reached"):
            await CosmosEventStore.open(cosmos_standin.url("x").replace(
                str(cosmos_standin.port), str(port)
            ))
        assert time.monotonic() - started < 30


class socket_bound:
    """A port nobody listens on, held so no one else takes it during the test."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *args: object) -> None:
        self.sock.close()


# ------------------------------------------------------- appends and positions


async def test_commands_stored_but_never_numbered_are_numbered_by_a_follower(
    url: str, opened: list[Any], quick: None
) -> None:
    stopped = await event_store(url, opened)
    # It stores two commands' events, then stops before numbering them.
    for stream in ("x", "z"):
        written = await stopped._write(request(stream, 0, "Created", "Named"))
        assert isinstance(written, cosmos_events._Written)
    other = await event_store(url, opened)
    y = await other.append(request("y", 0, "Created"))
    assert y.position == 1
    assert [e.stream_id for e in await other.read_all(0, 10)] == ["y"]
    # Not visible before it has a position; the stream itself shows it unnumbered.
    assert [(e.version, e.position) for e in await other.read_stream("x")] == [(1, 0), (2, 0)]

    await other.wait_for_append(1, 5)  # a follower sweeps: the commands get positions
    log = await whole_log(other)
    assert [(e.stream_id, e.version, e.position) for e in log] == [
        ("y", 1, 1), ("x", 1, 2), ("x", 2, 3), ("z", 1, 4), ("z", 2, 5),
    ]
    x_command = log[1].metadata["command_id"]
    stored = await other.get_command(x_command)
    assert stored is not None and stored.result == CommandResult(x_command, "x", 2, 3)


async def test_followers_sweeping_at_once_number_each_command_once(
    url: str, opened: list[Any], quick: None
) -> None:
    stopped = await event_store(url, opened)
    entries = []
    for i in range(12):
        written = await stopped._write(request(f"s{i % 5}", 2 * (i // 5), "Created", "Named"))
        assert isinstance(written, cosmos_events._Written)
        entries.append(written.entry)
    await asyncio.sleep(0.25)  # past the grace its appender had
    followers = [await event_store(url, opened) for _ in range(3)]
    for _ in range(3):
        await asyncio.gather(*(f.sequencer.sweep() for f in followers))
    # A follower that read them as pending before they were numbered takes them over
    # late: the markers tell it they are numbered already.
    late = await followers[1].sequencer.sequence(entries[5:])
    log = await whole_log(followers[0])
    firsts = {(e.stream_id, e.metadata["command_id"]): e.position for e in log if e.version % 2}
    assert late == {e.key: firsts[e.key] for e in entries[5:]}
    assert [e.position for e in log] == list(range(1, 25))
    assert len({e.event_id for e in log}) == 24
    for i in range(5):
        stream = [e for e in log if e.stream_id == f"s{i}"]
        assert [e.version for e in stream] == list(range(1, len(stream) + 1))


async def test_a_claim_left_unfinished_is_finished_by_the_next_appender(
    url: str, opened: list[Any]
) -> None:
    stopped = await event_store(url, opened)
    written = await stopped._write(request("x", 0, "Created", "Named"))
    head = await stopped.sequencer.head()
    claim = stopped.sequencer._claim(head["n"] + 1, head["last"] + 1, [written.entry])
    await stopped.sequencer._create_claim(claim, [written.entry])  # ... and it stops here
    other = await event_store(url, opened)
    assert await other.last_position() == 0  # the claim's positions are not readable yet

    y = await other.append(request("y", 0, "Created"))
    assert y.position == 3
    log = await whole_log(other)
    assert [(e.stream_id, e.position) for e in log] == [("x", 1), ("x", 2), ("y", 3)]


async def test_a_stream_whose_earlier_command_is_pending_is_numbered_in_version_order(
    url: str, opened: list[Any], quick: None
) -> None:
    stopped = await event_store(url, opened)
    await stopped._write(request("x", 0, "Created"))  # stored, never numbered
    other = await event_store(url, opened)
    await other.append(request("w", 0, "Created"))
    later = await other.append(request("x", 1, "Renamed"))  # waits, then numbers v1 first
    log = await whole_log(other)
    assert [(e.stream_id, e.version) for e in log] == [("w", 1), ("x", 1), ("x", 2)]
    assert later.position == 3


async def test_a_command_id_reserved_by_a_stopped_appender_is_taken_over_and_fenced(
    url: str, opened: list[Any], quick: None
) -> None:
    stopped = await event_store(url, opened)
    # A create without an id: each attempt of the handler targets a new stream.
    first_try = request("s-first", 0, "Created", command_id="key-1", data={"n": 1})
    reservation = await stopped._reserve(first_try)
    assert isinstance(reservation, cosmos_events._Reservation)  # ... then it stalls

    other = await event_store(url, opened)
    retry = request("s-retry", 0, "Created", command_id="key-1", data={"n": 1})
    taken = await other.append(retry)
    assert (taken.stream_id, taken.replayed) == ("s-retry", False)

    # The stalled appender wakes up and writes its batch: it lands on the fence,
    # stores nothing, and answers what the command's one stored attempt answers.
    late = await stopped._store(first_try, reservation)
    assert late == CommandResult("key-1", "s-retry", 1, taken.position, replayed=True)
    assert await other.read_stream("s-first") == []
    log = await whole_log(other)
    assert [e.stream_id for e in log] == ["s-retry"]
    assert await other.append(retry) == CommandResult(
        "key-1", "s-retry", 1, taken.position, replayed=True
    )


async def test_a_command_stored_by_a_stopped_appender_is_answered_by_its_retry(
    url: str, opened: list[Any], quick: None
) -> None:
    stopped = await event_store(url, opened)
    command = request("rec-1", 0, "Created", command_id="key-2")
    await stopped._write(command)  # reserved and stored, then killed before numbering

    other = await event_store(url, opened)
    again = await other.append(command)
    assert (again.stream_id, again.version, again.position, again.replayed) == (
        "rec-1", 1, 1, True
    )
    assert [e.stream_id for e in await whole_log(other)] == ["rec-1"]
    stored = await other.get_command("key-2")
    assert stored is not None and stored.result.position == 1


async def test_a_command_whose_appender_died_before_numbering_replays_through_the_handler(
    url: str, opened: list[Any]
) -> None:
    """kill -9 between storing and numbering: the client re-sends with its key; the
    handler must find the command accepted, not judge it against its own event."""
    from cqrskit.command_handler import CommandHandler
    from cqrskit.domains import records
    from cqrskit.domains.records import InsertRecord
    from cqrskit.registry import Registry

    stopped = await event_store(url, opened)

    async def dies(*args: Any, **kwargs: Any) -> Any:
        raise Unavailable("killed after storing, before numbering")

    stopped.sequencer.sequence = dies  # type: ignore[method-assign]
    command = InsertRecord(id="rec-9", data={"a": 1})
    with pytest.raises(Unavailable):
        await CommandHandler(stopped, Registry([records.domain])).handle(
            command, command_id="key-9"
        )

    other = await event_store(url, opened)
    handler = CommandHandler(other, Registry([records.domain]))
    again = await handler.handle(command, command_id="key-9")
    assert (again.stream_id, again.version, again.position, again.replayed) == (
        "rec-9", 1, 1, True
    )
    assert [e.stream_id for e in await whole_log(other)] == ["rec-9"]


# ------------------------------------------------------------------- relay


async def test_one_relay_leads_at_a_time_and_a_standby_takes_over(
    url: str, opened: list[Any]
) -> None:
    one = CosmosRelayState(await event_store(url, opened), ttl=2, poll=0.05)
    two = CosmosRelayState(await event_store(url, opened), ttl=2, poll=0.05)
    order: list[str] = []

    async def lead(state: CosmosRelayState, name: str, hold: float) -> None:
        async with state.lead():
            order.append(f"{name} leads")
            await asyncio.sleep(hold)
            order.append(f"{name} done")

    first = asyncio.create_task(lead(one, "one", 0.5))
    await asyncio.sleep(0.2)
    second = asyncio.create_task(lead(two, "two", 0))
    await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert order == ["one leads", "one done", "two leads", "two done"]

    await one.save(7)
    await two.save(5)  # a deposed leader finishing late never moves it back
    assert (await one.position(), await two.position()) == (7, 7)


async def test_a_leader_whose_lease_was_taken_steps_down(url: str, opened: list[Any]) -> None:
    store = await event_store(url, opened)
    state = CosmosRelayState(store, ttl=0.6, poll=0.05)

    async def lead_forever() -> None:
        async with state.lead():
            await asyncio.sleep(30)

    leader = asyncio.create_task(lead_forever())
    await asyncio.sleep(0.1)
    # Another process took the lease (say this one was paused past its ttl).
    await store.log.upsert_item({"id": state.lease_id, "pk": "relay", "owner": "thief",
                                 "expires_at": time.time() + 60})
    with pytest.raises(Unavailable, match="lost its leader lease"):
        await asyncio.wait_for(leader, 5)


async def test_the_relay_carries_the_numbered_log_and_a_standby_takes_over(
    url: str, opened: list[Any]
) -> None:
    from cqrskit.relay import Relay

    one, two = await event_store(url, opened), await event_store(url, opened)
    stream = RecordingStream()
    first = Relay(one, stream, CosmosRelayState(one, ttl=1, poll=0.05), batch_size=7,
                  idle_wait=0.05)
    standby = Relay(two, stream, CosmosRelayState(two, ttl=1, poll=0.05), batch_size=7,
                    idle_wait=0.05)
    first_task = asyncio.create_task(first.run())
    await asyncio.sleep(0.2)
    standby_task = asyncio.create_task(standby.run())
    try:
        await asyncio.gather(*(one.append(request(f"s{i}", 0, "Created")) for i in range(20)))
        await wait_for(lambda: first.position == 20)
        assert first.leading and not standby.leading
        first_task.cancel()  # it stops (giving its lease back on the way out)
        await asyncio.gather(*(two.append(request(f"t{i}", 0, "Created")) for i in range(15)))
        await wait_for(lambda: standby.position == 35)
    finally:
        for task in (first_task, standby_task):
            task.cancel()
        await asyncio.gather(first_task, standby_task, return_exceptions=True)
    published = sorted({p for batch in stream.acknowledged for p in batch})
    assert published == list(range(1, 36))  # nothing skipped; copies are the broker's to drop


class RecordingStream:
    """A broker that acknowledges everything: the batches the relay published."""

    partitions = 1
    needs_relay = True

    def __init__(self) -> None:
        self.acknowledged: list[list[int]] = []

    async def publish(self, envelopes: Any) -> None:
        self.acknowledged.append([e.position for e in envelopes])


async def wait_for(done: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.02)


# -------------------------------------------------------------- view store


def counting_runner(views: CosmosViewStore) -> Callable[[], ProjectionRunner]:
    registry, projection = counting_registry()
    return lambda: ProjectionRunner(projection, registry, views)


async def applied(views: CosmosViewStore) -> dict[str, list[int]]:
    page = await views.find("counts", {}, limit=100)
    return {d["id"]: d["applied"] for d in page.items}


async def test_a_commit_whose_writer_stopped_before_applying_is_applied_once(
    url: str, opened: list[Any], quick: None
) -> None:
    _, projection = counting_registry()
    one = await view_store(url, opened, list(projection.collections))
    two = await view_store(url, opened, list(projection.collections))
    batch = counted_batch(12, streams=3)

    async def crash(entry: JournalEntry) -> None:
        raise RuntimeError("killed between the commit point and applying it")

    one._apply = crash  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="killed"):
        await counting_runner(one)().process(batch[:8])
    assert await applied(two) == {}

    # Committed is committed: the next unit of work, in any process, applies it first.
    assert await two.run(lambda uow: uow.checkpoint("counts", 0)) == 8
    assert await applied(two) == {
        f"s{k}": [e.position for e in batch[:8] if e.stream_id == f"s{k}"] for k in range(3)
    }
    # The stream redelivers the whole batch: the first 8 are recognised as done.
    runner = counting_runner(two)()
    await runner.process(batch)
    assert await applied(two) == {
        f"s{k}": [e.position for e in batch if e.stream_id == f"s{k}"] for k in range(3)
    }
    assert (await two.checkpoints())[("counts", 0)] == 12


async def test_a_commit_applied_halfway_is_completed_and_nothing_applies_twice(
    url: str, opened: list[Any], quick: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, projection = counting_registry()
    one = await view_store(url, opened, list(projection.collections))
    two = await view_store(url, opened, list(projection.collections))
    batch = counted_batch(30, streams=6)
    writes = 0
    real_put = cosmos_views.put_guarded

    async def dies_after_three_writes(*args: Any) -> None:
        nonlocal writes
        writes += 1
        if writes > 3:
            raise RuntimeError("killed while applying")
        await real_put(*args)

    monkeypatch.setattr(cosmos_views, "put_guarded", dies_after_three_writes)
    with pytest.raises(RuntimeError, match="killed"):
        await counting_runner(one)().process(batch)
    await asyncio.sleep(0.2)  # the writes already sent land
    assert 0 < len(await applied(two)) < 6  # some documents made it, not the checkpoint
    assert (await two.checkpoints()).get(("counts", 0), 0) == 0
    monkeypatch.setattr(cosmos_views, "put_guarded", real_put)

    await counting_runner(two)().process(batch)
    assert await applied(two) == {
        f"s{k}": [e.position for e in batch if e.stream_id == f"s{k}"] for k in range(6)
    }


async def test_a_late_writer_applying_an_old_commit_changes_nothing(
    url: str, opened: list[Any]
) -> None:
    views = await view_store(url, opened, [Collection("docs")])
    entries: list[JournalEntry] = []
    real_apply = views._apply

    async def recording(entry: JournalEntry) -> None:
        entries.append(entry)
        await real_apply(entry)

    views._apply = recording  # type: ignore[method-assign]

    def first(uow: UnitOfWork) -> None:
        uow.put("docs", "a", {"v": 1})
        uow.put("docs", "b", {"v": 1})
        uow.set_checkpoint("p", 0, 5)

    def second(uow: UnitOfWork) -> None:
        uow.put("docs", "a", {"v": 2})
        uow.delete("docs", "b")
        uow.set_checkpoint("p", 0, 9)

    await views.run(first)
    await views.run(second)
    # A writer that stalled inside commit 1 finally writes it: every document it
    # touches carries a later seq, so nothing changes and "b" stays deleted.
    await real_apply(entries[0])
    assert await views.get("docs", "a") == {"v": 2}
    assert await views.get("docs", "b") is None
    assert (await views.find("docs", {})).items == [{"v": 2}]
    assert await views.checkpoints() == {("p", 0): 9}


async def test_a_document_written_again_after_clear_in_the_same_unit_is_kept(
    url: str, opened: list[Any]
) -> None:
    views = await view_store(url, opened, [Collection("docs")])
    await views.run(lambda uow: [uow.put("docs", i, {"v": 1}) for i in ("a", "b", "c")])

    def rebuild(uow: UnitOfWork) -> None:
        uow.clear("docs")
        uow.put("docs", "b", {"v": 2})  # an existing document, written after the clear
        uow.delete("docs", "c")

    await views.run(rebuild)
    assert (await views.find("docs", {})).items == [{"v": 2}]
    assert await views.get("docs", "b") == {"v": 2}


async def test_a_unit_that_read_a_stale_document_is_reported(
    url: str, opened: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """With a consistency weaker than Strong, a process may read a replica that has not
    seen another process's write yet. Nothing can undo the commit then, but the guarded
    write notices and says what to do."""
    views = await view_store(url, opened, [Collection("docs")])
    await views.run(lambda uow: uow.put("docs", "x", {"n": 1}))
    real_commit = views._commit

    async def write_behind_its_back(*args: Any) -> Any:
        stored = await views.containers["docs"].read_item("x", partition_key="x")
        await views.containers["docs"].replace_item("x", {**stored, "doc": {"n": 5}})
        return await real_commit(*args)

    views._commit = write_behind_its_back  # type: ignore[method-assign]

    def increment(uow: UnitOfWork) -> None:
        doc = uow.get("docs", "x")
        assert doc is not None
        uow.put("docs", "x", {"n": doc["n"] + 1})

    await views.run(increment)
    assert "Strong consistency" in caplog.text
    assert await views.get("docs", "x") == {"n": 2}  # the update it missed is lost


async def test_a_large_commit_goes_through_journal_chunks(
    url: str, opened: list[Any], quick: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cosmos_views, "_INLINE_LIMIT", 2000)
    monkeypatch.setattr(cosmos_views, "_CHUNK_SIZE", 2000)
    one = await view_store(url, opened, [Collection("docs")])
    two = await view_store(url, opened, [Collection("docs")])

    async def crash(entry: JournalEntry) -> None:
        raise RuntimeError("killed before applying")

    one._apply = crash  # type: ignore[method-assign]

    def many(uow: UnitOfWork) -> None:
        for i in range(40):
            uow.put("docs", f"d{i:02d}", {"text": "x" * 200, "i": i})

    with pytest.raises(RuntimeError):
        await one.run(many)
    head = await two._head()
    assert len(head["chunks"]) >= 4 and head["entry"] is None
    await two.run(lambda uow: uow.put("docs", "after", {"i": -1}))
    page = await two.find("docs", {}, limit=100)
    assert len(page.items) == 41
    assert await two.get("docs", "d39") == {"text": "x" * 200, "i": 39}
    assert (await two._head())["chunks"] == []


async def test_documents_come_back_exactly_as_written(url: str, opened: list[Any]) -> None:
    views = await view_store(url, opened, [Collection("docs")])
    doc = {"big": 2**63 - 1, "whole": 1.0, "neg": -(2**60), "small": 3, "ratio": 2.5,
           "nested": {"list": [1.0, 2**55, "x"]}, "kind": "k"}
    await views.run(lambda uow: uow.put("docs", "exact", doc))
    stored = await views.get("docs", "exact")
    assert stored == doc
    assert stored is not None and type(stored["whole"]) is float
    assert type(stored["nested"]["list"][0]) is float
    found = await views.find("docs", {"kind": "k", "small": 3})
    assert found.items == [doc]


async def test_partition_leases_are_exclusive_expire_and_are_released(
    url: str, opened: list[Any]
) -> None:
    views = await view_store(url, opened, [])
    other = await view_store(url, opened, [])
    assert await views.heartbeat("a", 10) == ["a"]
    assert await other.heartbeat("b", 10) == ["a", "b"]
    assert await views.claim_partitions("a", 2, 4, 10) == {0, 1}
    assert await other.claim_partitions("b", 4, 4, 10) == {2, 3}  # 0 and 1 are a's
    assert await views.leases() == {0: "a", 1: "a", 2: "b", 3: "b"}
    # Both renew at once: each keeps its own, neither gets the other's.
    mine, theirs = await asyncio.gather(
        views.claim_partitions("a", 2, 4, 10), other.claim_partitions("b", 2, 4, 10)
    )
    assert (mine, theirs) == ({0, 1}, {2, 3})
    assert await views.claim_partitions("a", 1, 4, 10) == {0}  # gives 1 up
    assert await other.claim_partitions("b", 3, 4, 0.3) == {1, 2, 3}
    await asyncio.sleep(1.5)  # b's leases expire (the server clock has whole seconds)
    assert await views.claim_partitions("a", 4, 4, 10) == {0, 1, 2, 3}
    await views.release_partitions("a")
    assert await other.leases() == {}
    assert await other.heartbeat("b", 10) == ["b"]
