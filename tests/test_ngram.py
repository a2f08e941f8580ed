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


def test_min_ngram_ignores_short_matches():
    tokens = [1, 2, 7, 5, 2, 7]          # the suffix "2 7" occurred once before, "5 2 7" never
    assert NgramDrafter(min_ngram=2).propose(tokens, 8).tokens[:1] == [5]
    assert len(NgramDrafter(min_ngram=3).propose(tokens, 8)) == 0
    assert NgramDrafter(min_ngram=3).propose([5, 2, 7, 9] + [5, 2, 7], 8).tokens[:1] == [9]
