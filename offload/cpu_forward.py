"""A lean forward for a Llama-architecture target (Llama, Mistral, Qwen2) whose layers are all in
the CPU kernels' form.

On a CPU, with weights computed by the packed kernels (`offload.kernels`), a one-token pass of a
small model is mostly Python: transformers' layer code makes ~15 module calls a layer, builds its
mask and position arguments, and dispatches attention through its interface. This forward does
the same arithmetic as transformers' Llama layers (RMSNorm, the rotary embedding from the
model's own rotary module, SDPA with the key/value heads shared, SiLU MLP) in a plain loop over
per-layer tensors gathered once: on SmolLM2-135M, 2 cores, a one-token pass took 6.3 ms instead
of 8.7 ms (docs/BENCHMARKS.md, run 2). Between the kernel calls, the small steps (RMSNorm into
the kernels' bf16 input, the rotary embedding and the cache writes, SiLU(gate) * up, the
residual adds) are C loops (`offload.native`, built with the machine's compiler) where one
builds, ~20 fewer torch operator calls a layer (~1.4 ms less a one-token pass, run 6); else
torch's operators, with the same bits. RMSNorm is `rms_norm` on every path, transformers'
layers too (its sum of squares in float64: a float32 sum's order differs between torch and C).

Exactness. The kernels take bf16 inputs, so a difference in the last float32 bit of a layer's
attention can round a bf16 input the other way and, over 30 layers, move the logits by 0.1-0.4;
and SDPA over a tree's rows under a mask sums in another order than SDPA over one row (~2e-7):
with that, greedy output changed with the draft, the budget and the threads (10 of 24 replies
on Spec-Bench prompts). So:
- a tree's rows attend alone (`rows_alone`, core.lm.ROWS_ALONE): each is one float32 SDPA call
  of one query row over exactly the keys it sees, in cache order and laid out as a one-token
  pass has them, no mask: the call a one-token pass makes at that position, so the same bits.
  A node whose ancestors are not the rows before it has them copied into the cache's places
  after the prefix for its call (the tree's own entries are put back after);
- so do a reply's own tokens (the token a pass drew, pending in the next pass);
- a prompt's tokens attend together under the causal mask, in float64, where schedules differ
  by ~1e-16, which the rounding to float32 absorbs but about once in 1e9 values: the engine
  cuts a prompt into calls alike with a tree on top or without, and a prompt resent with its
  start cached (a reply asked for again) gives the same bits but about as rarely;
- a reply leaves the cache with all its tokens but the last (`engine.generate`), as a reply
  one token a pass does, whatever the tree's last pass accepted: so a chat's next turn starts
  from the same cache either way. (A conversation continued in its session and the same
  conversation loaded afresh are not bit for bit the same computation: the reply's tokens were
  cached as they were drawn, alone in float32, and are a prompt's, in float64, after a load.)
Calls without `rows_alone`, and those through transformers' layers (its `generate`:
`_lean_sdpa`), attend one row alone in float32 and several together in float64; so generate's
greedy is the lean forward's. A kernel model whose layers the lean forward does not take attends
in float64 throughout (`_sdpa_float64`). (All of attention in float64 cost ~13 % of a one-token
pass, converting the cache every layer; every row alone, prompts too, made a prefill ~40 %
slower.)

It serves the calls the engine makes (`core.lm.run`: ids, positions, a 4-D additive mask or none
for one row, a cache, `logits_to_keep`, `rows_alone`); any other call (transformers' `generate`,
a call without positions) goes to the model's own forward.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from specexec_app.core.kvcache import CACHE_ARG, GrowingLayer, growing
from specexec_app.core.lm import ROWS_ALONE

from . import native
from .kernels import KERNEL_DTYPE, KernelLinear, KernelSlice

ARCHITECTURES = ("llama", "mistral", "qwen2")  # Llama's layers (Qwen2's with q/k/v biases)
NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
ATTENTION_DTYPE = torch.float64  # the arithmetic of rows that attend together (see above)
# The arguments of the engine's calls (`core.lm.run`); a call with any other goes to transformers.
ENGINE_CALL = {"input_ids", "position_ids", "attention_mask", "past_key_values", "cache",
               "use_cache", "logits_to_keep", ROWS_ALONE}


def _matmul(linear: KernelLinear):
    """a [n, in] in bf16 (the kernels' input) -> [n, out] with `linear`'s weights: one int4 kernel
    call, its bf16 output as it comes, when `linear` is a single 4-bit term; else its own forward
    (its terms summed in float32). Either output is what KernelLinear gives in float32, as bf16
    widens to float32 exactly. Returns the function and whether its output is bf16."""
    if len(linear.groups) == 1 and not linear.int8 and linear.bias is None:
        packed, scales, group = linear.packed0, linear.scales_zeros0, linear.groups[0]
        return (lambda a: torch._weight_int4pack_mm_for_cpu(a, packed, group, scales)), True
    return (lambda a: linear(a.float())), False


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


LEAN_SDPA = "specexec_sdpa_lean"        # a model with the lean forward, in calls that bypass it
FLOAT64_SDPA = "specexec_sdpa_float64"  # a kernel model without it: every row in float64


def _sees_all(mask: torch.Tensor | None) -> bool:
    """Whether an attention mask (additive, or True where a key is seen) hides no key."""
    if mask is None:
        return True
    return bool(mask.all()) if mask.dtype == torch.bool else not bool(mask.any())


def _sdpa_float64(module, query, key, value, attention_mask, *args, **kwargs):
    """transformers' SDPA attention computed in `ATTENTION_DTYPE`, output in the query's dtype:
    a tree's rows together and one row alone then differ by ~1e-16, which the rounding to float32
    absorbs (for a kernel model whose layers the lean forward does not take)."""
    from specexec_app.core.lm import _attention  # transformers' SDPA, GQA kept on a CPU

    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.to(ATTENTION_DTYPE)
    out, weights = _attention(module, query.to(ATTENTION_DTYPE), key.to(ATTENTION_DTYPE),
                              value.to(ATTENTION_DTYPE), attention_mask, *args, **kwargs)
    return out.to(query.dtype), weights


def _lean_sdpa(module, query, key, value, attention_mask, *args, **kwargs):
    """transformers' SDPA attention as the lean forward computes it (for its `generate`): one
    query row over keys it all sees in float32 with the SDPA call the lean forward makes;
    several rows (or a row that does not see every key) in float64."""
    if query.shape[0] == 1 and query.shape[2] == 1 and _sees_all(attention_mask):
        gqa = key.shape[1] != query.shape[1]
        out = F.scaled_dot_product_attention(query, key, value, scale=kwargs.get("scaling"),
                                             enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    return _sdpa_float64(module, query, key, value, attention_mask, *args, **kwargs)


for _name, _function in ((LEAN_SDPA, _lean_sdpa), (FLOAT64_SDPA, _sdpa_float64)):
    AttentionInterface.register(_name, _function)
    AttentionMaskInterface.register(_name, sdpa_mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of float32 rows as every path of a lean-forward model computes it (the fused C
    step, torch's operators, transformers' layers in its `generate`: `install`): the sum of
    squares in float64, rounded to float32 (a float32 sum depends on its order, which differs
    between torch's vectorised one and a C loop; float64 sums in two orders differ by ~1e-15 of
    the sum, so they round to the same float32 but about once in 1e7 rows), then
    x * rsqrt(mean + eps) * weight in float32 (rsqrt: 1 / sqrt, both correctly rounded, as C's
    are). Each path sums a row the same way however many rows a call has: exactness, which
    compares a path with itself, does not rest on the paths agreeing."""
    mean = x.double().square().sum(-1, keepdim=True).float() / x.shape[-1]
    return x * torch.rsqrt(mean + eps) * weight  # (torch.sqrt is not correctly rounded here)


def _own_norm(norm: torch.nn.Module) -> None:
    """`norm` (a Llama-type RMSNorm module) computes `rms_norm` from now on."""
    weight, eps = norm.weight, norm.variance_epsilon
    norm.forward = lambda hidden: rms_norm(hidden.float(), weight, eps).to(hidden.dtype)


def _lean_layers(model) -> list[tuple] | None:
    """Per decoder layer, what the lean forward computes with (norm weights and epsilons, the
    kernel matmuls, the attention scale, whether each matmul's output is bf16); None where a
    layer is not one it takes."""
    config = model.config
    if config.model_type not in ARCHITECTURES or getattr(config, "hidden_act", "silu") != "silu" \
            or getattr(config, "mlp_bias", False) or getattr(config, "use_sliding_window", False) \
            or any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return None
    layers = []
    for layer in model.model.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return None
        qkv = _fused(("q_proj", "k_proj", "v_proj"), attn)
        gate_up = _fused(("gate_proj", "up_proj"), mlp)
        if qkv is None or gate_up is None or not isinstance(attn.o_proj, KernelLinear) \
                or not isinstance(mlp.down_proj, KernelLinear) or gate_up.bias is not None \
                or attn.o_proj.bias is not None or mlp.down_proj.bias is not None:
            return None  # (q, k and v may have biases: Qwen2's)
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if any(type(n).__name__ not in NORMS for n in norms):
            return None
        (f_qkv, b_qkv), (f_out, b_out), (f_gu, b_gu), (f_down, b_down) = (
            _matmul(m) for m in (qkv, attn.o_proj, gate_up, mlp.down_proj))
        layers.append((norms[0].weight, norms[0].variance_epsilon, f_qkv, f_out,
                       norms[1].weight, norms[1].variance_epsilon, f_gu, f_down, attn.scaling,
                       (b_qkv, b_out, b_gu, b_down)))
    return layers


def install(model) -> bool:
    """For `model` (a causal LM on the CPU whose matrices are in the kernels' form): the lean
    forward when every decoder layer is a Llama layer with its q/k/v and gate/up fused and no
    bias, and transformers' SDPA attention made exact for the calls that go through its layers
    (`_lean_sdpa` beside the lean forward, else `_sdpa_float64`), its RMSNorm modules computing
    `rms_norm` as the lean forward does. Returns whether the lean forward is in."""
    config = model.config
    if not any(isinstance(m, KernelLinear) for m in model.modules()):
        return False  # float weights: float32 throughout, no bf16 rounding to magnify
    layers = _lean_layers(model)
    if getattr(config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(LEAN_SDPA if layers else FLOAT64_SDPA)
    if not layers:
        return False
    for norm in (*(n for layer in model.model.layers
                   for n in (layer.input_layernorm, layer.post_attention_layernorm)),
                 model.model.norm):
        if type(norm).__name__ in NORMS:
            _own_norm(norm)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    original = model.forward

    def forward(self, *args, **kwargs):
        ids, pos, mask = (kwargs.get(k) for k in ("input_ids", "position_ids", "attention_mask"))
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        lean = (not args and set(kwargs) <= ENGINE_CALL and ids is not None and pos is not None
                and ids.shape[0] == 1 and isinstance(cache, DynamicCache)
                and (mask.dim() == 4 if mask is not None else ids.shape[1] == 1))
        if not lean:  # the call as it came, to transformers' layers (which attend as
            kwargs.pop(ROWS_ALONE, None)  # `_lean_sdpa` does, whatever the rows)
            return original(*args, **kwargs)
        return _forward(self, layers, heads, kv_heads, head_dim, config.intermediate_size, ids,
                        pos, mask, cache, kwargs.get("logits_to_keep", 0), kwargs.get(ROWS_ALONE))

    model.forward = types.MethodType(forward, model)
    setattr(model, ROWS_ALONE, True)
    return True


def _alone_plan(mask: torch.Tensor, n: int, first: int) -> list[tuple[int, int, int, list[int]]]:
    """For rows `first` .. n - 1 of a call of `n` rows under `mask` [1, 1, n, past + n], which
    attend alone: per row, (row, how many of the call's rows it sees, how many of those are rows
    0, 1, ... in place after the prefix already, the rows it sees). Rows whose rows are all in
    place come first."""
    seen = (mask[0, 0, first:, -n:] == 0).tolist()
    plan = []
    for j, row in enumerate(seen, first):
        rows = [r for r, s in enumerate(row) if s]
        if not rows or rows[-1] != j:
            raise ValueError("a row of a tree pass must see itself and no later row")
        place = next((i for i, r in enumerate(rows) if r != i), len(rows))
        plan.append((j, len(rows), place, rows))
    return sorted(plan, key=lambda p: p[2] < p[1])


def _attend_alone(q, k, v, plan, o_heads, scale, gqa) -> None:
    """Each row of q [1, heads, n, d] by itself over the keys it sees (`_alone_plan`), into
    o_heads [1, heads, n, d]. k and v [1, kv_heads, past + n, d] are the cache's own entries: a
    row whose keys are not all in place has them copied into place for its call from the first
    row that is not in place for every such row on (the rows before it, a prompt's pending
    ones too, never move); the call's own entries are put back after."""
    past = k.shape[-2] - q.shape[-2]
    low = min((place for _, d, place, _ in plan if place < d), default=None)
    saved = None if low is None else (k[..., past + low:, :].clone(), v[..., past + low:, :].clone())
    for j, d, place, rows in plan:
        if place < d:
            at = torch.tensor(rows[low:]) - low
            k[..., past + low:past + d, :] = saved[0][..., at, :]
            v[..., past + low:past + d, :] = saved[1][..., at, :]
        o_heads[:, :, j:j + 1].copy_(F.scaled_dot_product_attention(
            q[:, :, j:j + 1], k[..., :past + d, :], v[..., :past + d, :], scale=scale,
            enable_gqa=gqa))
    if saved is not None:
        k[..., past + low:, :], v[..., past + low:, :] = saved


def _forward(model, layers, heads, kv_heads, head_dim, inter, ids, pos, mask, cache, keep, alone):
    """The arithmetic of transformers' layers (with `_lean_sdpa`), in fewer ops: the residual
    stream [n, hidden] updated in place, RMSNorm written into the kernels' bf16 input, q and k
    rotated together, values widened as they are written into the cache, attention's output
    rounded to bf16 as it is laid out for o_proj, kernel outputs added without a float32 copy.
    The steps between the kernels are the C loops of `offload.native` where they built
    (`_native_layers`), else torch's operators (`_torch_layers`): the same bits either way.
    Rows from `alone` on attend alone, the rows before together (None: a lone row alone,
    several together; the module's docstring)."""
    n = ids.shape[1]
    x = model.model.embed_tokens(ids)[0].clone()              # [n, hidden] float32, ours
    cos, sin = model.model.rotary_emb(x[None], pos)
    together = (n if n > 1 else 0) if alone is None else alone
    lone = n == 1 and not together  # one row alone: it sees every key, one SDPA call
    plan = _alone_plan(mask, n, together) if together < n and not lone else None
    if together and mask is not None:  # those rows' mask over the keys up to them, for float64
        mask = mask[..., :together, :mask.shape[-1] - n + together].to(ATTENTION_DTYPE)
    attend = functools.partial(_attend, together=together, mask=mask, lone=lone, plan=plan,
                               gqa=kv_heads != heads)
    lib = native.library()
    if lib is not None and growing(cache, len(layers)):
        _native_layers(lib, x, cos[0].contiguous(), sin[0].contiguous(), layers, cache, heads,
                       kv_heads, head_dim, inter, attend)
    else:
        _torch_layers(x, cos, sin, layers, cache, heads, kv_heads, head_dim, inter, attend)
    x = model.model.norm(x[None, -keep:] if keep else x[None])
    return CausalLMOutputWithPast(logits=model.lm_head(x), **{CACHE_ARG: cache})


def _attend(q, k, v, o_heads, scale, *, together, mask, lone, plan, gqa) -> None:
    """Attention of q [1, heads, n, d] over the cache's k and v [1, kv_heads, past + n, d] into
    o_heads [1, heads, n, d]: rows before `together` together under `mask` in float64, then a
    lone row as one SDPA call over every key, or the rows of `plan` alone."""
    if together:
        end = k.shape[-2] - q.shape[-2] + together
        o_heads[:, :, :together].copy_(F.scaled_dot_product_attention(
            q[:, :, :together].to(ATTENTION_DTYPE), k[..., :end, :].to(ATTENTION_DTYPE),
            v[..., :end, :].to(ATTENTION_DTYPE), attn_mask=mask, scale=scale, enable_gqa=gqa))
    if lone:  # (the call `_attend_alone` makes for a row whose keys are all in place)
        o_heads.copy_(F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa))
    elif plan:
        _attend_alone(q, k, v, plan, o_heads, scale, gqa)


def _buffers(n, hidden, heads, head_dim, inter):
    """The matmuls' bf16 inputs [n, hidden] and [n, inter]; attention's output [n, heads, d]
    (o_proj's input) as [1, heads, n, d] and [n, hidden]."""
    o = torch.empty(n, heads, head_dim, dtype=KERNEL_DTYPE)
    return (torch.empty(n, hidden, dtype=KERNEL_DTYPE), torch.empty(n, inter, dtype=KERNEL_DTYPE),
            o[None].transpose(1, 2), o.view(n, -1))


def _torch_layers(x, cos, sin, layers, cache, heads, kv_heads, head_dim, inter, attend) -> None:
    """The layers with torch's operators: `rms_norm`, q and k rotated with rotate_half's sign
    moved onto the sine ((-a) * b == a * (-b) exactly)."""
    n, hidden, k_end, half = x.shape[0], x.shape[1], (heads + kv_heads) * head_dim, head_dim // 2
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    sin = torch.cat((-sin[..., :half], sin[..., half:]), -1)
    a, m, o_heads, o_rows = _buffers(n, hidden, heads, head_dim, inter)
    for i, (w1, eps1, qkv, out, w2, eps2, gate_up, down, scale, _) in enumerate(layers):
        a.copy_(rms_norm(x, w1, eps1))
        y = qkv(a)
        t = y[:, :k_end].view(1, n, heads + kv_heads, head_dim).transpose(1, 2)
        qk = t * cos + t.roll(half, -1) * sin
        v = y[:, k_end:].view(1, n, kv_heads, head_dim).transpose(1, 2)
        layer = cache.layers[i] if i < len(cache.layers) else None
        if isinstance(layer, GrowingLayer):  # (transformers' Cache.update only forwards to it)
            k, v = layer.update(qk[:, heads:], v)
        else:
            k, v = cache.update(qk[:, heads:], v.float(), i)
        attend(qk[:, :heads], k, v, o_heads, scale)
        x.add_(out(o_rows))
        a.copy_(rms_norm(x, w2, eps2))
        gu = gate_up(a)
        g = F.silu(gu[:, :inter].float(), inplace=True)
        x.add_(down(torch.mul(g, gu[:, inter:], out=m)))


def _native_layers(lib, x, cos, sin, layers, cache, heads, kv_heads, head_dim, inter,
                   attend) -> None:
    """The layers with the C loops of `offload.native` between the kernels (cos and sin [n, d]):
    each layer's second norm follows o_proj's add in one call, and the next layer's first norm
    the MLP's. Keys and values are written into room made in the cache (`GrowingLayer.extend`)."""
    n, hidden = x.shape
    a, m, o_heads, o_rows = _buffers(n, hidden, heads, head_dim, inter)
    q = torch.empty(1, heads, n, head_dim)
    xp, ap, mp, qp, cp, sp = (t.data_ptr() for t in (x, a, m, q, cos, sin))
    shape, cpu = (1, kv_heads, n, head_dim), x.device
    lib.specexec_rms_bf16(xp, layers[0][0].data_ptr(), ap, n, hidden, layers[0][1])
    for i, (_, _, qkv, out, w2, eps2, gate_up, down, scale, bf) in enumerate(layers):
        if i == len(cache.layers):
            cache.layers.append(cache.layer_class_to_replicate())
        room_k, room_v, past = cache.layers[i].extend(shape, head_dim, x.dtype, cpu)
        y = qkv(a)
        lib.specexec_rope_write(y.data_ptr(), bf[0], cp, sp, qp, room_k.data_ptr(),
                                room_v.data_ptr(), n, heads, kv_heads, head_dim,
                                room_k.shape[-2], past)
        attend(q, cache.layers[i].keys, cache.layers[i].values, o_heads, scale)
        z = out(o_rows)  # (held while C reads it: a pointer does not keep a tensor alive)
        lib.specexec_add_rms_bf16(xp, z.data_ptr(), bf[1], w2.data_ptr(), ap, n, hidden, eps2)
        gu = gate_up(a)
        lib.specexec_silu_mul_bf16(gu.data_ptr(), bf[2], mp, n, inter)
        z, last = down(m), i + 1 == len(layers)
        lib.specexec_add_rms_bf16(xp, z.data_ptr(), bf[3],
                                  None if last else layers[i + 1][0].data_ptr(), ap, n, hidden,
                                  0.0 if last else layers[i + 1][1])
