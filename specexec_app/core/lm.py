"""A Hugging Face causal LM run over a tree: the one place that calls the model's forward."""

from __future__ import annotations

import threading

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from specexec_app.core.kvcache import CACHE_ARG, TokenCache
from specexec_app.core.tree import Tree, padded_mask, tree_inputs


ATTENTION = "specexec_sdpa"

# Kernels that take an additive mask without materialising the [heads, q, kv] scores. The math
# kernel would (64 x 2049 x 10241 scores for a 70B tree pass: 2.7-5.4 GB that no plan holds), so
# on CUDA a masked call that none of these can run fails loudly instead.
MASKED_KERNELS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
# sdpa_kernel sets process-wide flags and restores them on exit: two threads (target and an
# overlapped draft) entering and leaving it interleaved could leave either one unrestricted.
_kernel_flags = threading.Lock()


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
               is_causal=None, **kwargs):
    """transformers' "sdpa" attention, with two changes. On CUDA a masked call (a tree pass) may
    only run MASKED_KERNELS. On a CPU, several query rows under a mask with grouped KV heads run
    SDPA sharing each KV head among its query heads (`enable_gqa`) instead of transformers
    copying the keys and values to every head first (`repeat_kv`), which cost a quarter of a
    3-row pass at 6k tokens of context on 2 cores; the same arithmetic. (On a GPU a mask with
    `enable_gqa` would need the math kernel.)"""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (query.device.type == "cpu" and attention_mask is not None and query.shape[2] > 1
            and getattr(module, "num_key_value_groups", 1) > 1 and not dropout
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and kwargs.get("cache") is None):
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    if query.device.type == "cuda" and attention_mask is not None:
        with _kernel_flags, sdpa_kernel(MASKED_KERNELS):
            return sdpa_attention_forward(module, query, key, value, attention_mask,
                                          dropout=dropout, scaling=scaling, is_causal=is_causal,
                                          **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal, **kwargs)


