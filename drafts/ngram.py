"""Prompt lookup extended to trees: continuations of the text's own suffix matches."""

from __future__ import annotations

import numpy as np

from specexec_app.core.tree import Tree

from .base import Drafter


class NgramDrafter(Drafter):
    """Finds earlier places where the last 1..`max_ngram` tokens occurred and proposes what
    followed them, merged into a trie. A node's score is the number of matches running through
    it, each weighted by its match length, so a child never outscores its parent. Needs no
    weights and works with any target; strongest on code, quotes, summaries and edits.
    """

    name = "ngram"

    def __init__(self, max_ngram: int = 4, max_depth: int = 16, max_matches: int = 32,
                 min_ngram: int = 1):
        self.min_ngram = min_ngram  # shorter matches are ignored: an empty tree costs the least
        self.max_ngram = max_ngram
        self.max_depth = max_depth
        self.max_matches = max_matches

    def propose(self, tokens: list[int], budget: int) -> Tree:
        seq = np.asarray(tokens, dtype=np.int64)
        trie: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        tree = Tree()
        if len(seq) < 2:
            return tree  # nothing came before the last token
        top = min(self.max_ngram, len(seq) - 1)
        # Earlier places the suffix occurred: `ends` (each followed by a continuation) where the
        # last token did, then how far back each match runs (up to `top` tokens). One pass over
        # the text for the last token, then a few over the candidates: most passes find none.
        ends = np.flatnonzero(seq[:-1] == seq[-1]) + 1
        length = np.ones_like(ends)
        for k in range(1, top):
            longer = (length == k) & (ends > k)
            longer[longer] = seq[ends[longer] - 1 - k] == seq[-1 - k]
            length += longer
        for n in range(top, self.min_ngram - 1, -1):
            for e in ends[length >= n][::-1][: self.max_matches]:  # most recent first
                node = -1
                for tok in seq[e: e + self.max_depth].tolist():
                    child = trie.get((node, tok))
                    if child is None:
                        child = trie[(node, tok)] = tree.add(tok, node, 0.0)
                    tree.scores[child] += n
                    node = child
        return tree.select(tree.best_nodes(budget))
