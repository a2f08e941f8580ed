"""The drafter interface: whatever proposes the tree that the target verifies. Drafters live in
the drafts/ package; the engine knows only this."""

from __future__ import annotations

from abc import ABC, abstractmethod

from .tree import Tree


class Drafter(ABC):
    """Proposes a tree of likely continuations of the committed tokens.

    The acceptance rule makes the output exact whatever the tree holds; a better tree only
    means more tokens per target pass.
    """

    name: str = "drafter"
    # Cumulative counters for stats (a model drafter's): draft forwards run, seconds inside
    # them, seconds in propose. Drafters without a model leave them at 0.
    forwards: int = 0
    forward_s: float = 0.0
    propose_s: float = 0.0

    @abstractmethod
    def propose(self, tokens: list[int], budget: int) -> Tree:
        """A tree of at most `budget` nodes below the last of `tokens` (the root)."""

    def reset(self) -> None:
        """Forget any state kept between calls (caches of earlier conversations)."""
