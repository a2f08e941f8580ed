"""Drafting that overlaps verification: trees drafted ahead, regrafted below what was accepted.
Exactness (greedy and sampled) on the real default model; threads never outlive a reply."""

import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from drafts import Drafter, ModelDrafter, NgramDrafter
from specexec_app.core import engine
from specexec_app.core.lm import Target
from specexec_app.loading.hf import stop_ids, truncated_copy
from specexec_app.config.settings import DecodeSettings
from specexec_app.core.tree import Tree, likeliest_path, regraft

from test_exactness import (PAIR_PROMPT, PAIR_SAMPLER, PROMPTS, assert_follows,
                            assert_same_greedy, pair_distribution, reference, run)


def tree_of(edges):
    """[(token, parent, score)] -> Tree."""
    t = Tree()
    for tok, parent, score in edges:
        t.add(tok, parent, score)
    return t


def test_likeliest_path_follows_the_best_child():
    t = tree_of([(5, -1, -0.1), (6, -1, -0.5), (7, 0, -0.9), (8, 0, -0.3), (9, 3, -0.4)])
    assert likeliest_path(t) == [0, 3, 4]
    assert likeliest_path(Tree()) == []


def test_regraft_keeps_what_hangs_below_the_accepted_tokens():
    below = tree_of([(10, -1, -0.1), (11, 0, -0.2), (12, -1, -0.3), (13, 1, -0.4)])
    prefix = [1, 2, 3]
    # Accepted exactly the guess plus token 10: the subtree under node 10, re-rooted.
    got = regraft(prefix, below, [1, 2, 3, 10])
    assert (got.tokens, got.parents) == ([11, 13], [-1, 0])
    # Accepted deeper: 10 then 11.
    got = regraft(prefix, below, [1, 2, 3, 10, 11])
    assert (got.tokens, got.parents) == ([13], [-1])
    # Accepted a token the ahead tree does not hold, or left the guess: nothing to keep.
    assert len(regraft(prefix, below, [1, 2, 3, 99])) == 0
    assert len(regraft(prefix, below, [1, 2, 4, 10])) == 0
    # Stopped short of the guess: the rest of the guess as a chain, the tree below it.
    got = regraft(prefix, below, [1, 2])
    assert got.tokens == [3, 10, 11, 12, 13] and got.parents == [-1, 0, 1, 0, 2]
    assert got.best_nodes(2) == [0, 1]  # a budget cut keeps the chain first


@pytest.mark.parametrize("prompt", PROMPTS[2:])
@pytest.mark.parametrize("budget", [4, 64])
def test_greedy_with_overlap_equals_target_greedy(model, tokenizer, chat_ids, prompt, budget):
    ids, stops = chat_ids(prompt), stop_ids(tokenizer, model)
    done = run(model, NgramDrafter(), ids, stops, tokenizer, budget=budget, overlap=True)
    assert_same_greedy(model, ids, done.token_ids, reference(model, ids, stops))


@pytest.mark.parametrize("budget", [2, 16])
def test_overlap_with_a_model_draft_reuses_trees_and_stays_exact(model, tokenizer, chat_ids, budget):
    """The target as its own draft guesses the accepted leaf right, so trees drafted ahead are
    used; with a weak draft (3 layers, the CPU-drafter case) they are often thrown away."""
    ids, stops = chat_ids(PROMPTS[0]), stop_ids(tokenizer, model)
    ref = reference(model, ids, stops)
    perfect = ModelDrafter(model, model.config.vocab_size, top_k=4, max_depth=8,
                           stop_ids=frozenset(stops))
    done = run(model, perfect, ids, stops, tokenizer, budget=budget, overlap=True)
    assert_same_greedy(model, ids, done.token_ids, ref)
    if budget >= 16:  # a 2-node tree is often two siblings: nothing hangs below the new root
        assert done.stats.reused_trees >= done.stats.target_passes // 2
    weak = ModelDrafter(truncated_copy(model, 3), model.config.vocab_size, top_k=4,
                        stop_ids=frozenset(stops))
    done = run(model, weak, ids, stops, tokenizer, budget=budget, overlap=True)
    assert_same_greedy(model, ids, done.token_ids, ref)


