"""Streaming packed layers to the compute device, double-buffered, with no per-layer synchronize."""

from __future__ import annotations

from contextlib import contextmanager

import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from specexec_app.errors import UserError

from .store import DiskLayer, PackedLayer, disk_readers, host_buffer


class LayerStreamer:
    """Owns the streamed layers' traffic: host buffers (pinned), `n_buffers` device buffers, a copy
    stream and two CUDA events per buffer: `copied` (compute waits on it before reading the
    buffer) and `freed` (the next copy into the buffer waits on it). While layer i computes,
    layers i+1 .. i+n-1 copy. After the last layer the first ones of the next pass are fetched,
    so they arrive while the draft grows its tree.

    Layers left on disk (`DiskLayer`) are read by one reader thread, in order, each in chunks read
    by `n_readers` threads at once (default: `disk_readers`), into a ring of `n_staging` pinned
    host buffers, and copied from there on the copy stream; a staging buffer is reused once the
    copy out of it has completed (its `staged` event). Reads run ahead of compute as far as the
    device buffers allow, so the disk, the bus and the GPU work at once.

    On a CPU compute device there is no bus to cross: layers in RAM are read in place; layers on
    disk are read into the host buffers, one layer ahead of compute.

    `acquire(i)` gives the buffer that holds layer i (its bytes, still packed); the layer's
    modules read their entries from it (`offload.model.PackedLinear`).
    """

    def __init__(self, layers: list[PackedLayer | DiskLayer], device: torch.device,
                 n_buffers: int = 2, n_staging: int = 2, n_readers: int | None = None):
        self.layers = layers
        self.device = device
        self.n_buffers = max(1, min(n_buffers, len(layers)))
        self.bytes_streamed = 0
        self.wrap = True  # the last layer's release fetches the first ones (see layer_major)
        self.cuda = device.type == "cuda"
        self.on_disk = any(isinstance(layer, DiskLayer) for layer in layers)
        self.streaming = bool(layers) and (self.cuda or self.on_disk)
        if not self.streaming:
            return
        size = max(layer.nbytes for layer in layers)
        self.buffers = [torch.empty(size, dtype=torch.uint8, device=device)
                        for _ in range(self.n_buffers)]
        self.holds = [-1] * self.n_buffers  # the layer whose fetch was issued into each buffer
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.copied = [torch.cuda.Event() for _ in range(self.n_buffers)]
            self.freed = [torch.cuda.Event() for _ in range(self.n_buffers)]
        if self.on_disk:
            self.pending: list[Future | None] = [None] * self.n_buffers
            self.reader = ThreadPoolExecutor(1, thread_name_prefix="specexec-disk")
            weakref.finalize(self, self.reader.shutdown, wait=False)
            n_readers = n_readers or disk_readers(device)
            self.chunk_readers = None  # one reader: the reader thread reads each layer itself
            if n_readers > 1:
                self.chunk_readers = ThreadPoolExecutor(n_readers, thread_name_prefix="specexec-read")
                weakref.finalize(self, self.chunk_readers.shutdown, wait=False)
            if self.cuda:
                self.staging = [host_buffer(size, pin=True) for _ in range(n_staging)]
                # blocking: the reader thread sleeps in synchronize() instead of spinning a core
                self.staged = [torch.cuda.Event(blocking=True) for _ in range(n_staging)]
                self.next_staging = 0  # touched by the reader thread only

    @property
    def pinned_bytes(self) -> int:
        """Host bytes pinned for the copies: the layers in RAM, and the staging ring."""
        if not self.cuda:
            return 0
        held = sum(layer.buffer.numel() for layer in self.layers if isinstance(layer, PackedLayer))
        return held + sum(b.numel() for b in getattr(self, "staging", []))

    @property
    def device_bytes(self) -> int:
        """Device memory of the layer buffers (0 when the CPU computes from RAM)."""
        return sum(b.numel() for b in self.buffers) if self.streaming else 0

    def close(self) -> None:
        """Wait for the reads and copies in flight (the end-of-pass prefetch among them) before
        the buffers they write may be freed."""
        if not self.streaming:
            return
        for pending in getattr(self, "pending", []):
            if pending is not None:
                pending.exception()
        if self.cuda:
            self.copy_stream.synchronize()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _slot(self, i: int) -> int:
        return i % self.n_buffers

    def prefetch(self, i: int) -> None:
        if not self.streaming or i >= len(self.layers) or self.holds[self._slot(i)] == i:
            return
        s, layer = self._slot(i), self.layers[i]
        self.holds[s] = i
        self.bytes_streamed += layer.nbytes
        if self.on_disk:
            self.pending[s] = self.reader.submit(self._read, layer, s)
            return
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.freed[s])
            self.buffers[s][: layer.nbytes].copy_(layer.buffer, non_blocking=True)
            self.copied[s].record(self.copy_stream)

    def _read(self, layer: DiskLayer, s: int) -> None:
        """On the reader thread: the layer from disk into buffer `s` (through staging on CUDA).
        Buffer `s` is free on the host side: its previous layer was released before this read
        was queued (see `acquire`), and on CUDA the copy waits for `freed[s]`."""
        if not self.cuda:
            layer.read_into(self.buffers[s], self.chunk_readers)
            return
        t = self.next_staging
        self.next_staging = (t + 1) % len(self.staging)
        self.staged[t].synchronize()  # the copy out of this staging buffer has completed
        layer.read_into(self.staging[t], self.chunk_readers)
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.freed[s])
            self.buffers[s][: layer.nbytes].copy_(self.staging[t][: layer.nbytes], non_blocking=True)
            self.copied[s].record(self.copy_stream)
            self.staged[t].record(self.copy_stream)

    def acquire(self, i: int) -> torch.Tensor:
        """The buffer holding layer i on the compute device ([nbytes] uint8, laid out as its
        entries say), ready for kernels on the current stream."""
        layer = self.layers[i]
        if not self.streaming:
            return layer.buffer
        s = self._slot(i)
        self.prefetch(i)
        if self.on_disk:
            try:
                self.pending[s].result()
            except (OSError, UserError) as e:  # a missing, cut or unreadable file
                self.holds[s] = -1
                raise UserError(str(e)) from e
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.copied[s])
        for j in range(i + 1, i + self.n_buffers):
            self.prefetch(j)
        return self.buffers[s]

    def release(self, i: int) -> None:
        """Compute has queued all its reads of layer i's buffer."""
        if not self.streaming:
            return
        if self.cuda:
            self.freed[self._slot(i)].record(torch.cuda.current_stream(self.device))
        if i == len(self.layers) - 1 and self.wrap:  # the next pass starts from the first layers
            for j in range(self.n_buffers):
                self.prefetch(j)

    @contextmanager
    def layer_major(self):
        """While each layer runs more than once in a row (a long prompt's chunks, layer by layer),
        the last layer's release must not start fetching the first ones into buffers that later
        chunks still read; they are fetched when it ends."""
        self.wrap = False
        try:
            yield
        finally:
            self.wrap = True
            if self.streaming:
                for j in range(self.n_buffers):
                    self.prefetch(j)
