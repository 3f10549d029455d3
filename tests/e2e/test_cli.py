"""The `cqrskit` command line: help, projections list and rebuild, on real data dirs."""

from __future__ import annotations

import asyncio
import json
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cqrskit.bootstrap import open_runtime
from cqrskit.config import Settings

from .harness import Server, ServerPool, query_sqlite, run_cli, write_sqlite

pytestmark = pytest.mark.e2e

SUBCOMMANDS = [
    ("serve",), ("projections",), ("projections", "list"), ("projections", "rebuild"),
    ("dead-letters",), ("dead-letters", "list"), ("dead-letters", "retry"),
    ("dead-letters", "skip"), ("api",), ("command-handler",), ("query-handler",),
    ("update-processor",), ("relay",), ("leases",), ("up",), ("status",),
    ("keys",), ("keys", "create"), ("keys", "list"), ("keys", "revoke"),
]


def test_help_lists_every_command_and_each_subcommand_has_help() -> None:
    invocations = [("--help",), ("--version",), *[(*s, "--help") for s in SUBCOMMANDS]]
    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(invocations, pool.map(lambda a: run_cli(*a), invocations),
                           strict=True))
    for args, result in results.items():
        assert result.returncode == 0, (args, result.stderr)

    top = results[("--help",)].stdout
    assert "Usage: cqrskit [OPTIONS] COMMAND [ARGS]..." in top
    commands = top.split("Commands:")[1]
    for name in ("serve", "projections", "dead-letters"):
        assert f"\n  {name} " in commands, name
    assert "CQRSKIT_DATA_DIR" in top
    assert results[("--version",)].stdout.strip() == "cqrskit, version 0.1.0"

    for sub in SUBCOMMANDS:
        out = results[(*sub, "--help")].stdout
        assert out.startswith(f"Usage: cqrskit {' '.join(sub)}"), out
    assert "--port" in results[("serve", "--help")].stdout
    assert "--data-dir" in results[("serve", "--help")].stdout
    for group, children in (("projections", ("list", "rebuild")),
                            ("dead-letters", ("list", "retry", "skip"))):
        out = results[(group, "--help")].stdout
        assert all(f"\n  {child} " in out for child in children), out
        for child in children:
            assert "--data-dir" in results[(group, child, "--help")].stdout
    for role in ("api", "command-handler", "query-handler"):
        out = results[(role, "--help")].stdout
        assert "--host" in out and "--port" in out, out
        assert "CQRSKIT_COMMAND_HANDLER_URL" in out and "CQRSKIT_QUERY_HANDLER_URL" in out
    assert "Opens only the command DB" in results[("command-handler", "--help")].stdout
    assert "runs no update processor" in results[("query-handler", "--help")].stdout
    assert "--in-process-handlers" in results[("up", "--help")].stdout
    assert "NAME" in results[("projections", "rebuild", "--help")].stdout
    assert "DEAD_LETTER_ID" in results[("dead-letters", "retry", "--help")].stdout


def test_unknown_commands_and_projections_fail_clearly(tmp_path: Path) -> None:
    unknown = run_cli("nope")
    assert unknown.returncode == 2
    assert "No such command 'nope'" in unknown.stderr
    missing_arg = run_cli("projections", "rebuild", "--data-dir", str(tmp_path))
    assert missing_arg.returncode == 2
    assert "Missing argument 'NAME'" in missing_arg.stderr
    empty = run_cli("projections", "rebuild", "records", "--data-dir", str(tmp_path))
    assert empty.returncode == 1
    assert "no cqrskit data in" in empty.stderr
    assert not (tmp_path / "command.db").exists(), "a typo must not create databases"
    asyncio.run(_initialise(tmp_path))
    bad = run_cli("projections", "rebuild", "nope", "--data-dir", str(tmp_path))
    assert bad.returncode == 1
    assert "no projection named 'nope' (known: records, statistics)" in bad.stderr


async def _initialise(data_dir: Path) -> None:
    runtime = await open_runtime(Settings(data_dir=data_dir))
    await runtime.close()


# ------------------------------------------------------------------ rebuild


async def _populate(server: Server, count: int) -> str:
    """Insert `count` records, update every 5th, delete every 11th; return the last token."""
    tokens: list[str] = []

    async def worker(start: int) -> None:
        async with server.async_client() as client:
            for i in range(start, count, 4):
                rid = f"rec-{i:04d}"
                answers = [await client.post("/api/command/insert", json={
                    "id": rid, "data": {"i": i, "color": ["red", "blue", "green"][i % 3]}})]
                if i % 5 == 0:
                    answers.append(await client.post("/api/command/update", json={
                        "id": rid, "data": {"i": i, "updated": True}, "expected_version": 1}))
                if i % 11 == 0:
                    answers.append(await client.post("/api/command/delete", json={"id": rid}))
                for answer in answers:
                    assert answer.status_code == 202, answer.text
                tokens.append(answers[-1].json()["consistency_token"])

    await asyncio.gather(*(worker(start) for start in range(4)))
    return max(tokens, key=lambda t: int(t.split(".")[0]))


def _wait_fresh(server: Server) -> None:
    with server.client() as client:
        marker = client.post("/api/command/insert", json={"id": "zz-marker", "data": {}})
        token = {"X-Consistency-Token": marker.json()["consistency_token"]}
        assert client.get("/api/query/stats", headers=token).headers["X-Consistency"] == "fresh"
        read = client.get("/api/query/get", params={"id": "zz-marker"}, headers=token)
        assert read.headers["X-Consistency"] == "fresh"


