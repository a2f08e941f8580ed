"""Linear layers that a CPU computes straight from packed weights, with torch's packed kernels.

On a CPU a one-token step is bound by the bytes of weights it reads: float32 weights read 8x the
bytes of 4-bit blocks. torch ships kernels that multiply by packed weights without expanding them:
`_weight_int4pack_mm_for_cpu` (4-bit codes in groups of 32-256 inputs, each group with its own
scale and zero: w = (q - 8) * scale + zero) and `_weight_int8pack_mm` (int8 with a scale per
output row). Both are fast only with bf16 activations and scales (measured on 2 cores, one row of
a 1536 x 576 matrix: 0.018 ms in bf16, 0.63 ms in fp16 or float32), so `KernelLinear` rounds its
input to bf16, multiplies, and gives its output back in the model's dtype; the rest of the model
(norms, attention, the residual stream) stays in float32.

What maps onto them, exactly but for rounding the scales and zeros to bf16 (`kernel_weights`):
- GGUF Q4_0, Q4_1, Q4_K: one 4-bit term, groups of 32.
- GGUF Q5_0, Q5_1, Q5_K, Q8_0: a value is its low 4 bits plus 16 x its high bits, so two 4-bit
  terms (the high one scaled by 16, which is exact in bf16): the same bytes as the blocks, two
  kernel calls.
- Our int8 (a float32 scale per row): the int8 kernel.
- GPTQ without act-order and AWQ, groups of 32..256: one 4-bit term, zero = (8 - z) * scale.
Everything else (NF4, FP4, Q2_K/Q3_K/Q6_K with their groups of 16, IQ4) stays with the
workspace dequantizer (`offload.model.PackedLinear`).
"""

from __future__ import annotations

import torch
from torch import nn

from .quant import _awq_order, _bits, _f16, _k4_scales, _nibbles, _q5_high, _unpack_int4
from .store import Entry, entry_parts

KERNEL_DTYPE = torch.bfloat16
GROUPS = (32, 64, 128, 256)  # the group sizes `_weight_int4pack_mm_for_cpu` takes
ROW_MULTIPLE = 16            # `_convert_weight_to_int4pack_for_cpu` wants N % 16 == 0
PACK_BLOCK = 64              # ... and interleaves the rows of each block of 64


def available() -> bool:
    """Whether this torch has the packed CPU kernels."""
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_weight_int8pack_mm")


