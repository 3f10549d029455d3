"""Rows the SQL stores share: the columns they select and how a row becomes a value.

The tables have the same columns on every SQL store; only the driver's types differ
(SQLite hands JSON back as text and times as ISO strings, PostgreSQL as decoded
values and datetimes), so each store passes how to decode those two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from cqrskit.messages import Envelope
from cqrskit.ports import DeadLetter

# In the field order of Envelope: a row maps onto it positionally.
EVENT_COLUMNS = (
    "event_id, stream_id, stream_type, version, position, type, schema_version, "
    "data, metadata, recorded_at"
)
DEAD_LETTER_COLUMNS = (
    "id, projection, partition, stream_id, position, envelope, error, attempts, is_cause, "
    "parked_at"
)


def envelope_of(
    row: Sequence[Any], json: Callable[[Any], Any], timestamp: Callable[[Any], str]
) -> Envelope:
    """An Envelope from a row of EVENT_COLUMNS."""
    return Envelope(
        row[0], row[1], row[2], row[3], row[4], row[5], row[6],
        json(row[7]), json(row[8]), timestamp(row[9]),
    )


def text_envelopes_of(
    rows: Iterable[Sequence[Any]], json: Callable[[Any], Any]
) -> list[Envelope]:
    """Envelopes from rows of EVENT_COLUMNS whose `recorded_at` is already text.

    The same as `envelope_of` row by row, in one comprehension: a rebuild decodes
    every event of the log, and a call and ten index operations per row cost about
    a tenth of decoding it.
    """
    return [
        Envelope(
            event_id, stream_id, stream_type, version, position, type_, schema_version,
            json(data), json(metadata), recorded_at,
        )
        for (
            event_id, stream_id, stream_type, version, position, type_, schema_version,
            data, metadata, recorded_at,
        ) in rows
    ]


def dead_letter_of(
    row: Sequence[Any], json: Callable[[Any], Any], timestamp: Callable[[Any], str]
) -> DeadLetter:
    """A DeadLetter from a row of DEAD_LETTER_COLUMNS."""
    return DeadLetter(
        id=row[0], projection=row[1], partition=row[2], stream_id=row[3], position=row[4],
        envelope=Envelope.from_dict(json(row[5])), error=row[6], attempts=row[7],
        is_cause=bool(row[8]), parked_at=timestamp(row[9]),
    )
