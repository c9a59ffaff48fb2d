"""``Held``: an object as part of a key, by identity.

The serving engine keys caches by objects that are replaced, not changed (an adapter's configuration,
its LoRA weights): a key of ``id(obj)`` alone can outlive ``obj``, and a new object given the freed id
would then meet the old one's entry. A ``Held`` keeps its object alive for as long as the key is kept,
so no other object can take its id while it matters.
"""

from __future__ import annotations


class Held:
    """``obj`` in a key: equal to a ``Held`` of the same object alone, hashed by its id, and held."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other) -> bool:
        return isinstance(other, Held) and other.obj is self.obj
