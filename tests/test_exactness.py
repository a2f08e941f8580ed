"""The product's promise on the real default model: greedy output is the target's own greedy
output token for token, and sampled output follows the target's distribution."""

import pytest
import torch
from scipy.stats import chisquare

from drafts import ModelDrafter, NgramDrafter
from drafts.distilled import load_draft
from specexec_app.core import engine
from specexec_app.core.lm import Target
from specexec_app.loading.sources import SHIPPED_DRAFTS
from specexec_app.loading.hf import load_model, stop_ids, truncated_copy
from specexec_app.core.sampling import Sampler
from specexec_app.config.settings import DecodeSettings

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Repeat after me: red green blue, red green blue, red green blue.",
    "Write a Python function that returns the sum of a list of numbers.",
]
NEW = 32
_refs: dict = {}


def reference(model, ids: list[int], stops: set[int]) -> list[int]:
    key = tuple(ids)
    if key not in _refs:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=NEW, do_sample=False)[0, len(ids):].tolist()
        cut = next((i for i, t in enumerate(out) if t in stops), len(out))
        _refs[key] = out[:cut]
    return _refs[key]


def run(model, drafter, ids, stops, tokenizer, **settings) -> engine.Done:
    events = list(engine.generate(Target(model), drafter, ids,
                                  DecodeSettings(**({"max_new_tokens": NEW} | settings)),
                                  tokenizer, stops))
    assert isinstance(events[-1], engine.Done)
    return events[-1]


def assert_same_greedy(model, ids, got, ref):
    """Equal token for token; a divergence is allowed only where the target's two best logits
    are within numerical noise (1e-4 in fp32), and then nothing after it is compared."""
    for j in range(max(len(got), len(ref))):
        a = got[j] if j < len(got) else None
        b = ref[j] if j < len(ref) else None
        if a != b:
            with torch.no_grad():
                logits = model(torch.tensor([ids + ref[:j]])).logits[0, -1].float()
            top = logits.topk(2).values
            gap = float(top[0] - top[1])
            assert gap < 1e-4, f"diverged at token {j}: got {a}, target {b}, logit gap {gap:.2e}"
            return


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("budget", [1, 16, 256])
def test_greedy_ngram_equals_target_greedy(model, tokenizer, chat_ids, prompt, budget):
    ids, stops = chat_ids(prompt), stop_ids(tokenizer, model)
    done = run(model, NgramDrafter(), ids, stops, tokenizer, budget=budget)
    assert_same_greedy(model, ids, done.token_ids, reference(model, ids, stops))
    assert done.stats.new_tokens == len(done.token_ids)


@pytest.mark.parametrize("prompt", PROMPTS[:2])
@pytest.mark.parametrize("budget", [16])
def test_greedy_with_a_perfect_draft_accepts_deep_paths(model, tokenizer, chat_ids, prompt, budget):
    """The target as its own draft: long accepted paths exercise every commit."""
    ids, stops = chat_ids(prompt), stop_ids(tokenizer, model)
    drafter = ModelDrafter(model, model.config.vocab_size, top_k=4, max_depth=8,
                           stop_ids=frozenset(stops))
    done = run(model, drafter, ids, stops, tokenizer, budget=budget)
    assert_same_greedy(model, ids, done.token_ids, reference(model, ids, stops))
    if budget >= 8:
        assert done.stats.accepted_per_pass > 3


@pytest.fixture(scope="module")
def weak_draft(model):
    return truncated_copy(model, 3)


@pytest.mark.parametrize("budget", [4])
def test_greedy_with_a_weak_draft(model, weak_draft, tokenizer, chat_ids, budget):
    ids, stops = chat_ids(PROMPTS[0]), stop_ids(tokenizer, model)
    drafter = ModelDrafter(weak_draft, model.config.vocab_size, stop_ids=frozenset(stops))
    done = run(model, drafter, ids, stops, tokenizer, budget=budget)
    assert_same_greedy(model, ids, done.token_ids, reference(model, ids, stops))


@pytest.fixture(scope="module")
def new_drafts(model, source):
    """The drafters of issue 7 for the default target: quantized copies of it and the shipped
    distilled draft (sharing its embedding and head), each made once."""
    made = {}

    def get(kind):
        if kind not in made:
            cpu = torch.device("cpu")
            made[kind] = (load_draft(SHIPPED_DRAFTS["smollm2-distilled"], model, cpu)
                          if kind == "distilled" else load_model(source, cpu, quant=kind))
        return made[kind]
    return get


