"""The `http` workload's baseline: a bare FastAPI app with a POST route of the command
route's shape (a pydantic body like InsertRecord's, a 202 with a small JSON answer) and
nothing behind it. Served by `uvicorn benchmarks.http_bare:app`."""

from __future__ import annotations

import uuid

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, JsonValue

app = FastAPI()


class InsertBody(BaseModel):
    """InsertRecord's shape: an optional id and a JSON object."""

    id: str | None = None
    data: dict[str, JsonValue]


@app.get("/readyz")
async def ready() -> dict[str, str]:
    return {"status": "ready"}


@app.post("/api/command/insert", status_code=202)
async def insert(body: InsertBody) -> JSONResponse:
    command_id = str(uuid.uuid4())
    return JSONResponse(
        {"command_id": command_id, "stream_id": body.id or command_id, "version": 1},
        status_code=202, headers={"Location": f"/api/commands/{command_id}"},
    )
