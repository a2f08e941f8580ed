"""A Hugging Face causal LM run over a tree: the one place that calls the model's forward."""

from __future__ import annotations

import torch

from .kvcache import TokenCache
from .tree import Tree, tree_inputs


def model_device(model) -> torch.device:
    """Where the model computes: the device of its first parameter that is not on the meta device
    (the templates of streamed layers are)."""
    return next(p for p in model.parameters() if p.device.type != "meta").device


def forward_tree(model, kv: TokenCache, pending: list[int], tree: Tree) -> torch.Tensor:
    """One pass over `pending` tokens then `tree` on top of `kv`; the new entries are appended to
    the cache (pending first, then nodes in order) and `kv.tokens` is left unchanged.

    Returns float32 logits [1 + len(tree), V]: row 0 after the last pending token (the root),
    row 1 + i after node i.
    """
    past = len(kv.tokens)
    dtype = model.dtype if model.dtype.is_floating_point else torch.float32
    ids, pos, mask = tree_inputs(pending, tree, past, dtype)
    device = model_device(model)
    with torch.inference_mode():
        out = model(input_ids=ids.to(device), position_ids=pos.to(device),
                    attention_mask=mask.to(device), past_key_values=kv.cache,
                    use_cache=True, logits_to_keep=len(tree) + 1)
    return out.logits[0].float()


class Target:
    """The model whose output we promise: scores a tree in one pass, then commits a path."""

    def __init__(self, model, name: str = "target"):
        self.model = model
        self.name = name
        self.kv = TokenCache()
        self._pending: list[int] = []
        self.device = model_device(model)
        self.streamer = getattr(model, "_specexec_streamer", None)  # set by offload.offload_model
        self.placement = getattr(model, "_specexec_placement", None)

    @property
    def bytes_streamed(self) -> int:
        """Weight bytes copied to the device so far (0 for a resident model)."""
        return self.streamer.bytes_streamed if self.streamer else 0

    @property
    def context_length(self) -> int:
        cfg = self.model.config
        limit = getattr(cfg, "max_position_embeddings", None) or 2048
        window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        # Our tree mask is full attention: beyond a sliding window we would differ from the model.
        return min(limit, window) if window else limit

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
