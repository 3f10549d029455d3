"""A worked example: bank accounts that cannot be overdrawn.

Serve it next to the built-in domain:

    PYTHONPATH=examples CQRSKIT_DOMAINS=cqrskit.domains.records,bank cqrskit serve

Its routes are under /api/bank: POST /api/bank/command/open, .../deposit,
.../withdraw, GET /api/bank/query/account?id=, GET /api/bank/query/owned?owner=.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, Field

from cqrskit.aggregate import Aggregate, decides, evolves
from cqrskit.errors import CommandRejected, NotFound
from cqrskit.messages import Command, Envelope, Event, Identifier
from cqrskit.ports import Collection, ViewReader, ViewWriter
from cqrskit.registry import Domain, Projection, Query, projects

domain = Domain("bank")


class OpenAccount(Command):
    """Open an account for `owner`."""

    name: ClassVar[str] = "open"
    creates: ClassVar[bool] = True
    id: Identifier | None = None
    owner: str = Field(min_length=1, max_length=200)


class Deposit(Command):
    """Put money in (amount in cents)."""

    name: ClassVar[str] = "deposit"
    id: Identifier
    amount: int = Field(gt=0, le=10**12)


class Withdraw(Command):
    """Take money out (amount in cents); refused if the balance would go negative."""

    name: ClassVar[str] = "withdraw"
    id: Identifier
    amount: int = Field(gt=0, le=10**12)


class AccountOpened(Event):
    owner: str


class MoneyDeposited(Event):
    amount: int


class MoneyWithdrawn(Event):
    amount: int


@domain.aggregate
class Account(Aggregate):
    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.balance = 0

    @decides(OpenAccount)
    def open(self, command: OpenAccount) -> list[Event]:
        if self.version:
            raise CommandRejected(f"account {self.id!r} is already open")
        return [AccountOpened(owner=command.owner)]

    @decides(Deposit)
    def deposit(self, command: Deposit) -> list[Event]:
        self._require_open()
        return [MoneyDeposited(amount=command.amount)]

    @decides(Withdraw)
    def withdraw(self, command: Withdraw) -> list[Event]:
        self._require_open()
        if command.amount > self.balance:
            raise CommandRejected(
                f"account {self.id!r} holds {self.balance}, cannot withdraw {command.amount}"
            )
        return [MoneyWithdrawn(amount=command.amount)]

    def _require_open(self) -> None:
        if not self.version:
            raise NotFound(f"no account with id {self.id!r}")

    @evolves(MoneyDeposited)
    def _deposited(self, event: MoneyDeposited) -> None:
        self.balance += event.amount

    @evolves(MoneyWithdrawn)
    def _withdrawn(self, event: MoneyWithdrawn) -> None:
        self.balance -= event.amount


@domain.projection
class Balances(Projection):
    name = "balances"
    collections = (Collection("accounts", indexed=("owner",)),)

    @projects(AccountOpened)
    def opened(self, event: AccountOpened, envelope: Envelope, views: ViewWriter) -> None:
        views.put("accounts", envelope.stream_id,
                  {"id": envelope.stream_id, "owner": event.owner, "balance": 0})

    @projects(MoneyDeposited)
    def deposited(self, event: MoneyDeposited, envelope: Envelope, views: ViewWriter) -> None:
        self._add(envelope.stream_id, event.amount, views)

    @projects(MoneyWithdrawn)
    def withdrawn(self, event: MoneyWithdrawn, envelope: Envelope, views: ViewWriter) -> None:
        self._add(envelope.stream_id, -event.amount, views)

    def _add(self, account_id: str, amount: int, views: ViewWriter) -> None:
        doc = views.get("accounts", account_id)
        if doc is None:
            raise NotFound(f"account {account_id!r} is not in the view")
        views.put("accounts", account_id, {**doc, "balance": doc["balance"] + amount})


class AccountView(BaseModel):
    id: str
    owner: str
    balance: int


@domain.query
class GetAccount(Query):
    """One account and its balance."""

    name: ClassVar[str] = "account"
    reads: ClassVar[tuple[str, ...]] = ("balances",)
    result: ClassVar[Any] = AccountView
    id: Identifier

    async def run(self, views: ViewReader) -> AccountView:
        doc = await views.get("accounts", self.id)
        if doc is None:
            raise NotFound(f"no account with id {self.id!r}")
        return AccountView.model_validate(doc)


@domain.query
class AccountsOf(Query):
    """The accounts of one owner."""

    name: ClassVar[str] = "owned"
    reads: ClassVar[tuple[str, ...]] = ("balances",)
    result: ClassVar[Any] = list[AccountView]
    owner: str = Field(min_length=1, max_length=200)

    async def run(self, views: ViewReader) -> list[AccountView]:
        page = await views.find("accounts", {"owner": self.owner}, limit=100)
        return [AccountView.model_validate(d) for d in page.items]
