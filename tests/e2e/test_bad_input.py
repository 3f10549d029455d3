"""Bad input gets a clear JSON 4xx that names the problem, and changes nothing.

Each case is sent on a fresh connection; the event log, the command table and the
views (read straight from the SQLite files) and the statistics total must be what
they were before. Some cases also send a valid marker command afterwards and read
it back with its consistency token: the stores must have grown by that marker alone.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from .harness import Server, ServerPool, insert, query_sqlite, wait_until

pytestmark = pytest.mark.e2e

LIMIT = 4096
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server(module_servers: ServerPool) -> Server:
    return module_servers.new({
        "CQRSKIT_MAX_BODY_BYTES": str(LIMIT),
        "CQRSKIT_CONSISTENCY_TIMEOUT": "2",
    })


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def footprint(server: Server) -> tuple[int, int, int]:
    """Events, accepted commands and records, read straight from the SQLite files."""
    events = query_sqlite(server.command_db, "SELECT count(*) FROM events")[0][0]
    commands = query_sqlite(server.command_db, "SELECT count(*) FROM commands")[0][0]
    records = query_sqlite(server.query_db, "SELECT count(*) FROM view_records")[0][0]
    return int(events), int(commands), int(records)


def views_caught_up(server: Server) -> None:
    """Wait until both projections' checkpoints in query.db reach the end of the log."""

    def caught_up() -> bool:
        last = query_sqlite(server.command_db, "SELECT coalesce(max(position), 0) FROM events")
        rows = query_sqlite(server.query_db, "SELECT projection, position FROM checkpoints")
        reached = {name: position for name, position in rows}
        return all(reached.get(name, 0) >= last[0][0] for name in ("records", "statistics"))

    wait_until(caught_up, timeout=15, what="the views to catch up with the log")


@contextlib.contextmanager
def nothing_written(server: Server, *, marker: bool = False) -> Iterator[None]:
    """Assert the block wrote nothing to the command DB or the views.

    A command is appended before it is answered, so once the response is in, the
    files show whatever it wrote. With `marker`, a valid command is also sent and
    read back with its consistency token: the stores must have grown by it alone.
    """
    views_caught_up(server)
    before = footprint(server)
    yield
    after = footprint(server)
    with server.client() as client:
        if marker:
            accepted = insert(client, {"marker": True})
            token = {"X-Consistency-Token": accepted["consistency_token"]}
            stats = client.get("/api/query/stats", headers=token)
            assert stats.headers["X-Consistency"] == "fresh"
            read = client.get("/api/query/get", params={"id": accepted["id"]}, headers=token)
            assert read.status_code == 200
            after = footprint(server)
            before = (before[0] + 1, before[1] + 1, before[2] + 1)
        else:
            stats = client.get("/api/query/stats")
    assert after == before, "the bad request changed the stores"
    assert stats.json()["total"] == after[0]


