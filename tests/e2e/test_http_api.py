"""The reference-compatible HTTP flow against a real `cqrskit serve`, over real HTTP."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cqrskit.domains.records import domain as records_domain

from .harness import Server, ServerPool, insert, query_sqlite, wait_until

pytestmark = pytest.mark.e2e

ACCEPTED_KEYS = {"id", "command_id", "version", "consistency_token"}
RECORD_KEYS = {"id", "data", "version", "created_at", "updated_at"}


@pytest.fixture(scope="module")
def gate_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gate") / "gate"


@pytest.fixture(scope="module")
def server(module_servers: ServerPool, gate_file: Path) -> Server:
    return module_servers.new({
        "CQRSKIT_DOMAINS": "cqrskit.domains.records,gate_domain",
        "CQRSKIT_TEST_GATE_FILE": str(gate_file),
        "CQRSKIT_CONSISTENCY_TIMEOUT": "1",
    })


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def event_count(server: Server) -> int:
    return int(query_sqlite(server.command_db, "SELECT count(*) FROM events")[0][0])


def fresh_stats(client: httpx.Client, token: str) -> dict[str, Any]:
    response = client.get("/api/query/stats", headers={"X-Consistency-Token": token})
    assert response.status_code == 200, response.text
    assert response.headers["X-Consistency"] == "fresh"
    stats: dict[str, Any] = response.json()
    return stats


def get_record(client: httpx.Client, record_id: str, token: str | None = None) -> httpx.Response:
    headers = {"X-Consistency-Token": token} if token else {}
    return client.get("/api/query/get", params={"id": record_id}, headers=headers)


def test_health_and_readiness(client: httpx.Client) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"command_db": "ok", "query_db": "ok"}}


def test_insert_answers_202_and_a_read_with_the_token_sees_it(client: httpx.Client) -> None:
    record_id = unique("ref")
    response = client.post(
        "/api/command/insert", json={"id": record_id, "data": {"color": "red", "n": 1}}
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert set(body) == ACCEPTED_KEYS
    assert body["id"] == record_id
    assert body["version"] == 1
    assert response.headers["Location"] == f"/api/commands/{body['command_id']}"
    assert "Idempotent-Replayed" not in response.headers

    read = get_record(client, record_id, body["consistency_token"])
    assert read.status_code == 200, read.text
    assert read.headers["X-Consistency"] == "fresh"
    record = read.json()
    assert set(record) == RECORD_KEYS
    assert record["id"] == record_id
    assert record["data"] == {"color": "red", "n": 1}
    assert record["version"] == 1
    assert record["created_at"] == record["updated_at"]

    # Without a token the answer carries no consistency claim at all.
    plain = get_record(client, record_id)
    assert plain.status_code == 200
    assert "X-Consistency" not in plain.headers
    assert plain.json() == record


def test_insert_without_id_gets_an_assigned_one(client: httpx.Client) -> None:
    body = insert(client, {"nested": {"list": [1, 2.5, "x", None, True]}})
    assert set(body) == ACCEPTED_KEYS
    read = get_record(client, body["id"], body["consistency_token"])
    assert read.status_code == 200
    assert read.json()["data"] == {"nested": {"list": [1, 2.5, "x", None, True]}}
    # A second insert without id gets another id.
    assert insert(client, {})["id"] != body["id"]


def test_get_of_an_unknown_id_is_a_json_404(client: httpx.Client) -> None:
    missing = unique("missing")
    response = get_record(client, missing)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": "not_found", "message": f"no record with id {missing!r}"}


def test_update_and_delete_with_expected_versions(client: httpx.Client) -> None:
    record_id = unique("ver")
    created = insert(client, {"v": 1}, record_id=record_id)

    updated = client.post("/api/command/update",
                          json={"id": record_id, "data": {"v": 2}, "expected_version": 1})
    assert updated.status_code == 202, updated.text
    assert set(updated.json()) == ACCEPTED_KEYS
    assert updated.json()["version"] == 2
    read = get_record(client, record_id, updated.json()["consistency_token"]).json()
    assert read["data"] == {"v": 2}
    assert read["version"] == 2
    assert read["updated_at"] >= read["created_at"]

    stale = client.post("/api/command/update",
                        json={"id": record_id, "data": {"v": 3}, "expected_version": 1})
    assert stale.status_code == 409
    assert stale.json() == {
        "error": "conflict",
        "message": f"stream {record_id!r} is at version 2, not the expected 1",
        "current_version": 2,
        "expected_version": 1,
    }

    # Without expected_version an update applies to whatever is current.
    last_writer = client.post("/api/command/update", json={"id": record_id, "data": {"v": 3}})
    assert last_writer.status_code == 202
    assert last_writer.json()["version"] == 3

    stale_delete = client.post("/api/command/delete",
                               json={"id": record_id, "expected_version": 2})
    assert stale_delete.status_code == 409
    assert stale_delete.json()["current_version"] == 3

    deleted = client.post("/api/command/delete", json={"id": record_id, "expected_version": 3})
    assert deleted.status_code == 202, deleted.text
    assert deleted.json()["version"] == 4
    gone = get_record(client, record_id, deleted.json()["consistency_token"])
    assert gone.status_code == 404

    again = client.post("/api/command/delete", json={"id": record_id})
    assert again.status_code == 404
    assert again.json() == {"error": "not_found", "message": f"record {record_id!r} was deleted"}
    after = client.post("/api/command/update", json={"id": record_id, "data": {}})
    assert after.status_code == 404
    # Ids are not reused, even after a delete.
    reinsert = client.post("/api/command/insert", json={"id": record_id, "data": {}})
    assert reinsert.status_code == 409
    assert reinsert.json()["error"] == "rejected"
    assert created["command_id"] != updated.json()["command_id"]

    never = unique("never")
    unknown = client.post("/api/command/update", json={"id": never, "data": {}})
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "not_found", "message": f"no record with id {never!r}"}


def _page_through(client: httpx.Client, params: dict[str, Any], token: str) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = None
    while True:
        query = dict(params)
        if cursor is not None:
            query["cursor"] = cursor
        response = client.get("/api/query/list", params=query,
                              headers={"X-Consistency-Token": token})
        assert response.status_code == 200, response.text
        assert response.headers["X-Consistency"] == "fresh"
        page = response.json()
        assert set(page) == {"items", "next_cursor"}
        pages.append([item["id"] for item in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 100, "paging does not end"


def test_list_filters_and_cursor_paging(client: httpx.Client) -> None:
    batch = unique("batch")
    colors = ["red", "blue", "green"]
    expected: dict[str, list[str]] = {c: [] for c in colors}
    token = ""
    for i in range(23):
        color = colors[i % 3]
        record_id = f"{batch}-{i:02d}"
        data = {"batch": batch, "color": color, "size": i % 4, "label": str(i % 4)}
        token = insert(client, data, record_id=record_id)["consistency_token"]
        expected[color].append(record_id)

    pages = _page_through(
        client, {"filter": [f"batch:{batch}", "color:red"], "limit": 3}, token
    )
    assert len(pages) == 3
    assert [len(p) for p in pages] == [3, 3, 2]
    flat = [record_id for page in pages for record_id in page]
    assert flat == sorted(expected["red"]), "pages are ordered by id, without gaps or repeats"

    everything = _page_through(client, {"filter": [f"batch:{batch}"], "limit": 5}, token)
    assert [len(p) for p in everything] == [5, 5, 5, 5, 3]
    assert [r for p in everything for r in p] == sorted(r for ids in expected.values() for r in ids)

    # A filter value is JSON when it parses as JSON: size:2 is the number, label:"2" the string.
    by_number = _page_through(client, {"filter": [f"batch:{batch}", "size:2"]}, token)
    assert by_number == [[f"{batch}-{i:02d}" for i in range(23) if i % 4 == 2]]
    by_string = _page_through(client, {"filter": [f"batch:{batch}", 'label:"2"']}, token)
    assert by_string == by_number
    assert _page_through(client, {"filter": [f"batch:{batch}", "label:2"]}, token) == [[]]
    assert _page_through(client, {"filter": [f"batch:{batch}", "nosuchfield:1"]}, token) == [[]]

    full = client.get("/api/query/list", params={"filter": [f"batch:{batch}", "color:blue"]})
    items = full.json()["items"]
    assert [item["id"] for item in items] == sorted(expected["blue"])
    assert all(set(item) == RECORD_KEYS and item["data"]["color"] == "blue" for item in items)


def test_stats_count_every_event_by_type(server: Server, client: httpx.Client) -> None:
    marker = insert(client, {"marker": True})
    before = fresh_stats(client, marker["consistency_token"])
    assert before["total"] == event_count(server)
    ids = [insert(client, {"i": i}, record_id=unique("stat"))["id"] for i in range(3)]
    for record_id in ids[:2]:
        assert client.post("/api/command/update",
                           json={"id": record_id, "data": {"x": 1}}).status_code == 202
    last = client.post("/api/command/delete", json={"id": ids[0]})
    assert last.status_code == 202
    after = fresh_stats(client, last.json()["consistency_token"])

    assert after["total"] == before["total"] + 6
    assert after["total"] == event_count(server)
    delta = {
        t: after["by_type"].get(t, 0) - before["by_type"].get(t, 0)
        for t in ("RecordInserted", "RecordUpdated", "RecordDeleted")
    }
    assert delta == {"RecordInserted": 3, "RecordUpdated": 2, "RecordDeleted": 1}
    assert sum(after["by_type"].values()) == after["total"]
    assert sum(day["total"] for day in after["by_day"]) == after["total"]
    for day in after["by_day"]:
        assert set(day) == {"day", "total", "by_type"}
        assert sum(day["by_type"].values()) == day["total"]


def test_idempotency_key_replays_the_first_answer_and_appends_nothing(
    server: Server, client: httpx.Client
) -> None:
    record_id = unique("idem")
    key = unique("key")
    body = {"id": record_id, "data": {"once": True}}
    first = client.post("/api/command/insert", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 202, first.text
    assert "Idempotent-Replayed" not in first.headers
    assert first.json()["command_id"] == key
    before = fresh_stats(client, first.json()["consistency_token"])["total"]
    events_before = event_count(server)

    for _ in range(3):
        replay = client.post("/api/command/insert", json=body, headers={"Idempotency-Key": key})
        assert replay.status_code == 202, replay.text
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert replay.content == first.content
        assert replay.headers["Location"] == first.headers["Location"]

    # Without the key, the same body is a new command: the record already exists.
    assert client.post("/api/command/insert", json=body).status_code == 409

    marker = insert(client, {"marker": True})
    assert fresh_stats(client, marker["consistency_token"])["total"] == before + 1
    assert event_count(server) == events_before + 1
    rows = query_sqlite(server.command_db,
                        "SELECT count(*) FROM events WHERE stream_id = ?", (record_id,))
    assert rows == [(1,)]
    listed = client.get("/api/query/list", params={"filter": "once:true"}).json()["items"]
    assert [item["id"] for item in listed if item["id"] == record_id] == [record_id]

    # Updates replay too: the second send does not make version 3.
    update = {"id": record_id, "data": {"once": False}}
    ukey = unique("ukey")
    u1 = client.post("/api/command/update", json=update, headers={"Idempotency-Key": ukey})
    u2 = client.post("/api/command/update", json=update, headers={"Idempotency-Key": ukey})
    assert (u1.status_code, u2.status_code) == (202, 202)
    assert u1.json() == u2.json()
    assert u1.json()["version"] == 2
    assert u2.headers["Idempotent-Replayed"] == "true"
    read = get_record(client, record_id, u2.json()["consistency_token"]).json()
    assert read["version"] == 2


def test_a_reused_idempotency_key_with_another_body_is_409(
    server: Server, client: httpx.Client
) -> None:
    key = unique("key")
    record_id = unique("reuse")
    first = client.post("/api/command/insert", json={"id": record_id, "data": {"a": 1}},
                        headers={"Idempotency-Key": key})
    assert first.status_code == 202
    events = event_count(server)
    for other in (
        ("/api/command/insert", {"id": record_id, "data": {"a": 2}}),
        ("/api/command/insert", {"id": unique("other"), "data": {"a": 1}}),
        ("/api/command/update", {"id": record_id, "data": {"a": 1}}),
    ):
        response = client.post(other[0], json=other[1], headers={"Idempotency-Key": key})
        assert response.status_code == 409, response.text
        assert response.json() == {
            "error": "idempotency_key_reused",
            "message": f"command id {key!r} was already used for a different command; "
                       "use a new Idempotency-Key for a new command",
        }
    assert event_count(server) == events
    read = get_record(client, record_id, first.json()["consistency_token"])
    assert read.json()["data"] == {"a": 1}


def test_command_status_goes_from_pending_to_projected(
    client: httpx.Client, gate_file: Path
) -> None:
    held = Path(f"{gate_file}.held")
    held.unlink(missing_ok=True)
    gate_file.touch()
    try:
        gated = insert(client, {"gate": True}, record_id=unique("gated"))
        wait_until(held.exists, timeout=15, what="the gate projection to hold the views")

        status = client.get(f"/api/commands/{gated['command_id']}")
        assert status.status_code == 200, status.text
        pending = status.json()
        assert pending["status"] == "pending"
        assert pending["projections"]["gate"] == "pending"
        assert {k: pending[k] for k in ACCEPTED_KEYS} == gated
        assert isinstance(pending["position"], int)

        # A write made while the views are held cannot be read fresh: the bounded
        # wait (CQRSKIT_CONSISTENCY_TIMEOUT=1) ends and the answer says stale.
        behind = insert(client, {"behind": True}, record_id=unique("behind"))
        stale = client.get("/api/query/list", params={"filter": "behind:true"},
                           headers={"X-Consistency-Token": behind["consistency_token"]})
        assert stale.status_code == 200
        assert stale.headers["X-Consistency"] == "stale"
        assert behind["id"] not in [item["id"] for item in stale.json()["items"]]
        assert client.get(f"/api/commands/{behind['command_id']}").json()["status"] == "pending"
    finally:
        gate_file.unlink(missing_ok=True)

    def projected() -> dict[str, Any] | None:
        answer: dict[str, Any] = client.get(f"/api/commands/{gated['command_id']}").json()
        return answer if answer["status"] == "projected" else None

    done = wait_until(projected, timeout=15, what="the gated command to be projected")
    assert done["projections"] == {"records": "projected", "statistics": "projected",
                                   "gate": "projected"}
    fresh = get_record(client, behind["id"], behind["consistency_token"])
    assert fresh.status_code == 200
    assert fresh.headers["X-Consistency"] == "fresh"
    via_location = client.get(str(httpx.URL(client.base_url).join(
        client.post("/api/command/update", json={"id": behind["id"], "data": {}})
        .headers["Location"])))
    assert via_location.status_code == 200
    assert via_location.json()["version"] == 2

    unknown = client.get("/api/commands/no-such-command")
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "not_found",
                              "message": "no command with id 'no-such-command' was accepted"}


def test_a_404_after_a_consistency_wait_still_says_fresh_or_stale(
    client: httpx.Client,
) -> None:
    record_id = unique("gone")
    insert(client, {}, record_id=record_id)
    deleted = client.post("/api/command/delete", json={"id": record_id})
    assert deleted.status_code == 202
    gone = get_record(client, record_id, deleted.json()["consistency_token"])
    assert gone.status_code == 404
    assert gone.headers.get("X-Consistency") == "fresh"


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    name = ref.removeprefix("#/components/schemas/")
    resolved: dict[str, Any] = spec["components"]["schemas"][name]
    return resolved


def test_openapi_describes_every_command_body_and_query_parameter(
    client: httpx.Client,
) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    paths = spec["paths"]

    for name, (command_type, _) in records_domain.commands.items():
        operation = paths[f"/api/command/{name}"]["post"]
        body = operation["requestBody"]
        assert body["required"] is True
        schema = _resolve(spec, body["content"]["application/json"]["schema"])
        assert set(schema["properties"]) == set(command_type.model_fields), name
        required = {f for f, info in command_type.model_fields.items() if info.is_required()}
        assert set(schema.get("required", [])) == required, name
        assert schema["additionalProperties"] is False, name
        headers = {p["name"] for p in operation["parameters"] if p["in"] == "header"}
        assert "idempotency-key" in {h.lower() for h in headers}, name
        accepted = _resolve(
            spec, operation["responses"]["202"]["content"]["application/json"]["schema"]
        )
        assert set(accepted["properties"]) == ACCEPTED_KEYS
        assert {"409", "413", "422"} <= set(operation["responses"]), name

    for name, query_type in records_domain.queries.items():
        operation = paths[f"/api/query/{name}"]["get"]
        params = {p["name"]: p for p in operation["parameters"] if p["in"] == "query"}
        assert set(params) == set(query_type.model_fields), name
        headers = {p["name"].lower() for p in operation["parameters"] if p["in"] == "header"}
        assert "x-consistency-token" in headers, name

    insert_schema = _resolve(
        spec,
        paths["/api/command/insert"]["post"]["requestBody"]["content"]["application/json"][
            "schema"],
    )
    assert {"data", "id"} <= set(insert_schema["properties"])
    assert insert_schema["required"] == ["data"]
    id_schemas = insert_schema["properties"]["id"]["anyOf"]
    assert any(s.get("pattern") for s in id_schemas), "the id's safe alphabet is published"

    list_params = {p["name"]: p for p in paths["/api/query/list"]["get"]["parameters"]}
    assert {"filter", "cursor", "limit"} <= set(list_params)
    assert list_params["filter"]["schema"]["type"] == "array"
    assert list_params["limit"]["schema"]["minimum"] == 1
    assert list_params["limit"]["schema"]["maximum"] == 500
    get_params = {p["name"]: p for p in paths["/api/query/get"]["get"]["parameters"]}
    assert get_params["id"]["required"] is True

    for operational in ("/api/commands/{command_id}", "/api/dead-letters",
                        "/api/dead-letters/{dead_letter_id}/retry",
                        "/api/dead-letters/{dead_letter_id}/skip", "/healthz", "/readyz"):
        assert operational in paths
