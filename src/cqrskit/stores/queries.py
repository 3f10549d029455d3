"""What every view store checks and encodes the same way: collections, limits, filter
paths and page cursors."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from cqrskit.errors import CqrskitError, InvalidRequest

R = TypeVar("R")
V = TypeVar("V")

_PATH_SEGMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def known_collection(collections: Mapping[str, V], name: str) -> V:
    """What a store keeps for collection `name` (its declaration, its container),
    once `setup` has declared it."""
    try:
        return collections[name]
    except KeyError:
        raise CqrskitError(f"collection {name!r} is not set up") from None


def check_limit(limit: int) -> None:
    if limit < 1:
        raise InvalidRequest(f"limit must be at least 1, not {limit}")


def page_rows(
    rows: list[R], limit: int, doc_id: Callable[[R], str]
) -> tuple[list[R], str | None]:
    """A page's rows and the cursor of the next page, from up to `limit + 1` rows:
    the extra row only says that another page follows."""
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, encode_cursor(doc_id(rows[-1]))


def filter_path(field: str, value: Any) -> list[str]:
    """The segments of a filter's dotted path, once both path and value are known safe.

    Segments end up inside SQL (as JSON paths), so only identifiers pass.
    """
    segments = field.split(".")
    if not all(_PATH_SEGMENT.match(s) for s in segments):
        raise InvalidRequest(
            f"field {field!r} is not a dotted path of identifiers (letters, digits, _)"
        )
    if isinstance(value, (dict, list)):
        raise InvalidRequest(f"filter on {field!r} must compare with a scalar value")
    return segments


def encode_cursor(doc_id: str) -> str:
    """Opaque page cursor: the last id of a page, so the next page starts after it."""
    return base64.urlsafe_b64encode(doc_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        padded = (cursor + "=" * (-len(cursor) % 4)).encode()
        return base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except ValueError:
        raise InvalidRequest(f"cursor {cursor!r} is not one this service handed out") from None