def use_fast_attention(model) -> None:
    """Switch a model that runs transformers' "sdpa" attention to `_attention`; a model class
    that refuses a registered attention keeps "sdpa" (this is only a speed-up)."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTENTION, _attention)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
        model.set_attn_implementation(ATTENTION)
    except (ImportError, AttributeError, ValueError, TypeError):
        pass


def model_device(model) -> torch.device:
    """Where the model computes: the device of its first parameter that is not on the meta device
    (the templates of streamed layers are)."""
    return next(p for p in model.parameters() if p.device.type != "meta").device


PREFILL_CHUNK = 2048  # most rows of one pass over pending tokens (a long prompt goes in chunks)
# The attribute of a model whose forward takes `rows_alone=s` (offload.cpu_forward's lean
# forward): the rows from s on attend alone, each as a one-row pass would, over exactly the keys
# it sees; the rows before s (a prompt's tokens) attend together. A tree's rows, and a reply's
# own tokens, then compute what one-token passes compute, bit for bit.
ROWS_ALONE = "rows_alone"


def forward_tree(model, kv: TokenCache, pending: list[int], tree: Tree, streamer=None,
                 where: tuple[torch.device, torch.dtype] | None = None,
                 reply_from: int | None = None) -> torch.Tensor:
    """One pass over `pending` tokens then `tree` on top of `kv`; the new entries are appended to
    the cache (pending first, then nodes in order) and `kv.tokens` is left unchanged. A long run
    of pending tokens (a prompt) first goes through in chunks, so that no pass computes more than
    max(PREFILL_CHUNK, 1 + len(tree)) rows (PREFILL_CHUNK + len(tree) for a model that attends
    rows alone, below): the activations and the mask of an 8k-token prompt
    would otherwise take gigabytes of GPU memory that the placement has given to layers.

    Returns logits [1 + len(tree), V] in the model's dtype (rows are made float32 one at a time
    where they are sampled: for a 2048-node tree and a 128k vocabulary a float32 copy of them all
    would take another 1 GB of GPU memory): row 0 after the last pending token (the root), row
    1 + i after node i. With the `streamer` of a streamed target, a prompt of several chunks goes
    layer by layer (`_prefill_layer_major`): its layers are streamed once, not once a chunk.
    `where`: the model's device and mask dtype, if the caller knows them (finding them takes a
    walk over the model's parameters, ~40 us a pass).

    A model that attends rows alone (ROWS_ALONE) gets its pending tokens in chunks cut by
    PREFILL_CHUNK whatever the tree; the tree's rows attend alone, and so do pending tokens at
    positions from `reply_from` on (a reply's own tokens; None: none of them), the others (a
    prompt's) together. A prompt is then computed alike with a tree on top or without, and each
    node and each token of a reply as a one-token pass computes it.
    """
    where = where or (model_device(model), mask_dtype(model))
    alone = getattr(model, ROWS_ALONE, False)
    if alone:
        done = (len(pending) - 1) // PREFILL_CHUNK * PREFILL_CHUNK
        spans = [(a, a + PREFILL_CHUNK) for a in range(0, done, PREFILL_CHUNK)]
    else:
        rows, done, spans = max(PREFILL_CHUNK, len(tree) + 1), 0, []
        while len(pending) - done > 1 and len(pending) - done + len(tree) > rows:
            n = min(rows, len(pending) - done - 1)
            spans.append((done, done + n))
            done += n
    if len(spans) > 1 and streamer is not None and streamer.streaming and \
            model.config.model_type in LAYER_MAJOR:
        with streamer.layer_major():
            _prefill_layer_major(model, kv, len(kv.tokens), pending, spans)
    else:
        for a, b in spans:
            _forward(model, kv, len(kv.tokens) + a, pending[a:b], Tree(), where, alone, reply_from)
    return _forward(model, kv, len(kv.tokens) + done, pending[done:], tree, where, alone, reply_from)


# Decoder stacks whose forward is: embed, rotary embedding, the layers over one mask, norm
# (no embedding scale, no per-layer mask kinds within our full-attention context).
LAYER_MAJOR = ("llama", "mistral", "qwen2", "qwen3")


def _prefill_layer_major(model, kv: TokenCache, past: int, tokens: list[int],
                         spans: list[tuple[int, int]]) -> None:
    """`tokens[a:b]` for every span, through the model one layer at a time: each layer runs over
    every span before the next layer starts, so a streamed layer crosses the bus (or is read
    from disk) once for the whole prompt instead of once a span. The same arithmetic as a pass
    per span, in another order: every span of a layer sees the cache of the spans before it."""
    inner, device, dtype = model.model, model_device(model), mask_dtype(model)
    end = spans[-1][1]
    ids = torch.as_tensor([tokens[:end]], device=device)
    pos = torch.arange(past, past + end, device=device)[None]
    with torch.inference_mode():
        hidden = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(hidden, pos)
        for layer in inner.layers[: model.config.num_hidden_layers]:
            for a, b in spans:  # each span's mask is rebuilt here: only one exists at a time
                mask = padded_mask(b - a, past + b, dtype, device, past + a)
                mask[:, past + a:].triu_(1)
                out = layer(hidden[:, a:b], attention_mask=mask[None, None],
                            position_embeddings=(cos[:, a:b], sin[:, a:b]),
                            position_ids=pos[:, a:b], use_cache=True, **{CACHE_ARG: kv.cache})
                hidden[:, a:b] = out[0] if isinstance(out, tuple) else out


def mask_dtype(model) -> torch.dtype:
    """The dtype of the additive masks given to `model` (float32 where its dtype is not a float)."""
    return model.dtype if model.dtype.is_floating_point else torch.float32


def run(model, kv: TokenCache, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None,
        rows: int, alone: int | None = None) -> torch.Tensor:
    """One forward of `model`: input_ids and position_ids [1, q] and an additive mask
    [1, 1, q, cached + q] (None: every row sees every key) on top of `kv`'s cache, whose new
    entries are appended. Returns the logits [rows, V] of the last `rows` rows. `alone`: the
    first row that attends alone (only for a model that has ROWS_ALONE)."""
    extra = {ROWS_ALONE: alone} if alone is not None else {}
    with torch.inference_mode():
        out = model(input_ids=ids, position_ids=pos, attention_mask=mask,
                    use_cache=True, logits_to_keep=rows, **{CACHE_ARG: kv.cache}, **extra)
    return out.logits[0]


def _forward(model, kv: TokenCache, past: int, pending: list[int], tree: Tree,
             where: tuple[torch.device, torch.dtype], alone: bool = False,
             reply_from: int | None = None) -> torch.Tensor:
    """`pending` then `tree` on top of the `past` entries that `kv`'s cache holds (`alone`:
    the tree's rows attend alone, and the pending tokens from position `reply_from` on)."""
    ids, pos, mask = tree_inputs(pending, tree, past, where[1], where[0])
    first = None
    if alone:
        first = len(pending) if reply_from is None else max(0, min(len(pending), reply_from - past))
    return run(model, kv, ids, pos, mask, len(tree) + 1, first)


DEFAULT_CONTEXT = 8192  # tokens of a conversation when the user names none (the KV cache's room)


def model_context(config) -> int:
    """The most tokens the model can attend over: its position limit, or its sliding window (our
    tree mask is full attention: beyond the window we would differ from the model)."""
    limit = getattr(config, "max_position_embeddings", None) or 2048
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return min(limit, window) if window else limit


def rope_switch(model) -> int | None:
    """For a model whose rotary embedding is 'longrope' (Phi-3, Phi-3.5, Phi-4-mini): the length
    past which it computes with its long factors (`original_max_position_embeddings`); None for
    every other model (their frequencies do not depend on the pass: 'dynamic' ones change only
    past `max_position_embeddings`, which `model_context` keeps the context within)."""
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if getattr(rotary, "rope_type", None) != "longrope":
        return None
    config = model.config
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    switch = getattr(config, "original_max_position_embeddings", None) or \
        params.get("original_max_position_embeddings")
    return int(switch) if switch else None


class LongRope:
    """The long or short factors of a 'longrope' model chosen by the sequence, not by the pass.

    transformers picks them per forward from the pass's largest position, and its Phi-3
    generation recomputes the whole cache with the long factors once the sequence passes the
    switch: every token then has the long ones, before it the short. A tree pass reaching past
    the switch, or a long prompt prefilled in chunks, would mix the two. So the target keeps
    its trees below the switch while the sequence is short (`Target.rope_room`), starts its
    cache over when the sequence crosses it (`Target.verify`), and, while `long`, every pass's
    rotary embedding is computed with one more position at the switch, which selects the long
    factors on the device (no host round trip) for chunks that lie before it."""

    @classmethod
    def on(cls, rotary, switch: int) -> LongRope:
        """The one for `rotary` (a model loaded once may serve several Targets, or a draft)."""
        if getattr(rotary, "_specexec_longrope", None) is None:
            rotary._specexec_longrope = cls(rotary, switch)
        return rotary._specexec_longrope

    def __init__(self, rotary, switch: int):
        self.long = False
        forward = rotary.forward

        def forced(x, position_ids, *args, **kwargs):
            if not self.long:
                return forward(x, position_ids, *args, **kwargs)
            at = position_ids.new_full((position_ids.shape[0], 1), switch)
            cos, sin = forward(x, torch.cat([position_ids, at], 1), *args, **kwargs)
            return cos[:, :-1], sin[:, :-1]

        rotary.forward = forced


class Target:
    """The model whose output we promise: scores a tree in one pass, then commits a path.
    `context` caps the conversation's tokens (prompt and replies) below the model's own limit.
    `offloaded` (an `offload.Offloaded`, for a model placed by `offload.offload_model`) gives its
    placement and streamer; None for a model resident on one device."""

    def __init__(self, model, name: str = "target", context: int | None = None, offloaded=None):
        use_fast_attention(model)
        self.model = model
        self.name = name
        self.max_context = model_context(model.config)
        self.context_length = min(self.max_context, context) if context else self.max_context
        # Room for the context and a tree of the planned budget (a larger tree grows it).
        planned = offloaded.placement.tree_budget if offloaded is not None else 0
        self.kv = TokenCache(self.context_length + planned + 1)
        self._pending: list[int] = []
        self.device = model_device(model)
        self._where = (self.device, mask_dtype(model))
        self.streamer = offloaded.streamer if offloaded is not None else None
        self.placement = offloaded.placement if offloaded is not None else None
        self.rope_switch = rope_switch(model)
        self._rope = LongRope.on(model.model.rotary_emb, self.rope_switch) if self.rope_switch else None
        self._long = False  # whether the cache holds the long factors' entries

    def context_hint(self) -> str:
        """For messages about a full context: how it could grow ('' at the model's limit)."""
        if self.context_length < self.max_context:
            return f" (--context raises it, up to {self.max_context})"
        return ""

    def cached(self, tokens: list[int]) -> int:
        """How many of `tokens` the KV cache holds already: a pass over them computes only the
        rest (a chat turn that resends the conversation prefills only its new tokens)."""
        return self.kv.common_prefix(tokens)

    @property
    def bytes_streamed(self) -> int:
        """Weight bytes copied to the device so far (0 for a resident model)."""
        return self.streamer.bytes_streamed if self.streamer else 0

    def rope_room(self, n: int) -> int:
        """Tree levels a pass after `n` tokens may hold, plus one (as the context's room): while
        a 'longrope' sequence is short, its tree stays below the switch."""
        if self.rope_switch is None or n > self.rope_switch:
            return self.context_length
        return self.rope_switch - n + 1

    def verify(self, tokens: list[int], tree: Tree, reply_from: int | None = None) -> torch.Tensor:
        """Target logits [1 + len(tree), V] at the root (last of `tokens`) and at every node.
        `reply_from`: where the reply's own tokens start in `tokens` (None: all are a prompt's),
        for a model that computes them as one-token passes do (`forward_tree`)."""
        if self._rope is not None:
            long = len(tokens) > self.rope_switch
            if long != self._long:  # the sequence crossed the switch: every entry again
                self.kv.reset()
                self._long = long
            self._rope.long = long  # (a draft sharing the model may have set it since)
        self._pending = self.kv.sync(tokens)
        return forward_tree(self.model, self.kv, self._pending, tree, self.streamer, self._where,
                            reply_from)

    def settle(self, tokens: list[int]) -> None:
        """After a reply ending `tokens`: the cache keeps at most all of them but the last, what
        a reply one token a pass leaves (its last token drawn, never run), whatever a tree's
        last pass accepted beyond that (a stop token, nodes past the length): the next turn then
        starts from the same cache either way, and a model that attends rows alone computes it
        alike (offload/cpu_forward.py)."""
        self.kv.sync(tokens)

    def commit(self, tree: Tree, path: list[int]) -> None:
        """Keep the pending tokens and the accepted `path` nodes of the last `verify`."""
        base, p = len(self.kv.tokens), len(self._pending)
        slots = [base + i for i in range(p)] + [base + p + node for node in path]
        self.kv.commit(self._pending + [tree.tokens[n] for n in path], slots)
        self._pending = []
