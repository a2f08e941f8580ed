"""Dequantizers: one registry, by entry kind, of torch code that turns a packed weight matrix
into its floating-point values on the buffer's own device (CPU or CUDA, the same code).

Every dequantizer writes into an output tensor that the caller gives (a slice of the reused
dequant workspace, see `offload.model.Workspace`): `DEQUANTIZERS[kind](parts, entry, out)`, with
`parts` the entry's tensors viewed in the packed buffer and `out` of `entry.shape` in
`entry.dtype`. None synchronises with the host: the lookup tables (NF4, FP4, IQ4) are built once
per device by `prepare(device)` at load, the shifts are `arange` on the device, and nothing reads
a value back.

GGUF block formats (F32 .. Q8_0, the K-quants, IQ4_NL/IQ4_XS) are ports of the `gguf` package's
numpy dequantizers, op for op in float32, so that they are bit-exact against
`gguf.quants.dequantize` (tests/test_formats.py checks every type). We wrote them rather than
take diffusers' GGUF utilities (`diffusers.quantizers.gguf.utils`): those compute in the output
dtype (bf16/fp16 rounding inside the block arithmetic, not bit-exact against gguf), allocate
per-call constant tensors from Python lists on the device (a host round trip per matrix), and
would bring diffusers in as a run-time dependency for ~150 lines.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

QK_K = 256
DEQUANT_CHUNK = 1 << 22  # elements dequantized at once: bounds the float32 temporaries
SCRATCH_BYTES_PER_ELEMENT = 12  # their peak per element of a chunk (uint8 codes, float32 x2)

# bitsandbytes' tables (bitsandbytes/functional.py: get_4bit_type), stored as constants so that
# nothing is built from a Python list on the device while a pass runs.
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
FP4 = (0.0, 0.0052083333, 0.6666667, 1.0, 0.33333334, 0.5, 0.16666667, 0.25,
       -0.0, -0.0052083333, -0.6666667, -1.0, -0.33333334, -0.5, -0.16666667, -0.25)
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

_tables: dict[tuple[str, torch.device], torch.Tensor] = {}


def prepare(device: torch.device) -> None:
    """Build the lookup tables on `device` (once, at load: a blocking copy each)."""
    device = torch.device(device)
    for name, values, dtype in (("nf4", NF4, torch.float32), ("fp4", FP4, torch.float32),
                                ("iq4", IQ4_VALUES, torch.float32)):
        if (name, device) not in _tables:
            table = torch.tensor(values, dtype=dtype)
            if name == "fp4":  # bitsandbytes normalises its FP4 table by its largest value
                table = table / table.abs().max()
            if name != "iq4":  # bitsandbytes: a byte's two values, high nibble first: [256, 2]
                table = torch.stack([table.repeat_interleave(16), table.repeat(16)], dim=-1)
            _tables[name, device] = table.to(device)


def table(name: str, device: torch.device) -> torch.Tensor:
    if (name, device) not in _tables:
        prepare(device)
    return _tables[name, device]


# --- GGUF blocks: [n_blocks, type_size] uint8 -> [n_blocks, block_size] float32 ---

def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two bytes per row as float16, widened: [n, 2] uint8 -> [n, 1] float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., k] bytes -> [..., 2, k]: low nibbles, then high ones (ggml's order)."""
    return torch.stack([qs & 0x0F, qs >> 4], dim=-2)


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """[..., k] bytes -> [..., 4, k]: the 2-bit fields at shifts 0, 2, 4, 6."""
    return torch.stack([qs & 3, (qs >> 2) & 3, (qs >> 4) & 3, qs >> 6], dim=-2)


def _bits(b: torch.Tensor, n: int) -> torch.Tensor:
    """[..., 1, k] -> [..., n, k]: bit i of every value at row i (shift by arange on the device)."""
    return (b >> torch.arange(n, device=b.device, dtype=b.dtype).view(n, 1)) & 1


