"""A lean forward for a Llama-architecture target whose layers are all in the CPU kernels' form.

On a CPU, with weights computed by the packed kernels (`offload.kernels`), a one-token pass of a
small model is mostly Python: transformers' layer code makes ~15 module calls a layer, builds its
mask and position arguments, and dispatches attention through its interface. This forward does
the same arithmetic as transformers' Llama layers (RMSNorm in float32, the rotary embedding from
the model's own rotary module, SDPA with the key/value heads shared, SiLU MLP) in a plain loop
over per-layer tensors gathered once: on SmolLM2-135M, 2 cores, a one-token pass took 6.3 ms
instead of 8.7 ms (docs/BENCHMARKS.md, run 2).

Attention is computed in float64 (over the float32 keys and values of the cache). The kernels
take bf16 inputs, so a difference in the last float32 bit of a layer's attention (SDPA over a
tree's rows and over one row sums in different orders: ~2e-7) can round a bf16 input the other
way, and over 30 layers move the logits by 0.1-0.4: with float32 attention, greedy output changed
with the draft, the budget and the threads (10 of 24 replies on Spec-Bench prompts, 48 tokens,
n-gram 4/16 and the distilled draft 8). In float64 the schedules differ by ~1e-16, which the
rounding to float32 absorbs but about once in 1e9 values: 0 of 24. It costs ~13 % of a one-token
pass at Spec-Bench contexts (SmolLM2-135M, 2 cores; docs/BENCHMARKS.md), growing with the
context (converting each layer's keys and values); a float64 cache cost twice that, as reading
the cache bounds that part of the pass.

It serves the calls the engine makes (`core.lm.run`: ids, positions, a 4-D additive mask or none
for one row, a cache, `logits_to_keep`); any other call (transformers' `generate`, a call without
positions) goes to the model's own forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from specexec_app.core.kvcache import CACHE_ARG, GrowingLayer

from .kernels import KERNEL_DTYPE, KernelLinear, KernelSlice

ARCHITECTURES = ("llama", "mistral")
ATTENTION_DTYPE = torch.float64  # attention's arithmetic (see above); the cache stays float32
# The arguments of the engine's calls (`core.lm.run`); a call with any other goes to transformers.
ENGINE_CALL = {"input_ids", "position_ids", "attention_mask", "past_key_values", "cache",
               "use_cache", "logits_to_keep"}


def _matmul(linear: KernelLinear):
    """a [n, in] in bf16 (the kernels' input) -> [n, out] with `linear`'s weights: one int4 kernel
    call, its bf16 output as it comes, when `linear` is a single 4-bit term; else its own forward
    (its terms summed in float32). Either output is what KernelLinear gives in float32, as bf16
    widens to float32 exactly."""
    if len(linear.groups) == 1 and not linear.int8 and linear.bias is None:
        packed, scales, group = linear.packed0, linear.scales_zeros0, linear.groups[0]
        return lambda a: torch._weight_int4pack_mm_for_cpu(a, packed, group, scales)
    return lambda a: linear(a.float())


def _fused(names, parent):
    """The fused KernelLinear behind sibling slices (q, k, v or gate, up), or None."""
    slices = [getattr(parent, n) for n in names]
    if not all(isinstance(s, KernelSlice) for s in slices):
        return None
    shared = slices[0]._refs[0]
    if any(s._refs[0] is not shared for s in slices) or \
            [s.start for s in slices] != [0] + [s.end for s in slices[:-1]]:
        return None
    return shared.linear


EXACT_SDPA = "specexec_sdpa_float64"


def _sdpa_float64(module, query, key, value, attention_mask, *args, **kwargs):
    """transformers' SDPA attention computed in `ATTENTION_DTYPE`, output in the query's dtype:
    the same schedule invariance as the lean forward for the calls that go through
    transformers' layers (its `generate`, architectures the lean forward does not take)."""
    from specexec_app.core.lm import _attention  # transformers' SDPA, GQA kept on a CPU

    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.to(ATTENTION_DTYPE)
    out, weights = _attention(module, query.to(ATTENTION_DTYPE), key.to(ATTENTION_DTYPE),
                              value.to(ATTENTION_DTYPE), attention_mask, *args, **kwargs)
    return out.to(query.dtype), weights


AttentionInterface.register(EXACT_SDPA, _sdpa_float64)
AttentionMaskInterface.register(EXACT_SDPA, sdpa_mask)


def install(model) -> bool:
    """Attention in float64 for `model` (a causal LM on the CPU whose matrices are in the
    kernels' form) where it uses SDPA; and the lean forward when every decoder layer is a Llama
    layer with its q/k/v and gate/up fused and no bias. Returns whether the lean forward is in."""
    config = model.config
    if not any(isinstance(m, KernelLinear) for m in model.modules()):
        return False  # float weights: float32 throughout, no bf16 rounding to magnify
    if getattr(config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(EXACT_SDPA)
    if config.model_type not in ARCHITECTURES or getattr(config, "hidden_act", "silu") != "silu" \
            or getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return False
    layers = []
    for layer in model.model.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return False
        qkv = _fused(("q_proj", "k_proj", "v_proj"), attn)
        gate_up = _fused(("gate_proj", "up_proj"), mlp)
        if qkv is None or gate_up is None or not isinstance(attn.o_proj, KernelLinear) \
                or not isinstance(mlp.down_proj, KernelLinear):
            return False
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if any(type(n).__name__ not in ("LlamaRMSNorm", "MistralRMSNorm") for n in norms):
            return False
        layers.append((norms[0].weight, norms[0].variance_epsilon, _matmul(qkv), _matmul(attn.o_proj),
                       norms[1].weight, norms[1].variance_epsilon, _matmul(gate_up),
                       _matmul(mlp.down_proj), attn.scaling))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    original = model.forward

    def forward(self, *args, **kwargs):
        ids, pos, mask = (kwargs.get(k) for k in ("input_ids", "position_ids", "attention_mask"))
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        lean = (not args and set(kwargs) <= ENGINE_CALL and ids is not None and pos is not None
                and ids.shape[0] == 1 and isinstance(cache, DynamicCache)
                and (mask.dim() == 4 if mask is not None else ids.shape[1] == 1))
        if not lean:  # the call as it came, to transformers' layers
            return original(*args, **kwargs)
        return _forward(self, layers, heads, kv_heads, head_dim, config.intermediate_size, ids,
                        pos, mask, cache, kwargs.get("logits_to_keep", 0))

    model.forward = types.MethodType(forward, model)
    return True


def _forward(model, layers, heads, kv_heads, head_dim, inter, ids, pos, mask, cache, keep):
    """The arithmetic of transformers' layers (with `_sdpa_float64`) bit for bit, in fewer ops:
    the residual stream [n, hidden] updated in place, RMSNorm as torch's own (the same
    arithmetic in one call) written into the kernels' bf16 input, q and k rotated together with
    rotate_half's sign moved onto the sine ((-a) * b == a * (-b) exactly), values widened as they
    are written into the cache, attention's output rounded to bf16 as it is laid out for o_proj,
    and kernel outputs added without a float32 copy."""
    n = ids.shape[1]
    x = model.model.embed_tokens(ids)[0].clone()              # [n, hidden] float32, ours
    hidden, k_end, half = x.shape[-1], (heads + kv_heads) * head_dim, head_dim // 2
    cos, sin = model.model.rotary_emb(x[None], pos)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    sin = torch.cat((-sin[..., :half], sin[..., half:]), -1)
    mask = None if mask is None else mask.to(ATTENTION_DTYPE)
    a = torch.empty_like(x, dtype=KERNEL_DTYPE)               # the matmuls' bf16 inputs
    m = torch.empty(n, inter, dtype=KERNEL_DTYPE)
    o = torch.empty(n, heads, head_dim, dtype=KERNEL_DTYPE)   # attention's output, o_proj's input
    o_heads, o_rows = o.transpose(0, 1), o.view(n, -1)

    for i, (w1, eps1, qkv, out, w2, eps2, gate_up, down, scale) in enumerate(layers):
        a.copy_(F.rms_norm(x, (hidden,), w1, eps1))
        y = qkv(a)
        t = y[:, :k_end].view(1, n, heads + kv_heads, head_dim).transpose(1, 2)
        qk = t * cos + t.roll(half, -1) * sin
        v = y[:, k_end:].view(1, n, kv_heads, head_dim).transpose(1, 2)
        layer = cache.layers[i] if i < len(cache.layers) else None
        k, v = cache.update(qk[:, heads:], v if isinstance(layer, GrowingLayer) else v.float(), i)
        o_heads.copy_(F.scaled_dot_product_attention(
            qk[:, :heads].to(ATTENTION_DTYPE), k.to(ATTENTION_DTYPE), v.to(ATTENTION_DTYPE),
            attn_mask=mask, scale=scale, enable_gqa=kv_heads != heads)[0])
        x.add_(out(o_rows))
        a.copy_(F.rms_norm(x, (hidden,), w2, eps2))
        g, u = gate_up(a).split(inter, -1)
        x.add_(down(torch.mul(F.silu(g.float()), u, out=m)))
    x = model.model.norm(x[None, -keep:] if keep else x[None])
    return CausalLMOutputWithPast(logits=model.lm_head(x), **{CACHE_ARG: cache})
