"""After a commit, the caches hold exactly what a fresh prefill of the committed tokens holds."""

import torch

from drafts import ModelDrafter
from specexec_app.core.kvcache import TokenCache, truncate
from specexec_app.core.lm import Target, forward_tree
from specexec_app.core.sampling import Sampler, accept
from specexec_app.core.tree import Tree


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


def test_a_long_prompt_goes_through_in_chunks(model, tokenizer, chat_ids, monkeypatch):
    """A prompt longer than PREFILL_CHUNK is computed in chunks (no pass over more rows than
    that, or than the tree): the same logits and cache as one pass, and greedy output that is
    still the target's own."""
    import specexec_app.core.lm as lm
    from drafts import NgramDrafter
    from specexec_app.core import engine
    from specexec_app.loading.hf import stop_ids
    from specexec_app.config.settings import DecodeSettings

    ids = chat_ids("Repeat after me: red green blue, red green blue, red green blue, red.")
    tree = Tree()
    a = tree.add(100, -1, -0.1)
    tree.add(200, a, -0.2)
    tree.add(300, -1, -0.3)
    whole = TokenCache()
    want = forward_tree(model, whole, ids, tree)

    monkeypatch.setattr(lm, "PREFILL_CHUNK", 16)
    rows: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: rows.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        chunked = TokenCache()
        got = forward_tree(model, chunked, ids, tree)
        assert len(rows) == -(-(len(ids) + len(tree)) // 16) and max(rows) <= 16
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        for c, w in zip(chunked.cache.layers, whole.cache.layers):
            torch.testing.assert_close(c.keys, w.keys, atol=1e-4, rtol=1e-4)

        stops = stop_ids(tokenizer, model)
        rows.clear()
        done = list(engine.generate(Target(model), NgramDrafter(), ids,
                                    DecodeSettings(budget=8, max_new_tokens=24), tokenizer, stops))[-1]
        assert max(rows) <= 16
    finally:
        hook.remove()
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    cut = next((i for i, t in enumerate(ref) if t in stops), len(ref))
    assert done.token_ids == ref[:cut]


def test_our_attention_computes_what_sdpa_computes(model, chat_ids):
    """On a CPU a tree pass shares grouped KV heads inside SDPA (lm._attention); its logits are
    those of transformers' own "sdpa" attention."""
    from specexec_app.core.lm import ATTENTION, use_fast_attention

    ids = chat_ids("Name three rivers in Europe and say which is longest.")
    tree = Tree()
    a = tree.add(100, -1, -0.1)
    tree.add(200, a, -0.2)
    tree.add(300, -1, -0.3)
    use_fast_attention(model)
    try:
        model.set_attn_implementation("sdpa")
        kv = TokenCache()
        forward_tree(model, kv, ids, Tree())
        kv.tokens = list(ids)
        want = forward_tree(model, kv, [42], tree)
        model.set_attn_implementation(ATTENTION)
        kv = TokenCache()
        forward_tree(model, kv, ids, Tree())
        kv.tokens = list(ids)
        got = forward_tree(model, kv, [42], tree)
    finally:
        model.set_attn_implementation(ATTENTION)
    assert model.model.layers[0].self_attn.num_key_value_groups > 1  # the grouped path ran
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_cache_grows_in_place_and_holds_what_concatenation_would():
    """New entries are written into room kept at the end of each layer's buffers (no copy of the
    whole cache a pass): the buffer stays the same while it has room, doubles when full; after a
    truncation or a commit the layer still holds exactly what concatenating would."""
    from specexec_app.core.kvcache import MIN_ROOM, GrowingLayer, keep_slots, new_cache, truncate

    cache = new_cache()
    gen = torch.Generator().manual_seed(0)
    want_k = torch.empty(1, 2, 0, 4)
    want_v = torch.empty(1, 2, 0, 4)
    buffers = set()
    for step in range(40):
        k, v = torch.randn(1, 2, 7, 4, generator=gen), torch.randn(1, 2, 7, 4, generator=gen)
        got_k, got_v = cache.update(k, v, 0)
        want_k, want_v = torch.cat([want_k, k], -2), torch.cat([want_v, v], -2)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
        buffers.add(cache.layers[0].room_k.data_ptr())
        if step == 10:
            truncate(cache, 50)
            want_k, want_v = want_k[..., :50, :], want_v[..., :50, :]
        if step == 20:
            keep_slots(cache, 30, [40, 33, 31])
            index = torch.tensor([40, 33, 31])
            want_k = torch.cat([want_k[..., :30, :], want_k.index_select(-2, index)], -2)
            want_v = torch.cat([want_v[..., :30, :], want_v.index_select(-2, index)], -2)
            assert torch.equal(cache.layers[0].keys, want_k)
    assert isinstance(cache.layers[0], GrowingLayer)
    assert cache.layers[0].room_k.shape[-2] >= MIN_ROOM
    # 40 passes of 7 entries grew the buffers twice at most (256 -> 512), never per pass
    assert len(buffers) <= 3


def test_a_truncate_stopped_between_layers_is_finished_by_the_next_sync():
    """Ctrl+C can land between two layers of a truncate: the first layer cut, the others still
    holding a rejected tree's entries. The next sync sees the longest layer, not the first, and
    cuts them all, so the next pass does not attend to stale entries."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=3, num_attention_heads=4,
                                        num_key_value_heads=2)).eval()
    kv = TokenCache()
    forward_tree(tiny, kv, [1, 2, 3, 4, 5, 6], Tree())
    kv.tokens = [1, 2, 3, 4, 5, 6]
    layer = kv.cache.layers[0]
    layer.keys, layer.values = layer.keys[..., :3, :], layer.values[..., :3, :]  # stopped here
    kv.tokens = [1, 2, 3]
    assert kv.sync([1, 2, 3, 9]) == [9]
    assert all(layer.keys.shape[-2] == 3 for layer in kv.cache.layers)
