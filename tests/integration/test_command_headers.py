"""Command headers over HTTP: valid ones take the route without header parameters
(cqrskit.api.routes.PlainCommandRoute) and are used as before; an invalid one gets
the documented route's 422, with the body's errors, as before; the schema still
documents them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import LiveServer

from cqrskit.api.app import create_app
from cqrskit.config import Settings


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(data_dir=tmp_path, stream="embedded")
    server = await LiveServer(create_app(settings)).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            yield client
    finally:
        await server.stop()


async def test_an_invalid_header_is_reported_with_the_body_errors(
    client: httpx.AsyncClient,
) -> None:
    answer = await client.post("/api/command/insert", json={"data": 5},
                               headers={"Idempotency-Key": "!bad"})
    assert answer.status_code == 422
    locations = [d["location"] for d in answer.json()["details"]]
    assert locations == ["header.idempotency-key", "body.data"]
    answer = await client.post("/api/command/insert", json={"data": {}},
                               headers={"X-Correlation-ID": "has space"})
    assert answer.status_code == 422
    assert [d["location"] for d in answer.json()["details"]] == ["header.x-correlation-id"]


async def test_valid_headers_are_used_and_the_schema_still_documents_them(
    client: httpx.AsyncClient,
) -> None:
    headers = {"Idempotency-Key": "key-1", "X-Correlation-ID": "corr-1"}
    first = await client.post("/api/command/insert", json={"data": {"n": 1}}, headers=headers)
    assert first.status_code == 202, first.text
    assert first.json()["command_id"] == "key-1"
    again = await client.post("/api/command/insert", json={"data": {"n": 1}}, headers=headers)
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    reused = await client.post("/api/command/insert", json={"data": {"n": 2}}, headers=headers)
    assert reused.status_code == 409
    schema: dict[str, Any] = (await client.get("/openapi.json")).json()
    operation = schema["paths"]["/api/command/insert"]["post"]
    assert [p["name"] for p in operation["parameters"]] == ["idempotency-key", "x-correlation-id"]
    assert operation["operationId"] == "command_insert_api_command_insert_post"
    not_allowed = await client.get("/api/command/insert")
    assert not_allowed.status_code == 405
    assert not_allowed.headers["Allow"] == "POST"
