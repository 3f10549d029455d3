"""Opaque page cursors: the last id of a page, so the next page starts after it."""

from __future__ import annotations

import base64

from cqrskit.errors import InvalidRequest


def encode_cursor(doc_id: str) -> str:
    return base64.urlsafe_b64encode(doc_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        padded = (cursor + "=" * (-len(cursor) % 4)).encode()
        return base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except ValueError:
        raise InvalidRequest(f"cursor {cursor!r} is not one this service handed out") from None