@pytest.mark.parametrize("kind", ["nf4", "distilled"])
def test_greedy_with_self_drafts_and_the_distilled_draft(model, tokenizer, chat_ids, new_drafts, kind):
    stops = stop_ids(tokenizer, model)
    drafter = ModelDrafter(new_drafts(kind), model.config.vocab_size, stop_ids=frozenset(stops))
    ids = chat_ids(PROMPTS[0])
    done = run(model, drafter, ids, stops, tokenizer, budget=16)
    assert_same_greedy(model, ids, done.token_ids, reference(model, ids, stops))
    # The draft does its part: quantized copies agree on most tokens (3.5-5.7 accepted per pass
    # in docs/BENCHMARKS.md), the small distilled draft on some (1.4-1.6).
    assert done.stats.accepted_per_pass > (1.15 if kind == "distilled" else 2.5), done.stats


def test_greedy_raw_continuation(model, tokenizer):
    ids = tokenizer("def fib(n):\n    if n < 2:\n        return n\n    return").input_ids
    stops = stop_ids(tokenizer, model)
    done = run(model, NgramDrafter(), ids, stops, tokenizer, budget=16)
    assert_same_greedy(model, ids, done.token_ids, reference(model, ids, stops))


PAIR_PROMPT = "My favourite animal is the"
PAIR_SAMPLER = dict(temperature=1.0, top_p=0.9)


def pair_distribution(model, ids):
    """The target's p(t1) * p(t2 | t1) under PAIR_SAMPLER for every pair above 0.5 %, and the
    first tokens t1 considered with their p(t1) and p(. | t1) rows: (expected, (firsts, p1, p2))."""
    sampler = Sampler(**PAIR_SAMPLER)
    with torch.no_grad():
        p1 = sampler.probs(model(torch.tensor([ids])).logits[0, -1])
        firsts = [int(t) for t in torch.nonzero(p1 > 0.005).flatten()]
        p2 = sampler.probs(model(torch.tensor([ids + [t] for t in firsts])).logits[:, -1])
    expected = {(a, b): float(p1[a] * p2[i, b])
                for i, a in enumerate(firsts) for b in torch.nonzero(p2[i] > 0.005).flatten().tolist()}
    return expected, (firsts, p1, p2)


def assert_follows(counts: dict, expected: dict, n: int) -> None:
    """Chi-square of observed pair counts against the expected pair probabilities (pairs with an
    expected count of 5+ each, the rest pooled; at least 3 such pairs, so 3+ degrees of
    freedom)."""
    big = [k for k, p in expected.items() if p * n >= 5]
    observed = [counts.get(k, 0) for k in big] + [n - sum(counts.get(k, 0) for k in big)]
    exp = [expected[k] * n for k in big] + [n * (1 - sum(expected[k] for k in big))]
    assert len(big) >= 3
    assert chisquare(observed, exp).pvalue > 1e-3


@pytest.mark.parametrize("kind, n", [("target", 200), ("distilled", 150)])
def test_sampling_follows_the_target_distribution(model, tokenizer, chat_ids, new_drafts, kind, n):
    """Chi-square of the first two sampled tokens against p(t1) * p(t2 | t1) of the target,
    with a draft close to the target (itself, the distilled draft) so that t2 is often drawn at a
    tree node. The distilled draft gets a chat prompt: it knows chat answers, not raw text, and
    that prompt's first pairs are likelier (fewer samples suffice). A quantized self-draft is the
    same ModelDrafter over another model: its greedy test stands for it here (the sampling walk
    does not depend on which model drafted)."""
    ids = tokenizer(PAIR_PROMPT).input_ids if kind == "target" else chat_ids("Name one animal.")
    stops = stop_ids(tokenizer, model)
    expected, _ = pair_distribution(model, ids)

    dmodel = model if kind == "target" else new_drafts(kind)
    drafter = ModelDrafter(dmodel, model.config.vocab_size, top_k=8, max_depth=1)
    target = Target(model)
    counts, from_tree = {}, 0
    for seed in range(n):
        events = list(engine.generate(target, drafter, ids,
                                      DecodeSettings(budget=8, max_new_tokens=2, seed=seed,
                                                     **PAIR_SAMPLER),
                                      tokenizer, stops))
        done = events[-1]
        pair = tuple(done.token_ids)
        from_tree += done.stats.target_passes == 1 and len(pair) == 2
        key = pair if pair in expected else "other"
        counts[key] = counts.get(key, 0) + 1
    assert from_tree > n // 5  # many second tokens were drawn at a tree node in the same pass
    assert_follows(counts, expected, n)


