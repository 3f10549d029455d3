"""A test-only domain whose query fails with secrets in its error message.

Loaded by the server subprocess (CQRSKIT_DOMAINS=...,leaky_domain with this directory
on PYTHONPATH), it stands for a library error that quotes a connection string or a
token: the server logs it, and records it on the request's span, and neither may
show the secrets. Route: GET /api/leaky/query/boom
"""

from __future__ import annotations

from typing import Any, ClassVar

from cqrskit.ports import ViewReader
from cqrskit.registry import Domain, Query

domain = Domain("leaky")

# Each secret in a shape the redaction knows; tests look for the secret parts.
LEAKED = (
    "could not reach postgresql://app:LeakedDbPassword@db.internal:5432/views, "
    "Endpoint=sb://hub.servicebus.windows.net/;SharedAccessKeyName=send;"
    "SharedAccessKey=LeakedSharedKey=; AccountKey=LeakedAccountKey==; "
    "https://vault.example/x?sig=LeakedSignature&key=LeakedQueryKey; "
    "Authorization: Bearer LeakedBearerToken; X-API-Key: cqk_abc123_LeakedApiSecret"
)
SECRETS = ("LeakedDbPassword", "LeakedSharedKey", "LeakedAccountKey", "LeakedSignature",
           "LeakedQueryKey", "LeakedBearerToken", "LeakedApiSecret")


@domain.query
class Boom(Query):
    """Fails with a message that quotes secrets."""

    name: ClassVar[str] = "boom"
    reads: ClassVar[tuple[str, ...]] = ()
    result: ClassVar[Any] = dict

    async def run(self, views: ViewReader) -> Any:
        raise RuntimeError(LEAKED)
