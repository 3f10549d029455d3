"""Aggregates: decide events from a command, evolve state from events."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar, TypeVar

from cqrskit.errors import CqrskitError
from cqrskit.messages import Command, Event

F = TypeVar("F", bound=Callable[..., Any])

_DECIDES = "__cqrskit_decides__"
_EVOLVES = "__cqrskit_evolves__"


def decides(command_type: type[Command]) -> Callable[[F], F]:
    """Mark a method as the one that turns `command_type` into events."""

    def mark(method: F) -> F:
        setattr(method, _DECIDES, command_type)
        return method

    return mark


def evolves(event_type: type[Event]) -> Callable[[F], F]:
    """Mark a method as the one that applies `event_type` to the state."""

    def mark(method: F) -> F:
        setattr(method, _EVOLVES, event_type)
        return method

    return mark


class Aggregate:
    """A consistency boundary: one stream of events, one id.

    Subclasses set `stream_type`, keep their state in plain attributes, and mark
    methods with `@decides(SomeCommand)` (returning events; they must not change
    state) and `@evolves(SomeEvent)` (changing state; they must not fail).
    """

    stream_type: ClassVar[str]
    _deciders: ClassVar[dict[type[Command], Callable[..., Iterable[Event]]]]
    _evolvers: ClassVar[dict[str, tuple[type[Event], Callable[..., None]]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "stream_type" not in cls.__dict__:
            cls.stream_type = cls.__name__.lower()
        cls._deciders, cls._evolvers = {}, {}
        for klass in reversed(cls.__mro__):
            for member in vars(klass).values():
                if (command_type := getattr(member, _DECIDES, None)) is not None:
                    cls._deciders[command_type] = member
                if (event_type := getattr(member, _EVOLVES, None)) is not None:
                    cls._evolvers[event_type.type_name] = (event_type, member)

    def __init__(self, aggregate_id: str) -> None:
        self.id = aggregate_id
        self.version = 0

    @classmethod
    def command_types(cls) -> list[type[Command]]:
        return list(cls._deciders)

    @classmethod
    def event_types(cls) -> list[type[Event]]:
        return [event_type for event_type, _ in cls._evolvers.values()]

    def decide(self, command: Command) -> list[Event]:
        decider = self._deciders.get(type(command))
        if decider is None:
            raise CqrskitError(f"{type(self).__name__} does not handle {type(command).__name__}")
        return list(decider(self, command))

    def evolve(self, event: Event) -> None:
        entry = self._evolvers.get(event.type_name)
        if entry is not None:
            entry[1](self, event)
        self.version += 1

    def evolve_stored(self, type_name: str, data: dict[str, Any]) -> None:
        """Apply an event read back from the store (data already upcast)."""
        entry = self._evolvers.get(type_name)
        if entry is not None:
            entry[1](self, entry[0].model_validate(data))
        self.version += 1
