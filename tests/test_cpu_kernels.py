"""The CPU computes from packed weights (offload/kernels.py): each format that maps onto torch's
packed kernels gives the product with the same weights dequantized, but for the kernel's bf16
rounding of activations, scales and zeros."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from offload.kernels import GGUF_KERNEL_TYPES, KERNEL_DTYPE, kernel_nbytes, kernel_weights
from offload.store import Entry, materialize
from test_formats import _pack_cols, _pack_rows, random_blocks

pytestmark = pytest.mark.skipif(not hasattr(torch, "_weight_int4pack_mm_for_cpu"),
                                reason="this torch has no packed CPU kernels")


def _bf16_bound(x: torch.Tensor, w: torch.Tensor, terms: int) -> torch.Tensor:
    """How far bf16 rounding may move x W^T: the input's rounding, the scales' and zeros'
    (each at most 2^-8 of the weight's magnitude, per term), the output's."""
    mag = x.abs() @ w.abs().t()
    return mag * 2.0 ** -8 * (2 + terms) + 1e-6


def _check(entry: Entry, buffer: torch.Tensor, terms: int, rows_in: int = 5):
    """The kernel's product against float32 math with the dequantized weights, within the bf16
    bound; and the planned bytes equal the built ones."""
    linear = kernel_weights(entry, buffer)
    assert linear is not None, entry
    w = materialize(entry, buffer)
    x = torch.randn(rows_in, entry.shape[1], generator=torch.Generator().manual_seed(3))
    got, want = linear(x), x @ w.t()
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = (got - want).abs()
    bound = _bf16_bound(x, w, terms)
    assert (err <= bound).all(), (entry.kind, entry.meta, (err / bound).max().item())
    # Not a test that cannot fail: a wrong weight (one code off in the first group) breaks it.
    assert (err < 0.2 * (x.abs() @ w.abs().t())).all()
    assert kernel_nbytes(entry) == linear.nbytes
    return linear


@pytest.mark.parametrize("qtype", GGUF_KERNEL_TYPES)
@pytest.mark.parametrize("heads", [0, 4])
def test_gguf_blocks_compute_as_their_dequantized_weights(qtype, heads):
    from gguf import GGMLQuantizationType, quants

    rows, cols = 64, 512
    samples = [random_blocks(qtype, rows, cols, scale=0.01)]
    try:
        samples.append(quants.quantize(np.random.default_rng(1).standard_normal((rows, cols))
                                       .astype(np.float32), GGMLQuantizationType[qtype]))
    except (NotImplementedError, quants.QuantError):
        pass
    for data in samples:
        buffer = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).reshape(-1).copy())
        entry = Entry("w", (rows, cols), torch.float32, "gguf",
                      ((0, buffer.numel(), torch.uint8, (buffer.numel(),)),), (qtype, heads))
        _check(entry, buffer, terms=1 if qtype.startswith("Q4") else 2)


def test_a_wrong_code_is_caught():
    """The check above fails for a kernel whose weights are one step off: flip one nibble."""
    from gguf import GGMLQuantizationType, quants

    rows, cols = 16, 64
    data = quants.quantize(np.random.default_rng(2).standard_normal((rows, cols)).astype(np.float32),
                           GGMLQuantizationType.Q4_0)
    buffer = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).reshape(-1).copy())
    entry = Entry("w", (rows, cols), torch.float32, "gguf",
                  ((0, buffer.numel(), torch.uint8, (buffer.numel(),)),), ("Q4_0", 0))
    linear = kernel_weights(entry, buffer)
    buffer[2] ^= 0x0F  # after building: the dequantized reference now differs from the kernel
    w = materialize(entry, buffer)
    x = torch.zeros(1, cols)
    x[0, 0] = 1.0
    err = (linear(x) - x @ w.t()).abs()
    assert (err > _bf16_bound(x, w, 1)).any()


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_siblings_fused_in_one_kernel_call_give_each_its_own_product(qtype):
    """q, k and v (gate and up) computed in one call over their rows side by side: each slice is
    bit for bit what its own KernelLinear gives, computed once per input."""
    from torch import nn

    from offload.kernels import KernelSlice, fuse_siblings

    parent = nn.Module()
    alone = {}
    for name, rows in (("q_proj", 128), ("k_proj", 64), ("v_proj", 64)):
        data = random_blocks(qtype, rows, 128, scale=0.01)
        buffer = torch.from_numpy(data.reshape(-1).copy())
        entry = Entry(name, (rows, 128), torch.float32, "gguf",
                      ((0, buffer.numel(), torch.uint8, (buffer.numel(),)),), (qtype, 0))
        alone[name] = kernel_weights(entry, buffer)
        setattr(parent, name, kernel_weights(entry, buffer))
    fuse_siblings(parent)
    assert isinstance(parent.q_proj, KernelSlice)
    x = torch.randn(3, 128)
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(parent, name)(x), alone[name](x)), name
    assert not parent.q_proj.shared._last  # dropped once every slice took its part
    y = torch.randn(2, 128)  # a slice called alone with another input still computes it
    assert torch.equal(parent.v_proj(y), alone["v_proj"](y))
    # Rows that do not fill the packing's blocks of 64 are left unfused (it would mix them up).
    odd = nn.Module()
    data = torch.from_numpy(random_blocks(qtype, 48, 128).reshape(-1).copy())
    odd.gate_proj = alone["q_proj"]
    odd.up_proj = kernel_weights(Entry("u", (48, 128), torch.float32, "gguf",
                                       ((0, data.numel(), torch.uint8, (data.numel(),)),),
                                       (qtype, 0)), data)
    fuse_siblings(odd)
    assert not isinstance(odd.gate_proj, KernelSlice)


def test_int8_rows_use_the_int8_kernel():
    q = torch.randint(-127, 128, (48, 96), dtype=torch.int8)
    scale = torch.rand(48, 1) * 0.01
    buffer = torch.cat([q.view(torch.uint8).reshape(-1), scale.view(torch.uint8).reshape(-1)])
    entry = Entry("w", (48, 96), torch.float32, "int8",
                  ((0, q.numel(), torch.int8, (48, 96)), (q.numel(), 48 * 4, torch.float32, (48, 1))))
    linear = _check(entry, buffer, terms=1)
    assert linear.int8


def _int4_entry(kind: str, group: int, act_order: bool = False):
    gen = torch.Generator().manual_seed(4)
    out_f, in_f = 32, 256
    q = torch.randint(0, 16, (out_f, in_f), generator=gen)
    z = torch.randint(1, 16, (in_f // group, out_f), generator=gen)
    s = (torch.rand(in_f // group, out_f, generator=gen) * 0.02 + 0.001).half()
    if kind == "gptq":
        g_idx = (torch.randperm(in_f, generator=gen) if act_order else torch.arange(in_f)) // group
        tensors = [_pack_rows(q.t()), _pack_cols(z), s, g_idx.int()]
        meta = (0,)
    else:
        order = (0, 2, 4, 6, 1, 3, 5, 7)
        tensors = [_pack_cols(q.t(), order), _pack_cols(z, order), s]
        meta = (group,)
    parts, at, chunks = [], 0, []
    for t in tensors:
        raw = t.contiguous().view(torch.uint8).reshape(-1)
        parts.append((at, raw.numel(), t.dtype, tuple(t.shape)))
        chunks.append(raw)
        at += raw.numel()
    return Entry("w", (out_f, in_f), torch.float32, kind, tuple(parts), meta), torch.cat(chunks)


@pytest.mark.parametrize("kind", ["gptq", "awq"])
@pytest.mark.parametrize("group", [32, 128])
def test_gptq_and_awq_groups_use_the_int4_kernel(kind, group):
    _check(*_int4_entry(kind, group), terms=1)


def test_what_does_not_map_is_left_to_the_dequantizer():
    """Act-order GPTQ, NF4, Q6_K (groups of 16) and a row count the packer refuses: None."""
    assert kernel_weights(*_int4_entry("gptq", 32, act_order=True)) is None
    data = random_blocks("Q6_K", 16, 256)
    buffer = torch.from_numpy(data.reshape(-1).copy())
    q6 = Entry("w", (16, 256), torch.float32, "gguf", ((0, buffer.numel(), torch.uint8, (buffer.numel(),)),),
               ("Q6_K", 0))
    assert kernel_weights(q6, buffer) is None and kernel_nbytes(q6) is None
    data = random_blocks("Q4_0", 8, 64)
    buffer = torch.from_numpy(data.reshape(-1).copy())
    odd = Entry("w", (8, 64), torch.float32, "gguf", ((0, buffer.numel(), torch.uint8, (buffer.numel(),)),),
                ("Q4_0", 0))
    assert kernel_weights(odd, buffer) is None and kernel_nbytes(odd) is None
    assert KERNEL_DTYPE == torch.bfloat16


@pytest.mark.parametrize("rows", [64, 192, 80, 16, 112])
def test_packed_codes_unpack_to_what_was_packed(rows):
    """unpack_int4 reads torch's int4 packing back (whole blocks of 64 rows and the rows past
    them are laid out differently): a change of that layout in a new torch fails here."""
    from offload.kernels import unpack_int4

    codes = torch.randint(0, 16, (rows, 128), dtype=torch.int32,
                          generator=torch.Generator().manual_seed(rows))
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(unpack_int4(packed, rows, 128).int(), codes)


def _gguf_linear(qtype: str, rows: int, cols: int):
    data = random_blocks(qtype, rows, cols, scale=0.01)
    buffer = torch.from_numpy(data.reshape(-1).copy())
    return kernel_weights(Entry("w", (rows, cols), torch.float32, "gguf",
                                ((0, buffer.numel(), torch.uint8, (buffer.numel(),)),),
                                (qtype, 0)), buffer)


def _int8_linear(rows: int, cols: int):
    q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8)
    scale = torch.rand(rows, 1) * 0.01
    buffer = torch.cat([q.view(torch.uint8).reshape(-1), scale.view(torch.uint8).reshape(-1)])
    return kernel_weights(Entry("w", (rows, cols), torch.float32, "int8",
                                ((0, q.numel(), torch.int8, (rows, cols)),
                                 (q.numel(), rows * 4, torch.float32, (rows, 1)))), buffer)


@pytest.mark.parametrize("form", ["Q4_1", "Q4_K", "Q8_0", "int8"])
def test_a_kernel_linears_dense_weight_is_what_its_kernel_multiplies_by(form):
    """dense_weight() against the kernel itself: the product with the identity reads each
    weight back (rounded to bf16 per 4-bit term by the kernel's output). Rows past the blocks
    of 64 and chunks of it are covered (208 rows, chunks of 128)."""
    linear = _int8_linear(208, 256) if form == "int8" else _gguf_linear(form, 208, 256)
    dense = linear.dense_weight(chunk=128)
    read = linear(torch.eye(256)).t()  # [out, in]
    terms = 2 if form == "Q8_0" else 1
    # Per term, the kernel's bf16 output is within half a bf16 unit of the exact weight.
    bound = dense.abs().amax() * 2.0 ** -8 * terms if terms > 1 else dense.abs() * 2.0 ** -8
    assert ((dense - read).abs() <= bound).all(), form
    assert (dense - read).abs().max() < 0.05 * dense.abs().max()  # not all zero, not far off
    assert dense.abs().max() > 0


def test_many_rows_go_to_the_dense_copy_and_few_to_the_kernel():
    """ManyRows: under MANY_ROWS rows, the kernel's own bits; from MANY_ROWS on, a bf16 product
    with the dense copy, within bf16 rounding of the kernel's."""
    from offload.kernels import MANY_ROWS, ManyRows

    linear = _gguf_linear("Q8_0", 128, 256)
    wide = ManyRows(linear)
    few = torch.randn(MANY_ROWS - 1, 256)
    assert torch.equal(wide(few), linear(few))
    many = torch.randn(3, MANY_ROWS, 256)  # any leading shape: rows are all but the last dim
    got = wide(many)
    want = torch.nn.functional.linear(many.to(KERNEL_DTYPE), wide.dense).float()
    assert got.shape == (3, MANY_ROWS, 128) and torch.equal(got, want)
    w = linear.dense_weight()
    assert ((got - linear(many)).abs() <= _bf16_bound(many.reshape(-1, 256), w, 3).view(got.shape)).all()


def test_a_draft_head_gets_its_dense_copy_only_where_it_fits(monkeypatch):
    """dense_head: a packed head gets the copy; a head too big for DENSE_HEAD_MAX keeps the
    kernels alone; a float head is left as it is."""
    import drafts.model as dm
    from offload.kernels import ManyRows
    from transformers import LlamaConfig, LlamaForCausalLM

    def draft():
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
        return LlamaForCausalLM(cfg)

    plain = draft()
    assert not dm.dense_head(plain) and isinstance(plain.lm_head, torch.nn.Linear)
    packed = draft()
    packed.lm_head = _gguf_linear("Q4_1", 128, 64)
    monkeypatch.setattr(dm, "DENSE_HEAD_MAX", 128 * 64 * 2 - 1)  # one byte short
    assert not dm.dense_head(packed) and not isinstance(packed.lm_head, ManyRows)
    monkeypatch.setattr(dm, "DENSE_HEAD_MAX", 128 * 64 * 2)
    head = packed.lm_head
    assert dm.dense_head(packed) and isinstance(packed.lm_head, ManyRows)
    assert packed.lm_head.linear is head and packed.get_output_embeddings() is packed.lm_head
    assert not dm.dense_head(packed)  # once


# --- the default model as the app runs it on a CPU: its Q4_1 GGUF through the kernels ---

@pytest.fixture(scope="module")
def kernel_model(gguf_source):
    from specexec_app.loading.session import _load_target

    model, _ = _load_target(gguf_source, torch.device("cpu"), "auto", None, None, lambda _: None,
                            None, 0, False, 2048, 16)
    return model


@pytest.fixture(params=["fused", "torch-ops"])
def steps(request):
    """The lean forward's steps between the kernels: the C loops of `offload.native` ("fused"),
    or torch's operators ("torch-ops"); each is exact by itself."""
    from offload import native
    from test_native import built_or_skip

    if request.param == "torch-ops":
        with native.off():
            yield request.param
        return
    built_or_skip()
    yield request.param


def test_the_default_gguf_runs_on_the_kernels_close_to_its_float_weights(kernel_model, model,
                                                                         chat_ids):
    """Every matrix of the shipped Q4_1 model (the Q8_0 head too) in kernel form, no float copy of
    them kept; its logits follow the float32 model of the same weights: the same next token
    nearly everywhere and logits within the drift of bf16 activations over 30 layers."""
    from offload.kernels import KernelLinear, KernelSlice
    from offload.model import PackedLinear

    assert not any(isinstance(m, (PackedLinear, torch.nn.Linear)) for m in kernel_model.modules())
    for layer in kernel_model.model.layers:  # q, k, v in one kernel call, gate and up in another
        attn, mlp = layer.self_attn, layer.mlp
        assert all(isinstance(m, KernelSlice) for m in (attn.q_proj, attn.k_proj, attn.v_proj,
                                                         mlp.gate_proj, mlp.up_proj))
        assert isinstance(attn.o_proj, KernelLinear) and isinstance(mlp.down_proj, KernelLinear)
    assert isinstance(kernel_model.lm_head, KernelLinear)
    ids = chat_ids("Explain in two sentences why the sky is blue, then list three colours.")
    with torch.inference_mode():
        got = kernel_model(torch.tensor([ids])).logits[0].float()
        want = model(torch.tensor([ids])).logits[0].float()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree
    spread = want.std(dim=-1, keepdim=True)
    assert ((got - want).abs() / spread).mean() < 0.1


# Spec-Bench prompts (math_reasoning, writing) where float32 attention changed the greedy reply
# with the draft: a test that fails if attention stops being schedule-invariant.
BANANAS = ("John picks 4 bananas on Wednesday. Then he picks 6 bananas on Thursday. On Friday, he "
           "picks triple the number of bananas he did on Wednesday. How many bananas does John have?")
TRAVEL = ("Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural "
          "experiences and must-see attractions.")


def own_greedy(model, ids, stops, tokenizer, new):
    """The target's own greedy reply as the engine computes it: one token per pass."""
    from drafts.chain import NoDraft
    from test_exactness import run

    return run(model, NoDraft(), ids, stops, tokenizer, budget=1, max_new_tokens=new).token_ids


@pytest.mark.parametrize("draft,budget,threads", [("ngram", 4, 2), ("ngram", 16, 1),
                                                  ("distilled", 8, 2), ("distilled", 64, 1)])
def test_greedy_specexec_on_the_kernels_is_their_own_greedy(kernel_model, tokenizer, chat_ids,
                                                             draft, budget, threads, steps):
    """Exactness against the target as it computes, token for token, no near-tie allowed:
    greedy SpecExec over the kernel model gives the kernel model's own one-token-per-pass greedy
    reply, whatever the draft, the budget and the threads (a tree's rows attend alone,
    offload/cpu_forward.py; attending together under the tree's mask, one of these differed)."""
    from drafts import ModelDrafter, NgramDrafter
    from drafts.distilled import load_draft
    from offload.kernels import ManyRows
    from specexec_app.loading.sources import SHIPPED_DRAFTS
    from test_exactness import run

    stops, new = {tokenizer.eos_token_id}, 48
    if draft == "ngram":
        drafter = NgramDrafter(min_ngram=1)
    else:
        dmodel = load_draft(SHIPPED_DRAFTS["smollm2-distilled"], kernel_model, torch.device("cpu"))
        drafter = ModelDrafter(dmodel, kernel_model.config.vocab_size, stop_ids=frozenset(stops))
        # The draft's forwards of 5+ rows take a dense copy of the shared head; the target's
        # head is the same packed module as before, never the copy.
        assert isinstance(dmodel.lm_head, ManyRows) and dmodel.lm_head.linear is kernel_model.lm_head
    before, saved = torch.get_num_threads(), 0
    for prompt in (BANANAS, TRAVEL):
        ids = chat_ids(prompt)
        torch.set_num_threads(2)
        ref = own_greedy(kernel_model, ids, stops, tokenizer, new)
        torch.set_num_threads(threads)
        try:
            done = run(kernel_model, drafter, ids, stops, tokenizer, budget=budget, max_new_tokens=new)
        finally:
            torch.set_num_threads(before)
        assert len(ref) > 20 and done.token_ids == ref, prompt
        saved += len(done.token_ids) - done.stats.target_passes
    assert saved > 0  # drafted tokens were accepted: the trees were not all rejected


def test_the_lean_forward_computes_what_the_layers_compute(kernel_model, chat_ids, steps):
    """The engine's calls (positions, a causal mask or none for one row, a cache) go through the
    lean forward (offload/cpu_forward.py), any other call through transformers' layers; both give
    the same logits, bit for bit, with the fused C steps or torch's operators between the kernels
    (RMSNorm is `rms_norm` on every path; a prompt's rows attend together in float64, one row
    alone in float32), over a prompt and then one row on the cache it left."""
    from specexec_app.core.kvcache import CACHE_ARG, TokenCache
    from specexec_app.core.lm import mask_dtype
    from specexec_app.core.tree import Tree, tree_inputs

    assert "forward" in vars(kernel_model)  # installed on the instance
    ids = chat_ids("Name the planets of the solar system in order.")
    got, want = [], []
    for force_layers, out in ((False, got), (True, want)):
        kv = TokenCache()
        extra = {"return_dict": True} if force_layers else {}
        for pending, past in ((ids[:-1], 0), (ids[-1:], len(ids) - 1)):
            x, pos, mask = tree_inputs(pending, Tree(), past, mask_dtype(kernel_model),
                                       torch.device("cpu"))
            assert (mask is None) == (len(pending) == 1)
            with torch.inference_mode():
                out.append(kernel_model(input_ids=x, position_ids=pos, attention_mask=mask,
                                        use_cache=True, **{CACHE_ARG: kv.cache},
                                        logits_to_keep=0, **extra).logits[0].float())
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.equal(g, w), (g - w).abs().max()


def test_a_tree_pass_computes_what_one_token_passes_compute(kernel_model, chat_ids, steps):
    """The promise behind greedy exactness on a CPU, checked bit for bit: the logits a tree pass
    gives at each node are those that a reply's one-token passes down that node's path give (the
    prompt's rows attend together in both, the tree's and the reply's alone), under other
    thread counts and over cache buffers of other sizes too, for nodes whose ancestors are the
    rows before them and for nodes whose are not (copied into place for their call); and after
    a commit of a path of the second kind
    the next one-token pass still gives what it gives after one-token passes down that path.
    (With the rows attending together under the tree's mask, SDPA sums in another order: the
    bits differ and this test fails.)"""
    from specexec_app.core.lm import Target
    from specexec_app.core.tree import Tree
    from test_offload import tree_batch

    # A prompt long enough that the tree pass outgrows the cache's first 256 places while the
    # one-token side, whose context is capped at 300, holds room for 301: the keys' strides differ.
    ids = chat_ids(" ".join([TRAVEL] * 10))
    tree = tree_batch()  # rows: root, 100, 100-200, 300, 100-200-400, 100-500
    assert 256 - len(tree) < len(ids) < 290
    before = torch.get_num_threads()

    def one_token(path: list[int]) -> list[torch.Tensor]:
        """Logits after the prompt and after each token of `path`, one token a pass."""
        target = Target(kernel_model, context=300)
        out = []
        for i in range(len(path) + 1):
            out.append(target.verify(ids + path[:i], Tree(), reply_from=len(ids))[0].float())
            target.commit(Tree(), [])
        return out

    def path_to(node: int) -> list[int]:
        nodes = []
        while node >= 0:
            nodes.append(node)
            node = tree.parents[node]
        return nodes[::-1]

    try:
        torch.set_num_threads(1)
        target = Target(kernel_model)
        got = target.verify(ids, tree, reply_from=len(ids)).float()
        torch.set_num_threads(2)
        assert torch.equal(got[0], one_token([])[0])
        for node in range(len(tree)):
            tokens = [tree.tokens[n] for n in path_to(node)]
            assert torch.equal(got[1 + node], one_token(tokens)[-1]), (node, tokens)
        path = path_to(3)  # 100-200-400: 400 is not right after 200 in the pass
        target.commit(tree, path)
        tokens = [tree.tokens[n] for n in path]
        after = target.verify(ids + tokens + [7], Tree(), reply_from=len(ids))[0].float()
        assert torch.equal(after, one_token(tokens + [7])[-1])
    finally:
        torch.set_num_threads(before)


def test_a_kernel_model_without_the_lean_forward_attends_in_float64_and_stays_exact(
        gguf_source, tokenizer, chat_ids):
    """A kernel model whose layers the lean forward does not take (here: its architectures
    list emptied while it loads) goes through transformers' layers with every row's attention
    in float64, a tree's rows together and one row alone alike within rounding: greedy SpecExec
    is its own one-token greedy."""
    import offload.cpu_forward as cpu_forward
    from drafts import NgramDrafter
    from specexec_app.loading.session import _load_target
    from test_exactness import run

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_forward, "ARCHITECTURES", ())
        plain, _ = _load_target(gguf_source, torch.device("cpu"), "auto", None, None,
                                lambda _: None, None, 0, False, 2048, 16)
    assert "forward" not in vars(plain) and not hasattr(plain, "rows_alone")
    assert plain.config._attn_implementation == cpu_forward.FLOAT64_SDPA
    stops, saved = {tokenizer.eos_token_id}, 0
    for prompt in (BANANAS, TRAVEL):
        ids = chat_ids(prompt)
        ref = own_greedy(plain, ids, stops, tokenizer, 48)
        done = run(plain, NgramDrafter(min_ngram=1), ids, stops, tokenizer, budget=4,
                   max_new_tokens=48)
        assert len(ref) > 20 and done.token_ids == ref, prompt
        saved += len(done.token_ids) - done.stats.target_passes
    assert saved > 0