def q4_0(b):
    n = b.shape[0]
    d, qs = _f16(b[:, :2]), b[:, 2:]
    q = (_nibbles(qs).reshape(n, -1).to(torch.int8) - 8).float()
    return d * q


def q4_1(b):
    n = b.shape[0]
    d, m, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:]
    return d * _nibbles(qs).reshape(n, -1).float() + m


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes of a little-endian uint32 -> its 32 bits [n, 32] (uint8)."""
    word = qh.contiguous().view(torch.int32)  # [n, 1]; the sign bit is masked off below
    return _bits(word.view(-1, 1, 1), 32).reshape(qh.shape[0], 32).to(torch.uint8)


def q5_0(b):
    n = b.shape[0]
    d, qh, qs = _f16(b[:, :2]), _q5_high(b[:, 2:6]), b[:, 6:]
    q = (_nibbles(qs).reshape(n, -1) | (qh << 4)).to(torch.int8) - 16
    return d * q.float()


def q5_1(b):
    n = b.shape[0]
    d, m, qh, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), _q5_high(b[:, 4:8]), b[:, 8:]
    q = (_nibbles(qs).reshape(n, -1) | (qh << 4)).float()
    return d * q + m


def q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def q2_k(b):
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0xF).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _crumbs(qs.reshape(n, 2, 32)).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def q3_k(b):
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = _nibbles(scales[:, :8]).reshape(n, 16)
    high = _crumbs(scales[:, 8:12]).reshape(n, 16)
    sc = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * sc).reshape(n, 16, 1)
    ql = _crumbs(qs.reshape(n, 2, 32)).reshape(n, 16, 16)
    qh = _bits(hmask.reshape(n, 1, 32), 8).reshape(n, 16, 16) ^ 1  # offset 4 where the bit is 0
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes of 6-bit scales and mins per block -> ([n, 8], [n, 8]) (ggml's get_scale_min_k4)."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k4_scales(b) -> tuple[torch.Tensor, torch.Tensor]:
    """The header Q4_K and Q5_K blocks share: each of the 8 sub-blocks' scale and min
    ([n, 8, 1] each), from the super-block's fp16 d and dmin and its 6-bit scales."""
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    return (d * sc.float()).reshape(n, 8, 1), (dmin * mn.float()).reshape(n, 8, 1)


def q4_k(b):
    n = b.shape[0]
    dl, ml = _k4_scales(b)
    q = _nibbles(b[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).float()
    return (dl * q - ml).reshape(n, QK_K)


def q5_k(b):
    n = b.shape[0]
    dl, ml = _k4_scales(b)
    ql = _nibbles(b[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48].reshape(n, 1, 32), 8).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float()
    return (dl * q - ml).reshape(n, QK_K)


def q6_k(b):
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales, d = b[:, 192:208].contiguous().view(torch.int8).float(), _f16(b[:, 208:210])
    dl = (d * scales).reshape(n, 16, 1)
    low = _nibbles(ql.reshape(n, 2, 64)).reshape(n, 8, 32)
    high = _crumbs(qh.reshape(n, 2, 32)).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (dl * q).reshape(n, QK_K)


def iq4_nl(b):
    n = b.shape[0]
    d = _f16(b[:, :2])
    idx = _nibbles(b[:, 2:]).reshape(n, -1)
    return d * table("iq4", b.device)[idx.long()]


def iq4_xs(b):
    n = b.shape[0]
    d = _f16(b[:, :2])
    high = b[:, 2:4].contiguous().view(torch.int16).reshape(n, 1)
    high = ((high >> (2 * torch.arange(8, device=b.device, dtype=torch.int16))) & 3).to(torch.uint8)
    low = _nibbles(b[:, 4:8].reshape(n, 4, 1)).transpose(-1, -2).reshape(n, 8)
    sc = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * sc).reshape(n, 8, 1)
    idx = _nibbles(b[:, 8:].reshape(n, 8, 16)).reshape(n, 8, 32)
    return (dl * table("iq4", b.device)[idx.long()]).reshape(n, QK_K)


