"""A draft model that grows the tree best-first by cumulative log-probability (SpecExec)."""

from __future__ import annotations

import numpy as np
import torch

from specexec_app.core.kvcache import TokenCache
from specexec_app.core.lm import forward_tree, model_device, use_fast_attention
from specexec_app.core.tree import Tree, additive_mask

from .base import Drafter


class ModelDrafter(Drafter):
    """Any small causal LM that shares the target's tokenizer.

    Each round takes the best not-yet-expanded nodes among the current best `budget` (up to
    `expand_batch` of them), runs the draft once over all of them with a tree mask on its KV
    cache, and adds each one's `top_k` children. It stops when no node within the best `budget`
    is left to expand: no new child could then enter the kept set. The KV entries of expanded
    nodes that the target accepts are kept for the next call.
    """

    name = "model"

    def __init__(self, model, vocab_size: int, top_k: int = 8, expand_batch: int = 32,
                 max_depth: int = 32, stop_ids: frozenset[int] = frozenset()):
        use_fast_attention(model)
        self.model = model
        self.vocab_size = vocab_size  # ids past the shared tokenizer's vocabulary are never drafted
        self.top_k = top_k
        self.expand_batch = expand_batch
        self.max_depth = max_depth
        self.stop_ids = stop_ids
        self.kv = TokenCache()
        self._last: tuple[Tree, list[int]] | None = None  # last tree and its nodes' cache slots

    def reset(self) -> None:
        self.kv.reset()
        self._last = None

    def _reuse_last_tree(self, tokens: list[int]) -> None:
        """Keep the cache entries of the last tree's nodes that `tokens` went on to accept."""
        last, self._last = self._last, None
        base = len(self.kv.tokens)
        if last is None or tokens[:base] != self.kv.tokens:
            return
        tree, slots = last
        children = tree.children()
        node, kept_tokens, kept_slots = -1, [], []
        for tok in tokens[base:]:
            node = children.get(node, {}).get(tok, -1)
            if node < 0 or slots[node] < 0:
                break
            kept_tokens.append(tok)
            kept_slots.append(slots[node])
        self.kv.commit(kept_tokens, kept_slots)

    def _logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits[:, : self.vocab_size].float(), dim=-1)

    def propose(self, tokens: list[int], budget: int) -> Tree:
        self._reuse_last_tree(tokens)
        pending = self.kv.sync(tokens)
        root_lp = self._logprobs(forward_tree(self.model, self.kv, pending, Tree()))[-1]
        self.kv.tokens = list(tokens)  # the pending tokens are now cached

        tree = Tree()
        depths: list[int] = []
        slots: list[int] = []  # cache slot of each node once expanded, else -1
        self._add_children(tree, depths, slots, -1, 0.0, root_lp)
        while True:
            batch = self._next_batch(tree, depths, slots, budget)
            if not batch:
                break
            logprobs = self._expand(tree, slots, batch, depths)
            for node, lp in zip(batch, logprobs):
                self._add_children(tree, depths, slots, node, tree.scores[node], lp)
        keep = tree.best_nodes(budget)
        final = tree.select(keep)
        self._last = (final, [slots[i] for i in keep])
        return final

    def _add_children(self, tree, depths, slots, parent, score, logprobs) -> None:
        k = min(self.top_k, logprobs.shape[-1])
        values, ids = logprobs.topk(k)
        depth = depths[parent] + 1 if parent >= 0 else 1
        for v, t in zip(values.tolist(), ids.tolist()):
            tree.add(t, parent, score + v)
            depths.append(depth)
            slots.append(-1)

    def _next_batch(self, tree, depths, slots, budget) -> list[int]:
        """The best unexpanded nodes among the current best `budget`, best first."""
        scores = np.asarray(tree.scores)
        order = np.argsort(-scores, kind="stable")[:budget]
        batch = [int(i) for i in order
                 if slots[i] < 0 and depths[i] < self.max_depth
                 and tree.tokens[i] not in self.stop_ids and np.isfinite(scores[i])]
        return batch[: self.expand_batch]

    def _expand(self, tree: Tree, slots: list[int], batch: list[int], depths) -> torch.Tensor:
        """Run the draft on `batch` (whose ancestors are all expanded): [len(batch), V] logprobs."""
        past = len(self.kv.tokens)            # committed prefix; expanded nodes follow it
        cached = self.kv.cache.get_seq_length()
        q = len(batch)
        allowed = torch.zeros(q, cached + q, dtype=torch.bool)
        allowed[:, :past] = True
        for row, node in enumerate(batch):
            parent = tree.parents[node]
            while parent >= 0:
                allowed[row, slots[parent]] = True
                parent = tree.parents[parent]
            allowed[row, cached + row] = True
            slots[node] = cached + row
        device = model_device(self.model)
        dtype = self.model.dtype
        ids = torch.tensor([[tree.tokens[i] for i in batch]], device=device)
        pos = torch.tensor([[past - 1 + depths[i] for i in batch]], device=device)
        with torch.inference_mode():
            out = self.model(input_ids=ids, position_ids=pos,
                             attention_mask=additive_mask(allowed, dtype).to(device),
                             past_key_values=self.kv.cache, use_cache=True)
        return self._logprobs(out.logits[0])
