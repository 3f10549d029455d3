"""What every view store checks and encodes the same way: filter paths and page cursors."""

from __future__ import annotations

import base64
import re
from typing import Any

from cqrskit.errors import InvalidRequest

_PATH_SEGMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


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
