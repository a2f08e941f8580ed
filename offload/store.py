"""Weights of one decoder layer as a single contiguous host buffer, in 16, 8 or 4 bits.

Quantized weights stay packed in the buffer (what crosses the bus) and are dequantized on the
compute device, one matrix at a time just before its matmul (`offload.model.PackedLinear`, with
the dequantizers of `offload.quant`): 8-bit as int8 with a float32 scale per output row, 4-bit as
NF4 (blocks of 64 with a float32 absmax each), so 4-bit moves about a quarter of the 16-bit bytes.
Checkpoints that come quantized (GGUF, bitsandbytes, GPTQ, AWQ) give entries of their own kinds.
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
    """One tensor of the layer, as `kind` parts at byte offsets: "raw" (the tensor itself, cast to
    `dtype` on use), "int8", "nf4" (ours), or a checkpoint's own ("gguf", "bnb4", "gptq", "awq";
    see `offload.quant.DEQUANTIZERS`), whose parameters (block type, group size...) are `meta`."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype             # dtype of the dequantized tensor
    kind: str
    parts: tuple[tuple[int, int, torch.dtype, tuple[int, ...]], ...]  # (offset, nbytes, dtype, shape)
    meta: tuple = ()

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def needs_workspace(self) -> bool:
        """Whether using it computes a new tensor (dequantized, or cast) rather than a view."""
        return self.kind != "raw" or self.parts[0][2] != self.dtype


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


def host_buffer(nbytes: int, pin: bool = False) -> torch.Tensor:
    """[nbytes] uint8 in host RAM. Pinned (for copies a CUDA device reads at full speed) by
    registering the pages of an ordinary allocation with CUDA, not through `pin_memory=True`,
    whose caching allocator rounds every buffer up to a power of two (a 1.71 GB layer took
    2 GiB): the pinned bytes are the bytes asked for."""
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if pin and nbytes:
        import weakref

        cudart = torch.cuda.cudart()
        ptr = buffer.data_ptr()
        err = cudart.cudaHostRegister(ptr, nbytes, 0)
        if int(getattr(err, "value", err)) != 0:
            raise MemoryError(f"cannot pin {nbytes / 2**30:.2f} GiB of host memory (CUDA error "
                              f"{int(getattr(err, 'value', err))})")
        # Unregistered when the returned tensor goes (its holder, a PackedLayer or the staging
        # ring, keeps it for as long as views of it are used).
        weakref.finalize(buffer, cudart.cudaHostUnregister, ptr)
    return buffer


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


def is_quantized_matrix(shape: tuple[int, ...], quant: int, name: str) -> bool:
    return quant < 16 and len(shape) == 2 and name.endswith("weight") and \
        (quant == 8 or (shape[0] * shape[1]) % NF4_BLOCK == 0)


def layout(shapes: list[tuple[str, tuple[int, ...]]], quant: int,
           dtype: torch.dtype) -> tuple[list[Entry], int]:
    """Where each parameter (name, shape) of a layer goes in its packed buffer at `quant` bits,
    and the buffer's size: what `pack_layer` will build, known before anything is read."""
    entries, offset = [], 0
    size = torch.finfo(dtype).bits // 8
    for name, shape in shapes:
        numel = 1
        for d in shape:
            numel *= d
        if is_quantized_matrix(shape, quant, name):
            if quant == 8:
                kind, parts = "int8", [(numel, torch.int8, shape), (shape[0] * 4, torch.float32, (shape[0], 1))]
            else:
                kind, parts = "nf4", [(numel // 2, torch.uint8, (numel // 2,)),
                                      (numel // NF4_BLOCK * 4, torch.float32, (numel // NF4_BLOCK,))]
        else:
            kind, parts = "raw", [(numel * size, dtype, shape)]
        placed = []
        for nbytes, dt, sh in parts:
            placed.append((offset, nbytes, dt, tuple(sh)))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        entries.append(Entry(name, tuple(shape), dtype, kind, tuple(placed),
                             ("nf4", NF4_BLOCK, None) if kind == "nf4" else ()))
    return entries, offset


def pack_layer(layer: nn.Module, quant: int = 16, dtype: torch.dtype = torch.float16,
               pin: bool = False, compute: torch.device | None = None) -> PackedLayer:
    """Pack every parameter of `layer` (cast to `dtype`, then quantized if `quant` < 16) into one
    host buffer laid out by `layout`. With `compute` (a GPU), each matrix is quantized there, one
    at a time, and only its packed parts come back: quantizing a 70B to NF4 on the CPU at every
    start took minutes."""
    if quant not in (16, 8, 4):
        raise ValueError(f"quant must be 16, 8 or 4, not {quant}")
    params = [(name, p) for name, p in layer.named_parameters()]
    entries, nbytes = layout([(n, tuple(p.shape)) for n, p in params], quant, dtype)
    buffer = host_buffer(nbytes, pin)
    for (name, p), e in zip(params, entries):
        t = p.detach()
        if e.kind != "raw" and compute is not None:
            t = t.to(compute)
        _, parts = _parts(t.to(dtype), quant, name) if e.kind != "raw" else ("raw", [t.to(dtype)])
        for (off, nb, _, _), part in zip(e.parts, parts):
            buffer[off:off + nb].copy_(part.contiguous().reshape(-1).view(torch.uint8))
    return PackedLayer(buffer, entries)


def _view(buffer: torch.Tensor, part) -> torch.Tensor:
    off, nbytes, dtype, shape = part
    return buffer[off:off + nbytes].view(dtype).view(shape)


def unpack(entries: list[Entry], buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """The layer's parameters from a buffer laid out like `entries` (host or device), each a new
    tensor (raw ones too): the whole layer dequantized at once, for a resident copy or a check;
    a pass dequantizes one matrix at a time instead (`offload.model.PackedLinear`)."""
    return {e.name: materialize(e, buffer) for e in entries}


def entry_parts(e: Entry, buffer: torch.Tensor) -> list[torch.Tensor]:
    return [_view(buffer, p) for p in e.parts]


def materialize(e: Entry, buffer: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Entry `e` of `buffer` as a tensor of `e.shape` in `e.dtype`, on the buffer's device:
    dequantized (or cast) into `out` when given, else into a new tensor."""
    from .quant import DEQUANTIZERS

    if out is None:
        out = torch.empty(e.shape, dtype=e.dtype, device=buffer.device)
    DEQUANTIZERS[e.kind](entry_parts(e, buffer), e, out)
    return out


def roundtrip(layer: nn.Module, quant: int, dtype: torch.dtype) -> None:
    """Give `layer` the exact weights its packed form decodes to (a resident reference that
    computes the same function as the packed layers)."""
    packed = pack_layer(layer, quant, dtype)
    params = unpack(packed.entries, packed.buffer)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.data = params[name]