def _table(server: Server, collection: str) -> list[tuple[str, Any]]:
    rows = query_sqlite(server.query_db, f"SELECT id, doc FROM view_{collection} ORDER BY id")
    return [(rid, json.loads(doc)) for rid, doc in rows]


def _replay_records(server: Server) -> list[tuple[str, Any]]:
    """What the records view must hold: the event log, folded by hand."""
    view: dict[str, dict[str, Any]] = {}
    for stream_id, version, kind, data, at in query_sqlite(
        server.command_db,
        "SELECT stream_id, version, type, data, recorded_at FROM events ORDER BY position",
    ):
        payload = json.loads(data)
        if kind == "RecordInserted":
            view[stream_id] = {"id": stream_id, "data": payload["data"], "version": version,
                               "created_at": at, "updated_at": at}
        elif kind == "RecordUpdated":
            view[stream_id] = {**view[stream_id], "data": payload["data"], "version": version,
                               "updated_at": at}
        else:
            del view[stream_id]
    return sorted(view.items())


def _last_position(server: Server) -> int:
    return int(query_sqlite(server.command_db, "SELECT max(position) FROM events")[0][0])


def _projections_table(output: str) -> dict[str, list[str]]:
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 5 and cells[0] != "projection":
            rows[cells[0]] = cells[1:]
    return rows


def _corrupt(server: Server) -> None:
    """Damage the records view the way a bad deploy might, straight in query.db."""
    write_sqlite(
        server.query_db,
        ("DELETE FROM view_records WHERE id IN "
         "(SELECT id FROM view_records ORDER BY id LIMIT 25)", ()),
        ("UPDATE view_records SET doc = json_set(doc, '$.version', 99) "
         "WHERE id = (SELECT max(id) FROM view_records)", ()),
        ("INSERT INTO view_records (id, doc) VALUES ('bogus', '{\"id\": 1}')", ()),
    )


def test_rebuild_records_reproduces_the_same_view(servers: ServerPool) -> None:
    server = servers.new(name="rebuild")
    asyncio.run(_populate(server, 300))
    _wait_fresh(server)
    # uvicorn re-raises the SIGTERM after its graceful shutdown: the status is -15.
    assert server.stop() in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log_tail(5)

    last = _last_position(server)
    assert last > 300
    before_records = _table(server, "records")
    before_totals = _table(server, "stats_totals")
    before_days = _table(server, "stats_by_day")
    assert len(before_records) > 250
    assert before_records == _replay_records(server)

    listed = server.cli("projections", "list")
    assert listed.returncode == 0, listed.stderr
    table = _projections_table(listed.stdout)
    assert table == {
        "records": ["0", str(last), "0", "records"],
        "statistics": ["0", str(last), "0", "stats_totals, stats_by_day"],
    }

    _corrupt(server)
    assert _table(server, "records") != before_records
    rebuilt = server.cli("projections", "rebuild", "records")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert f"records: rebuilt up to position {last}" in rebuilt.stdout
    assert _table(server, "records") == before_records
    # Rebuilding one projection leaves the others alone.
    assert _table(server, "stats_totals") == before_totals

    stats = server.cli("projections", "rebuild", "statistics")
    assert stats.returncode == 0, stats.stderr
    assert _table(server, "stats_totals") == before_totals
    assert _table(server, "stats_by_day") == before_days
    assert _table(server, "stats_totals")[0][1]["total"] == last
    assert _projections_table(server.cli("projections", "list").stdout) == table


def test_projections_list_shows_how_far_behind_a_projection_is(servers: ServerPool) -> None:
    server = servers.new(name="behind")
    asyncio.run(_populate(server, 40))
    _wait_fresh(server)
    server.stop()
    last = _last_position(server)
    # Move the records checkpoint back by hand: list must report the lag.
    write_sqlite(server.query_db, (
        "UPDATE checkpoints SET position = ? WHERE projection = 'records'", (last - 7,)))
    table = _projections_table(server.cli("projections", "list").stdout)
    assert table["records"] == ["0", str(last - 7), "7", "records"]
    assert table["statistics"][1:3] == [str(last), "0"]

    # `status` counts the events behind exactly, and dates the oldest of them.
    status = server.cli("status")
    assert status.returncode == 0, status.stderr
    assert f"log at position {last}; 0 dead letters" in status.stdout
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in status.stdout.splitlines() if line.count("│") == 7}
    assert rows["records"][:3] == ["0", str(last - 7), "7"]
    assert float(rows["records"][3]) > 0
    assert rows["statistics"][:4] == ["0", str(last), "0", "0.0"]


def test_rebuild_while_the_server_runs(servers: ServerPool) -> None:
    server = servers.new(name="live")
    asyncio.run(_populate(server, 120))
    _wait_fresh(server)
    _corrupt(server)
    rebuilt = server.cli("projections", "rebuild", "records")
    assert rebuilt.returncode == 0, rebuilt.stderr
    # The running server follows the reset checkpoint and keeps projecting.
    with server.client() as client:
        after = client.post("/api/command/insert", json={"id": "zz-after", "data": {"n": 1}})
        token = {"X-Consistency-Token": after.json()["consistency_token"]}
        read = client.get("/api/query/get", params={"id": "zz-after"}, headers=token)
        assert read.status_code == 200
        assert read.headers["X-Consistency"] == "fresh"
    assert _table(server, "records") == _replay_records(server)
