"""Errors the core raises; the API maps each to one HTTP status."""

from __future__ import annotations


class CqrskitError(Exception):
    """Base of every error cqrskit raises on purpose.

    `headers` are sent with the HTTP answer (e.g. whether a read was fresh).
    """

    headers: dict[str, str] | None = None


class CommandRejected(CqrskitError):
    """The aggregate refused the command (a business rule): 409."""


class NotFound(CqrskitError):
    """The command or query names something that does not exist: 404."""


class ConcurrencyConflict(CqrskitError):
    """The stream moved on since the caller read it: 409 with the current version."""

    def __init__(self, stream_id: str, expected: int, current: int) -> None:
        super().__init__(
            f"stream {stream_id!r} is at version {current}, not the expected {expected}"
        )
        self.stream_id = stream_id
        self.expected = expected
        self.current = current


class IdempotencyKeyReused(CqrskitError):
    """A command id came back with a different command: 409."""

    def __init__(self, command_id: str) -> None:
        super().__init__(
            f"command id {command_id!r} was already used for a different command; "
            "use a new Idempotency-Key for a new command"
        )
        self.command_id = command_id


class InvalidRequest(CqrskitError):
    """Input that passed schema validation but still cannot be served: 400."""


class Unavailable(CqrskitError):
    """A store or stream cannot be reached right now: 503."""
