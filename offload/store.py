"""Weights of one decoder layer as a single contiguous host buffer, in 16, 8 or 4 bits.

Quantized weights stay packed in the buffer (what crosses the bus) and are dequantized on the
compute device: 8-bit as int8 with a float32 scale per output row, 4-bit as bitsandbytes NF4
(blocks of 64 with a float32 absmax each), so 4-bit moves about a quarter of the 16-bit bytes.
"""

from __future__ import annotations

import os
from concurrent.futures import Executor, wait
from dataclasses import dataclass, field

import torch
from torch import nn

from specexec_app.errors import UserError

NF4_BLOCK = 64
_ALIGN = 64  # bytes; keeps every view aligned for vectorized loads and DMA
READ_CHUNK = 16 << 20  # bytes per read of a layer on disk


@dataclass(frozen=True)
class Entry:
    """One tensor of the layer, as `kind` ("raw", "int8" or "nf4") parts at byte offsets."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype             # dtype of the dequantized tensor
    kind: str
    parts: tuple[tuple[int, int, torch.dtype, tuple[int, ...]], ...]  # (offset, nbytes, dtype, shape)


@dataclass
class PackedLayer:
    buffer: torch.Tensor           # [nbytes] uint8, pinned when a CUDA device will read it
    entries: list[Entry] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()


@dataclass
class DiskLayer:
    """A streamed layer left on disk: `segments` (file, file offset, bytes, buffer offset) fill a
    buffer laid out like `entries`, read again on every pass through a staging buffer."""
    entries: list[Entry]
    nbytes: int
    segments: tuple[tuple[str, int, int, int], ...]

    def read_into(self, buffer: torch.Tensor, pool: Executor | None = None) -> None:
        """Plain positioned reads (thread-safe, no memory map), in chunks of `READ_CHUNK` spread
        over `pool`'s threads when given (see `disk_readers`). They go through the page cache,
        which the kernel reclaims when RAM is short: what RAM can spare speeds the next pass up,
        and nothing is pinned to it (`benchmarks/offload_bench.py --disk` drops it to time the
        disk itself)."""
        fds = {}
        try:
            chunks = []
            for path, offset, nbytes, at in self.segments:
                if path not in fds:
                    fds[path] = os.open(path, os.O_RDONLY)
                view = buffer[at:at + nbytes].numpy()
                chunks += [(fds[path], path, offset + c, view[c:c + READ_CHUNK])
                           for c in range(0, nbytes, READ_CHUNK)]
            if pool is None or len(chunks) == 1:
                for chunk in chunks:
                    read_fully(*chunk)
            else:
                reads = [pool.submit(read_fully, *chunk) for chunk in chunks]
                wait(reads)  # every read has ended before its file closes
                for read in reads:
                    read.result()
        finally:
            for fd in fds.values():
                os.close(fd)


def disk_readers(device: torch.device) -> int:
    """Reads in flight at once for a layer on disk. While a GPU computes, 4: an NVMe drive
    reaches its speed only with several reads queued (to be measured on the GPU machine's
    drive); when the CPU computes, 1: its cores are better spent on the layers (on 2 cores,
    4 readers gained nothing on this VM's disk and slowed the pass: docs/BENCHMARKS.md)."""
    return 4 if device.type == "cuda" else 1


def read_fully(fd: int, path: str, offset: int, view) -> None:
    """Fill `view` (a writable buffer) from byte `offset` of the open file: one read returns at
    most about 2 GiB on Linux, and may return less than asked."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise UserError(f"{path} is truncated (at byte {offset + done}); "
                            "download or convert it again")
        done += got


def _parts(t: torch.Tensor, quant: int, name: str) -> tuple[str, list[torch.Tensor]]:
    is_matrix = t.dim() == 2 and name.endswith("weight")
    if quant == 8 and is_matrix:
        scale = t.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0  # [out, 1]
        q = torch.round(t.float() / scale).clamp_(-127, 127).to(torch.int8)
        return "int8", [q, scale]
    if quant == 4 and is_matrix and t.numel() % NF4_BLOCK == 0:
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(t.float().contiguous(), blocksize=NF4_BLOCK,
                                           quant_type="nf4")
        return "nf4", [packed.flatten(), state.absmax.float()]
    return "raw", [t]


def pack_layer(layer: nn.Module, quant: int = 16, dtype: torch.dtype = torch.float16,
               pin: bool = False) -> PackedLayer:
    """Pack every parameter of `layer` (cast to `dtype`, then quantized if `quant` < 16)."""
    if quant not in (16, 8, 4):
        raise ValueError(f"quant must be 16, 8 or 4, not {quant}")
    plan, offset = [], 0
    for name, p in layer.named_parameters():
        kind, parts = _parts(p.detach().to(dtype), quant, name)
        placed = []
        for part in parts:
            part = part.contiguous()
            nbytes = part.numel() * part.element_size()
            placed.append((offset, nbytes, part.dtype, tuple(part.shape), part))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        plan.append((name, tuple(p.shape), kind, placed))
    buffer = torch.empty(offset, dtype=torch.uint8, pin_memory=pin)
    entries = []
    for name, shape, kind, placed in plan:
        for off, nbytes, _, _, part in placed:
            buffer[off:off + nbytes].copy_(part.reshape(-1).view(torch.uint8))
        entries.append(Entry(name, shape, dtype, kind,
                             tuple((off, nb, dt, sh) for off, nb, dt, sh, _ in placed)))
    return PackedLayer(buffer, entries)


def _view(buffer: torch.Tensor, part) -> torch.Tensor:
    off, nbytes, dtype, shape = part
    return buffer[off:off + nbytes].view(dtype).view(shape)


def unpack(entries: list[Entry], buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """The layer's parameters from a buffer laid out like `entries` (host or device): raw tensors
    are views; quantized ones are dequantized on the buffer's device."""
    out = {}
    for e in entries:
        parts = [_view(buffer, p) for p in e.parts]
        if e.kind == "raw":  # a layer read from disk keeps the checkpoint's dtype: cast here
            out[e.name] = parts[0] if parts[0].dtype == e.dtype else parts[0].to(e.dtype)
        elif e.kind == "int8":
            q, scale = parts
            out[e.name] = (q.to(e.dtype) * scale.to(e.dtype))
        else:
            out[e.name] = dequantize_nf4(parts[0], parts[1], e.shape, e.dtype)
    return out


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape, dtype) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    state = bnbf.QuantState(absmax=absmax, shape=torch.Size(shape), blocksize=NF4_BLOCK,
                            code=bnbf.get_4bit_type("nf4", device=packed.device),
                            quant_type="nf4", dtype=dtype)
    return bnbf.dequantize_4bit(packed.view(-1, 1), state)


def roundtrip(layer: nn.Module, quant: int, dtype: torch.dtype) -> None:
    """Give `layer` the exact weights its packed form decodes to (resident layers then compute
    the same function as streamed ones)."""
    packed = pack_layer(layer, quant, dtype)
    params = unpack(packed.entries, packed.buffer)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.data = params[name].clone()
