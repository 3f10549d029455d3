"""Tenants: one service, many tenants, none of whom sees another's data.

The tenant comes from the authenticated principal only (api/auth.py). Domain
code never hears of it: the framework namespaces what a tenant writes and reads.

- A stream, a command id and a view document of tenant T get the id `~T~<id>`.
  `~` is outside the identifier alphabet (messages.IDENTIFIER_PATTERN) and outside
  tenant names, so a prefixed id can never be sent by a client nor mistaken for
  another tenant's, and it sorts after every valid id.
- The default tenant (every principal without a tenant; everything with
  CQRSKIT_AUTH=none) keeps plain ids: same streams, same documents, no migration.
- Projections see the envelope with the plain stream id and write through a
  `TenantWriter`; queries read through a `TenantViews`. Both add the prefix to
  document ids; `find` is bounded to the tenant's id range (a primary-key range
  scan on every store), so no filter, cursor or aggregate reaches past it. A page
  cursor names a stored id; it is opaque, and a forged one only moves the start
  of a page within the tenant's own range.

`tenant=None` everywhere means "no tenancy": today's behaviour, no wrapper at all
(auth none, the CLI). `DEFAULT` means the default tenant of a service with
authentication on: plain ids, but reads exclude the other tenants' documents.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from cqrskit.messages import Envelope
from cqrskit.ports import Page, ViewReader, ViewWriter
from cqrskit.registry import Projection

DEFAULT = "default"
MARK = "~"
# Ids' alphabet without ':' (kept for future sub-namespaces) and '~' (the mark), at
# most 64 characters: an Entra ID tenant id (a GUID) fits.
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_TENANT = re.compile(TENANT_PATTERN)
# Every id of the default tenant sorts below MARK: valid ids start with a letter or
# digit, and so do the documents a domain keys itself ("all", "2026-11-29").
_DEFAULT_RANGE = ("", MARK)


def valid_tenant(name: str) -> bool:
    return bool(_TENANT.match(name))


def is_default(tenant: str | None) -> bool:
    return tenant is None or tenant == DEFAULT


def scoped(tenant: str | None, local_id: str) -> str:
    """The stored id of `local_id` for `tenant` (unchanged for the default tenant)."""
    if is_default(tenant):
        return local_id
    return f"{MARK}{tenant}{MARK}{local_id}"


def split(stored_id: str) -> tuple[str | None, str]:
    """(tenant, local id) of a stored id; (None, id) for the default tenant's."""
    if stored_id[:1] != MARK:
        return None, stored_id
    tenant, sep, local_id = stored_id[1:].partition(MARK)
    if not sep:
        return None, stored_id
    return tenant, local_id


def local(stored_id: str) -> str:
    """A stored id as its tenant knows it."""
    return split(stored_id)[1]


def id_range(tenant: str | None) -> tuple[str, str]:
    """[low, high) holding exactly the stored ids of `tenant`.

    '\\x7f' is the character after MARK: every id starting `~T~` is below `~T\\x7f`,
    and no tenant name holds '~', so `~T~` never matches another tenant's prefix.
    """
    if is_default(tenant):
        return _DEFAULT_RANGE
    return f"{MARK}{tenant}{MARK}", f"{MARK}{tenant}\x7f"


def tenant_of(stored_id: str) -> str:
    """The tenant a stored stream (or document, or command) id belongs to, named as
    principals name it."""
    return split(stored_id)[0] or DEFAULT


def public_result(answer: dict[str, Any]) -> dict[str, Any]:
    """A command's answer with the ids its caller sent (the token stays as it is:
    it hashes the stored stream id, which is what partitions the stream)."""
    if answer["id"][:1] != MARK and answer["command_id"][:1] != MARK:
        return answer
    return {**answer, "id": local(answer["id"]), "command_id": local(answer["command_id"])}


# ------------------------------------------------------------------- projections


class TenantWriter:
    """A projection's views, as one tenant sees them."""

    __slots__ = ("tenant", "views")

    def __init__(self, views: ViewWriter, tenant: str) -> None:
        self.views = views
        self.tenant = tenant

    def get(self, collection: str, doc_id: str) -> dict[str, Any] | None:
        return self.views.get(collection, scoped(self.tenant, doc_id))

    def put(self, collection: str, doc_id: str, doc: dict[str, Any]) -> None:
        self.views.put(collection, scoped(self.tenant, doc_id), doc)

    def delete(self, collection: str, doc_id: str) -> None:
        self.views.delete(collection, scoped(self.tenant, doc_id))


def for_projection(envelope: Envelope, views: ViewWriter) -> tuple[Envelope, ViewWriter]:
    """The envelope and views a projection applies an event with.

    The default tenant's events pass as they are (one comparison); a tenant's
    event gets its plain stream id and views that prefix every document id.
    """
    if envelope.stream_id[:1] != MARK:
        return envelope, views
    tenant, local_id = split(envelope.stream_id)
    if tenant is None:
        return envelope, views
    return replace(envelope, stream_id=local_id), TenantWriter(views, tenant)


def documents_read(projection: Projection, envelope: Envelope) -> Iterable[tuple[str, str]]:
    """The projection's prefetch hints for `envelope`, as stored ids."""
    tenant, local_id = split(envelope.stream_id)
    if tenant is None:
        return projection.documents_read(envelope)
    documents = projection.documents_read(replace(envelope, stream_id=local_id))
    return [(collection, scoped(tenant, doc_id)) for collection, doc_id in documents]


# ----------------------------------------------------------------------- queries


class TenantViews:
    """The query DB as one tenant's queries see it: only that tenant's documents."""

    __slots__ = ("high", "low", "tenant", "views")

    def __init__(self, views: ViewReader, tenant: str) -> None:
        self.views = views
        self.tenant = tenant
        self.low, self.high = id_range(tenant)

    async def get(self, collection: str, doc_id: str) -> dict[str, Any] | None:
        if is_default(self.tenant) and doc_id[:1] == MARK:
            return None  # another tenant's stored id, asked for by its full name
        return await self.views.get(collection, scoped(self.tenant, doc_id))

    async def find(
        self,
        collection: str,
        filters: Mapping[str, Any],
        *,
        after: str | None = None,
        limit: int = 50,
        descending: bool = False,
        id_range: tuple[str, str] | None = None,
    ) -> Page:
        # The cursor passes as it is: it names a stored id, and a forged one moves
        # the start within the tenant's range only, never out of it.
        return await self.views.find(
            collection, filters, after=after, limit=limit, descending=descending,
            id_range=self._narrowed(id_range),
        )

    def _narrowed(self, wanted: tuple[str, str] | None) -> tuple[str, str]:
        """The tenant's range, narrowed further by a range the query asked for itself."""
        if wanted is None:
            return self.low, self.high
        low = max(self.low, scoped(self.tenant, wanted[0]))
        high = min(self.high, scoped(self.tenant, wanted[1]))
        return low, max(low, high)
