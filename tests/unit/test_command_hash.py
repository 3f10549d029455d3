"""The digest that tells a retried command from another command under the same id."""

from typing import ClassVar

from cqrskit.command_handler import command_hash
from cqrskit.messages import Command


def test_command_hash_digests_integers_beyond_64_bits() -> None:
    """A domain may leave an integer field unbounded: the digest must not fail on it."""
    class Huge(Command):
        name: ClassVar[str] = "huge"
        n: int

    assert command_hash(Huge(n=2**100)) == command_hash(Huge(n=2**100))
    assert command_hash(Huge(n=2**100)) != command_hash(Huge(n=2**100 + 1))
