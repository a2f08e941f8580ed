"""Wide tree growth (issue 19): what the drafter keeps, how many forwards it takes, how often it
waits on the device, and that output stays the target's own. A tiny random Llama stands in for
a draft where a brute-force reference must run it hundreds of times; the real default model
and the shipped distilled draft check greedy exactness."""


import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from drafts import ModelDrafter
from drafts.model import expand_batch, forward_cap
from specexec_app.core.tree import Tree

VOCAB = 64


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def full_tree(model, prompt, top_k, max_depth):
    """Every node of the top-k tree down to max_depth, each drafted from a plain causal forward of
    its whole path: {token path: cumulative log-probability}."""
    out, frontier = {}, [((), 0.0)]
    for _ in range(max_depth):
        nxt = []
        for path, score in frontier:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + list(path)])).logits[0, -1]
            values, ids = torch.log_softmax(logits.float(), -1).topk(top_k)
            for v, t in zip(values.tolist(), ids.tolist()):
                out[path + (t,)] = score + v
                nxt.append((path + (t,), score + v))
        frontier = nxt
    return out


def paths(tree: Tree) -> dict:
    memo, out = {}, {}
    for i, (t, p) in enumerate(zip(tree.tokens, tree.parents)):
        memo[i] = memo.get(p, ()) + (t,)
        out[memo[i]] = tree.scores[i]
    return out


@pytest.mark.parametrize("budget, batch", [(5, None), (30, 4), (60, 7), (100, None)])
def test_the_kept_tree_is_the_best_budget_of_the_whole_top_k_tree(tiny, budget, batch):
    """Growth stops when no node within the best `budget` is left to run; then the kept set is
    the best `budget` nodes of everything scored, which is the best `budget` of the whole top-k
    tree (what one-node-at-a-time best-first search keeps), whatever the batch."""
    prompt, top_k, depth = [3, 14, 15, 9, 2, 6], 3, 4
    drafter = ModelDrafter(tiny, VOCAB, top_k=top_k, max_depth=depth, expand_batch=batch,
                           max_forwards=100)
    tree = drafter.propose(prompt, budget)
    assert all(p < i for i, p in enumerate(tree.parents))
    got = paths(tree)
    assert all(path[:-1] in got for path in got if len(path) > 1)  # closed under ancestors
    everything = full_tree(tiny, prompt, top_k, depth)
    best = sorted(everything, key=lambda p: (-everything[p], len(p)))[:budget]
    assert set(got) == set(best)
    for path, score in got.items():
        assert abs(score - everything[path]) < 1e-4, path


def test_forward_count_batch_and_early_stop(tiny):
    prompt = [5, 6, 7]
    drafter = ModelDrafter(tiny, VOCAB, top_k=3, max_depth=4, expand_batch=1, max_forwards=100)
    tree = drafter.propose(prompt, 30)
    # Early stop: growth ends, long before the cap, once every kept node that may have children
    # has been run (its cache slot is set), and not before; one node a forward here.
    _, slots = drafter._last
    shallow = [i for i, d in enumerate(tree.depths) if d < 4]
    assert all(slots[i] >= 0 for i in shallow)
    runs = sum(s >= 0 for s in slots)
    assert 1 + runs <= drafter.forwards < 100
    # The cap holds, and a capped tree is still full-size and closed.
    capped = ModelDrafter(tiny, VOCAB, top_k=3, max_depth=8, expand_batch=1, max_forwards=3)
    tree = capped.propose(prompt, 30)
    assert capped.forwards == 3 and len(tree) == 3 + 3 + 3  # root's 3 children, 2 more runs
    assert max(tree.depths) <= 3  # one level a forward at most
    # Defaults: about budget / 8 nodes a forward (at least 128 on a GPU, 32 on a CPU); 16
    # forwards at most up to budget 2048, 20 at 4096.
    assert expand_batch(64) == 128 and expand_batch(2048) == 256
    assert expand_batch(64, "cpu") == 32 and expand_batch(2048, "cpu") == 256
    assert forward_cap(2048) == 16 and forward_cap(4096) == 20 and forward_cap(256) == 16


def path_scores(model, prompt, tree: Tree) -> dict:
    """{token path: cumulative log-probability} of every node of `tree`, each scored by a plain
    causal forward of the prompt and the path."""
    with torch.no_grad():
        out = {}
        for path in paths(tree):
            lp = torch.log_softmax(model(torch.tensor([prompt + list(path)])).logits[0].float(), -1)
            out[path] = sum(lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(path))
    return out


