"""The bank example runs on the real embedded runtime and keeps its rule."""

import sys
from pathlib import Path

import pytest

from cqrskit.bootstrap import open_runtime
from cqrskit.config import Settings
from cqrskit.errors import CommandRejected
from cqrskit.registry import Registry

sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
import bank


async def test_accounts_cannot_be_overdrawn(tmp_path: Path) -> None:
    runtime = await open_runtime(Settings(data_dir=tmp_path), Registry([bank.domain]))
    runtime.processor.start()
    try:
        opened = await runtime.commands.handle(bank.OpenAccount(owner="ada"))
        await runtime.commands.handle(bank.Deposit(id=opened.stream_id, amount=500))
        last = await runtime.commands.handle(bank.Withdraw(id=opened.stream_id, amount=200))
        with pytest.raises(CommandRejected, match="holds 300"):
            await runtime.commands.handle(bank.Withdraw(id=opened.stream_id, amount=301))

        answer = await runtime.queries.handle(
            bank.GetAccount(id=opened.stream_id), last.consistency_token
        )
        assert answer.fresh is True
        assert answer.result.balance == 300
        owned = await runtime.queries.handle(bank.AccountsOf(owner="ada"))
        assert [a.id for a in owned.result] == [opened.stream_id]
        assert len(await runtime.store.read_stream(opened.stream_id)) == 3
    finally:
        await runtime.close()
