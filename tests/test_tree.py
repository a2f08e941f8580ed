"""The tree as data: mask, positions, budget and closure, checked without a model."""

import random

import pytest
import torch

from specexec_app.core.sampling import Sampler, accept
from specexec_app.core.tree import KEY_ALIGN, Tree, tree_inputs


def random_tree(n: int, seed: int) -> Tree:
    rng = random.Random(seed)
    tree = Tree()
    for i in range(n):
        parent = rng.randrange(-1, i)
        parent_score = tree.scores[parent] if parent >= 0 else 0.0
        tree.add(rng.randrange(50), parent, parent_score - rng.random())
    return tree


def ancestors(tree: Tree, i: int) -> set[int]:
    out = set()
    while i >= 0:
        out.add(i)
        i = tree.parents[i]
    return out


@pytest.mark.parametrize("seed", range(5))
def test_mask_is_the_ancestor_relation_and_positions_are_depths(seed):
    tree = random_tree(40, seed)
    pending, past = [7, 8, 9], 5
    ids, pos, mask = tree_inputs(pending, tree, past, torch.float32)
    p, n = len(pending), len(tree)
    assert ids[0].tolist() == pending + tree.tokens
    assert mask.shape == (1, 1, p + n, past + p + n)
    allowed = mask[0, 0] == 0
    assert allowed[:, :past].all()                          # everyone sees the cached prefix
    assert torch.equal(allowed[:p, past:past + p], torch.ones(p, p, dtype=torch.bool).tril())
    assert not allowed[:p, past + p:].any()                 # pending tokens never see the tree
    assert allowed[p:, past:past + p].all()                 # nodes see all pending tokens
    for i in range(n):
        seen = {j for j in range(n) if allowed[p + i, past + p + j]}
        assert seen == ancestors(tree, i)
        depth = len(ancestors(tree, i))
        assert pos[0, p + i] == past + p - 1 + depth        # root position + depth
    assert pos[0, :p].tolist() == list(range(past, past + p))


def reference_inputs(pending, tree, past, dtype):
    """tree_inputs as it was at cf67880: the mask built on the CPU, element by element."""
    p, n = len(pending), len(tree)
    root = past + p - 1
    ids = torch.tensor([pending + tree.tokens])
    pos = torch.tensor([list(range(past, past + p)) + [root + d for d in tree.depths]])
    ancestors = torch.zeros(n, n, dtype=torch.bool)
    for i, parent in enumerate(tree.parents):
        if parent >= 0:
            ancestors[i, :parent + 1] = ancestors[parent, :parent + 1]
        ancestors[i, i] = True
    allowed = torch.zeros(p + n, past + p + n, dtype=torch.bool)
    allowed[:, :past] = True
    allowed[:p, past:past + p] = torch.ones(p, p, dtype=torch.bool).tril()
    allowed[p:, past:past + p] = True
    allowed[p:, past + p:] = ancestors
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return ids, pos, mask[None, None]


@pytest.mark.parametrize("n, pending, past", [(0, 5, 0), (1, 1, 0), (40, 3, 5), (300, 1, 77),
                                              (64, 2, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_built_inputs_equal_the_reference(n, pending, past, dtype):
    tree = random_tree(n, n + past)
    if n > 100:  # deep chains too
        for i in range(n - 30, n):
            tree.parents[i] = i - 1
    toks = list(range(10, 10 + pending))
    got, want = tree_inputs(toks, tree, past, dtype), reference_inputs(toks, tree, past, dtype)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)
    mask = got[2]
    assert mask.shape == (1, 1, pending + n, past + pending + n)
    # Attention never copies it to pad the key width: every stride but the last is aligned.
    assert all(s % KEY_ALIGN == 0 for s in mask.stride()[:-1]) and mask.stride(-1) == 1


def test_a_one_row_pass_has_no_mask():
    ids, pos, mask = tree_inputs([42], Tree(), 17, torch.float32)
    assert mask is None and ids.tolist() == [[42]] and pos.tolist() == [[17]]


@pytest.mark.parametrize("budget", [1, 5, 17, 40, 100])
def test_best_nodes_respects_budget_and_is_closed_under_ancestors(budget):
    tree = random_tree(60, budget)
    keep = tree.best_nodes(budget)
    assert len(keep) == min(budget, len(tree))
    assert all(ancestors(tree, i) <= set(keep) for i in keep)
    worst_kept = min(tree.scores[i] for i in keep)
    assert all(tree.scores[i] <= worst_kept for i in range(len(tree)) if i not in keep)
    sub = tree.select(keep)
    assert all(sub.parents[i] < i for i in range(len(sub)))
    assert [sub.tokens[i] for i in range(len(sub))] == [tree.tokens[i] for i in keep]


def test_best_nodes_keeps_parent_on_equal_scores():
    tree = Tree()
    root_child = tree.add(1, -1, -1.0)
    tree.add(2, root_child, -1.0)  # a child with log-probability 0 ties its parent
    tree.add(3, -1, -1.0)
    keep = tree.best_nodes(2)
    assert keep == [0, 1] or keep == [0, 2]
    assert 0 in keep


def test_within_depth():
    tree = random_tree(50, 3)
    sub = tree.within_depth(2)
    assert max(sub.depths, default=0) <= 2
    assert len(sub) == sum(1 for d in tree.depths if d <= 2)


def test_accept_follows_matching_children_greedily():
    # root -> 5 -> 6 ; root -> 7 ; logits make the target pick 5, then 6, then 9 (not in tree).
    tree = Tree()
    a = tree.add(5, -1, -0.1)
    tree.add(6, a, -0.2)
    tree.add(7, -1, -0.3)
    logits = torch.full((4, 10), -10.0)
    logits[0, 5] = logits[1, 6] = logits[2, 9] = logits[3, 1] = 0.0
    path, tokens = accept(tree, logits, Sampler(0.0))
    assert path == [0, 1]
    assert tokens == [5, 6, 9]


def test_accept_samples_each_token_from_the_target_rows():
    """The first two tokens drawn through a tree follow p_root(t1) * p_node(t1)(t2) exactly."""
    from scipy.stats import chisquare

    torch.manual_seed(0)
    V = 4
    tree = Tree()
    for t in range(V):            # every first token has a node, so t2 is always drawn
        tree.add(t, -1, -1.0)     # from the row of the node that t1 leads to
    logits = torch.randn(1 + V, V) * 1.5
    sample = Sampler(temperature=1.0, seed=1)
    probs = torch.softmax(logits, -1)
    expected = torch.stack([probs[0, a] * probs[1 + a] for a in range(V)]).flatten()
    counts = torch.zeros(V * V)
    n = 20000
    for _ in range(n):
        _, tokens = accept(tree, logits, sample)
        counts[tokens[0] * V + tokens[1]] += 1
    assert chisquare(counts.numpy(), (expected * n).numpy()).pvalue > 1e-3
    # and the test can fail: a wrong distribution (the root row reused) is rejected
    wrong = torch.stack([probs[0, a] * probs[0] for a in range(V)]).flatten()
    assert chisquare(counts.numpy(), (wrong * n).numpy()).pvalue < 1e-6


def test_top_p_keeps_the_smallest_set_reaching_p():
    sampler = Sampler(temperature=1.0, top_p=0.7, seed=0)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = sampler.probs(logits)
    assert torch.allclose(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))
