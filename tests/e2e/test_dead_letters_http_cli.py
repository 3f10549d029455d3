"""Dead letters end to end: park after retries, queue behind, retry, skip; HTTP and CLI.

The server loads `faulty_domain` (this directory is on its PYTHONPATH): its `items`
projection fails on events whose data has "poison": true while a switch file exists.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .harness import Server, ServerPool, wait_until

pytestmark = pytest.mark.e2e

POISON_ERROR = "PoisonedEvent: poisoned event {} v{}"
QUEUED = "queued behind an earlier event of this stream in the dead-letter queue"


def faulty_env(poison_file: Path) -> dict[str, str]:
    return {
        "CQRSKIT_DOMAINS": "cqrskit.domains.records,faulty_domain",
        "CQRSKIT_RETRY_ATTEMPTS": "2",
        "CQRSKIT_RETRY_BACKOFF": "0.01",
        "CQRSKIT_CONSISTENCY_TIMEOUT": "2",
        "CQRSKIT_TEST_POISON_FILE": str(poison_file),
    }


@pytest.fixture(scope="module")
def poison(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("switch") / "poison-on"


@pytest.fixture(scope="module")
def server(module_servers: ServerPool, poison: Path) -> Server:
    return module_servers.new(faulty_env(poison))


@pytest.fixture
def client(server: Server, poison: Path) -> Iterator[httpx.Client]:
    poison.touch()
    try:
        with server.client() as c:
            yield c
    finally:
        poison.unlink(missing_ok=True)


# ------------------------------------------------------------------ helpers


def command(client: httpx.Client, name: str, item_id: str, data: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"/api/faulty/command/{name}", json={"id": item_id, "data": data})
    assert response.status_code == 202, response.text
    result: dict[str, Any] = response.json()
    return result


def create(client: httpx.Client, item_id: str, data: dict[str, Any]) -> dict[str, Any]:
    return command(client, "create", item_id, data)


def change(client: httpx.Client, item_id: str, data: dict[str, Any]) -> dict[str, Any]:
    return command(client, "change", item_id, data)


def status(client: httpx.Client, accepted: dict[str, Any]) -> dict[str, Any]:
    response = client.get(f"/api/commands/{accepted['command_id']}")
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def wait_status(client: httpx.Client, accepted: dict[str, Any], wanted: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        answer = status(client, accepted)
        return answer if answer["status"] == wanted else None

    return wait_until(probe, timeout=20, what=f"command {accepted['command_id']} to be {wanted}")


def letters(client: httpx.Client, projection: str | None = None) -> list[dict[str, Any]]:
    params = {"projection": projection} if projection else {}
    response = client.get("/api/dead-letters", params=params)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def of_stream(items: list[dict[str, Any]], stream_id: str) -> list[tuple[int, bool]]:
    return [(d["version"], d["is_cause"]) for d in items if d["stream_id"] == stream_id]


def get_item(client: httpx.Client, item_id: str, token: str | None = None) -> httpx.Response:
    headers = {"X-Consistency-Token": token} if token else {}
    return client.get("/api/faulty/query/get", params={"id": item_id}, headers=headers)


def item(client: httpx.Client, item_id: str, token: str) -> dict[str, Any]:
    response = get_item(client, item_id, token)
    assert response.status_code == 200, response.text
    assert response.headers["X-Consistency"] == "fresh"
    answer: dict[str, Any] = response.json()
    return answer


# ------------------------------------------------------------------- HTTP


def test_a_poisoned_event_parks_its_stream_and_retry_replays_it_in_order(
    client: httpx.Client, poison: Path
) -> None:
    a1 = create(client, "item-a", {"poison": True, "n": 1})
    a2 = change(client, "item-a", {"n": 2})
    a3 = change(client, "item-a", {"n": 3})
    b1 = create(client, "item-b", {"n": 1})
    b2 = change(client, "item-b", {"n": 2})
    record = client.post("/api/command/insert", json={"id": "rec-1", "data": {"n": 1}})
    assert record.status_code == 202

    # Other streams keep flowing, in this projection and in the others.
    assert item(client, "item-b", b2["consistency_token"]) == {
        "id": "item-b", "data": {"n": 2}, "version": 2, "applied": [1, 2],
    }
    assert b1["version"] == 1
    read = client.get("/api/query/get", params={"id": "rec-1"},
                      headers={"X-Consistency-Token": record.json()["consistency_token"]})
    assert read.status_code == 200
    assert read.headers["X-Consistency"] == "fresh"

    parked = wait_status(client, a3, "parked")
    assert parked["projections"] == {"records": "projected", "statistics": "projected",
                                     "items": "parked"}
    assert status(client, a1)["status"] == "parked"
    assert status(client, a2)["status"] == "parked"
    assert status(client, b2)["status"] == "projected"
    assert get_item(client, "item-a").status_code == 404

    items = letters(client)
    assert [(d["projection"], d["stream_id"], d["version"], d["is_cause"]) for d in items] == [
        ("items", "item-a", 1, True), ("items", "item-a", 2, False),
        ("items", "item-a", 3, False),
    ]
    cause, *queued = items
    assert cause["event_type"] == "ItemCreated"
    assert cause["error"] == POISON_ERROR.format("item-a", 1)
    assert cause["attempts"] == 2
    assert all(d["error"] == QUEUED and d["attempts"] == 0 for d in queued)
    assert [d["event_type"] for d in queued] == ["ItemChanged", "ItemChanged"]
    assert cause["position"] < queued[0]["position"] < queued[1]["position"]
    assert letters(client, "items") == items
    assert letters(client, "records") == []

    # Retry while the projection still fails: nothing applies, the error is reported.
    retry = client.post(f"/api/dead-letters/{cause['id']}/retry")
    assert retry.status_code == 409, retry.text
    assert retry.json() == {
        "error": "retry_failed",
        "message": "the head event of the stream failed again: "
                   + POISON_ERROR.format("item-a", 1),
        "applied": 0, "remaining": 3,
    }
    again = letters(client, "items")
    assert [d["id"] for d in again] == [d["id"] for d in items]
    assert again[0]["attempts"] == 3
    assert get_item(client, "item-a").status_code == 404

    # While parked, a new event of that stream queues behind as well.
    a4 = change(client, "item-a", {"n": 4})
    wait_status(client, a4, "parked")
    assert of_stream(letters(client), "item-a") == [(1, True), (2, False), (3, False),
                                                     (4, False)]

    # Flip the switch: the retry applies all four, oldest first, and the view catches up.
    poison.unlink()
    healed = client.post(f"/api/dead-letters/{cause['id']}/retry")
    assert healed.status_code == 200
    assert healed.json() == {"applied": 4, "remaining": 0}
    assert letters(client) == []
    assert item(client, "item-a", a4["consistency_token"]) == {
        "id": "item-a", "data": {"n": 4}, "version": 4, "applied": [1, 2, 3, 4],
    }
    assert status(client, a4)["status"] == "projected"
    assert status(client, a1)["status"] == "projected"

    # The stream is no longer parked: new events apply at once.
    a5 = change(client, "item-a", {"n": 5})
    assert item(client, "item-a", a5["consistency_token"])["applied"] == [1, 2, 3, 4, 5]
    assert client.post(f"/api/dead-letters/{cause['id']}/retry").status_code == 404


def test_skip_drops_one_parked_event_for_good(client: httpx.Client, poison: Path) -> None:
    create(client, "item-c", {"poison": True})
    change(client, "item-c", {"n": 2})
    c3 = change(client, "item-c", {"n": 3})
    wait_status(client, c3, "parked")
    parked = [d for d in letters(client) if d["stream_id"] == "item-c"]
    assert [(d["version"], d["is_cause"]) for d in parked] == [(1, True), (2, False), (3, False)]

    skipped = client.post(f"/api/dead-letters/{parked[1]['id']}/skip")
    assert skipped.status_code == 200, skipped.text
    assert skipped.json() == {"skipped": parked[1]}
    left = [d["id"] for d in letters(client) if d["stream_id"] == "item-c"]
    assert left == [parked[0]["id"], parked[2]["id"]]
    again = client.post(f"/api/dead-letters/{parked[1]['id']}/skip")
    assert again.status_code == 404
    assert again.json() == {"error": "not_found",
                            "message": f"no dead letter with id {parked[1]['id']}"}

    poison.unlink()
    # Retrying through any letter of the stream starts from the head of its queue.
    retry = client.post(f"/api/dead-letters/{parked[2]['id']}/retry")
    assert retry.json() == {"applied": 2, "remaining": 0}
    assert item(client, "item-c", c3["consistency_token"]) == {
        "id": "item-c", "data": {"n": 3}, "version": 3, "applied": [1, 3],
    }


def test_skipping_the_cause_leaves_the_queue_and_reports_the_next_error(
    client: httpx.Client, poison: Path
) -> None:
    create(client, "item-d", {"poison": True})
    d2 = change(client, "item-d", {"n": 2})
    wait_status(client, d2, "parked")
    head, behind = [d for d in letters(client) if d["stream_id"] == "item-d"]
    assert client.post(f"/api/dead-letters/{head['id']}/skip").status_code == 200
    # The stream stays parked behind what is left; the next event cannot apply on
    # its own (its item was never created in the view), and retry says so.
    retry = client.post(f"/api/dead-letters/{behind['id']}/retry")
    assert retry.status_code == 409
    assert retry.json() == {
        "error": "retry_failed",
        "message": "the head event of the stream failed again: "
                   "LookupError: item item-d is not in the view",
        "applied": 0, "remaining": 1,
    }
    [left] = [d for d in letters(client) if d["stream_id"] == "item-d"]
    assert (left["id"], left["is_cause"], left["attempts"]) == (behind["id"], True, 1)
    assert client.post(f"/api/dead-letters/{behind['id']}/skip").status_code == 200
    assert of_stream(letters(client), "item-d") == []
    assert get_item(client, "item-d").status_code == 404


def test_a_read_of_a_parked_write_is_not_reported_fresh(
    client: httpx.Client, poison: Path
) -> None:
    h1 = create(client, "item-h", {"n": 1})
    assert item(client, "item-h", h1["consistency_token"])["version"] == 1
    h2 = change(client, "item-h", {"poison": True, "n": 2})
    wait_status(client, h2, "parked")
    try:
        read = get_item(client, "item-h", h2["consistency_token"])
        assert read.status_code == 200
        assert read.json()["version"] == 1, "the parked change is not in the view"
        assert read.headers["X-Consistency"] != "fresh"
    finally:
        for d in letters(client):
            client.post(f"/api/dead-letters/{d['id']}/skip")


# -------------------------------------------------------------------- CLI


def cli_ok(server: Server, *args: str) -> str:
    result = server.cli(*args)
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result.stdout


def listed_ids(output: str) -> list[int]:
    """The id column of `cqrskit dead-letters list`."""
    return [int(m.group(1)) for m in re.finditer(r"^\W*(\d+)\s*│", output, re.MULTILINE)]


def test_dead_letters_through_the_cli_with_the_server_running_and_stopped(
    servers: ServerPool, tmp_path: Path
) -> None:
    poison = tmp_path / "poison-on"
    poison.touch()
    server = servers.new(faulty_env(poison), name="cli")
    with server.client() as client:
        create(client, "item-e", {"poison": True})
        e2 = change(client, "item-e", {"n": 2})
        f1 = create(client, "item-f", {"n": 1})
        wait_status(client, e2, "parked")
        assert item(client, "item-f", f1["consistency_token"])["version"] == 1
        over_http = letters(client)
    cause, queued = over_http

    # list, while the server runs
    out = cli_ok(server, "dead-letters", "list")
    assert listed_ids(out) == [cause["id"], queued["id"]]
    for text in ("items", "item-e", "ItemCreated", "ItemChanged", "yes", "queued",
                 "PoisonedEvent"):
        assert text in out, text

    # retry while it still fails: non-zero exit, the error on stderr
    failing = server.cli("dead-letters", "retry", str(cause["id"]))
    assert failing.returncode == 1
    assert "applied 0; 2 still parked" in failing.stdout
    assert f"the head event failed again: {POISON_ERROR.format('item-e', 1)}" in failing.stderr

    # with the server stopped: list, then heal and retry
    server.stop()
    assert listed_ids(cli_ok(server, "dead-letters", "list", "--projection", "items")) == [
        cause["id"], queued["id"],
    ]
    poison.unlink()
    assert "applied 2; 0 still parked" in cli_ok(server, "dead-letters", "retry",
                                                 str(queued["id"]))
    assert cli_ok(server, "dead-letters", "list").strip() == "no dead letters"

    # the restarted server serves what the CLI applied
    server.start()
    with server.client() as client:
        e3 = change(client, "item-e", {"n": 3})
        assert item(client, "item-e", e3["consistency_token"]) == {
            "id": "item-e", "data": {"n": 3}, "version": 3, "applied": [1, 2, 3],
        }

        # skip and retry through the CLI while the server runs
        poison.touch()
        create(client, "item-g", {"poison": True})
        g2 = change(client, "item-g", {"n": 2})
        wait_status(client, g2, "parked")
        head, behind = letters(client)
        out = cli_ok(server, "dead-letters", "skip", str(behind["id"]))
        assert "skipped ItemChanged item-g v2" in out
        assert [d["id"] for d in letters(client)] == [head["id"]]
        poison.unlink()
        assert "applied 1; 0 still parked" in cli_ok(server, "dead-letters", "retry",
                                                     str(head["id"]))
        assert letters(client) == []
        g3 = change(client, "item-g", {"n": 3})
        assert item(client, "item-g", g3["consistency_token"]) == {
            "id": "item-g", "data": {"n": 3}, "version": 3, "applied": [1, 3],
        }

    missing = server.cli("dead-letters", "retry", "999999")
    assert missing.returncode != 0
    assert "no dead letter with id 999999" in missing.stderr
    unknown = server.cli("dead-letters", "list", "--projection", "nope")
    assert unknown.returncode != 0
    assert "no projection named 'nope'" in unknown.stderr
