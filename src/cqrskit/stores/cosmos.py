"""Cosmos DB: what the event store and the view store share — the URL, the client, errors.

URL: `cosmos://HOST[:PORT]?database=NAME&tls=true|false&key_env=VARIABLE`

- `database`: the Cosmos database the containers live in (default `cqrskit`); the
  command DB and the query DB may share one, their containers have distinct names.
- `tls`: `true` (default) speaks HTTPS; `false` plain HTTP, for the local stand-in
  only. It also switches the SDK's endpoint discovery: a real account advertises
  its regional endpoints, the stand-in advertises an https address it does not serve.
- `key_env`: the name of the environment variable that holds the account key. The
  key itself never appears in a URL, a log line or an error message. Without
  `key_env`, the client authenticates with Microsoft Entra ID through
  `azure.identity.aio.DefaultAzureCredential` (a managed identity on Azure).
- the port defaults to 443 with TLS, 8081 without.

Examples: `cosmos://myaccount.documents.azure.com?database=cqrskit` (managed
identity), `cosmos://127.0.0.1:8081?database=dev&tls=false&key_env=CQRSKIT_COSMOS_KEY`.

The helpers below paper over two things: the SDK's exceptions (turned into
`Unavailable` when the service cannot be reached), and two quirks of the local
stand-in (`@vercel/cosmosdb-server`) that production does not have: a point read
of a missing document answers 500 instead of 404, and a query scoped to one
partition must name the partition key in its WHERE clause (it ignores the SDK's
partition key option otherwise, so every query here names it explicitly).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from azure.core import MatchConditions
from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError
from azure.cosmos import PartitionKey
from azure.cosmos.aio import ContainerProxy, CosmosClient, DatabaseProxy
from azure.cosmos.exceptions import CosmosHttpResponseError

from cqrskit.errors import CqrskitError, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

_DATABASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,254}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_OPTIONS = {"database", "tls", "key_env"}
# Status codes that mean "not now" rather than "no": throttled after the SDK's own
# retries, timed out, or the service (or a replica) unavailable.
_TRANSIENT = {408, 429, 449, 500, 502, 503, 504}

IF_MATCH = MatchConditions.IfNotModified
# Concurrent requests one step sends (documents to read, stamp or write).
FAN_OUT = 32


@dataclass(frozen=True, slots=True)
class CosmosUrl:
    """Where the account is and how to authenticate; never holds the key itself."""

    endpoint: str
    database: str
    key_env: str | None
    tls: bool

    @classmethod
    def parse(cls, url: str) -> CosmosUrl:
        parts = urlsplit(url)
        if parts.scheme != "cosmos" or not parts.hostname:
            raise CqrskitError(
                f"not a Cosmos DB URL: {url!r} (expected "
                "cosmos://host[:port]?database=NAME&tls=true|false&key_env=VARIABLE)"
            )
        if parts.username or parts.password:
            raise CqrskitError(
                "a Cosmos DB URL carries no credentials: put the key in an environment "
                "variable and name it with ?key_env=VARIABLE"
            )
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = set(options) - _OPTIONS
        if unknown:
            hint = " (put the key in an environment variable and name it with key_env)" if (
                "key" in unknown
            ) else ""
            raise CqrskitError(
                f"unknown Cosmos DB URL option(s) {', '.join(sorted(unknown))}; "
                f"use {', '.join(sorted(_OPTIONS))}{hint}"
            )
        database = options.get("database", "cqrskit")
        if not _DATABASE_NAME.match(database):
            raise CqrskitError(f"database name {database!r} must match {_DATABASE_NAME.pattern}")
        tls_text = options.get("tls", "true").lower()
        if tls_text not in ("true", "false"):
            raise CqrskitError(f"tls must be true or false, not {tls_text!r}")
        tls = tls_text == "true"
        key_env = options.get("key_env") or None
        if key_env is not None and not _ENV_NAME.match(key_env):
            raise CqrskitError(f"key_env {key_env!r} is not an environment variable name")
        port = parts.port or (443 if tls else 8081)
        endpoint = f"{'https' if tls else 'http'}://{parts.hostname}:{port}/"
        return cls(endpoint, database, key_env, tls)


def _credential(url: CosmosUrl) -> Any:
    if url.key_env is None:
        from azure.identity.aio import DefaultAzureCredential

        return DefaultAzureCredential()
    key = os.environ.get(url.key_env)
    if not key:
        raise CqrskitError(
            f"the environment variable {url.key_env} (named by key_env in the Cosmos DB URL) "
            "is not set"
        )
    return key


@dataclass(slots=True)
class CosmosAccount:
    """An open client on one database, and the credential to close with it."""

    client: CosmosClient
    database: DatabaseProxy
    credential: Any

    async def close(self) -> None:
        await self.client.close()
        if not isinstance(self.credential, str):
            with contextlib.suppress(Exception):
                await self.credential.close()


async def open_database(url: CosmosUrl) -> CosmosAccount:
    """A client and the database, created if missing; fails fast when nothing answers."""
    # The SDK logs every request and response at INFO: far too much for a service log.
    azure_log = logging.getLogger("azure")
    azure_log.setLevel(max(logging.WARNING, azure_log.level))
    credential = _credential(url)
    client = CosmosClient(
        url.endpoint, credential=credential, enable_endpoint_discovery=url.tls,
        connection_timeout=5, retry_total=3, retry_connect=2, retry_read=2,
    )
    account = CosmosAccount(client, client.get_database_client(url.database), credential)
    try:
        async with translated(f"the Cosmos DB account at {url.endpoint}"):
            try:
                account.database = await client.create_database_if_not_exists(url.database)
            except CosmosHttpResponseError as error:
                # As for containers (see ensure_container): created meanwhile (409), or
                # created by the deployment because our role may not (403).
                if error.status_code not in (403, 409):
                    raise
                await account.database.read()
    except BaseException:
        await account.close()
        raise
    return account


async def ensure_container(
    database: DatabaseProxy, name: str, partition_key: str, *, ttl: bool = False,
    unindexed: tuple[str, ...] = (),
) -> ContainerProxy:
    """The container, created if missing. `ttl` lets documents carry their own `ttl`
    (seconds), which Cosmos uses to delete tombstones and old markers by itself.
    `unindexed` names top-level fields never filtered on (JSON text kept verbatim):
    every indexed path costs request units on every write."""
    # (The SDK annotates the policy as dict[str, str]; it is any JSON object.)
    indexing: Any = {
        "indexingMode": "consistent", "automatic": True,
        "includedPaths": [{"path": "/*"}],
        "excludedPaths": [{"path": '/"_etag"/?'}, *({"path": f"/{f}/?"} for f in unindexed)],
    }
    async with translated(f"Cosmos DB container {name}"):
        try:
            return await database.create_container_if_not_exists(
                name, partition_key=PartitionKey(partition_key),
                default_ttl=-1 if ttl else None, indexing_policy=indexing,
            )
        except CosmosHttpResponseError as error:
            # 409: another process created it between the SDK's read and its create.
            # 403: data-plane roles (a managed identity) may not create containers:
            # the deployment (Bicep) did, and we only use it.
            if error.status_code not in (403, 409):
                raise
            container = database.get_container_client(name)
            await container.read()
            return container


# ------------------------------------------------------------------ errors


def status_of(error: BaseException) -> int | None:
    # Batch errors (CosmosBatchOperationError) carry the failing operation's status too.
    code = getattr(error, "status_code", None) if isinstance(error, HttpResponseError) else None
    return code if isinstance(code, int) else None


def is_not_found(error: BaseException) -> bool:
    if status_of(error) == 404:
        return True
    # The stand-in answers a point read of a missing document (with a partition key)
    # with a 500 from its own TypeError; Cosmos answers 404.
    return status_of(error) == 500 and "Cannot read properties of undefined" in str(error)


def is_conflict(error: BaseException) -> bool:
    return status_of(error) == 409


def is_precondition_failed(error: BaseException) -> bool:
    return status_of(error) == 412


def unavailable(error: BaseException, what: str) -> Unavailable | None:
    """The Unavailable that `error` means, or None when it is not about availability."""
    if isinstance(error, (ServiceRequestError, ServiceResponseError, TimeoutError, OSError)):
        return Unavailable(f"{what} cannot be reached: {type(error).__name__}: {error}")
    code = status_of(error)
    if code in _TRANSIENT and not is_not_found(error):
        return Unavailable(f"{what} is unavailable (HTTP {code}); try again")
    return None


@contextlib.asynccontextmanager
async def translated(what: str) -> AsyncIterator[None]:
    """Turn "cannot reach the service" into Unavailable (503) that says what failed."""
    try:
        yield
    except Unavailable:
        raise
    except Exception as error:
        mapped = unavailable(error, what)
        if mapped is None:
            raise
        raise mapped from error


# ---------------------------------------------------------- small operations


async def read_or_none(container: ContainerProxy, item_id: str, partition: str) -> Any:
    """A point read (1 RU); None when the document does not exist."""
    try:
        return await container.read_item(item_id, partition_key=partition)
    except CosmosHttpResponseError as error:
        if is_not_found(error):
            return None
        raise


async def query(
    container: ContainerProxy, sql: str, params: Mapping[str, Any] | None = None,
    *, partition: str | None = None,
) -> list[Any]:
    """Every result of a parameterised query. With `partition`, the SQL must also name
    the partition key in its WHERE clause (see the module docstring)."""
    parameters: list[dict[str, Any]] = [
        {"name": name, "value": value} for name, value in (params or {}).items()
    ]
    if partition is None:
        items = container.query_items(sql, parameters=parameters)
    else:
        items = container.query_items(sql, parameters=parameters, partition_key=partition)
    return [item async for item in items]


_ID_ESCAPES = {ch: f"%{ord(ch):02X}" for ch in "/\\?#%"}


def safe_id(text: str) -> str:
    """A Cosmos document id made from any text: `/ \\ ? #` may not appear in one."""
    return "".join(_ID_ESCAPES.get(ch, ch) for ch in text)


class ServerClock:
    """Wall-clock seconds anchored to the server's `_ts`, for lease expiry times.

    Processes on several machines compare each other's lease times; the server's
    clock is the one they share. `_ts` has whole seconds, so the anchor is only
    moved when the local clock is more than two seconds off, and leases are kept
    well above that (10 s by default).
    """

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def observe(self, document: Mapping[str, Any]) -> None:
        server = document.get("_ts")
        if isinstance(server, int):
            skew = server + 0.5 - time.time()
            if abs(skew - self.offset) > 2:
                self.offset = skew


async def bounded(works: Iterable[Awaitable[T]], limit: int = FAN_OUT) -> list[T]:
    """Await all, at most `limit` at a time."""
    semaphore = asyncio.Semaphore(limit)

    async def one(work: Awaitable[T]) -> T:
        async with semaphore:
            return await work

    return list(await asyncio.gather(*(one(w) for w in works)))
