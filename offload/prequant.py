"""Hugging Face checkpoints saved quantized: bitsandbytes 4-bit (NF4/FP4, with or without nested
absmax), GPTQ 4-bit (groups, act-order g_idx, symmetric or not) and AWQ 4-bit (GEMM layout).
Their packed tensors are streamed as they are (the bytes in the files are the bytes that cross
the bus) and dequantized on the device by `offload.quant`; no bitsandbytes, optimum, auto-gptq or
autoawq at run time. Anything else is a one-line error naming it and what is supported.
"""

from __future__ import annotations

import json

import torch

from specexec_app.errors import UserError

from .quant import FP4, NF4
from .shards import ShardReader
from .store import _ALIGN, DiskLayer, Entry

SUPPORTED = ("bitsandbytes 4-bit (nf4, fp4)", "gptq 4-bit", "awq 4-bit (gemm)")


def _get(qc, key, default=None):
    return qc.get(key, default) if isinstance(qc, dict) else getattr(qc, key, default)


class PreQuantized:
    """Where the packed tensors of each quantized Linear lie in a checkpoint's safetensors files,
    by the checkpoint's `quantization_config`."""

    def __init__(self, folder, reader: ShardReader, qc, dtype: torch.dtype):
        self.folder, self.reader, self.dtype = folder, reader, dtype
        self.method = str(_get(qc, "quant_method", "?")).lower()
        bits = _get(qc, "bits", 4)
        if self.method == "bitsandbytes":
            if not _get(qc, "load_in_4bit", False) and not _get(qc, "_load_in_4bit", False):
                raise UserError(f"{folder} is a bitsandbytes 8-bit checkpoint, which is not "
                                f"supported (supported: {', '.join(SUPPORTED)}); use the 16-bit "
                                "checkpoint with --quant 8")
            self.describe = f"bnb {_get(qc, 'bnb_4bit_quant_type', 'nf4')}"
        elif self.method in ("gptq", "awq"):
            if bits != 4:
                raise UserError(f"{folder} is a {bits}-bit {self.method.upper()} checkpoint, which "
                                f"is not supported (supported: {', '.join(SUPPORTED)})")
            self.group = _get(qc, "group_size", 128)
            if self.method == "awq":
                version = str(_get(qc, "version", "gemm")).lower()
                if version != "gemm":
                    raise UserError(f"{folder} is an AWQ checkpoint in the {version} layout, which "
                                    f"is not supported (supported: {', '.join(SUPPORTED)})")
            # auto-gptq v1 checkpoints store each zero minus one; "gptq_v2" stores it as it is
            fmt = str(_get(qc, "checkpoint_format", "gptq")).lower()
            self.zero_offset = 0 if fmt == "gptq_v2" or self.method == "awq" else 1
            self.describe = f"{self.method.upper()} 4-bit"
        else:
            raise UserError(f"{folder} is quantized with {self.method}, which is not supported "
                            f"(supported: {', '.join(SUPPORTED)})")

    def has(self, prefix: str) -> bool:
        """Whether the Linear at `prefix` ("model.layers.0.self_attn.q_proj") is quantized here."""
        key = f"{prefix}.qweight" if self.method in ("gptq", "awq") else f"{prefix}.weight.absmax"
        return key in self.reader

    def _need(self, name: str) -> None:
        if name not in self.reader:
            raise UserError(f"{self.folder} lacks the tensor {name} that a {self.describe} "
                            "checkpoint of this architecture holds")

    def parts(self, prefix: str, shape: tuple[int, int]) -> tuple[str, list[str], tuple]:
        """(kind, tensor names in order, meta) of the quantized Linear at `prefix` of `shape`."""
        if self.method == "bitsandbytes":
            w = f"{prefix}.weight"
            state_name = next((k for k in (f"{w}.quant_state.bitsandbytes__nf4",
                                           f"{w}.quant_state.bitsandbytes__fp4") if k in self.reader), None)
            if state_name is None:
                raise UserError(f"{self.folder} lacks the quant state of {w}")
            state = json.loads(bytes(self.reader.get(state_name).numpy()).decode())
            quant_type, blocksize = state["quant_type"], int(state["blocksize"])
            if quant_type not in ("nf4", "fp4") or tuple(state["shape"]) != tuple(shape):
                raise UserError(f"{self.folder}: {w} is {quant_type} of shape {state['shape']}; "
                                f"supported: {', '.join(SUPPORTED)} of the model's shapes")
            quant_map = self.reader.get(f"{w}.quant_map").float()
            table = torch.tensor(NF4 if quant_type == "nf4" else FP4)
            if quant_type == "fp4":
                table = table / table.abs().max()
            if not torch.allclose(quant_map, table, atol=1e-6, rtol=0):
                raise UserError(f"{self.folder}: {w} has a {quant_type} code table of its own, "
                                "which is not supported")
            names = [w, f"{w}.absmax"]
            nested = "nested_offset" in state
            if nested:
                names += [f"{w}.nested_quant_map", f"{w}.nested_absmax"]
                if int(state.get("nested_blocksize", 256)) != 256:
                    raise UserError(f"{self.folder}: {w} nests its absmax in blocks of "
                                    f"{state['nested_blocksize']}, which is not supported (256)")
            for name in names:
                self._need(name)
            return "bnb4", names, (quant_type, blocksize, float(state["nested_offset"]) if nested else None)
        names = [f"{prefix}.qweight", f"{prefix}.qzeros", f"{prefix}.scales"]
        if self.method == "gptq":
            names.append(f"{prefix}.g_idx")
        for name in names:
            self._need(name)
        return self.method, names, (self.zero_offset,) if self.method == "gptq" else (self.group,)

    def layer(self, prefix: str, params: list[tuple[str, tuple[int, ...]]],
              linears: dict[str, tuple[int, int]]) -> DiskLayer:
        """The layer at `prefix` ("model.layers.3.") as a buffer of entries: its quantized Linear
        modules (name -> [out, in]) packed as the files hold them, its other parameters raw."""
        entries, segments, at = [], [], 0

        def place(name: str) -> tuple:
            nonlocal at
            path, stored, shape, offset, nbytes = self.reader.locate(name)
            segments.append((str(path), offset, nbytes, at))
            part = (at, nbytes, stored, shape)
            at += -(-nbytes // _ALIGN) * _ALIGN
            return part

        for name, shape in params:
            module = name.rpartition(".")[0]
            if name.endswith(".weight") and module in linears and self.has(prefix + module):
                kind, names, meta = self.parts(prefix + module, linears[module])
                if kind == "gptq":
                    meta = (self.zero_offset,)
                entries.append(Entry(name, shape, self.dtype, kind, tuple(place(n) for n in names), meta))
                continue
            if prefix + name not in self.reader:
                raise UserError(f"{self.folder} lacks the weight {prefix + name}; is it a "
                                "checkpoint of this architecture?")
            entries.append(Entry(name, shape, self.dtype, "raw", (place(prefix + name),)))
        return DiskLayer(entries, at, tuple(segments))