class LateDrafter(Drafter):
    """Proposes nothing at its first call of a reply (like an n-gram drafter before any match);
    asked again below the same tokens (the overlapped call, during the first pass), it proposes
    the target's own top-16 tokens, each with its top-4 continuations. So the second token is
    drawn in a tree drafted during the first pass and regrafted below the first token."""

    def __init__(self, prompt, tree):
        self.prompt, self.tree, self.calls = prompt, tree, 0

    def reset(self):
        self.calls = 0

    def propose(self, tokens, budget):
        self.calls += 1
        return self.tree if self.calls == 2 and tokens == self.prompt else Tree()


def test_sampling_with_overlap_follows_the_target_distribution(model, tokenizer):
    ids = tokenizer(PAIR_PROMPT).input_ids
    stops = stop_ids(tokenizer, model)
    expected, (firsts, p1, p2) = pair_distribution(model, ids)
    tree = Tree()
    for i, a in sorted(enumerate(firsts), key=lambda ia: -float(p1[ia[1]]))[:16]:
        node = tree.add(a, -1, float(p1[a]))
        for b in p2[i].topk(4).indices.tolist():
            tree.add(b, node, float(p1[a] * p2[i, b]))
    drafter = LateDrafter(ids, tree)
    target = Target(model)
    n, counts, reused = 200, {}, 0
    for seed in range(n):
        drafter.reset()
        done = list(engine.generate(target, drafter, ids,
                                    DecodeSettings(budget=64, max_new_tokens=2, seed=seed,
                                                   overlap=True, **PAIR_SAMPLER),
                                    tokenizer, stops))[-1]
        reused += done.stats.reused_trees
        key = tuple(done.token_ids) if tuple(done.token_ids) in expected else "other"
        counts[key] = counts.get(key, 0) + 1
    assert reused > n // 4  # many second tokens came from a tree drafted during the first pass
    assert_follows(counts, expected, n)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


class Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def draft_threads():
    return [t for t in threading.enumerate() if t.name.startswith("specexec-draft")]


def test_a_thousand_overlapped_turns_leave_no_thread(tiny):
    target = Target(tiny)
    drafter = ModelDrafter(tiny, 64, top_k=2, max_depth=3)
    before = threading.active_count()
    for turn in range(1000):
        prompt = [1 + turn % 50, 2, 3]
        list(engine.generate(target, drafter, prompt,
                             DecodeSettings(budget=4, max_new_tokens=3, overlap=True), Tok(), set()))
    assert not draft_threads() and threading.active_count() == before


def test_stopped_and_failed_replies_leave_no_thread(tiny):
    target = Target(tiny)
    gen = engine.generate(target, ModelDrafter(tiny, 64, top_k=2, max_depth=3), [1, 2, 3],
                          DecodeSettings(budget=4, max_new_tokens=50, overlap=True), Tok(), set())
    next(e for e in gen if isinstance(e, engine.Pass))  # a reply in flight, then Ctrl+C
    gen.close()
    assert not draft_threads()

    class Failing(Drafter):
        calls = 0

        def propose(self, tokens, budget):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("draft failed")
            return tree_of([(5, -1, 0.0)])

    with pytest.raises(RuntimeError, match="draft failed"):
        list(engine.generate(target, Failing(), [1, 2, 3],
                             DecodeSettings(budget=4, max_new_tokens=50, overlap=True), Tok(), set()))
    assert not draft_threads()


def test_ctrl_c_while_stopping_waits_for_the_draft_in_flight():
    """A second Ctrl+C while a stopped reply waits for its draft thread does not leave that
    thread drafting beside the next reply (both would use the draft's cache): the wait goes on,
    and the Ctrl+C is raised once the draft is done."""
    import os
    import signal
    import time

    from specexec_app.core.lookahead import Lookahead

    release, finished = threading.Event(), threading.Event()

    class Slow(Drafter):
        def propose(self, tokens, budget):
            release.wait(10)
            finished.set()
            return tree_of([(5, -1, 0.0)])

    ahead = Lookahead(Slow(), enabled=True)
    ahead.start([1, 2, 3], tree_of([(4, -1, 0.0)]), budget=4, context=100)

    def second_ctrl_c_then_draft_ends():
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl+C: a KeyboardInterrupt inside close()
        time.sleep(0.3)
        release.set()

    threading.Thread(target=second_ctrl_c_then_draft_ends).start()
    with pytest.raises(KeyboardInterrupt):
        ahead.close()
    assert finished.is_set() and not draft_threads()