def test_a_repeated_text_seeds_a_chain_deeper_than_the_forward_cap(tiny):
    """The context ends with tokens seen before: what followed them runs as a chain in the root's
    forward, scored by the draft like any node, so the tree goes deeper than its forwards allow
    (one level a forward). Every node's score is its path's draft log-probability, no node has a
    twin (a chain token among its parent's top-k children is kept once), and the tree stays closed."""
    prompt = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 3, 7, 8, 9]  # ... 7 8 9 occurred before
    drafter = ModelDrafter(tiny, VOCAB, top_k=3, max_depth=8, max_forwards=2)
    assert drafter.seed_chain(prompt) == [10, 11, 12, 13, 14, 15, 16]  # max_depth - 1 tokens
    tree = drafter.propose(prompt, 1000)
    assert drafter.forwards == 2
    got = paths(tree)
    assert len(got) == len(tree)  # no two nodes with the same parent and token
    assert all(path[:-1] in got for path in got if len(path) > 1)
    assert (10, 11, 12, 13, 14, 15, 16) in got and max(tree.depths) == 8  # seed + a run's children
    for path, score in path_scores(tiny, prompt, tree).items():
        assert abs(got[path] - score) < 1e-4, path
    # With a budget, the kept nodes are the best-scored ones of all that were scored.
    small = ModelDrafter(tiny, VOCAB, top_k=3, max_depth=8, max_forwards=2).propose(prompt, 12)
    kept = paths(small)
    assert set(kept) == set(sorted(got, key=lambda p: (-got[p], len(p)))[:12])
    # No repeat, no seed; and the classic chain drafter never seeds.
    assert drafter.seed_chain([1, 2, 3, 4]) == []
    assert ModelDrafter(tiny, VOCAB, seed=False).seed_chain(prompt) == []


@pytest.mark.parametrize("budget", [2048, 4096])
def test_wide_trees_take_few_forwards(tiny, budget):
    drafter = ModelDrafter(tiny, VOCAB)
    tree = drafter.propose([1, 2, 3, 4], budget)
    assert len(tree) == budget
    assert drafter.forwards <= {2048: 16, 4096: 20}[budget]


class HostWaits(TorchDispatchMode):
    """Counts, outside the model's forwards, the ops that make the host wait for a CUDA device:
    reading a scalar (.item(), int()), nonzero and boolean-mask indexing, copies to the CPU."""

    def __init__(self):
        super().__init__()
        self.counts, self.in_model = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if not self.in_model and ("_local_scalar_dense" in name or "nonzero" in name):
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_one_host_round_trip_per_forward(tiny):
    drafter = ModelDrafter(tiny, VOCAB, expand_batch=16)
    mode = HostWaits()
    forward = tiny.forward

    def counted_forward(*a, **kw):
        mode.in_model += 1
        try:
            return forward(*a, **kw)
        finally:
            mode.in_model -= 1
    tiny.forward = counted_forward
    try:
        with mode:
            drafter.propose([1, 2, 3, 4, 5, 9, 3, 4, 5], 300)  # seeded: "3 4 5" came before
    finally:
        del tiny.forward
    assert drafter.seed_chain([1, 2, 3, 4, 5, 9, 3, 4, 5])[:2] == [9, 3]
    rounds = drafter.forwards - 1  # the root's forward needs no count of nodes left
    assert rounds >= 5
    # One count of nodes left to run per round, one more to find none left (unless capped).
    assert mode.counts.get("_local_scalar_dense.default", 0) <= rounds + 1, mode.counts
    assert not any("nonzero" in k for k in mode.counts), mode.counts


@pytest.mark.parametrize("budget", [64])
def test_greedy_with_the_distilled_draft_and_wide_trees(model, tokenizer, chat_ids, budget):
    from drafts.distilled import load_draft
    from specexec_app.loading.hf import stop_ids
    from specexec_app.loading.sources import SHIPPED_DRAFTS
    from test_exactness import PROMPTS, assert_same_greedy, reference, run

    stops = stop_ids(tokenizer, model)
    draft = load_draft(SHIPPED_DRAFTS["smollm2-distilled"], model, torch.device("cpu"))
    drafter = ModelDrafter(draft, model.config.vocab_size, stop_ids=frozenset(stops))
    ids = chat_ids(PROMPTS[1])
    done = run(model, drafter, ids, stops, tokenizer, budget=budget)
    assert_same_greedy(model, ids, done.token_ids, reference(model, ids, stops))
    assert done.stats.accepted_per_pass > 1.3
    assert drafter.forwards <= done.stats.target_passes * forward_cap(budget)


