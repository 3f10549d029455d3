"""No secret reaches the logs or the traces: a real `cqrskit serve` with credentials in
its settings, requests that carry keys and tokens, and an error that quotes secrets;
then everything the process wrote (logs, and its spans through the console exporter)
is searched for them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cqrskit.api.auth import ApiKeys

from .harness import ServerPool, wait_until
from .leaky_domain import SECRETS

pytestmark = pytest.mark.e2e

DB_PASSWORD = "PgUrlPassword"
HANDLER_SECRET = "HandlerKeySecret"
SPAN = '"name": "GET /api/leaky/query/boom"'  # how the console exporter prints it
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.JwtSignatureSecret"


def test_no_secret_in_logs_or_spans(
    servers: ServerPool, postgres_schemas: Callable[..., str], tmp_path: Path
) -> None:
    query_db = postgres_schemas().replace("postgres@", f"postgres:{DB_PASSWORD}@", 1)
    assert DB_PASSWORD in query_db  # PostgreSQL trusts 127.0.0.1: the password is unused
    keys = ApiKeys(tmp_path / "keys.json")
    _, key = keys.create("client", ["commands:write", "queries:read"])
    key_id, key_secret = key.split("_")[1], key.split("_", 2)[2]
    server = servers.new({
        "CQRSKIT_QUERY_DB": query_db,
        "CQRSKIT_AUTH": "keys",
        "CQRSKIT_API_KEYS_FILE": str(tmp_path / "keys.json"),
        "CQRSKIT_HANDLER_API_KEY": f"cqk_{key_id}_{HANDLER_SECRET}",
        "CQRSKIT_TELEMETRY": "console",
        "CQRSKIT_LOG_LEVEL": "DEBUG",
        "CQRSKIT_DOMAINS": "cqrskit.domains.records,leaky_domain",
        # Export spans every 0.1 s rather than 5 s (uvicorn re-raises SIGTERM after its
        # shutdown, so the exit-time flush does not run; see the report).
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    })
    good = {"X-API-Key": key}
    with server.client() as client:
        assert client.post("/api/command/insert", json={"id": "r1", "data": {}},
                           headers=good).status_code == 202
        secret_params = {"id": "nope", "access_token": "QueryStringToken",
                         "key": "QueryStringKey"}
        # Refused (unknown parameters), but the request is logged and traced all the same.
        assert client.get("/api/query/get", params=secret_params,
                          headers=good).status_code == 422
        wrong = f"cqk_{key_id}_WrongKeySecret"
        assert client.post("/api/command/insert", json={"data": {}},
                           headers={"X-API-Key": wrong}).status_code == 401
        assert client.get("/api/query/list", headers={
            "Authorization": f"Bearer {JWT}"}).status_code == 401
    # On its own connection: after an unhandled error uvicorn closes the connection.
    with server.client() as client:
        boom = client.get("/api/leaky/query/boom", headers=good)
        assert boom.status_code == 500
        assert not any(secret in boom.text for secret in SECRETS)
    wait_until(lambda: SPAN in server.log_path.read_text(errors="replace"), timeout=10,
               what="the failed request's span in the output")
    server.stop()
    output = server.log_path.read_text(errors="replace")

    # What the test provoked is there, so its absence below means redacted, not unlogged.
    assert "unhandled error on GET /api/leaky/query/boom" in output
    assert "postgresql://app:***@db.internal" in output  # the error's message, redacted
    assert "postgresql://postgres:***@127.0.0.1:5432" in output  # the "ready" line
    assert "exception.message" in output or "RuntimeError" in output
    for secret in (*SECRETS, DB_PASSWORD, HANDLER_SECRET, key_secret, "WrongKeySecret",
                   "QueryStringToken", "QueryStringKey", "JwtSignatureSecret"):
        assert secret not in output, f"{secret} leaked:\n" + "\n".join(
            line for line in output.splitlines() if secret in line)[:2000]


def test_the_leaky_domain_leaks_without_redaction() -> None:
    """The check above can fail: unredacted, the error message holds every secret."""
    from cqrskit.redaction import redact

    from .leaky_domain import LEAKED

    assert all(secret in LEAKED for secret in SECRETS)
    assert not any(secret in redact(LEAKED) for secret in SECRETS)
