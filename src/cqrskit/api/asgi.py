"""The App Service API as an ASGI app factory, for servers that import an app by name.

`gunicorn --config deploy/azure/gunicorn.conf.py` serves `cqrskit.api.asgi:create()`
with uvicorn workers; each worker process calls `create()` once. It is the app of
`cqrskit api`: configured only by CQRSKIT_* environment variables (Settings), it
forwards commands and queries to CQRSKIT_COMMAND_HANDLER_URL / QUERY_HANDLER_URL
(the Function apps) when they are set, and handles them in process otherwise.
"""

from __future__ import annotations

from fastapi import FastAPI

from cqrskit import process
from cqrskit.api.app import create_app
from cqrskit.config import Settings


def create() -> FastAPI:
    """The `api` role's app, with the logging and telemetry `cqrskit api` sets up."""
    settings = Settings()
    process.setup(settings, "api")
    return create_app(settings, role="api")