def test_a_one_row_pass_sends_no_mask_to_attention(tiny):
    """What reaches the attention function: nothing for a one-token pass (transformers would
    copy the KV heads for a mask), an aligned tree mask for a tree pass; the logits are those of
    plain causal passes either way."""
    from transformers import AttentionInterface

    from specexec_app.core import lm
    from specexec_app.core.kvcache import TokenCache

    lm.use_fast_attention(tiny)
    seen = []

    def recording(module, query, key, value, attention_mask, **kw):
        seen.append(attention_mask)
        return lm._attention(module, query, key, value, attention_mask, **kw)
    AttentionInterface.register(lm.ATTENTION, recording)
    try:
        kv = TokenCache()
        lm.forward_tree(tiny, kv, [1, 2, 3], Tree())
        kv.tokens = [1, 2, 3]
        seen.clear()
        one = lm.forward_tree(tiny, kv, [4], Tree())  # one pending token, no tree
        assert len(seen) == 2 and all(m is None for m in seen)  # both layers
        kv.tokens = [1, 2, 3, 4]
        seen.clear()
        tree = Tree([6, 8, 7], [-1, 0, -1], [0.0, 0.0, 0.0])
        logits = lm.forward_tree(tiny, kv, [5], tree)
        assert len(seen) == 2 and all(m is not None and m.stride(-2) % 8 == 0 for m in seen)
    finally:
        AttentionInterface.register(lm.ATTENTION, lm._attention)
    with torch.no_grad():
        plain = tiny(torch.tensor([[1, 2, 3, 4, 5, 6, 8]])).logits[0]
        other = tiny(torch.tensor([[1, 2, 3, 4, 5, 7]])).logits[0]
    torch.testing.assert_close(one[-1], plain[3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[[0, 1, 2]], plain[[4, 5, 6]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[3], other[5], atol=1e-5, rtol=1e-5)


def test_a_cpu_draft_keeps_freed_memory_for_reuse():
    """keep_freed_memory (set when a model draft computes on the CPU): a block past glibc's
    32 MB mapping threshold, like a 256-row batch's logits, comes from the heap, not from a fresh
    mapping whose pages fault in one by one."""
    import ctypes

    from drafts.model import keep_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        pytest.skip("not glibc >= 2.33")
    assert keep_freed_memory()
    mapped = libc.mallinfo2().hblkhd
    block = torch.ones(48 << 20, dtype=torch.uint8)
    assert libc.mallinfo2().hblkhd == mapped and int(block.sum()) == 48 << 20


def test_a_draft_with_a_smaller_vocabulary_than_the_target(tiny):
    """A target whose vocabulary is past the draft's (Qwen2.5's padded 152064 against its small
    drafts' 151936): a token only the target has goes into the draft as a guess, not an
    IndexError, and the output is still the target's greedy output."""
    from specexec_app.config.settings import DecodeSettings
    from specexec_app.core import engine
    from specexec_app.core.lm import Target

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=3 * VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, initializer_range=0.3)
    target = LlamaForCausalLM(cfg).eval()
    prompt = [3, 7, 11, 13, 17, 19, 23, 29]
    with torch.no_grad():
        ref = target.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    assert max(ref) >= VOCAB  # the target writes a token the draft lacks

    class Tok:
        def decode(self, ids, **kw):
            return ""

    done = list(engine.generate(Target(target), ModelDrafter(tiny, VOCAB, top_k=4, max_depth=4),
                                prompt, DecodeSettings(budget=8, max_new_tokens=24), Tok(), set()))[-1]
    assert done.token_ids == ref


def test_top_k_of_a_row_with_few_finite_values_gives_valid_ids():
    """The two-step top-k (block maxima, then the best blocks) over a row with fewer finite
    values than k (a vocabulary masked to -inf) returns ids inside the row, never a padded
    column past it (the target's embedding would raise on it)."""
    from drafts.model import top_k

    v = 8 * 64 + 5  # a partial last block
    x = torch.full((2, v), float("-inf"))
    x[0, [3, 100, 200, 300, v - 1]] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    x[1] = torch.randn(v)
    values, ids = top_k(x, 8)
    assert int(ids.max()) < v and int(ids.min()) >= 0
    assert ids[0, :5].tolist() == [v - 1, 300, 200, 100, 3]
    torch.testing.assert_close(values[1], x[1].topk(8).values)
    assert ids[1].tolist() == x[1].topk(8).indices.tolist()