def test_seed_repeats_sampled_output(model, tokenizer, chat_ids):
    ids, stops = chat_ids(PROMPTS[0]), stop_ids(tokenizer, model)
    outs = [run(model, NgramDrafter(), ids, stops, tokenizer, budget=8, temperature=1.0,
                max_new_tokens=24, seed=seed).token_ids for seed in (7, 7, 8)]
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


class OutOfMemoryAbove(Target):
    """A target on a device that runs out of memory for trees above `limit` nodes (we have no GPU
    in CI, so the device's refusal is simulated; the recovery is real)."""

    def __init__(self, model, limit):
        super().__init__(model)
        self.limit = limit

    def verify(self, tokens, tree, reply_from=None):
        if len(tree) > self.limit:
            self.kv.sync(tokens)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().verify(tokens, tree, reply_from)


def test_out_of_memory_shrinks_the_budget_and_stays_exact(model, tokenizer, chat_ids):
    ids, stops = chat_ids(PROMPTS[2]), stop_ids(tokenizer, model)
    events = list(engine.generate(OutOfMemoryAbove(model, 3), NgramDrafter(), ids,
                                  DecodeSettings(budget=64, max_new_tokens=NEW), tokenizer, stops))
    notices = [e for e in events if isinstance(e, engine.Notice)]
    assert notices and "retrying with budget" in notices[0].message
    assert all(e.tree_size <= 3 for e in events if isinstance(e, engine.Pass))
    assert_same_greedy(model, ids, events[-1].token_ids, reference(model, ids, stops))


class DraftOutOfMemoryAbove(NgramDrafter):
    """A drafter whose device refuses trees above `limit` nodes (simulated, as above)."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    def propose(self, tokens, budget):
        if budget > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().propose(tokens, budget)


@pytest.mark.parametrize("overlap", [False, True])
def test_draft_out_of_memory_shrinks_the_budget_and_stays_exact(model, tokenizer, chat_ids, overlap):
    ids, stops = chat_ids(PROMPTS[2]), stop_ids(tokenizer, model)
    events = list(engine.generate(Target(model), DraftOutOfMemoryAbove(8), ids,
                                  DecodeSettings(budget=64, max_new_tokens=NEW, overlap=overlap),
                                  tokenizer, stops))
    notices = [e.message for e in events if isinstance(e, engine.Notice)]
    assert notices and all("while drafting" in m for m in notices)
    assert_same_greedy(model, ids, events[-1].token_ids, reference(model, ids, stops))


def test_draft_out_of_memory_at_budget_one_is_a_clear_error(model, tokenizer, chat_ids):
    from specexec_app.errors import UserError

    with pytest.raises(UserError, match="--drafter cpu"):
        list(engine.generate(Target(model), DraftOutOfMemoryAbove(0), chat_ids(PROMPTS[0]),
                             DecodeSettings(budget=4, max_new_tokens=4), tokenizer,
                             stop_ids(tokenizer, model)))


@pytest.fixture(scope="module")
def longrope():
    """A tiny Phi-3 whose rotary embedding is 'longrope' (Phi-3/3.5, Phi-4-mini), switching to
    its long factors past 32 tokens (far apart from the short ones, so that a mix shows)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(2)
    half = 8  # head_dim 16
    cfg = Phi3Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                     original_max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2, initializer_range=0.3,
                     rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * half,
                                   "long_factor": [8.0] * half})
    return Phi3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("prompt_len", [26, 40])
def test_greedy_is_exact_across_a_longrope_models_switch(longrope, monkeypatch, prompt_len):
    """transformers' Phi-3 computes a sequence short (short factors) up to 32 tokens and then
    long (its whole cache again with the long factors): a tree reaching past the switch, or a
    long prompt prefilled in chunks, would mix the two. Greedy output equals transformers'
    generate for a prompt that crosses the switch while decoding (26) and one already past it,
    prefilled in chunks of 16 (40), with no draft, an n-gram draft and a model draft whose trees
    reach past the switch."""
    import specexec_app.core.lm as lm

    monkeypatch.setattr(lm, "PREFILL_CHUNK", 16)
    ids = torch.randint(3, 96, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    with torch.no_grad():
        ref = longrope.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=20, do_sample=False, eos_token_id=None)[0, len(ids):].tolist()

    class Tok:
        def decode(self, ids, **kw):
            return ""

    for drafter, budget in ((NgramDrafter(min_ngram=99), 1), (NgramDrafter(), 8),
                            (ModelDrafter(longrope, 96, top_k=4, max_depth=8), 32)):
        events = list(engine.generate(Target(longrope), drafter, ids,
                                      DecodeSettings(budget=budget, max_new_tokens=20), Tok(), set()))
        assert events[-1].token_ids == ref, drafter
