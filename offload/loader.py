"""Loading an offloaded target shard by shard: the model is built on the meta device and each
decoder layer is read from the safetensors files, placed (moved to the device, or packed and
quantized for streaming) and freed before the next is read. Host memory holds the packed
streamed layers plus one layer in full precision, never the whole model: a 70B checkpoint
placed in 4 bits needs about 40 GB of RAM, not 140."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from specexec_app.errors import UserError

from .model import offload_model, plan_placement
from .packed import PackedReader, is_packed
from .store import _ALIGN, DiskLayer, Entry, read_fully


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class ShardReader:
    """Tensors by name from a folder's safetensors files, each read with plain reads into its
    own buffer (no memory map: mapped pages of the whole file would count against RAM)."""

    def __init__(self, folder: Path):
        import struct

        self.where: dict[str, tuple] = {}
        self.files = {}
        for path in sorted(folder.glob("*.safetensors")):
            f = open(path, "rb", buffering=0)  # noqa: SIM115 - kept open while loading
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            self.files[path] = f
            for name, t in header.items():
                if name != "__metadata__":
                    self.where[name] = (path, t["dtype"], t["shape"], 8 + n + t["data_offsets"][0],
                                        t["data_offsets"][1] - t["data_offsets"][0])

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def locate(self, name: str) -> tuple[Path, torch.dtype, tuple[int, ...], int, int]:
        """(file, dtype, shape, byte offset, bytes) of tensor `name`."""
        path, dtype, shape, offset, nbytes = self.where[name]
        if dtype not in _DTYPES:
            raise UserError(f"{path}: tensor {name} has dtype {dtype}, which is not supported")
        return path, _DTYPES[dtype], tuple(shape), offset, nbytes

    def get(self, name: str) -> torch.Tensor:
        path, dtype, shape, offset, nbytes = self.locate(name)
        out = torch.empty(nbytes, dtype=torch.uint8)
        read_fully(self.files[path].fileno(), path, offset, out.numpy())
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
        for f in self.files.values():
            f.close()


def load_offloaded(folder: Path, device: torch.device, quant: int, offload: str,
                   gpu_memory: int | None, reserve: int, dtype: torch.dtype,
                   progress: Callable[[int, int], None] | None = None,
                   trust_remote_code: bool = False, ram_free: int | None = None,
                   context: int = 0, tree_budget: int = 0):
    """The target from a safetensors folder, placed within `gpu_memory` and `ram_free` (see
    `plan_placement`, with room for a `context`-token KV cache and `tree_budget`-node trees)
    layer by layer as it is read. Layers streamed from disk are read in place
    on every pass: 16-bit ones from the safetensors files, quantized ones from a folder that
    `specexec quantize` wrote. Returns the model (eval mode)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    packed = PackedReader(folder) if is_packed(folder) else None
    if packed:  # quantized by `specexec quantize`: its bits and dtype hold
        if quant not in (16, packed.quant):
            raise UserError(f"{folder} is packed in {packed.quant} bits; --quant {quant} cannot "
                            "apply (leave --quant out)")
        quant, dtype = packed.quant, packed.dtype
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True,
                                            trust_remote_code=trust_remote_code)
        with init_empty_weights():  # parameters on the meta device; buffers (rotary tables) real
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa",
                                                     trust_remote_code=trust_remote_code)
        if (folder / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - a broken or unknown config
        raise UserError(f"cannot load model {folder}: {str(e).strip().splitlines()[0][:300]}") from e
    model.eval()
    try:
        placement = plan_placement(model, device, quant, offload, gpu_memory, reserve, dtype=dtype,
                                   ram_free=ram_free, context=context, tree_budget=tree_budget,
                                   can_stream_from_disk=bool(packed) or quant == 16)
    except MemoryError as e:
        raise UserError(str(e)) from e
    reader = ShardReader(folder)
    names = [n for n, _ in model.named_parameters()]
    head = model.get_output_embeddings()
    tied_head = {n for n, p in model.named_parameters() if head is not None and p is head.weight
                 and getattr(config, "tie_word_embeddings", False)}  # tied to the embedding later

    def present(prefix: str | None) -> list[str]:
        """The parameters under `prefix` (None: those outside the decoder layers) that the files
        hold; one missing is an error, except a tied head (tied to the embedding later)."""
        wanted = [n for n in names if n.startswith(prefix)] if prefix else \
                 [n for n in names if not n.startswith("model.layers.")]
        for name in wanted:
            if name not in reader and name not in tied_head:
                raise UserError(f"{folder} lacks the weight {name}; is it a checkpoint of "
                                f"this architecture ({config.model_type})?")
        return [n for n in wanted if n in reader]

    def fill(prefix: str | None) -> None:
        for name in present(prefix):
            set_module_tensor_to_device(model, name, "cpu", value=reader.get(name), dtype=dtype)

    def disk_layer(i: int) -> DiskLayer:
        if packed:
            return packed.disk_layer(i)
        prefix = f"model.layers.{i}."
        return reader.disk_layer(prefix, [n[len(prefix):] for n in present(prefix)], dtype)

    try:
        offload_model(model, device, placement, dtype, progress=progress, fill=fill,
                      read_packed=packed.read if packed else None, disk_layer=disk_layer)
    finally:
        reader.close()
    return model
