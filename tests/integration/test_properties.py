"""Property: any sequence of commands on any aggregates leaves the views equal to a
replay of the log, and the log holds exactly the accepted commands' events.

Hypothesis draws command sequences over a few record ids (inserts, updates,
deletes, some with an expected version, some with an Idempotency-Key sent
twice); each example runs on fresh SQLite files through the command handler and
the update processor, refusals included.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cqrskit.bootstrap import open_runtime
from cqrskit.config import Settings
from cqrskit.domains import records
from cqrskit.domains.records import DeleteRecord, InsertRecord, UpdateRecord
from cqrskit.errors import CqrskitError
from cqrskit.messages import Command
from cqrskit.registry import Registry
from cqrskit.update_processor import ProjectionRunner
from replays import records_view, replay_records, replay_statistics, statistics_view, whole_log

IDS = ("a", "b", "c")
# Text JSON can store everywhere: no NUL, no lone surrogates (refused with a 422).
chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(chars, max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(chars, max_size=5), children, max_size=3),
    max_leaves=6,
)
data = st.dictionaries(st.text(chars, min_size=1, max_size=6), json_values, max_size=4)
versions = st.none() | st.integers(1, 4)

commands = st.lists(
    st.one_of(
        st.builds(InsertRecord, id=st.sampled_from(IDS), data=data),
        st.builds(UpdateRecord, id=st.sampled_from(IDS), data=data, expected_version=versions),
        st.builds(DeleteRecord, id=st.sampled_from(IDS), expected_version=versions),
    ).flatmap(lambda c: st.tuples(st.just(c), st.sampled_from([None, "k1", "k2", "k3"]))),
    max_size=25,
)


async def _run(directory: Path, sequence: list[tuple[Command, str | None]]) -> None:
    registry = Registry([records.domain])
    runtime = await open_runtime(Settings(
        data_dir=directory, stream="embedded",
        command_db=f"sqlite:///{directory / 'command.db'}",
        query_db=f"sqlite:///{directory / 'query.db'}",
    ), registry)
    try:
        accepted: dict[str, Any] = {}
        for command, key in sequence:
            try:
                result = await runtime.commands.handle(command, command_id=key)
            except CqrskitError:
                continue  # refused: must leave no trace in the log
            if not result.replayed:
                accepted[result.command_id] = result
        log = await whole_log(runtime.store)
        assert {e.metadata["command_id"] for e in log} == set(accepted)
        for name in registry.projections:
            runner = ProjectionRunner(registry.projection(name), registry, runtime.views)
            await runner.follow(runtime.stream, 1, until=log[-1].position if log else 0)
        assert await records_view(runtime.views) == replay_records(log)
        assert await statistics_view(runtime.views) == replay_statistics(log)
        for stream_id in {e.stream_id for e in log}:
            versions = [e.version for e in log if e.stream_id == stream_id]
            assert versions == list(range(1, len(versions) + 1))
    finally:
        await runtime.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequence=commands)
def test_views_equal_a_replay_of_the_log_after_any_commands(
    sequence: list[tuple[Command, str | None]],
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(_run(Path(directory), sequence))