def test_a_prompt_in_chunks_is_cut_alike_with_a_tree_or_without(kernel_model, tokenizer,
                                                                 chat_ids, monkeypatch):
    """On the lean forward a prompt's chunks (PREFILL_CHUNK, 16 here) do not depend on the tree
    on top (they attend together, in float64, so their cut must be the same in both modes):
    full chunks, then the rest with the tree; greedy SpecExec over such a prompt is still the
    one-token greedy."""
    import specexec_app.core.lm as lm
    from drafts import NgramDrafter
    from specexec_app.core.lm import Target
    from specexec_app.core.tree import Tree
    from test_exactness import run
    from test_offload import tree_batch

    monkeypatch.setattr(lm, "PREFILL_CHUNK", 16)
    ids = chat_ids("Repeat after me: red green blue, red green blue, red green blue, red.")
    assert len(ids) > 32
    rows: list[list[int]] = []
    hook = kernel_model.register_forward_pre_hook(
        lambda _, args, kwargs: rows[-1].append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        for tree in (Tree(), tree_batch()):
            rows.append([])
            Target(kernel_model).verify(ids, tree, reply_from=len(ids))
    finally:
        hook.remove()
    chunks, rest = [16] * ((len(ids) - 1) // 16), (len(ids) - 1) % 16 + 1  # never empty
    assert rows == [chunks + [rest], chunks + [rest + len(tree_batch())]]
    stops = {tokenizer.eos_token_id}
    ref = own_greedy(kernel_model, ids, stops, tokenizer, 32)
    done = run(kernel_model, NgramDrafter(min_ngram=1), ids, stops, tokenizer, budget=4,
               max_new_tokens=32)
    assert len(ref) > 10 and done.token_ids == ref
    assert done.stats.target_passes < len(ref)


def test_a_qwen2_target_with_qkv_biases_takes_the_lean_forward(tmp_path):
    """Qwen2's layers are Llama's with biases on q, k and v: the fused q/k/v kernel carries them
    (int8 rows here, `--quant 8`) and the lean forward takes the model: it computes what
    transformers' layers compute, bit for bit (a prompt, then one row), and greedy SpecExec is
    the model's own one-token greedy."""
    from pathlib import Path

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from offload.kernels import KernelSlice
    from offload.loader import load_offloaded
    from specexec_app.core.kvcache import CACHE_ARG, TokenCache
    from specexec_app.core.tree import Tree, tree_inputs
    from test_formats import assert_drafted_greedy_is_its_own

    config = Qwen2Config(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2, vocab_size=512,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    source = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in source.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    source.save_pretrained(tmp_path)
    model = load_offloaded(Path(tmp_path), torch.device("cpu"), 8, "never", None, 0,
                           torch.float32).model
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, KernelSlice) and q._refs[0].linear.bias is not None
    assert getattr(model, "rows_alone", False)

    ids = list(range(10, 60))
    got, want = [], []
    for force_layers, out in ((False, got), (True, want)):
        kv = TokenCache()
        extra = {"return_dict": True} if force_layers else {}
        for pending, past in ((ids[:-1], 0), (ids[-1:], len(ids) - 1)):
            x, pos, mask = tree_inputs(pending, Tree(), past, torch.float32, torch.device("cpu"))
            with torch.inference_mode():
                out.append(model(input_ids=x, position_ids=pos, attention_mask=mask, use_cache=True,
                                 **{CACHE_ARG: kv.cache}, logits_to_keep=1, **extra).logits[0])
    for g, w in zip(got, want):
        assert torch.equal(g, w), (g - w).abs().max()
    assert_drafted_greedy_is_its_own(model, [7, 8, 9, 10, 11] * 6)


def test_a_reply_leaves_the_cache_a_one_token_reply_leaves(kernel_model, tokenizer, chat_ids,
                                                          steps):
    """Whatever the tree's last pass accepted (a stop token, nodes past the length), a reply
    leaves in the target's cache what a reply one token a pass leaves: all its tokens but the
    last. So a chat's next turn computes the same logits, bit for bit, after either."""
    from drafts import NgramDrafter
    from drafts.chain import NoDraft
    from specexec_app.config.settings import DecodeSettings
    from specexec_app.core import engine
    from specexec_app.core.lm import Target
    from specexec_app.core.tree import Tree

    stops, more = {tokenizer.eos_token_id}, tokenizer.encode("\nAnd why?")
    for prompt, new in (("Name three colours, in one short sentence.", 64), (TRAVEL, 24)):
        ids = chat_ids(prompt)
        caches, nexts, reasons = [], [], set()
        for drafter, budget in ((NoDraft(), 1), (NgramDrafter(min_ngram=1), 4)):
            target = Target(kernel_model)
            done = list(engine.generate(target, drafter, ids, DecodeSettings(
                budget=budget, max_new_tokens=new), tokenizer, stops))[-1]
            reasons.add(done.stats.stop_reason)
            caches.append(list(target.kv.tokens))
            turn = ids + done.token_ids + [tokenizer.eos_token_id] + more
            nexts.append(target.verify(turn, Tree(), reply_from=len(turn))[0].float())
        assert len(reasons) == 1 and caches[0] == caches[1], prompt
        assert caches[0] == (ids + done.token_ids)[:-1]
        assert torch.equal(nexts[0], nexts[1]), prompt


@pytest.mark.parametrize("kind", ["self-int8", "self-nf4"])
def test_self_drafts_of_the_gguf_target_load_and_stay_exact(kernel_model, gguf_source, tokenizer,
                                                            chat_ids, kind):
    """A quantized copy of a GGUF target as the draft (bitsandbytes cannot quantize a GGUF load:
    the blocks are expanded, then packed by offload): it loads, its trees are accepted, and the
    output is the kernel target's own greedy."""
    from specexec_app.loading.session import make_drafter
    from test_exactness import NEW, PROMPTS, run

    stops = {tokenizer.eos_token_id}
    drafter = make_drafter(kind, None, gguf_source, kernel_model, torch.device("cpu"),
                           kernel_model.config.vocab_size, stops)
    ids = chat_ids(PROMPTS[0])
    done = run(kernel_model, drafter, ids, stops, tokenizer, budget=4)
    assert done.stats.accepted_per_pass > 1.5  # a copy of the target: most nodes accepted
    assert done.token_ids == own_greedy(kernel_model, ids, stops, tokenizer, NEW)


def test_a_batch_of_two_goes_through_the_layers(kernel_model, chat_ids):
    """The lean forward takes one sequence (the engine's calls); a batch of two goes to
    transformers' layers, and each row gets the logits it gets alone."""
    from specexec_app.core.kvcache import CACHE_ARG, TokenCache
    from specexec_app.core.tree import Tree, tree_inputs

    ids = chat_ids("Name three colours.")
    x, pos, mask = tree_inputs(ids, Tree(), 0, torch.float32, torch.device("cpu"))
    outs = []
    with torch.inference_mode():
        for batch in (1, 2):
            outs.append(kernel_model(input_ids=x.expand(batch, -1), position_ids=pos.expand(batch, -1),
                                     attention_mask=mask.expand(batch, -1, -1, -1), use_cache=True,
                                     **{CACHE_ARG: TokenCache().cache}, logits_to_keep=1).logits)
    assert outs[1].shape[0] == 2
    assert torch.allclose(outs[1][0], outs[0][0], atol=1e-3) and torch.allclose(outs[1][1], outs[0][0], atol=1e-3)
