"""Fixtures: runtimes on real SQLite files in tmp_path, and the ledger test domain."""

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from integration_helpers import Ledger, OpenRuntime, make_ledger

from cqrskit.bootstrap import Runtime, open_runtime
from cqrskit.config import Settings
from cqrskit.domains import records
from cqrskit.registry import Registry


@pytest.fixture
async def open_rt(tmp_path: Path) -> AsyncIterator[OpenRuntime]:
    """Open runtimes (default: the records domain, files in tmp_path); all closed at the end.

    Two runtimes opened on the same data_dir share the SQLite files, like two processes.
    """
    opened: list[Runtime] = []

    async def factory(
        registry: Registry | None = None, *, data_dir: Path | None = None, **settings: Any
    ) -> Runtime:
        directory = data_dir or tmp_path
        values: dict[str, Any] = {
            "data_dir": directory,
            "command_db": f"sqlite:///{directory / 'command.db'}",
            "query_db": f"sqlite:///{directory / 'query.db'}",
            "stream": "embedded",
            "retry_backoff": 0.01,
            "consistency_timeout": 5,
            **settings,
        }
        runtime = await open_runtime(Settings(**values), registry or Registry([records.domain]))
        opened.append(runtime)
        return runtime

    yield factory
    for runtime in reversed(opened):
        await runtime.close()


@pytest.fixture
async def runtime(open_rt: OpenRuntime) -> Runtime:
    """The records domain on fresh files; the update processor is not started."""
    return await open_rt()


@pytest.fixture
def ledger() -> Ledger:
    """A fresh test domain; its projection fails on fail=True events while broken."""
    return make_ledger()
