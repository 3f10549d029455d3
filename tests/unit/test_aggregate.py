"""Aggregates: @decides/@evolves dispatch, version counting, and the records rules."""

from typing import ClassVar

import pytest
from pydantic import ValidationError

from cqrskit.aggregate import Aggregate, decides, evolves
from cqrskit.domains.records import (
    DeleteRecord,
    InsertRecord,
    Record,
    RecordDeleted,
    RecordInserted,
    RecordUpdated,
    UpdateRecord,
)
from cqrskit.errors import CommandRejected, CqrskitError, NotFound
from cqrskit.messages import Command, Event


class Open(Command):
    name: ClassVar[str] = "open"
    creates: ClassVar[bool] = True
    id: str | None = None
    owner: str


class Deposit(Command):
    name: ClassVar[str] = "deposit"
    id: str
    amount: int


class Close(Command):
    name: ClassVar[str] = "close"
    id: str


class Opened(Event):
    owner: str


class Deposited(Event):
    amount: int


class Noted(Event):
    """Decided but not evolved: it must still count as a version."""

    text: str


class Account(Aggregate):
    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.owner: str | None = None
        self.balance = 0

    @decides(Open)
    def open(self, command: Open) -> list[Event]:
        if self.version:
            raise CommandRejected("already open")
        return [Opened(owner=command.owner)]

    @decides(Deposit)
    def deposit(self, command: Deposit) -> list[Event]:
        if command.amount <= 0:
            raise CommandRejected("amount must be positive")
        return [Deposited(amount=command.amount), Noted(text=f"+{command.amount}")]

    @evolves(Opened)
    def opened(self, event: Opened) -> None:
        self.owner = event.owner

    @evolves(Deposited)
    def deposited(self, event: Deposited) -> None:
        self.balance += event.amount


class SavingsAccount(Account):
    stream_type = "savings"


def test_stream_type_defaults_to_the_lowercased_class_name() -> None:
    assert Account.stream_type == "account"
    assert SavingsAccount.stream_type == "savings"


def test_commands_and_events_are_discovered_from_the_marks() -> None:
    assert set(Account.command_types()) == {Open, Deposit}
    assert set(Account.event_types()) == {Opened, Deposited}
    # A subclass inherits its parent's deciders and evolvers.
    assert set(SavingsAccount.command_types()) == {Open, Deposit}
    assert set(SavingsAccount.event_types()) == {Opened, Deposited}


def test_decide_dispatches_on_the_command_type_and_does_not_change_state() -> None:
    account = Account("a-1")
    events = account.decide(Open(owner="ada"))
    assert events == [Opened(owner="ada")]
    assert (account.version, account.owner) == (0, None)

    for event in events:
        account.evolve(event)
    events = account.decide(Deposit(id="a-1", amount=5))
    assert events == [Deposited(amount=5), Noted(text="+5")]
    assert (account.version, account.balance) == (1, 0)


def test_evolve_counts_every_event_even_without_an_evolver() -> None:
    account = Account("a-1")
    account.evolve(Opened(owner="ada"))
    account.evolve(Deposited(amount=5))
    account.evolve(Noted(text="+5"))
    account.evolve(Deposited(amount=7))
    assert account.version == 4
    assert account.owner == "ada"
    assert account.balance == 12


def test_decide_on_an_unhandled_command_raises() -> None:
    with pytest.raises(CqrskitError, match="Account does not handle Close"):
        Account("a-1").decide(Close(id="a-1"))


def test_business_rules_raise_from_decide() -> None:
    account = Account("a-1")
    account.evolve(Opened(owner="ada"))
    with pytest.raises(CommandRejected, match="already open"):
        account.decide(Open(owner="bob"))
    with pytest.raises(CommandRejected, match="positive"):
        account.decide(Deposit(id="a-1", amount=0))


def test_evolve_stored_validates_dict_data_into_the_event_model() -> None:
    account = Account("a-1")
    account.evolve_stored("Opened", {"owner": "ada"})
    account.evolve_stored("Deposited", {"amount": 5})
    account.evolve_stored("Noted", {"text": "not evolved"})
    account.evolve_stored("SomethingFromTheFuture", {"whatever": 1})
    assert (account.version, account.owner, account.balance) == (4, "ada", 5)


def test_evolve_stored_rejects_data_that_does_not_match_the_event() -> None:
    account = Account("a-1")
    with pytest.raises(ValidationError):
        account.evolve_stored("Deposited", {"amount": "a lot"})
    assert account.version == 0


# ------------------------------------------------------------ records rules


def _record(*events: Event) -> Record:
    record = Record("r-1")
    for event in events:
        record.evolve(event)
    return record


def test_record_insert_on_a_new_stream_is_accepted() -> None:
    assert _record().decide(InsertRecord(id="r-1", data={"a": 1})) == [
        RecordInserted(data={"a": 1})
    ]


@pytest.mark.parametrize(
    "history",
    [
        [RecordInserted(data={})],
        [RecordInserted(data={}), RecordUpdated(data={"a": 1})],
        [RecordInserted(data={}), RecordDeleted()],
    ],
    ids=["inserted", "updated", "deleted"],
)
def test_record_insert_twice_is_rejected(history: list[Event]) -> None:
    with pytest.raises(CommandRejected, match="already exists"):
        _record(*history).decide(InsertRecord(id="r-1", data={}))


@pytest.mark.parametrize(
    "command", [UpdateRecord(id="r-1", data={"a": 1}), DeleteRecord(id="r-1")],
    ids=["update", "delete"],
)
def test_record_update_or_delete_of_a_missing_record_is_not_found(command: Command) -> None:
    with pytest.raises(NotFound, match="no record"):
        _record().decide(command)


@pytest.mark.parametrize(
    "command", [UpdateRecord(id="r-1", data={"a": 1}), DeleteRecord(id="r-1")],
    ids=["update", "delete"],
)
def test_record_update_or_delete_of_a_deleted_record_is_not_found(command: Command) -> None:
    record = _record(RecordInserted(data={}), RecordDeleted())
    with pytest.raises(NotFound, match="was deleted"):
        record.decide(command)


def test_record_update_and_delete_of_a_live_record() -> None:
    record = _record(RecordInserted(data={"a": 1}))
    assert record.decide(UpdateRecord(id="r-1", data={"a": 2})) == [RecordUpdated(data={"a": 2})]
    assert record.decide(DeleteRecord(id="r-1")) == [RecordDeleted()]
    assert record.version == 1 and not record.deleted

