"""Streaming packed layers to the compute device, double-buffered, with no per-layer synchronize."""

from __future__ import annotations

import torch

from .store import PackedLayer, unpack


class LayerStreamer:
    """Owns the streamed layers' traffic: host buffers (pinned), `n_buffers` device buffers, a copy
    stream and two CUDA events per buffer: `copied` (compute waits on it before reading the
    buffer) and `freed` (the next copy into the buffer waits on it). While layer i computes,
    layers i+1 .. i+n-1 copy. After the last layer the first ones of the next pass are fetched,
    so they arrive while the draft grows its tree.

    On a CPU compute device there is no bus to cross: layers are read in place from host RAM.
    """

    def __init__(self, layers: list[PackedLayer], device: torch.device, n_buffers: int = 2):
        self.layers = layers
        self.device = device
        self.n_buffers = max(1, min(n_buffers, len(layers)))
        self.bytes_streamed = 0
        self.streaming = device.type == "cuda" and bool(layers)
        if self.streaming:
            size = max(layer.nbytes for layer in layers)
            self.buffers = [torch.empty(size, dtype=torch.uint8, device=device)
                            for _ in range(self.n_buffers)]
            self.copy_stream = torch.cuda.Stream(device)
            self.copied = [torch.cuda.Event() for _ in range(self.n_buffers)]
            self.freed = [torch.cuda.Event() for _ in range(self.n_buffers)]
            self.holds = [-1] * self.n_buffers  # the layer whose copy was issued into each buffer

    def _slot(self, i: int) -> int:
        return i % self.n_buffers

    def prefetch(self, i: int) -> None:
        if not self.streaming or i >= len(self.layers) or self.holds[self._slot(i)] == i:
            return
        s, host = self._slot(i), self.layers[i].buffer
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.freed[s])
            self.buffers[s][: host.numel()].copy_(host, non_blocking=True)
            self.copied[s].record(self.copy_stream)
        self.holds[s] = i
        self.bytes_streamed += host.numel()

    def acquire(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's parameters on the compute device, ready for kernels on the current stream."""
        layer = self.layers[i]
        if not self.streaming:
            return unpack(layer.entries, layer.buffer)
        self.prefetch(i)
        torch.cuda.current_stream(self.device).wait_event(self.copied[self._slot(i)])
        for j in range(i + 1, i + self.n_buffers):
            self.prefetch(j)
        return unpack(layer.entries, self.buffers[self._slot(i)])

    def release(self, i: int) -> None:
        """Compute has queued all its reads of layer i's buffer."""
        if not self.streaming:
            return
        self.freed[self._slot(i)].record(torch.cuda.current_stream(self.device))
        if i == len(self.layers) - 1:  # the next pass starts from the first streamed layers
            for j in range(self.n_buffers):
                self.prefetch(j)
