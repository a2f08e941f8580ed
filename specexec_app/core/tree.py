"""The draft tree as data, and the attention inputs derived from it in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
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
        order = np.lexsort((np.arange(len(self)), -np.asarray(self.scores, dtype=np.float64)))
        return sorted(order[:budget].tolist())

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


KEY_ALIGN = 8  # SDPA's memory-efficient kernel copies a mask whose row stride is not a multiple of 8


def padded_mask(rows: int, width: int, dtype: torch.dtype, device, past: int) -> torch.Tensor:
    """[rows, width] additive mask, 0 over the first `past` columns and dtype's min elsewhere, as a
    view of storage `width` rounded up to KEY_ALIGN wide (so that attention never pads a copy)."""
    full = torch.empty(rows, -(-width // KEY_ALIGN) * KEY_ALIGN, dtype=dtype, device=device)
    full[:, :past] = 0
    full[:, past:] = torch.finfo(dtype).min
    return full[:, :width]


def mark_ancestors(mask: torch.Tensor, parents: torch.Tensor, nodes: torch.Tensor,
                   columns: torch.Tensor, steps: int) -> torch.Tensor:
    """Open (set to 0) in row r of `mask` [len(nodes), K] the column of nodes[r] and of each of its
    ancestors, walking up `steps` generations with tensor ops (no host round trip).

    parents: [n] parent index of every node, -1 below the root; columns: [n] each node's column
    (key slot). Returns each row's depth [len(nodes)] (1 for a child of the root), exact when
    `steps` is at least the deepest row's depth.
    """
    rows = torch.arange(len(nodes), device=nodes.device)
    own = columns[nodes]
    cur, depth = nodes, torch.zeros_like(nodes)
    for _ in range(steps):
        live = cur >= 0
        safe = cur.clamp(min=0)
        mask[rows, torch.where(live, columns[safe], own)] = 0  # a finished row re-opens its own
        depth += live
        cur = torch.where(live, parents[safe], cur)
    return depth


def to_device(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """Lists of ints -> one long tensor on `device`, copied once and without a host wait."""
    t = torch.tensor(rows, dtype=torch.long)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def tree_inputs(pending: list[int], tree: Tree, past_len: int, dtype: torch.dtype,
                device: torch.device | str = "cpu"):
    """Inputs of one pass over `pending` committed tokens (not yet cached; the last is the root)
    followed by the tree's nodes, on top of `past_len` cached tokens, built on `device`.

    Returns input_ids [1, q], position_ids [1, q] and an additive mask [1, 1, q, past_len + q]
    (its rows stride a multiple of KEY_ALIGN), or None for a one-row pass, which sees everything
    cached. q = len(pending) + len(tree): pending tokens attend causally, every node attends to
    the whole prefix and to its own ancestors, and a node at depth d sits at the root's position
    + d. Only the tokens and parent indices cross to the device; mask and depths are built there.
    """
    device = torch.device(device)
    p, n = len(pending), len(tree)
    assert p >= 1, "the root token must be among the pending tokens"
    q, width = p + n, past_len + p + n
    sent = to_device([pending + tree.tokens, [-1] * p + tree.parents], device)
    ids, parents = sent[:1], sent[1, p:]
    pos = torch.arange(past_len, past_len + q, device=device)
    if q == 1:
        return ids, pos[None], None
    mask = padded_mask(q, width, dtype, device, past_len)
    mask[:p, past_len:past_len + p].triu_(1)  # pending tokens: causal among themselves
    if n:
        mask[p:, past_len:past_len + p] = 0
        nodes = torch.arange(n, device=device)
        steps = max(tree.depths)
        depth = mark_ancestors(mask[p:], parents, nodes, past_len + p + nodes, steps)
        pos[p:] = past_len + p - 1 + depth
    return ids, pos[None], mask[None, None]


class GrowingTree:
    """A tree being grown on a device by a draft model. Node i's token, parent (-1 below the
    root), score, depth, key slot (its entry in the draft's KV cache once the draft has run on
    it, else -1) and whether it is open (may still be run) are tensors [capacity]; so is the
    ancestor relation among the nodes run, `seen` [runs, runs]. The host knows only counts, so
    growing needs no host round trip. Parents come before their children, and scores never rise
    from a parent to its child. A node is open until run, unless it is `max_depth` deep, ends
    on a token of `stops` [s], or scores -inf."""

    def __init__(self, device: torch.device, max_depth: int, stops: torch.Tensor,
                 capacity: int = 1024, runs: int = 256):
        self.device = torch.device(device)
        self.max_depth, self.stops = max_depth, stops
        self.n = 0     # nodes
        self.runs = 0  # nodes run, in slots past .. past + runs - 1 of the draft's cache
        kw = dict(dtype=torch.long, device=self.device)
        self.tokens = torch.zeros(capacity, **kw)
        self.parents = torch.full((capacity,), -1, **kw)
        self.depths = torch.zeros(capacity, **kw)
        self.slots = torch.full((capacity,), -1, **kw)
        self.scores = torch.full((capacity,), -math.inf, dtype=torch.float32, device=self.device)
        self.open = torch.zeros(capacity, dtype=torch.bool, device=self.device)
        self.seen = torch.zeros(runs, runs, dtype=torch.bool, device=self.device)

    def _reserve(self, m: int) -> None:
        cap = len(self.tokens)
        if self.n + m > cap:
            grow = max(cap, self.n + m - cap)
            for name, fill in (("tokens", 0), ("parents", -1), ("depths", 0), ("slots", -1),
                               ("scores", -math.inf), ("open", False)):
                old = getattr(self, name)
                setattr(self, name, torch.cat([old, old.new_full((grow,), fill)]))

    def add(self, parents: torch.Tensor, tokens: torch.Tensor, scores: torch.Tensor) -> None:
        """Append nodes: parents, tokens, scores [m] (parents already in the tree, or -1)."""
        m = len(tokens)
        self._reserve(m)
        new = slice(self.n, self.n + m)
        self.tokens[new] = tokens
        self.parents[new] = parents
        self.scores[new] = scores
        depths = torch.where(parents >= 0, self.depths[parents.clamp(min=0)] + 1, 1)
        self.depths[new] = depths
        self.open[new] = ((depths < self.max_depth) & scores.isfinite()
                          & ~torch.isin(tokens, self.stops))
        self.n += m

    def seed(self, tokens: torch.Tensor, scores: torch.Tensor, past: int) -> None:
        """Start the tree with a chain [L] that the draft has already run, in cache slots past ..
        past + L - 1 (right after the prefix): node i below node i - 1 (node 0 below the root),
        closed, its children still to add."""
        assert self.n == 0 and self.runs == 0
        m = len(tokens)
        self._reserve(m)
        steps = torch.arange(m, device=self.device)
        self.tokens[:m], self.scores[:m] = tokens, scores
        self.parents[:m], self.depths[:m], self.slots[:m] = steps - 1, steps + 1, past + steps
        self.n = m
        if m > len(self.seen):
            self.seen = torch.zeros(m, m, dtype=torch.bool, device=self.device)
        self.seen[:m, :m] = torch.ones(m, m, dtype=torch.bool, device=self.device).tril()
        self.runs = m

    def ranked(self, budget: int) -> torch.Tensor:
        """The best min(budget, n) nodes [k], best first: by score, ties to the lower index, so the
        set is closed under ancestors (what Tree.best_nodes keeps)."""
        return torch.sort(self.scores[:self.n], descending=True, stable=True).indices[:budget]

    def pass_inputs(self, nodes: torch.Tensor, past: int, dtype: torch.dtype):
        """Inputs of a draft pass over open `nodes` [b] (whose ancestors have all been run) on top
        of the draft's cache: the committed prefix (`past` entries, the root last) then the
        nodes run so far. The nodes take the next b slots and are closed. Returns input_ids
        [1, b], position_ids [1, b] and an additive mask [1, 1, b, past + runs + b]: each row
        sees the prefix, its ancestors and itself."""
        b, runs = len(nodes), self.runs
        if runs + b > len(self.seen):
            cap = max(2 * len(self.seen), runs + b)
            seen = torch.zeros(cap, cap, dtype=torch.bool, device=self.device)
            seen[:runs, :runs] = self.seen[:runs, :runs]
            self.seen = seen
        own = torch.arange(runs, runs + b, device=self.device)
        # A node sees what its parent saw, and itself (a child of the root: only itself).
        parent_run = self.slots[self.parents[nodes].clamp(min=0)] - past
        rows = self.seen[parent_run.clamp(min=0), : runs + b] & (self.parents[nodes] >= 0)[:, None]
        rows[torch.arange(b, device=self.device), own] = True
        self.seen[runs:runs + b, : runs + b] = rows
        self.slots[nodes] = past + own
        self.open[nodes] = False
        self.runs += b
        mask = padded_mask(b, past + runs + b, dtype, self.device, past)
        mask[:, past:].masked_fill_(rows, 0)
        return self.tokens[nodes][None], (past - 1 + self.depths[nodes])[None], mask[None, None]

    def to_host(self, keep: torch.Tensor) -> tuple[Tree, list[int]]:
        """The sub-tree of the nodes `keep` [k] (ascending, closed under ancestors), renumbered,
        and each kept node's key slot (-1 if never run): one device-to-host copy."""
        new_index = torch.full((self.n,), -1, dtype=torch.long, device=self.device)
        new_index[keep] = torch.arange(len(keep), device=self.device)
        parents = self.parents[keep]
        parents = torch.where(parents >= 0, new_index[parents.clamp(min=0)], -1)
        rows = torch.stack([self.tokens[keep].double(), parents.double(),
                            self.slots[keep].double(), self.scores[keep].double()]).tolist()
        tokens, parents, slots, scores = rows
        tree = Tree([int(t) for t in tokens], [int(p) for p in parents], scores)
        return tree, [int(s) for s in slots]
