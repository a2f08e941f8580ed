from drafts import NgramDrafter


def test_ngram_proposes_what_followed_the_suffix_before():
    tokens = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3, 4, 6, 8, 1, 2, 3]
    tree = NgramDrafter(max_depth=3).propose(tokens, budget=10)
    kids = tree.children()
    root = kids[-1]
    assert set(root) == {4}                    # "1 2 3" was always followed by 4
    four = root[4]
    assert set(kids[four]) == {5, 6}           # then by 5 or 6
    assert tree.scores[four] >= max(tree.scores[c] for c in kids[four].values())


def test_ngram_budget_and_closure():
    tokens = [i % 7 for i in range(200)] + [3, 1, 4, 1, 5, 9, 2, 6] * 5
    for budget in (1, 3, 16, 64):
        tree = NgramDrafter().propose(tokens, budget)
        assert 1 <= len(tree) <= budget
        assert all(p < i for i, p in enumerate(tree.parents))
        for i, p in enumerate(tree.parents):
            if p >= 0:
                assert tree.scores[p] >= tree.scores[i]


def test_ngram_with_nothing_to_copy_proposes_nothing():
    assert len(NgramDrafter().propose([1, 2, 3, 4], budget=8)) == 0
    assert len(NgramDrafter().propose([5], budget=8)) == 0
    assert len(NgramDrafter(min_ngram=1).propose([], budget=8)) == 0


def test_min_ngram_ignores_short_matches():
    tokens = [1, 2, 7, 5, 2, 7]          # the suffix "2 7" occurred once before, "5 2 7" never
    assert NgramDrafter(min_ngram=2).propose(tokens, 8).tokens[:1] == [5]
    assert len(NgramDrafter(min_ngram=3).propose(tokens, 8)) == 0
    assert NgramDrafter(min_ngram=3).propose([5, 2, 7, 9] + [5, 2, 7], 8).tokens[:1] == [9]


def brute_force_tree(drafter: NgramDrafter, tokens: list[int], budget: int):
    """The drafter's definition, window by window: for n from the longest match down, every
    earlier window of n tokens equal to the last n (most recent first, `max_matches` of them)
    adds n to each node of what followed it."""
    from specexec_app.core.tree import Tree

    trie, tree = {}, Tree()
    for n in range(min(drafter.max_ngram, len(tokens) - 1), drafter.min_ngram - 1, -1):
        starts = [s for s in range(len(tokens) - n) if tokens[s:s + n] == tokens[-n:]]
        for s in starts[::-1][: drafter.max_matches]:
            node = -1
            for tok in tokens[s + n: s + n + drafter.max_depth]:
                if (node, tok) not in trie:
                    trie[(node, tok)] = tree.add(tok, node, 0.0)
                node = trie[(node, tok)]
                tree.scores[node] += n
    return tree.select(tree.best_nodes(budget))


def test_ngram_matches_its_brute_force_definition():
    import random

    rng = random.Random(0)
    drafters = [NgramDrafter(), NgramDrafter(min_ngram=3), NgramDrafter(max_ngram=2, max_matches=3),
                NgramDrafter(min_ngram=1, max_ngram=6, max_depth=4)]
    found = 0
    for trial in range(300):
        vocab = rng.choice([2, 3, 5, 20])
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 120))]
        for drafter in drafters:
            budget = rng.choice([1, 3, 8, 64])
            got, want = drafter.propose(tokens, budget), brute_force_tree(drafter, tokens, budget)
            assert (got.tokens, got.parents, got.scores) == (want.tokens, want.parents, want.scores)
            found += len(got) > 0
    assert found > 300  # most cases proposed something: the comparison was not of empty trees
