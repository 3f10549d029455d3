"""The whole runtime on each backend: commands in, views out, equal to a replay of the log."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from pydantic import ValidationError

from cqrskit.bootstrap import open_runtime
from cqrskit.command_handler import CommandHandler
from cqrskit.config import Settings
from cqrskit.domains import records
from cqrskit.domains.records import (
    DeleteRecord,
    GetRecord,
    GetStatistics,
    InsertRecord,
    ListRecords,
    UpdateRecord,
)
from cqrskit.errors import InvalidRequest
from cqrskit.messages import CommandResult, ConsistencyToken
from cqrskit.registry import Registry

from .conftest import Backend
from .helpers import (
    records_view,
    replay_records,
    replay_statistics,
    statistics_view,
    whole_log,
)


async def test_views_equal_a_replay_of_the_log_and_reads_see_their_writes(
    backend: Backend, tmp_path: Path
) -> None:
    settings = Settings(
        data_dir=tmp_path, command_db=backend.command_url, query_db=backend.query_url,
        stream="embedded", retry_backoff=0.01, consistency_timeout=10,
    )
    runtime = await open_runtime(settings, Registry([records.domain]))
    try:
        runtime.processor.start()
        handle, query = runtime.commands.handle, runtime.queries.handle
        rng = random.Random(7)
        ids = [f"rec-{i}" for i in range(60)]
        results: list[CommandResult] = list(await asyncio.gather(
            *(handle(InsertRecord(id=i, data={"n": 0, "color": rng.choice("rgb")}),
                     command_id=f"ins-{i}") for i in ids)
        ))
        results += await asyncio.gather(
            *(handle(UpdateRecord(id=i, data={"n": k, "color": rng.choice("rgb")}))
              for k in (1, 2) for i in ids if rng.random() < 0.7),
            *(handle(InsertRecord(data={"n": -1, "color": "g"})) for _ in range(15)),
        )
        results += await asyncio.gather(*(handle(DeleteRecord(id=i)) for i in ids[::6]))

        # Read your own writes: each answer waited for its command's event.
        for k in range(5):
            written = await handle(UpdateRecord(id="rec-1", data={"n": 100 + k}))
            answer = await query(GetRecord(id="rec-1"), written.consistency_token)
            assert answer.fresh is True
            assert (answer.result.version, answer.result.data) == (
                written.version, {"n": 100 + k}
            )
            results.append(written)

        last = max(results, key=lambda r: r.position)
        token = ConsistencyToken.decode(last.consistency_token)
        assert await runtime.checkpoints.wait(tuple(runtime.registry.projections), token, 10)
        log = await whole_log(runtime.store)
        assert [e.position for e in log] == list(range(1, len(results) + 1))
        assert await records_view(runtime.views) == replay_records(log)
        assert await statistics_view(runtime.views) == replay_statistics(log)

        stats = await query(GetStatistics(), last.consistency_token)
        assert stats.fresh is True and stats.result.total == len(log)
        reds = await query(ListRecords(filter=["color:r"], limit=500))
        assert sorted(r.id for r in reds.result.items) == sorted(
            i for i, d in replay_records(log).items() if d["data"].get("color") == "r"
        )
        status = await runtime.queries.command_status("ins-rec-5")
        assert status["status"] == "projected" and status["version"] == 1
    finally:
        await runtime.close()


async def test_a_nul_character_in_command_data_is_stored_or_refused_as_bad_input(
    backend: Backend,
) -> None:
    store = await backend.event_store()
    handler = CommandHandler(store, Registry([records.domain]))
    data = {"text": "a\x00b", "key\x00": 1}
    try:
        command = InsertRecord(id="nul", data=data)
    except ValidationError:
        return  # refused before the handler runs (422): fine on every backend
    try:
        await handler.handle(command)
    except InvalidRequest:
        assert await store.last_position() == 0  # refused as bad input (400), nothing written
        return
    [event] = await store.read_stream("nul")
    assert event.data == {"data": data}