def _plain(dtype: torch.dtype) -> Callable:
    return lambda b: b.contiguous().view(dtype).float()


# GGML type name -> (values per block, bytes per block, dequantizer).
GGUF_TYPES: dict[str, tuple[int, int, Callable]] = {
    "F32": (1, 4, _plain(torch.float32)), "F16": (1, 2, _plain(torch.float16)),
    "BF16": (1, 2, _plain(torch.bfloat16)),
    "Q4_0": (32, 18, q4_0), "Q4_1": (32, 20, q4_1), "Q5_0": (32, 22, q5_0),
    "Q5_1": (32, 24, q5_1), "Q8_0": (32, 34, q8_0),
    "Q2_K": (QK_K, 84, q2_k), "Q3_K": (QK_K, 110, q3_k), "Q4_K": (QK_K, 144, q4_k),
    "Q5_K": (QK_K, 176, q5_k), "Q6_K": (QK_K, 210, q6_k),
    "IQ4_NL": (32, 18, iq4_nl), "IQ4_XS": (QK_K, 136, iq4_xs),
}


def gguf_row_bytes(qtype: str, cols: int) -> int:
    block, size, _ = GGUF_TYPES[qtype]
    return cols // block * size


def dequant_gguf(parts, entry, out: torch.Tensor) -> None:
    """GGUF blocks [rows, row bytes] -> out [rows, cols]. `entry.meta` is (type, heads): heads > 0
    undoes the Q/K row order that llama.cpp's converter gives Llama (transformers'
    LlamaTensorProcessor._reverse_permute_weights), as a view of the packed rows."""
    (data,) = parts
    qtype, heads = entry.meta
    block, size, fn = GGUF_TYPES[qtype]
    rows, cols = entry.shape if len(entry.shape) == 2 else (1, entry.shape[0])
    data = data.reshape(rows, -1)
    if heads:
        data = data.reshape(heads, rows // heads // 2, 2, -1).transpose(1, 2).reshape(rows, -1)
    out = out.view(rows, cols)
    for r0, r1 in _ranges(rows, DEQUANT_CHUNK // max(1, cols)):
        values = fn(data[r0:r1].reshape(-1, size))
        out[r0:r1].copy_(values.view(r1 - r0, cols))


# --- this project's own packed kinds, bitsandbytes, GPTQ, AWQ ---

def dequant_raw(parts, entry, out):
    out.copy_(parts[0].view(out.shape))


def dequant_int8(parts, entry, out):
    q, scale = parts  # [out, in] int8, [out, 1] float32
    torch.mul(q.to(out.dtype), scale.to(out.dtype), out=out)


def _ranges(n: int, step: int) -> list[tuple[int, int]]:
    """[begin, end) ranges of `step` items over n (the last one shorter)."""
    return [(i, min(n, i + step)) for i in range(0, n, max(1, step))]


def dequant_4bit(parts, entry, out):
    """bitsandbytes 4-bit (NF4 or FP4): packed [numel / 2] uint8, the first value of a pair in
    the high nibble; absmax per block of `blocksize` (float32; or "nested": uint8 codes into a
    256-entry table, scaled by a float32 absmax per 256 of them, plus an offset). W = code[q] *
    absmax. meta = (quant type, blocksize, nested offset or None); ours: ("nf4", 64, None)."""
    quant_type, blocksize, offset = entry.meta or ("nf4", 64, None)
    packed, absmax = parts[0].reshape(-1), parts[1].reshape(-1)
    if offset is not None:
        code, absmax2 = parts[2], parts[3]
        absmax = _nested(code.float()[absmax.int()], absmax2, 256) + offset
    absmax = absmax.float()
    pairs = table(quant_type, packed.device)  # [256, 2]: one lookup per byte
    flat = out.view(-1)
    for v0, v1 in _ranges(flat.numel(), max(1, DEQUANT_CHUNK // blocksize) * blocksize):
        values = torch.index_select(pairs, 0, packed[v0 // 2:v1 // 2].int()).view(-1, blocksize)
        values.mul_(absmax[v0 // blocksize:v1 // blocksize].view(-1, 1))
        flat[v0:v1].copy_(values.view(-1))


def _nested(values: torch.Tensor, absmax: torch.Tensor, block: int) -> torch.Tensor:
    """The 8-bit-coded absmax of a nested quant state, scaled back per block of `block`."""
    n = values.numel()
    pad = -n % block
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    return (values.view(-1, block) * absmax.float().view(-1, 1)).reshape(-1)[:n]


def _unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words holding eight 4-bit values (lowest bits first) -> their values (int32),
    expanded x8 along `dim` (0: rows, 1: columns)."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    if dim == 0:
        v = (packed.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF  # [rows, 8, cols]
        return v.reshape(-1, packed.shape[1])
    v = (packed.unsqueeze(2) >> shifts.view(1, 1, 8)) & 0xF  # [rows, cols, 8]
    return v.reshape(packed.shape[0], -1)


def dequant_gptq(parts, entry, out):
    """GPTQ 4-bit: qweight [in / 8, out] int32 (packed along the input), qzeros [groups, out / 8]
    int32, scales [groups, out] fp16, g_idx [in] int32 (the group of each input; act-order
    checkpoints permute it). W[o, i] = (q[i, o] - (z[g_idx[i], o] + zero_offset)) * s[g_idx[i], o];
    meta = (zero offset,): 1 for auto-gptq v1 checkpoints, which store zeros minus one."""
    qweight, qzeros, scales, g_idx = parts
    (offset,) = entry.meta
    z = _unpack_int4(qzeros, 1) + offset                         # [groups, out]
    cols = qweight.shape[1]
    for r0, r1 in _ranges(qweight.shape[0], DEQUANT_CHUNK // 8 // cols):
        q = _unpack_int4(qweight[r0:r1], 0)                      # [8 (r1 - r0), out]
        g = g_idx[r0 * 8:r1 * 8].long()
        out[:, r0 * 8:r1 * 8].copy_(((q - z[g]).float() * scales.float()[g]).t())


def _awq_order(v: torch.Tensor) -> torch.Tensor:
    """Undo AWQ's order within a word: nibble p holds output (0, 2, 4, 6, 1, 3, 5, 7)[p], so the
    even outputs come first, then the odd: [rows, cols] -> [rows, cols] in output order."""
    rows, cols = v.shape
    return v.view(rows, cols // 8, 2, 4).transpose(-1, -2).reshape(rows, cols)


def dequant_awq(parts, entry, out):
    """AWQ GEMM 4-bit: qweight [in, out / 8] int32 (packed along the output, in AWQ's order),
    qzeros [groups, out / 8] int32 (the same), scales [groups, out] fp16; groups of meta[0] inputs.
    W[o, i] = (q[i, o] - z[i // group, o]) * s[i // group, o]."""
    qweight, qzeros, scales = parts
    (group,) = entry.meta
    z = _awq_order(_unpack_int4(qzeros, 1))                     # [groups, out]
    cols = qweight.shape[1] * 8
    for r0, r1 in _ranges(qweight.shape[0], group * max(1, DEQUANT_CHUNK // group // cols)):
        q = _awq_order(_unpack_int4(qweight[r0:r1], 1))         # [r1 - r0, out]
        g = torch.arange(r0, r1, device=q.device) // group
        out[:, r0:r1].copy_(((q - z[g]).float() * scales.float()[g]).t())


DEQUANTIZERS: dict[str, Callable] = {
    "raw": dequant_raw, "int8": dequant_int8, "nf4": dequant_4bit, "bnb4": dequant_4bit,
    "gguf": dequant_gguf, "gptq": dequant_gptq, "awq": dequant_awq,
}


def scratch_bytes(numel: int) -> int:
    """Temporaries of one dequant (its chunks of about DEQUANT_CHUNK values: codes, float32
    values and indices), beside the workspace it writes into."""
    return 2 * min(numel, DEQUANT_CHUNK) * SCRATCH_BYTES_PER_ELEMENT
