"""Safetensors files read by hand: the one parser of their headers, and tensors by name read with
plain positioned reads (no memory map: mapped pages of a whole file would count against RAM)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from specexec_app.errors import UserError

from .store import _ALIGN, DiskLayer, Entry, read_fully

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """The tensors of a safetensors file ({name: {"dtype", "shape", "data_offsets"}}, metadata
    left out) and the byte where their data starts. A header that cannot be read, or that
    places data beyond the end of the file, is a one-line error naming the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        for name, t in tensors.items():
            begin, end = t["data_offsets"]
            if not (isinstance(t["dtype"], str) and isinstance(t["shape"], list)
                    and all(isinstance(d, int) and d >= 0 for d in t["shape"])
                    and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
                raise ValueError(f"tensor {name} is described wrongly")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise UserError(f"{path} is corrupt: its header cannot be read ({e}); download or "
                        "convert it again") from e
    start = 8 + n
    end = max((t["data_offsets"][1] for t in tensors.values()), default=0)
    if size < start + end:
        raise UserError(f"{path} is truncated: {size} of {start + end} bytes; download or "
                        "convert it again")
    return tensors, start


class ShardReader:
    """Tensors by name from a folder's safetensors files, each read into its own buffer."""

    def __init__(self, folder: Path):
        self.where: dict[str, tuple] = {}
        self.files = {}
        for path in sorted(folder.glob("*.safetensors")):
            header, start = read_header(path)
            self.files[path] = os.open(path, os.O_RDONLY)
            for name, t in header.items():
                begin, end = t["data_offsets"]
                self.where[name] = (path, t["dtype"], t["shape"], start + begin, end - begin)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def locate(self, name: str) -> tuple[Path, torch.dtype, tuple[int, ...], int, int]:
        """(file, dtype, shape, byte offset, bytes) of tensor `name`."""
        path, dtype, shape, offset, nbytes = self.where[name]
        if dtype not in DTYPES:
            raise UserError(f"{path}: tensor {name} has dtype {dtype}, which is not supported")
        n = 1
        for d in shape:
            n *= d
        if n * torch.tensor([], dtype=DTYPES[dtype]).element_size() != nbytes:
            raise UserError(f"{path} is corrupt: tensor {name} of shape {shape} in {dtype} does "
                            f"not take the {nbytes} bytes its header gives it")
        return path, DTYPES[dtype], tuple(shape), offset, nbytes

    def get(self, name: str) -> torch.Tensor:
        path, dtype, shape, offset, nbytes = self.locate(name)
        out = torch.empty(nbytes, dtype=torch.uint8)
        read_fully(self.files[path], path, offset, out.numpy())
        return out.view(dtype).reshape(shape)

    def disk_layer(self, prefix: str, names: list[str], dtype: torch.dtype) -> DiskLayer:
        """Where the tensors `prefix + name` lie in the files, as a layer to read on every pass
        (in the checkpoint's dtype, cast to `dtype` on the compute device)."""
        entries, segments, at = [], [], 0
        for name in names:
            path, stored, shape, offset, nbytes = self.locate(prefix + name)
            entries.append(Entry(name, shape, dtype, "raw", ((at, nbytes, stored, shape),)))
            segments.append((str(path), offset, nbytes, at))
            at += -(-nbytes // _ALIGN) * _ALIGN
        return DiskLayer(entries, at, tuple(segments))

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files = {}