def assert_error(response: httpx.Response, status: int, code: str, *names: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == code, body
    assert isinstance(body["message"], str)
    for name in names:
        assert name in body["message"], f"{name!r} not in {body['message']!r}"


@dataclass
class Case:
    method: str
    path: str
    status: int
    code: str
    names: tuple[str, ...]
    body: Any = None
    raw: bytes | None = None
    params: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def send(self, client: httpx.Client) -> httpx.Response:
        content = self.raw
        headers = dict(self.headers)
        if self.body is not None:
            content = json.dumps(self.body).encode()
            headers.setdefault("content-type", "application/json")
        return client.request(self.method, self.path, params=self.params, headers=headers,
                              content=content)


INSERT = "/api/command/insert"
UPDATE = "/api/command/update"
DELETE = "/api/command/delete"
SAFE_ID_PATTERN = "should match pattern"

CASES = [
    # --- malformed JSON: 400
    pytest.param(Case("POST", INSERT, 400, "malformed_json", ("not valid JSON",),
                      raw=b'{"data": {"a": 1}', headers=JSON), id="json-truncated"),
    pytest.param(Case("POST", INSERT, 400, "malformed_json", ("not valid JSON",),
                      raw=b"{'data': {}}", headers=JSON), id="json-single-quotes"),
    pytest.param(Case("POST", UPDATE, 400, "malformed_json", ("not valid JSON",),
                      raw=b'{"id": "a", "data": {},}', headers=JSON), id="json-trailing-comma"),
    pytest.param(Case("POST", DELETE, 400, "malformed_json", ("not valid JSON",),
                      raw=b"not json", headers=JSON), id="json-garbage"),
    # --- wrong types: 422
    pytest.param(Case("POST", INSERT, 422, "validation_failed", ("body.data", "dictionary"),
                      body={"data": [1, 2]}), id="type-data-list"),
    pytest.param(Case("POST", INSERT, 422, "validation_failed", ("body.data",),
                      body={"data": "text"}), id="type-data-string"),
    pytest.param(Case("POST", INSERT, 422, "validation_failed", ("body.id", "string"),
                      body={"id": 5, "data": {}}), id="type-id-number"),
    pytest.param(Case("POST", UPDATE, 422, "validation_failed",
                      ("body.expected_version", "integer"),
                      body={"id": "a", "data": {}, "expected_version": "one"}),
                 id="type-expected-version-string"),
    pytest.param(Case("POST", DELETE, 422, "validation_failed", ("body.expected_version",),
                      body={"id": "a", "expected_version": 0}), id="range-expected-version-0"),
    # Found by schemathesis: an integer beyond 64 bits was a 500.
    pytest.param(Case("POST", DELETE, 422, "validation_failed", ("body.expected_version",),
                      body={"id": "a", "expected_version": 2**112},
                      headers={"Idempotency-Key": "huge-version"}),
                 id="range-expected-version-huge"),
    pytest.param(Case("POST", INSERT, 422, "validation_failed", ("body",),
                      body=[{"data": {}}]), id="type-body-array"),
    pytest.param(Case("POST", INSERT, 422, "validation_failed", ("body.data", "Field required"),
                      body={}), id="missing-data"),
    pytest.param(Case("POST", INSERT, 422, "validation_failed", ("body", "Field required"),
                      headers=JSON), id="missing-body"),
    pytest.param(Case("POST", UPDATE, 422, "validation_failed", ("body.id", "Field required"),
                      body={"data": {}}), id="missing-id-on-update"),
    pytest.param(Case("GET", "/api/query/list", 422, "validation_failed",
                      ("query.limit", "integer"), params={"limit": "ten"}), id="type-limit"),
    pytest.param(Case("GET", "/api/query/stats", 422, "validation_failed", ("query.days",),
                      params={"days": "week"}), id="type-days"),
    # --- unknown fields: 422
    pytest.param(Case("POST", INSERT, 422, "validation_failed",
                      ("body.colour", "Extra inputs are not permitted"),
                      body={"data": {}, "colour": "red"}), id="unknown-body-field"),
    pytest.param(Case("POST", DELETE, 422, "validation_failed", ("body.force",),
                      body={"id": "a", "force": True}), id="unknown-body-field-delete"),
    pytest.param(Case("GET", "/api/query/get", 422, "validation_failed",
                      ("query.verbose", "Extra inputs are not permitted"),
                      params={"id": "a", "verbose": "1"}), id="unknown-query-param"),
    # --- ids that are not safe identifiers: 422
    pytest.param(Case("POST", INSERT, 422, "validation_failed", ("body.id", SAFE_ID_PATTERN),
                      body={"id": "has space", "data": {}}), id="id-space"),
    pytest.param(Case("POST", INSERT, 422, "validation_failed", ("body.id", SAFE_ID_PATTERN),
                      body={"id": "../../etc/passwd", "data": {}}), id="id-path"),
    pytest.param(Case("POST", INSERT, 422, "validation_failed", ("body.id", SAFE_ID_PATTERN),
                      body={"id": "x'; DROP TABLE events; --", "data": {}}), id="id-sql"),
    pytest.param(Case("POST", INSERT, 422, "validation_failed", ("body.id", SAFE_ID_PATTERN),
                      body={"id": "", "data": {}}), id="id-empty"),
    pytest.param(Case("POST", INSERT, 422, "validation_failed", ("body.id", SAFE_ID_PATTERN),
                      body={"id": "a" * 129, "data": {}}), id="id-too-long"),
    pytest.param(Case("POST", INSERT, 422, "validation_failed", ("body.id", SAFE_ID_PATTERN),
                      body={"id": "caf\u00e9", "data": {}}), id="id-non-ascii"),
    pytest.param(Case("POST", UPDATE, 422, "validation_failed", ("body.id", SAFE_ID_PATTERN),
                      body={"id": "-leading-dash", "data": {}}), id="id-update"),
    pytest.param(Case("GET", "/api/query/get", 422, "validation_failed",
                      ("query.id", SAFE_ID_PATTERN), params={"id": "a/b"}), id="id-query"),
    pytest.param(Case("GET", "/api/query/get", 422, "validation_failed",
                      ("query.id", SAFE_ID_PATTERN), params={"id": "a\nb"}), id="id-query-newline"),
    pytest.param(Case("POST", INSERT, 422, "validation_failed",
                      ("header.idempotency-key", SAFE_ID_PATTERN),
                      body={"data": {}}, headers={"Idempotency-Key": "not a key!"}),
                 id="id-idempotency-key"),
    pytest.param(Case("POST", INSERT, 422, "validation_failed",
                      ("header.idempotency-key", SAFE_ID_PATTERN),
                      body={"data": {}}, headers={"Idempotency-Key": "k" * 200}),
                 id="id-idempotency-key-long"),
    pytest.param(Case("POST", INSERT, 422, "validation_failed",
                      ("header.x-correlation-id", SAFE_ID_PATTERN),
                      body={"data": {}}, headers={"X-Correlation-Id": "a b"}),
                 id="id-correlation-id"),
    pytest.param(Case("GET", "/api/commands/bad%20id", 422, "validation_failed",
                      ("path.command_id", SAFE_ID_PATTERN)), id="id-command-status-path"),
    pytest.param(Case("GET", "/api/commands/.hidden", 422, "validation_failed",
                      ("path.command_id", SAFE_ID_PATTERN)), id="id-command-status-dot"),
    # --- wrong content type: 415
    pytest.param(Case("POST", INSERT, 415, "unsupported_media_type",
                      ("Content-Type: application/json", "text/plain"),
                      raw=b'{"data": {}}', headers={"content-type": "text/plain"}),
                 id="content-type-text"),
    pytest.param(Case("POST", INSERT, 415, "unsupported_media_type",
                      ("application/x-www-form-urlencoded",),
                      raw=b"data=1", headers={"content-type": "application/x-www-form-urlencoded"}),
                 id="content-type-form"),
    pytest.param(Case("POST", UPDATE, 415, "unsupported_media_type", ("application/xml",),
                      raw=b"<id>a</id>", headers={"content-type": "application/xml"}),
                 id="content-type-xml"),
    pytest.param(Case("POST", INSERT, 415, "unsupported_media_type", ("Content-Type",),
               raw=b'{"data": {}}'), id="content-type-missing"),
    pytest.param(Case("POST", INSERT, 415, "unsupported_media_type", ("text/json",),
               raw=b'{"data": {}}', headers={"content-type": "text/json"}),
                 id="content-type-text-json"),
    # --- unknown routes: 404
    pytest.param(Case("GET", "/api/query/nope", 404, "not_found",
                      ("no route GET /api/query/nope",)), id="route-query"),
    pytest.param(Case("POST", "/api/command/nope", 404, "not_found",
                      ("no route POST /api/command/nope",), body={"data": {}}),
                 id="route-command"),
    pytest.param(Case("GET", "/api/records/query/get", 404, "not_found", ("no route",),
                      params={"id": "a"}), id="route-domain"),
    pytest.param(Case("GET", "/api", 404, "not_found", ("no route GET /api",)), id="route-api"),
    pytest.param(Case("GET", "/dashboard/missing.js", 404, "not_found", ()),
                 id="route-dashboard-asset"),
    # --- wrong method: 405
    pytest.param(Case("GET", INSERT, 405, "method_not_allowed",
                      ("GET is not allowed on /api/command/insert",)), id="method-get-command"),
    pytest.param(Case("POST", "/api/query/get", 405, "method_not_allowed",
                      ("POST is not allowed on /api/query/get",), body={"id": "a"}),
                 id="method-post-query"),
    pytest.param(Case("DELETE", "/api/commands/abc", 405, "method_not_allowed",
                      ("DELETE is not allowed",)), id="method-delete-status"),
    pytest.param(Case("PUT", UPDATE, 405, "method_not_allowed", ("PUT is not allowed",),
                      body={"id": "a", "data": {}}), id="method-put-update"),
    pytest.param(Case("GET", "/api/dead-letters/1/retry", 405, "method_not_allowed",
                      ("GET is not allowed",)), id="method-get-retry"),
    # --- list: out-of-range limit, bad cursor, bad filter
    pytest.param(Case("GET", "/api/query/list", 422, "validation_failed",
                      ("query.limit", "greater than or equal to 1"), params={"limit": 0}),
                 id="list-limit-0"),
    pytest.param(Case("GET", "/api/query/list", 422, "validation_failed", ("query.limit",),
                      params={"limit": -5}), id="list-limit-negative"),
    pytest.param(Case("GET", "/api/query/list", 422, "validation_failed",
                      ("query.limit", "less than or equal to 500"), params={"limit": 501}),
                 id="list-limit-501"),
    pytest.param(Case("GET", "/api/query/list", 400, "invalid_request",
                      ("cursor 'abc' is not one this service handed out",),
                      params={"cursor": "abc"}), id="list-cursor-undecodable"),
    pytest.param(Case("GET", "/api/query/list", 422, "validation_failed", ("query.cursor",),
                      params={"cursor": "A" * 201}), id="list-cursor-too-long"),
    pytest.param(Case("GET", "/api/query/list", 400, "invalid_request",
                      ("cursor '!!!' is not one this service handed out",),
                      params={"cursor": "!!!"}), id="list-cursor-not-base64"),
    pytest.param(Case("GET", "/api/query/list", 400, "invalid_request",
                      ("filter 'nocolon' must look like field:value",),
                      params={"filter": "nocolon"}), id="list-filter-no-colon"),
    pytest.param(Case("GET", "/api/query/list", 400, "invalid_request", ("filter ':red'",),
                      params={"filter": ":red"}), id="list-filter-no-field"),
    pytest.param(Case("GET", "/api/query/list", 400, "invalid_request",
                      ("'data.a b' is not a dotted path",), params={"filter": "a b:1"}),
                 id="list-filter-bad-field"),
    pytest.param(Case("GET", "/api/query/list", 400, "invalid_request",
                      ("is not a dotted path",), params={"filter": "a')--:1"}),
                 id="list-filter-injection"),
    pytest.param(Case("GET", "/api/query/list", 400, "invalid_request",
                      ("must compare with a string, number",), params={"filter": "a:[1]"}),
                 id="list-filter-array-value"),
    pytest.param(Case("GET", "/api/query/list", 422, "validation_failed", ("query.filter",),
                      params={"filter": [f"f{i}:1" for i in range(9)]}),
                 id="list-too-many-filters"),
    # --- garbage consistency tokens: 400
    pytest.param(Case("GET", "/api/query/get", 400, "invalid_request",
                      ("not a consistency token: 'garbage'",),
                      params={"id": "a"}, headers={"X-Consistency-Token": "garbage"}),
                 id="token-garbage"),
    pytest.param(Case("GET", "/api/query/list", 400, "invalid_request",
                      ("not a consistency token: '1.zz'",),
                      headers={"X-Consistency-Token": "1.zz"}), id="token-bad-hash"),
    pytest.param(Case("GET", "/api/query/stats", 400, "invalid_request",
                      ("not a consistency token: '-1.0'",),
                      headers={"X-Consistency-Token": "-1.0"}), id="token-negative"),
    pytest.param(Case("GET", "/api/query/stats", 400, "invalid_request",
                      ("not a consistency token",),
                      headers={"X-Consistency-Token": "1.2.3"}), id="token-three-parts"),
    pytest.param(Case("GET", "/api/query/stats", 422, "validation_failed",
                      ("header.x-consistency-token", "at most 40 characters"),
                      headers={"X-Consistency-Token": "9" * 41}), id="token-too-long"),
    # --- dead-letter routes
    pytest.param(Case("POST", "/api/dead-letters/abc/retry", 422, "validation_failed",
                      ("path.dead_letter_id", "integer")), id="dead-letter-id-text"),
    pytest.param(Case("POST", "/api/dead-letters/0/skip", 422, "validation_failed",
                      ("path.dead_letter_id",)), id="dead-letter-id-0"),
    pytest.param(Case("POST", "/api/dead-letters/99999/retry", 404, "not_found",
                      ("no dead letter with id 99999",)), id="dead-letter-unknown-retry"),
    pytest.param(Case("POST", "/api/dead-letters/99999/skip", 404, "not_found",
                      ("no dead letter with id 99999",)), id="dead-letter-unknown-skip"),
    pytest.param(Case("GET", "/api/dead-letters", 422, "validation_failed",
                      ("query.projection",), params={"projection": "Bad!"}),
                 id="dead-letter-projection-pattern"),
    pytest.param(Case("GET", "/api/dead-letters", 404, "not_found",
               ("no projection named 'nope'",), params={"projection": "nope"}),
                 id="dead-letter-projection-unknown"),
    # --- JSON the service cannot store faithfully
    pytest.param(Case("POST", INSERT, 422, "validation_failed", ("body.data",),
               raw=b'{"data": {"x": NaN}}', headers=JSON), id="json-nan"),
    pytest.param(Case("POST", INSERT, 422, "validation_failed", ("body.data",),
               raw=b'{"data": {"x": [1e400, -Infinity]}}', headers=JSON), id="json-infinity"),
    pytest.param(Case("POST", INSERT, 422, "validation_failed", ("body.data",),
               raw=b'{"data": {"x": 123456789012345678901234567890}}', headers=JSON),
                 id="json-big-integer"),
    pytest.param(Case("POST", INSERT, 422, "validation_failed", ("body.data",),
               raw=b'{"data": {"x": "\\ud800"}}', headers=JSON), id="json-lone-surrogate"),
]


@pytest.mark.parametrize("case", CASES)
def test_bad_request_is_a_clear_4xx_and_writes_nothing(server: Server, case: Case) -> None:
    with nothing_written(server), server.client() as client:
        response = case.send(client)
        assert_error(response, case.status, case.code, *case.names)
    if case.status == 405:
        assert response.headers.get("Allow"), "a 405 says which methods are allowed"
    if case.status == 422:
        details = response.json()["details"]
        assert details and all({"location", "problem", "type"} <= set(d) for d in details)


PAD_SKELETON = len(json.dumps({"data": {"pad": ""}}))


def _body_of_size(size: int) -> bytes:
    """A valid insert body of exactly `size` bytes."""
    body = json.dumps({"data": {"pad": "x" * (size - PAD_SKELETON)}}).encode()
    assert len(body) == size
    return body


def test_a_body_at_the_limit_is_accepted(server: Server, client: httpx.Client) -> None:
    response = client.post(INSERT, content=_body_of_size(LIMIT), headers=JSON)
    assert response.status_code == 202, response.text
    read = client.get("/api/query/get", params={"id": response.json()["id"]},
                      headers={"X-Consistency-Token": response.json()["consistency_token"]})
    assert read.json()["data"]["pad"] == "x" * (LIMIT - PAD_SKELETON)


@pytest.mark.parametrize("path", [INSERT, UPDATE])
def test_an_oversized_body_with_content_length_is_413(
    server: Server, client: httpx.Client, path: str
) -> None:
    body = _body_of_size(LIMIT + 1)
    request = client.build_request("POST", path, content=body, headers=JSON)
    assert request.headers["content-length"] == str(LIMIT + 1)
    with nothing_written(server, marker=True):
        response = client.send(request)
        assert_error(response, 413, "payload_too_large",
                     f"larger than the limit of {LIMIT} bytes")


def test_an_oversized_chunked_body_without_content_length_is_413(
    server: Server, client: httpx.Client
) -> None:
    body = _body_of_size(LIMIT * 3)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start:start + 1000]

    request = client.build_request("POST", INSERT, content=chunks(), headers=JSON)
    assert "content-length" not in request.headers
    assert request.headers["transfer-encoding"] == "chunked"
    with nothing_written(server, marker=True):
        response = client.send(request)
        assert_error(response, 413, "payload_too_large",
                     f"larger than the limit of {LIMIT} bytes")


def test_a_small_chunked_body_is_accepted(server: Server, client: httpx.Client) -> None:
    body = json.dumps({"data": {"chunked": True}}).encode()
    request = client.build_request("POST", INSERT, content=iter([body[:5], body[5:]]),
                                   headers=JSON)
    assert "content-length" not in request.headers
    response = client.send(request)
    assert response.status_code == 202, response.text


def test_conflicts_write_nothing(server: Server, client: httpx.Client) -> None:
    """409s are bad input too: stale versions, reused ids, reused keys change nothing."""
    record_id = insert(client, {"v": 1}, key="conflict-key")["id"]
    with nothing_written(server, marker=True):
        stale = client.post(UPDATE, json={"id": record_id, "data": {}, "expected_version": 7})
        assert_error(stale, 409, "conflict", "not the expected 7")
        assert stale.json()["current_version"] == 1
        again = client.post(INSERT, json={"id": record_id, "data": {}})
        assert_error(again, 409, "rejected", "already exists")
        reused = client.post(INSERT, json={"data": {"v": 2}},
                             headers={"Idempotency-Key": "conflict-key"})
        assert_error(reused, 409, "idempotency_key_reused", "conflict-key")
