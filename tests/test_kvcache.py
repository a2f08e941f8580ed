"""After a commit, the caches hold exactly what a fresh prefill of the committed tokens holds."""

import torch

from drafts import ModelDrafter
from specexec_app.kvcache import TokenCache, truncate
from specexec_app.lm import Target, forward_tree
from specexec_app.sampling import Sampler, accept
from specexec_app.tree import Tree


def assert_cache_matches_prefill(model, kv: TokenCache):
    fresh = TokenCache()
    forward_tree(model, fresh, kv.tokens, Tree())
    assert kv.cache.get_seq_length() == fresh.cache.get_seq_length() == len(kv.tokens)
    for got, want in zip(kv.cache.layers, fresh.cache.layers):
        torch.testing.assert_close(got.keys, want.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.values, want.values, atol=1e-4, rtol=1e-4)


def test_target_and_draft_caches_equal_a_fresh_prefill_after_commits(model, chat_ids):
    target = Target(model)
    drafter = ModelDrafter(model, model.config.vocab_size, top_k=3, max_depth=4)
    tokens = chat_ids("List three colors of the rainbow.")
    sample = Sampler(0.0)
    accepted_from_tree = 0
    for _ in range(4):
        tree = drafter.propose(tokens, budget=12)
        logits = target.verify(tokens, tree)
        path, drawn = accept(tree, logits, sample)
        target.commit(tree, path)
        accepted_from_tree += len(path)
        tokens = tokens + drawn
        assert target.kv.tokens == tokens[:-1]       # the last drawn token is pending
        assert_cache_matches_prefill(model, target.kv)
    assert accepted_from_tree > 0                    # the commit of tree nodes was exercised
    drafter.propose(tokens, budget=4)                # reuses the accepted part of its tree
    assert drafter.kv.tokens == tokens
    truncate(drafter.kv.cache, len(tokens))           # drop the new tree's entries
    assert_cache_matches_prefill(model, drafter.kv)


def test_model_drafter_scores_are_cumulative_draft_logprobs(model, chat_ids):
    drafter = ModelDrafter(model, model.config.vocab_size, top_k=4, max_depth=3)
    tokens = chat_ids("Name a fruit.")
    tree = drafter.propose(tokens, budget=20)
    assert 1 <= len(tree) <= 20
    assert all(p < i for i, p in enumerate(tree.parents))
    for node in range(0, len(tree), 3):
        path = tree.path_to(node)
        seq = tokens + [tree.tokens[n] for n in path]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
        expect = sum(float(logp[len(tokens) - 1 + k, seq[len(tokens) + k]]) for k in range(len(path)))
        assert abs(tree.scores[node] - expect) < 1e-3
