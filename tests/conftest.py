"""Fixtures shared by every test that needs a real server (PostgreSQL, NATS, ...).

A test that needs a server asks for it with `require_service`: when the server
does not answer, the test is skipped with the reason and how to start it, or
fails with that reason when CQRSKIT_REQUIRE_SERVICES=1 (CI, where a missing
server is a broken setup, not a reason to skip).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

POSTGRES_HOST = "127.0.0.1"
POSTGRES_PORT = 5432
POSTGRES_DSN = f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/test"
POSTGRES_START = (
    "docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust -e POSTGRES_DB=test "
    "postgres:15"
)

RequireService = Callable[..., None]


def require_service(name: str, host: str, port: int, *, start: str = "") -> None:
    """Skip the calling test (or fail it under CQRSKIT_REQUIRE_SERVICES=1) when
    nothing accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as error:
        reason = f"{name} is not reachable on {host}:{port} ({error})"
    if start:
        reason += f": start it with `{start}`"
    if os.environ.get("CQRSKIT_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (CQRSKIT_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(name="require_service", scope="session")
def require_service_fixture() -> RequireService:
    """`require_service("NATS", "127.0.0.1", 4222, start="nats-server -js")` in a test."""
    return require_service


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """The test database (no schema): for admin connections in tests."""
    pytest.importorskip("psycopg", reason="install the postgres extra: pip install -e '.[dev]'")
    require_service("PostgreSQL", POSTGRES_HOST, POSTGRES_PORT, start=POSTGRES_START)
    return POSTGRES_DSN


def drop_schema(dsn: str, schema: str) -> None:
    """Drop a test schema; end the sessions of a test that left a transaction open on it."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '5s'")
        for _ in range(3):
            try:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
                return
            except psycopg.errors.LockNotAvailable:
                conn.execute(
                    "SELECT pg_terminate_backend(l.pid) FROM pg_locks l "
                    "JOIN pg_class c ON c.oid = l.relation "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = %s AND l.pid <> pg_backend_pid()",
                    (schema,),
                )
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
def postgres_schemas(postgres_dsn: str) -> Iterator[Callable[..., str]]:
    """A factory of store URLs, each in a new schema; every schema is dropped at the end.

    Extra keyword arguments become URL query parameters (e.g. application_name).
    """
    schemas: list[str] = []

    def new_url(**params: str) -> str:
        schema = f"cqrskit_t_{uuid.uuid4().hex[:12]}"
        schemas.append(schema)
        query = "".join(f"&{key}={value}" for key, value in params.items())
        return f"{postgres_dsn}?schema={schema}{query}"

    yield new_url
    for schema in schemas:
        drop_schema(postgres_dsn, schema)


@pytest.fixture
def postgres_url(postgres_schemas: Callable[..., str]) -> str:
    """A store URL in a schema of its own, dropped after the test."""
    return postgres_schemas()


# ----------------------------------------------------------- Cosmos DB stand-in

COSMOS_KEY_ENV = "CQRSKIT_COSMOS_KEY"
# The Azure Cosmos DB emulator's published key; the stand-in accepts any key, the
# SDK only needs a well-formed one to sign its requests with.
COSMOS_EMULATOR_KEY = (
    "C2y6yDjf5/R+ob0N8A7Cgv30VRDJIWEHLM+4QDU5DE2nQ9nDuVTqobD4b8mGGyPMbIZnqyMsEcaGQy67XIw/Jw=="
)
COSMOS_STANDIN = Path(__file__).resolve().parent.parent / "scripts" / "cosmos-standin"


def _not_available(reason: str) -> None:
    if os.environ.get("CQRSKIT_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (CQRSKIT_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


@dataclass(frozen=True)
class CosmosStandIn:
    """The running stand-in (`scripts/cosmos-standin`): URLs of fresh databases on it."""

    port: int

    def url(self, database: str) -> str:
        return (f"cosmos://127.0.0.1:{self.port}?database={database}&tls=false"
                f"&key_env={COSMOS_KEY_ENV}")

    def new_url(self) -> str:
        """A database of its own (created on first use): tests never share data."""
        return self.url(f"t{uuid.uuid4().hex[:16]}")

    def key_env(self) -> dict[str, str]:
        """The environment variable with the key, for a child process."""
        return {COSMOS_KEY_ENV: os.environ[COSMOS_KEY_ENV]}


@pytest.fixture(scope="session")
def cosmos_standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CosmosStandIn]:
    """One stand-in server (npm @vercel/cosmosdb-server, in memory) for the session."""
    pytest.importorskip("azure.cosmos", reason="install the cosmos extra: pip install -e '.[dev]'")
    if shutil.which("node") is None or shutil.which("npm") is None:
        _not_available("the Cosmos DB stand-in needs node and npm (apt-get install nodejs npm)")
    installed = subprocess.run(
        [str(COSMOS_STANDIN), "--install"], capture_output=True, text=True, timeout=600,
        stdin=subprocess.DEVNULL, check=False,
    )
    if installed.returncode != 0:
        _not_available(f"installing the Cosmos DB stand-in failed: {installed.stderr[-2000:]}")
    os.environ.setdefault(COSMOS_KEY_ENV, COSMOS_EMULATOR_KEY)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    log_path = tmp_path_factory.mktemp("cosmos-standin") / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(COSMOS_STANDIN), str(port)], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    _not_available(
                        f"the Cosmos DB stand-in did not start: {log_path.read_text()[-2000:]}"
                    )
                time.sleep(0.05)
        yield CosmosStandIn(port)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
