"""Key/value cache bookkeeping: which committed tokens a cache holds, and the commit of a path."""

from __future__ import annotations

import functools

import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_ROOM = 256  # positions a layer's buffers hold at first
# The keyword that takes the KV cache in transformers' forwards and outputs: `cache` since 5.24
# (the old name then warns on every run, and is to go in 5.40), `past_key_values` before (the
# GPU image has 5.17). Calls pass it as **{CACHE_ARG: cache}.
CACHE_ARG = "cache" if Version(transformers.__version__) >= Version("5.24.0.dev0") else "past_key_values"


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values are views [..., :length, :] of buffers
    with room to grow: a pass writes its new entries in place, and the buffers are reallocated
    (twice as large) only when full. transformers' DynamicLayer concatenates instead, copying the
    whole cache of every layer on every pass: at 8k tokens of SmolLM2-135M, 377 MB a token.
    `limit` (the positions the plan keeps memory for) caps the doubling."""

    def __init__(self, limit: int | None = None):
        super().__init__()
        self.limit = limit

    def update(self, key_states, value_states, *args, **kwargs):
        """Append the new entries; values are stored in the keys' dtype (the CPU's lean forward
        hands its bf16 kernel output over as it is, widened exactly as it is written)."""
        room_k, room_v, n = self.extend(key_states.shape, value_states.shape[-1],
                                        key_states.dtype, key_states.device)
        room_k[..., n:n + key_states.shape[-2], :] = key_states
        room_v[..., n:n + key_states.shape[-2], :] = value_states
        return self.keys, self.values

    def extend(self, shape, value_dim: int, dtype: torch.dtype, device: torch.device):
        """Room for shape[-2] more entries (keys `shape`, values `value_dim` wide a head), which
        the keys and values now end with, for the caller to write. Returns the buffers (whole:
        contiguous, [..., room, dim]) and the position of the first new entry."""
        if not self.is_initialized:
            empty = torch.empty(0, dtype=dtype, device=device)
            self.lazy_initialization(empty, empty)
            self.room_k = self.room_v = None
        n, add = self.get_seq_length(), shape[-2]
        # The views truncate() and the commit leave are still views of the buffers' start.
        if self.room_k is None or n + add > self.room_k.shape[-2] or \
                (n and self.keys.data_ptr() != self.room_k.data_ptr()):
            size = max(MIN_ROOM, 2 * (n + add))
            if self.limit:
                size = max(n + add, min(size, self.limit))
            room_k = torch.empty((*shape[:-2], size, shape[-1]), dtype=dtype, device=device)
            room_v = torch.empty((*shape[:-2], size, value_dim), dtype=dtype, device=device)
            if n:
                room_k[..., :n, :] = self.keys
                room_v[..., :n, :] = self.values
            self.room_k, self.room_v = room_k, room_v
        self.keys, self.values = self.room_k[..., :n + add, :], self.room_v[..., :n + add, :]
        return self.room_k, self.room_v, n

    def reset(self) -> None:
        self.room_k = self.room_v = None
        super().reset()


def new_cache(limit: int | None = None) -> DynamicCache:
    """No config: every layer a full-attention GrowingLayer (at most `limit` positions of room,
    beyond what a pass needs), which the commit below can edit."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = functools.partial(GrowingLayer, limit)
    return cache


def growing(cache: DynamicCache, count: int) -> bool:
    """Whether `cache`'s first `count` layers are GrowingLayers, or will be as they are made."""
    make = cache.layer_class_to_replicate
    made = make is GrowingLayer or getattr(make, "func", None) is GrowingLayer
    return all(isinstance(layer, GrowingLayer) for layer in cache.layers[:count]) and \
        (len(cache.layers) >= count or made)


def cache_len(cache: DynamicCache) -> int:
    """The longest layer's length: a truncate stopped part way (Ctrl+C between two layers)
    leaves later layers longer than the first, and the next sync must see it."""
    return max((layer.get_seq_length() for layer in cache.layers), default=0)


def keep_slots(cache: DynamicCache, base: int, slots: list[int]) -> None:
    """Keep the first `base` entries of every layer, followed by the entries at `slots` (all at
    `base` or beyond, in that order). Only the kept entries after `base` move: the committed
    prefix is not copied on every pass (at 6k tokens that copy took 49 ms a pass on 2 cores)."""
    if slots == list(range(base, base + len(slots))):  # already in place (the pending tokens)
        truncate(cache, base + len(slots))
        return
    index, end = torch.as_tensor(slots, dtype=torch.long), base + len(slots)
    on_device: dict[torch.device, torch.Tensor] = {}  # one copy per device, not one per layer
    with torch.inference_mode():  # the cache's tensors were made in inference mode
        for layer in cache.layers:
            if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                continue
            dev = layer.keys.device
            idx = on_device.get(dev)
            if idx is None:
                idx = on_device[dev] = index.to(dev, non_blocking=True)
            layer.keys[..., base:end, :] = layer.keys.index_select(-2, idx)
            layer.values[..., base:end, :] = layer.values.index_select(-2, idx)
    truncate(cache, end)


def truncate(cache: DynamicCache, length: int) -> None:
    """Drop every entry from position `length` on."""
    for layer in cache.layers:  # (a layer no longer than `length` is left as it is)
        keys = getattr(layer, "keys", None)
        if keys is None or keys.numel() == 0 or keys.shape[-2] <= length:
            continue
        layer.keys = layer.keys[..., :length, :]
        layer.values = layer.values[..., :length, :]


class TokenCache:
    """A KV cache together with the committed tokens it holds, position for position.

    `sync(tokens)` keeps the longest cached prefix of `tokens` and returns the rest (the pending
    tokens, at least one, so that a forward pass can produce the distribution after `tokens`).
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit  # positions the plan keeps room for (context and a tree)
        self.cache = new_cache(limit)
        self.tokens: list[int] = []

    def common_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens` the cache holds already (at most all but the last)."""
        common, limit = 0, min(len(self.tokens), len(tokens) - 1)
        while common < limit and self.tokens[common] == tokens[common]:
            common += 1
        return common

    def sync(self, tokens: list[int]) -> list[int]:
        common = self.common_prefix(tokens)
        if common < len(self.tokens) or cache_len(self.cache) > common:
            truncate(self.cache, common)
            self.tokens = self.tokens[:common]
        return list(tokens[common:])

    def commit(self, tokens: list[int], slots: list[int]) -> None:
        """After a pass, keep the committed prefix plus the entries at `slots`, which hold `tokens`."""
        base = len(self.tokens)
        keep_slots(self.cache, base, list(slots))
        self.tokens = self.tokens + list(tokens)

    def reset(self) -> None:
        self.cache = new_cache(self.limit)
        self.tokens = []
