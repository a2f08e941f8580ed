"""A Hugging Face causal LM run over a tree: the one place that calls the model's forward."""

from __future__ import annotations

import torch

from specexec_app.core.kvcache import TokenCache
from specexec_app.core.tree import Tree, tree_inputs


ATTENTION = "specexec_sdpa"


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
               is_causal=None, **kwargs):
    """transformers' "sdpa" attention, except on a CPU for several query rows under a mask (a
    tree pass) with grouped KV heads: there SDPA shares each KV head among its query heads
    (`enable_gqa`) instead of transformers copying the keys and values to every head first
    (`repeat_kv`), which cost a quarter of a 3-row pass at 6k tokens of context on 2 cores. The
    same arithmetic. (On a GPU a mask with `enable_gqa` would fall back to the math kernel.)"""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (query.device.type == "cpu" and attention_mask is not None and query.shape[2] > 1
            and getattr(module, "num_key_value_groups", 1) > 1 and not dropout
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
            and kwargs.get("cache") is None):
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
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


def forward_tree(model, kv: TokenCache, pending: list[int], tree: Tree) -> torch.Tensor:
    """One pass over `pending` tokens then `tree` on top of `kv`; the new entries are appended to
    the cache (pending first, then nodes in order) and `kv.tokens` is left unchanged. A long run
    of pending tokens (a prompt) first goes through in chunks, so that no pass computes more than
    max(PREFILL_CHUNK, 1 + len(tree)) rows: the activations and the mask of an 8k-token prompt
    would otherwise take gigabytes of GPU memory that the placement has given to layers.

    Returns logits [1 + len(tree), V] in the model's dtype (rows are made float32 one at a time
    where they are sampled: for a 2048-node tree and a 128k vocabulary a float32 copy of them all
    would take another 1 GB of GPU memory): row 0 after the last pending token (the root), row
    1 + i after node i.
    """
    rows, done = max(PREFILL_CHUNK, len(tree) + 1), 0
    while len(pending) - done > 1 and len(pending) - done + len(tree) > rows:
        n = min(rows, len(pending) - done - 1)
        _forward(model, kv, len(kv.tokens) + done, pending[done:done + n], Tree())
        done += n
    return _forward(model, kv, len(kv.tokens) + done, pending[done:], tree)


def _forward(model, kv: TokenCache, past: int, pending: list[int], tree: Tree) -> torch.Tensor:
    """`pending` then `tree` on top of the `past` entries that `kv`'s cache holds."""
    dtype = model.dtype if model.dtype.is_floating_point else torch.float32
    ids, pos, mask = tree_inputs(pending, tree, past, dtype)
    device = model_device(model)
    with torch.inference_mode():
        out = model(input_ids=ids.to(device), position_ids=pos.to(device),
                    attention_mask=mask.to(device), past_key_values=kv.cache,
                    use_cache=True, logits_to_keep=len(tree) + 1)
    return out.logits[0]


DEFAULT_CONTEXT = 8192  # tokens of a conversation when the user names none (the KV cache's room)


def model_context(config) -> int:
    """The most tokens the model can attend over: its position limit, or its sliding window (our
    tree mask is full attention: beyond the window we would differ from the model)."""
    limit = getattr(config, "max_position_embeddings", None) or 2048
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return min(limit, window) if window else limit


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
        self.kv = TokenCache()
        self._pending: list[int] = []
        self.device = model_device(model)
        self.streamer = offloaded.streamer if offloaded is not None else None
        self.placement = offloaded.placement if offloaded is not None else None

    def context_hint(self) -> str:
        """For messages about a full context: how it could grow ('' at the model's limit)."""
        if self.context_length < self.max_context:
            return f" (--context raises it, up to {self.max_context})"
        return ""

    @property
    def bytes_streamed(self) -> int:
        """Weight bytes copied to the device so far (0 for a resident model)."""
        return self.streamer.bytes_streamed if self.streamer else 0

    def verify(self, tokens: list[int], tree: Tree) -> torch.Tensor:
        """Target logits [1 + len(tree), V] at the root (last of `tokens`) and at every node."""
        self._pending = self.kv.sync(tokens)
        return forward_tree(self.model, self.kv, self._pending, tree)

    def commit(self, tree: Tree, path: list[int]) -> None:
        """Keep the pending tokens and the accepted `path` nodes of the last `verify`."""
        base, p = len(self.kv.tokens), len(self._pending)
        slots = [base + i for i in range(p)] + [base + p + node for node in path]
        self.kv.commit(self._pending + [tree.tokens[n] for n in path], slots)
        self._pending = []
