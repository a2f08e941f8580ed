"""Classic speculative decoding as a drafter: one chain of draft tokens instead of a tree.

Used by the benchmark to compare SpecExec trees with the chain that classic speculative decoding
verifies, under the same target, acceptance rule and caches.
"""

from __future__ import annotations

from specexec_app.core.tree import Tree

from .base import Drafter
from .model import ModelDrafter


class NoDraft(Drafter):
    """No draft at all: the target decodes one token per pass."""

    name = "none"

    def propose(self, tokens: list[int], budget: int) -> Tree:
        return Tree()


class ChainDrafter(Drafter):
    """The inner drafter's most likely chain of `budget` tokens. A model draft decodes it greedily
    (top-1 at every step, as classic speculative decoding does); any other drafter gives the
    best-scoring path of its tree."""

    name = "chain"

    def __init__(self, inner: Drafter):
        self.inner = inner
        if isinstance(inner, ModelDrafter):
            # One token per forward, as classic speculative decoding drafts: no forward cap
            # below the depth limit.
            self.inner = ModelDrafter(inner.model, inner.vocab_size, top_k=1, expand_batch=1,
                                      max_depth=inner.max_depth, stop_ids=inner.stop_ids,
                                      max_forwards=inner.max_depth + 1, seed=False)

    def reset(self) -> None:
        self.inner.reset()

    forwards = property(lambda self: self.inner.forwards)
    forward_s = property(lambda self: self.inner.forward_s)
    propose_s = property(lambda self: self.inner.propose_s)

    def propose(self, tokens: list[int], budget: int) -> Tree:
        if isinstance(self.inner, ModelDrafter):
            return self.inner.propose(tokens, budget)
        tree = self.inner.propose(tokens, max(budget, 64))
        children = tree.children()
        chain, node = Tree(), -1
        while len(chain) < budget and children.get(node):
            node = max(children[node].values(), key=lambda n: tree.scores[n])
            chain.add(tree.tokens[node], len(chain) - 1, tree.scores[node])
        return chain
