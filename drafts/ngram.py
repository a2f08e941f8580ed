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
        for n in range(min(self.max_ngram, len(seq) - 1), self.min_ngram - 1, -1):
            # Windows that end before the last token, so that each has a continuation.
            windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
            starts = np.flatnonzero((windows == seq[-n:]).all(axis=1))
            for s in starts[::-1][: self.max_matches]:  # most recent first
                node = -1
                for tok in seq[s + n: s + n + self.max_depth].tolist():
                    child = trie.get((node, tok))
                    if child is None:
                        child = trie[(node, tok)] = tree.add(tok, node, 0.0)
                    tree.scores[child] += n
                    node = child
        return tree.select(tree.best_nodes(budget))
