"""Counting the host round trips of a pass: the ops that make the host wait for a CUDA device
(reading a value back, a data-dependent shape, a copy to the host) or that copy Python data to
it (a tensor built from a list). On a CPU nothing waits, so the same ops are counted as what
they WOULD cost on a GPU: the count is the same on both.

    with RoundTrips(model) as trips:
        forward_tree(model, kv, prompt, tree)
    trips.inside   # in the decoder layers (the streamed loop): the goal is 0
    trips.outside  # before and after them (inputs, logits)
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_READBACK = {aten._local_scalar_dense.default: "item", aten.item.default: "item",  # (inference mode)
             aten.nonzero.default: "nonzero",
             aten.masked_select.default: "masked_select", aten.unique_consecutive.default: "unique",
             aten._unique2.default: "unique", aten.repeat_interleave.Tensor: "repeat_interleave"}


class RoundTrips(TorchDispatchMode):
    """Counts host round trips per op, split by whether a decoder layer of `model` was running."""

    def __init__(self, model=None):
        super().__init__()
        self.inside, self.outside = Counter(), Counter()
        self._depth = 0
        self._hooks = []
        if model is not None:
            for layer in model.model.layers:
                self._hooks.append(layer.register_forward_pre_hook(self._enter, prepend=True))
                self._hooks.append(layer.register_forward_hook(self._leave))

    def _enter(self, *_):
        self._depth += 1

    def _leave(self, *_):
        self._depth -= 1

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)

    def _count(self, what: str) -> None:
        (self.inside if self._depth else self.outside)[what] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _READBACK:
            self._count(_READBACK[func])
        elif func in (aten.lift_fresh.default, aten.lift_fresh_copy.default):
            if out.numel():  # an empty one (a new KV cache's) moves no data
                self._count("tensor from Python data")
        elif func.overloadpacket in (aten._to_copy, aten.copy_, aten.to):
            src = args[1] if func.overloadpacket is aten.copy_ else args[0]
            dst = args[0] if func.overloadpacket is aten.copy_ else out
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and \
                    src.device.type == "cuda" and dst.device.type == "cpu":
                self._count("device to host copy")
        return out

    @property
    def total_inside(self) -> int:
        return sum(self.inside.values())

    @property
    def total(self) -> int:
        return sum(self.inside.values()) + sum(self.outside.values())
