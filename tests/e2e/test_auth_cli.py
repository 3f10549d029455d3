"""The secure default and `cqrskit keys`, through the real console script."""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import ServerPool, free_port, run_cli

pytestmark = pytest.mark.e2e


def test_listening_beyond_loopback_without_auth_is_refused() -> None:
    port = str(free_port())
    refusals = [
        run_cli("serve", "--host", "0.0.0.0", "--port", port, timeout=30),
        run_cli("api", "--port", port, env={"CQRSKIT_HOST": "0.0.0.0"}, timeout=30),
        run_cli("command-handler", "--host", "::", "--port", port, timeout=30),
        run_cli("query-handler", "--host", "10.1.2.3", "--port", port, timeout=30),
    ]
    for result in refusals:
        assert result.returncode != 0, result.stdout
        message = " ".join(result.stderr.split())
        assert "without authentication" in message, result.stderr
        assert "CQRSKIT_AUTH" in message and "CQRSKIT_ALLOW_UNAUTHENTICATED=1" in message


def test_keys_create_list_revoke_and_a_server_that_checks_them(
    tmp_path: Path, servers: ServerPool
) -> None:
    keys_file = tmp_path / "keys.json"
    env = {"CQRSKIT_API_KEYS_FILE": str(keys_file)}
    created = run_cli("keys", "create", "--name", "ci", "--scope", "commands:write",
                      "--scope", "queries:read", env=env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("cqk_") and "shown only now" in created.stderr
    key_id = key.split("_")[1]
    assert key.split("_", 2)[2] not in keys_file.read_text()
    assert keys_file.stat().st_mode & 0o077 == 0  # only its owner can read it

    listed = run_cli("keys", "list", env=env)
    assert listed.returncode == 0 and key_id in listed.stdout and "ci" in listed.stdout
    assert key.split("_", 2)[2] not in listed.stdout

    bad_scope = run_cli("keys", "create", "--name", "x", "--scope", "root", env=env)
    assert bad_scope.returncode != 0
    tenant_key = run_cli("keys", "create", "--name", "acme-ci", "--tenant", "acme",
                         "--scope", "queries:read", env=env)
    assert tenant_key.returncode == 0, tenant_key.stderr
    cells = [[cell.strip() for cell in line.split("│")]
             for line in run_cli("keys", "list", env=env).stdout.splitlines() if "│" in line]
    tenants = {row[2]: row[3] for row in cells}  # name -> tenant
    assert tenants["acme-ci"] == "acme" and tenants["ci"] == "default", cells

    server = servers.new({**env, "CQRSKIT_AUTH": "keys"})
    with server.client() as client:
        assert client.post("/api/command/insert", json={"data": {}}).status_code == 401
        sent = client.post("/api/command/insert", json={"data": {}}, headers={"X-API-Key": key})
        assert sent.status_code == 202, sent.text

        revoked = run_cli("keys", "revoke", key_id, env=env)
        assert revoked.returncode == 0, revoked.stderr
        [row] = [line for line in run_cli("keys", "list", env=env).stdout.splitlines()
                 if key_id in line]
        assert not row.rstrip(" │|").endswith("-"), row  # the revoked column has a date
        again = client.post("/api/command/insert", json={"data": {}}, headers={"X-API-Key": key})
        assert again.status_code == 401

    unknown = run_cli("keys", "revoke", "nosuchkey", env=env)
    assert unknown.returncode != 0 and "no API key" in unknown.stderr