class KernelLinear(nn.Module):
    """Stands in for an nn.Linear on a CPU: y = x W^T (+ b) with W the sum of 4-bit terms
    (packed [N, K / 2] uint8, scales and zeros [K / group, N, 2] bf16, group) or int8 (q [N, K],
    scale [N] bf16). Its tensors are buffers (moved with the module, never trained)."""

    def __init__(self, out_features: int, in_features: int, int4: list[tuple] = (),
                 int8: tuple | None = None, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.groups = []
        for k, (packed, scales_zeros, group) in enumerate(int4):
            self.register_buffer(f"packed{k}", packed)
            self.register_buffer(f"scales_zeros{k}", scales_zeros)
            self.groups.append(group)
        self.int8 = int8 is not None
        if int8 is not None:
            self.register_buffer("q8", int8[0])
            self.register_buffer("scale8", int8[1])
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        a = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)
        y = torch._weight_int8pack_mm(a, self.q8, self.scale8).to(x.dtype) if self.int8 else None
        for k, group in enumerate(self.groups):  # terms summed in the model's dtype, not in bf16
            part = torch._weight_int4pack_mm_for_cpu(a, getattr(self, f"packed{k}"), group,
                                                     getattr(self, f"scales_zeros{k}"))
            y = part.to(x.dtype) if y is None else y.add_(part)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def dense_weight(self, dtype: torch.dtype = torch.float32, chunk: int = 4096) -> torch.Tensor:
        """W [out, in] in `dtype`, as the kernels see it (the terms' bf16 scales and zeros), made
        `chunk` rows at a time so that the float32 temporaries stay small."""
        out = torch.empty(self.out_features, self.in_features, dtype=dtype)
        chunk = max(PACK_BLOCK, chunk // PACK_BLOCK * PACK_BLOCK)  # whole packed blocks
        for start in range(0, self.out_features, chunk):
            end = min(start + chunk, self.out_features)
            w = torch.zeros(end - start, self.in_features)
            if self.int8:
                w += self.q8[start:end].float() * self.scale8[start:end].float()[:, None]
            for k, group in enumerate(self.groups):
                codes = unpack_int4(getattr(self, f"packed{k}")[start:end], end - start,
                                    self.in_features)
                sz = getattr(self, f"scales_zeros{k}")[:, start:end].float()  # [in / group, rows, 2]
                scale, zero = (sz[..., i].t().repeat_interleave(group, 1) for i in (0, 1))
                w += (codes.float() - 8) * scale + zero
            out[start:end] = w
        return out

    def extra_repr(self) -> str:
        kind = "int8" if self.int8 else f"{len(self.groups)} x int4 (groups of {self.groups[0]})"
        return f"{self.in_features} -> {self.out_features}, {kind}"


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The codes [n, k] (0..15, uint8) that `_convert_weight_to_int4pack_for_cpu` packed into
    `packed` [n, k / 2]: each whole block of PACK_BLOCK rows is [k, 32] bytes, row d of the
    block in the low nibbles and row 32 + d in the high ones; the rows past the last whole block
    are [k, r / 2] bytes, rows 2i and 2i + 1 in the low and high nibbles (torch 2.13's layout;
    tests/test_cpu_kernels.py checks it against the packer)."""
    full = n // PACK_BLOCK * PACK_BLOCK
    out = torch.empty(n, k, dtype=torch.uint8)
    if full:
        b = packed[:full].reshape(-1, k, 32)
        blocks = out[:full].view(-1, 2, 32, k)
        blocks[:, 0] = (b & 15).transpose(1, 2)
        blocks[:, 1] = (b >> 4).transpose(1, 2)
    if full < n:
        t = packed[full:].reshape(k, (n - full) // 2)
        out[full::2] = (t & 15).t()
        out[full + 1::2] = (t >> 4).t()
    return out


MANY_ROWS = 5  # rows from which a dense bf16 product beats the packed kernels (ManyRows)


class ManyRows(nn.Module):
    """A KernelLinear whose calls of MANY_ROWS rows or more go to a dense bf16 copy of its
    weight. torch's packed CPU kernels are matrix-vector kernels: fastest for one row, but
    their time grows with every row, while a dense bf16 product (oneDNN) is a real matrix
    kernel (measured on the development machine, 1 thread, SmolLM2's 49152 x 576 head as
    GGUF Q8_0, two 4-bit terms, against dense: 1.9 / 3.0 ms for one row, 2.9 / 3.4 ms for 4,
    4.9 / 3.6 ms for 5 (the kernels take rows 4 at a time), 22 / 6.7 ms for 32, 86 / 18 ms
    for 128). For a draft model's head, which a tree's growth runs over 32-256 rows a forward:
    it costs the dense copy's memory (2 bytes a weight) and rounds the weights to bf16 there,
    which a draft may (the target verifies every guess); a target's head or layers never take
    it (a tree pass must give the bits of one-token passes)."""

    def __init__(self, linear: KernelLinear):
        super().__init__()
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("dense", linear.dense_weight(KERNEL_DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < MANY_ROWS * self.in_features:
            return self.linear(x)
        y = torch.nn.functional.linear(x.to(KERNEL_DTYPE), self.dense).to(x.dtype)
        return y if self.linear.bias is None else y + self.linear.bias

    def extra_repr(self) -> str:
        return f"dense bf16 copy from {MANY_ROWS} rows"


# Linear modules of one parent that take the same input (a Llama layer's attention and MLP):
# on a CPU one kernel call over their rows side by side costs less than one call each.
FUSE = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse(linears: list[KernelLinear]) -> KernelLinear | None:
    """One KernelLinear whose outputs are those of `linears` side by side (the packed rows and
    their scales concatenated: the int4 packing interleaves rows within blocks of PACK_BLOCK, so
    each member's rows must fill whole blocks; tested; biases, where all have one, too: each
    output is its kernel sum plus its bias either way), or None when their forms differ."""
    first = linears[0]
    if any(m.in_features != first.in_features or m.groups != first.groups or m.int8 != first.int8
           or (m.bias is None) != (first.bias is None) or (m.groups and m.out_features % PACK_BLOCK)
           for m in linears):
        return None
    int4 = [(torch.cat([getattr(m, f"packed{k}") for m in linears]),
             torch.cat([getattr(m, f"scales_zeros{k}") for m in linears], dim=1), group)
            for k, group in enumerate(first.groups)]
    int8 = (torch.cat([m.q8 for m in linears]), torch.cat([m.scale8 for m in linears])) \
        if first.int8 else None
    bias = torch.cat([m.bias for m in linears]) if first.bias is not None else None
    return KernelLinear(sum(m.out_features for m in linears), first.in_features, int4, int8, bias)


class Shared(nn.Module):
    """A fused KernelLinear computed once for an input that its slices all receive: the first
    slice called computes it, the others take their part; the result is dropped when every
    slice has had it (a different input is simply computed again: always correct)."""

    def __init__(self, linear: KernelLinear, n_slices: int):
        super().__init__()
        self.linear, self.n_slices = linear, n_slices
        self._last: list = []  # [input, output, slices still to take it]

    def part(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        if not self._last or self._last[0] is not x:
            self._last = [x, self.linear(x), self.n_slices]
        out = self._last[1][..., start:end]
        self._last[2] -= 1
        if self._last[2] == 0:
            self._last = []
        return out


class KernelSlice(nn.Module):
    """Stands in for one of the fused Linear modules: its rows of the shared product."""

    def __init__(self, shared: Shared, start: int, end: int, owner: bool):
        super().__init__()
        self.start, self.end = start, end
        self.in_features, self.out_features = shared.linear.in_features, end - start
        if owner:  # registered once, so that its buffers are counted and moved once
            self.shared = shared
        self._refs = [shared]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._refs[0].part(x, self.start, self.end)

    def extra_repr(self) -> str:
        return f"rows {self.start}..{self.end} of a fused {self._refs[0].linear.extra_repr()}"


def fuse_siblings(layer: nn.Module) -> None:
    """Replace each group of FUSE siblings that are all KernelLinear by slices of one fused one."""
    for parent in layer.modules():
        for names in FUSE:
            members = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, KernelLinear) for m in members):
                continue
            fused = fuse(members)
            if fused is None:
                continue
            shared, at = Shared(fused, len(names)), 0
            for i, (name, m) in enumerate(zip(names, members)):
                setattr(parent, name, KernelSlice(shared, at, at + m.out_features, owner=i == 0))
                at += m.out_features


# --- packed formats as 4-bit terms: (codes 0..15, scale, zero) with w = sum (codes - 8) s + z ---

def _one(codes, s, c):
    """w = s * codes + c, codes in 0..15."""
    return [(codes, s, c + 8 * s)]


def _two(low, high, s, c):
    """w = s * (low + 16 * high) + c, low in 0..15, high in -8..7: the high term's zero is 0 and
    its scale 16 s (exact in bf16 when s is)."""
    return [(low, s, c + 8 * s), (high + 8, 16 * s, torch.zeros_like(s))]


def _gguf_terms(qtype: str, b: torch.Tensor):
    """[n, block bytes] -> terms of codes [n, values], scales and zeros [n, groups of 32]."""
    n = b.shape[0]
    if qtype == "Q4_0":
        d = _f16(b[:, :2])
        return _one(_nibbles(b[:, 2:]).reshape(n, 32), d, -8 * d)
    if qtype == "Q4_1":
        return _one(_nibbles(b[:, 4:]).reshape(n, 32), _f16(b[:, :2]), _f16(b[:, 2:4]))
    if qtype == "Q4_K":
        dl, ml = _k4_scales(b)
        codes = _nibbles(b[:, 16:].reshape(n, 4, 32)).reshape(n, 256)
        return _one(codes, dl.reshape(n, 8), -ml.reshape(n, 8))
    if qtype == "Q8_0":
        q = b[:, 2:].contiguous().view(torch.int8)
        d = _f16(b[:, :2])
        return _two(q & 15, q >> 4, d, torch.zeros_like(d))
    if qtype == "Q5_0":
        d = _f16(b[:, :2])
        return _two(_nibbles(b[:, 6:]).reshape(n, 32), _q5_high(b[:, 2:6]).to(torch.int8) - 1, d,
                    torch.zeros_like(d))
    if qtype == "Q5_1":
        low = _nibbles(b[:, 8:]).reshape(n, 32)
        return _two(low, _q5_high(b[:, 4:8]).to(torch.int8), _f16(b[:, :2]), _f16(b[:, 2:4]))
    if qtype == "Q5_K":
        dl, ml = _k4_scales(b)
        low = _nibbles(b[:, 48:].reshape(n, 4, 32)).reshape(n, 256)
        high = _bits(b[:, 16:48].reshape(n, 1, 32), 8)
        return _two(low, high.reshape(n, 256).to(torch.int8), dl.reshape(n, 8), -ml.reshape(n, 8))
    return None


GGUF_KERNEL_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q8_0")


def _gguf(e: Entry, data: torch.Tensor, rows: int, cols: int):
    from .quant import GGUF_TYPES

    qtype, heads = e.meta
    if qtype not in GGUF_KERNEL_TYPES:
        return None
    _, size, _ = GGUF_TYPES[qtype]
    data = data.reshape(rows, -1)
    if heads:  # llama.cpp's Q/K row order, undone as in `dequant_gguf`
        data = data.reshape(heads, rows // heads // 2, 2, -1).transpose(1, 2).reshape(rows, -1)
    terms = _gguf_terms(qtype, data.reshape(-1, size))
    return [(codes.reshape(rows, cols), s.reshape(rows, -1), z.reshape(rows, -1), 32)
            for codes, s, z in terms]


def _gptq(e: Entry, parts, rows: int, cols: int):
    qweight, qzeros, scales, g_idx = parts
    (offset,) = e.meta
    n_groups = scales.shape[0]
    group = cols // n_groups if n_groups else 0
    if group * n_groups != cols or not torch.equal(
            g_idx.long(), torch.arange(cols, device=g_idx.device) // max(1, group)):
        return None  # act-order: the inputs of a group are not next to each other
    codes = _unpack_int4(qweight, 0).t()                        # [out, in]
    z = (_unpack_int4(qzeros, 1) + offset).float().t()          # [out, groups]
    s = scales.float().t()
    return [(codes, s, (8 - z) * s, group)]


def _awq(e: Entry, parts, rows: int, cols: int):
    qweight, qzeros, scales = parts
    (group,) = e.meta
    codes = _awq_order(_unpack_int4(qweight, 1)).t()            # [out, in]
    z = _awq_order(_unpack_int4(qzeros, 1)).float().t()
    s = scales.float().t()
    return [(codes, s, (8 - z) * s, group)]


def kernel_weights(e: Entry, buffer: torch.Tensor) -> KernelLinear | None:
    """The packed CPU kernel form of matrix entry `e` of `buffer` (a host buffer laid out like
    it), or None when its format does not map onto the kernels."""
    if not available() or len(e.shape) != 2:
        return None
    rows, cols = e.shape
    parts = entry_parts(e, buffer)
    if e.kind == "int8":
        q, scale = parts
        return KernelLinear(rows, cols, int8=(q.contiguous().clone(),
                                              scale.reshape(-1).to(KERNEL_DTYPE)))
    terms = {"gguf": lambda: _gguf(e, parts[0], rows, cols), "gptq": lambda: _gptq(e, parts, rows, cols),
             "awq": lambda: _awq(e, parts, rows, cols)}.get(e.kind, lambda: None)()
    if not terms or rows % ROW_MULTIPLE or any(g not in GROUPS or cols % g for *_, g in terms):
        return None
    int4 = []
    for codes, s, z, group in terms:
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        scales_zeros = torch.stack([s.t(), z.t()], dim=-1).to(KERNEL_DTYPE).contiguous()
        int4.append((packed, scales_zeros, group))
    return KernelLinear(rows, cols, int4=int4)


def kernel_nbytes(e: Entry) -> int | None:
    """The bytes of `kernel_weights(e)` without building it (None when it would not map; an
    act-order GPTQ matrix is counted as mapped: it is never larger than its checkpoint form)."""
    if not available() or len(e.shape) != 2:
        return None
    rows, cols = e.shape
    if e.kind == "int8":
        return rows * cols + rows * 2
    if e.kind == "gguf" and e.meta[0] in GGUF_KERNEL_TYPES:
        terms, group = (1 if e.meta[0].startswith("Q4") else 2), 32
    elif e.kind in ("gptq", "awq"):
        terms, group = 1, cols // max(1, e.parts[2][3][0])  # scales: [groups, out]
    else:
        return None
    if rows % ROW_MULTIPLE or group not in GROUPS or cols % group:
        return None
    return terms * (rows * cols // 2 + cols // group * rows * 2 * 2)
