"""The draft tree as data, and the attention inputs derived from it in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class Tree:
    """Draft tokens hanging below a root (the last committed token, which is not stored here).

    Node i holds `tokens[i]`; `parents[i]` is its parent's index, or -1 for a child of the root;
    `scores[i]` is its priority (cumulative draft log-probability for model drafters). Parents
    always come before their children (`parents[i] < i`).
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, score: float) -> int:
        assert parent < len(self.tokens)
        self.tokens.append(int(token))
        self.parents.append(int(parent))
        self.scores.append(float(score))
        return len(self.tokens) - 1

    @property
    def depths(self) -> list[int]:
        """Depth of every node; children of the root have depth 1."""
        depths: list[int] = []
        for p in self.parents:
            depths.append(1 if p < 0 else depths[p] + 1)
        return depths

    def children(self) -> dict[int, dict[int, int]]:
        """{node (-1 = root): {token: child node}}."""
        out: dict[int, dict[int, int]] = {-1: {}}
        for i, (tok, p) in enumerate(zip(self.tokens, self.parents)):
            out.setdefault(p, {}).setdefault(tok, i)
        return out

    def path_to(self, node: int) -> list[int]:
        """Nodes from the root's child down to `node`, inclusive."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def ancestor_mask(self) -> torch.Tensor:
        """[n, n] bool: entry (i, j) is True when j is i or an ancestor of i."""
        n = len(self)
        mask = torch.zeros(n, n, dtype=torch.bool)
        for i, p in enumerate(self.parents):
            if p >= 0:
                mask[i, :p + 1] = mask[p, :p + 1]
            mask[i, i] = True
        return mask

    def best_nodes(self, budget: int) -> list[int]:
        """Indices of the `budget` best-scored nodes, ascending. The set is closed under ancestors
        because a child never scores above its parent (ties keep the parent: lower index)."""
        if len(self) <= budget:
            return list(range(len(self)))
        order = sorted(range(len(self)), key=lambda i: (-self.scores[i], i))
        return sorted(order[:budget])

    def select(self, keep: list[int]) -> Tree:
        """The sub-tree of the nodes `keep` (ascending, closed under ancestors), renumbered."""
        new_index = {old: new for new, old in enumerate(keep)}
        out = Tree()
        for old in keep:
            p = self.parents[old]
            out.add(self.tokens[old], new_index[p] if p >= 0 else -1, self.scores[old])
        return out

    def within_depth(self, max_depth: int) -> Tree:
        depths = self.depths
        return self.select([i for i in range(len(self)) if depths[i] <= max_depth])


def chain(tokens: list[int], score: float = 0.0) -> Tree:
    """A tree that is one path: tokens[0] below the root, each next below the one before."""
    tree = Tree()
    for tok in tokens:
        tree.add(tok, len(tree) - 1, score)
    return tree


def likeliest_path(tree: Tree) -> list[int]:
    """Nodes from the root's best-scored child down to a leaf, best-scored child at each step:
    the draft's guess of what the target will accept."""
    children = tree.children()
    path, node = [], -1
    while children.get(node):
        node = max(children[node].values(), key=lambda n: (tree.scores[n], -n))
        path.append(node)
    return path


def regraft(prefix: list[int], tree: Tree, committed: list[int]) -> Tree:
    """The part of `tree` (drafted below the last token of `prefix`) that lies below the last
    token of `committed`, re-rooted there; empty when `committed` left what was drafted.

    If `committed` stops short of `prefix`, the rest of `prefix` becomes a chain (scored above
    every node, so that a budget cut keeps it) with `tree` hung below it.
    """
    out = Tree()
    if len(committed) <= len(prefix):
        if prefix[:len(committed)] != committed:
            return out
        out = chain(prefix[len(committed):], math.inf)
        end, offset = len(out) - 1, len(out)
        for tok, p, score in zip(tree.tokens, tree.parents, tree.scores):
            out.add(tok, end if p < 0 else offset + p, score)
        return out
    if committed[:len(prefix)] != prefix:
        return out
    children, node = tree.children(), -1
    for tok in committed[len(prefix):]:
        node = children.get(node, {}).get(tok)
        if node is None:
            return out
    new_index = {node: -1}
    for i, p in enumerate(tree.parents):
        if p in new_index and i != node:
            new_index[i] = out.add(tree.tokens[i], new_index[p], tree.scores[i])
    return out


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[q, kv] bool -> [1, 1, q, kv] additive float mask (0 where allowed, dtype's min elsewhere)."""
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def tree_inputs(pending: list[int], tree: Tree, past_len: int, dtype: torch.dtype):
    """Inputs of one pass over `pending` committed tokens (not yet cached; the last is the root)
    followed by the tree's nodes, on top of `past_len` cached tokens.

    Returns input_ids [1, q], position_ids [1, q] and an additive mask [1, 1, q, past_len + q],
    q = len(pending) + len(tree): pending tokens attend causally, every node attends to the whole
    prefix and to its own ancestors, and a node at depth d sits at the root's position + d.
    """
    p, n = len(pending), len(tree)
    assert p >= 1, "the root token must be among the pending tokens"
    root_pos = past_len + p - 1
    ids = torch.tensor([pending + tree.tokens], dtype=torch.long)
    pos = torch.tensor([list(range(past_len, past_len + p)) + [root_pos + d for d in tree.depths]],
                       dtype=torch.long)
    allowed = torch.zeros(p + n, past_len + p + n, dtype=torch.bool)
    allowed[:, :past_len] = True
    allowed[:p, past_len:past_len + p] = torch.ones(p, p, dtype=torch.bool).tril()
    allowed[p:, past_len:past_len + p] = True
    allowed[p:, past_len + p:] = tree.ancestor_mask()
    return ids, pos, additive_mask(allowed, dtype)
