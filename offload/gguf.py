"""GGUF files (llama.cpp, Ollama) as a streamed source: each decoder layer's tensors stay in their
GGUF block format (Q4_K, Q6_K, Q8_0...), read per tensor from the file(s), cross the bus as they
are and are dequantized on the compute device per matrix (`offload.quant`). Nothing is expanded
to 16 bits in RAM but the embeddings, the final norm and the head.

The tensor names and the config come from transformers' own GGUF integration
(`transformers.modeling_gguf_pytorch_utils`: its name map and its tensor processors, including
the Q/K row order that llama.cpp's converter gives Llama, undone here on the packed rows).
Supported: the architectures whose decoder layers are Llama's (llama, mistral, qwen2).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from specexec_app.errors import UserError

from .model import Offloaded, offload_model, plan_placement
from .quant import GGUF_TYPES
from .store import _ALIGN, DiskLayer, Entry, PackedLayer, host_buffer, materialize

SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
ARCHITECTURES = ("llama", "mistral", "qwen2")
_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def split_parts(path: Path) -> list[Path]:
    """The files of a GGUF model: `path` alone, or every part of a split one
    (`NAME-00001-of-0000N.gguf`, from any of its parts); a missing part is a one-line error."""
    m = SPLIT.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    parts = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    for part in parts:
        if not part.is_file():
            raise UserError(f"{part} is missing: {path.name} is one of {count} parts of a split "
                            "GGUF model, and every part must be in the same folder")
    return parts


def is_gguf(path: Path) -> bool:
    """Whether a file is GGUF by its magic bytes (an Ollama blob has no .gguf suffix)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


class GGUFModel:
    """The tensors of a GGUF model (one file, or the parts of a split one), by GGUF name: the
    file, the byte offset and size of each, and its block type. Reads only the headers (the
    `gguf` package's reader maps the files; no tensor data is touched here)."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        self.parts = split_parts(path)
        self.tensors: dict[str, tuple[str, int, int, str, tuple[int, ...]]] = {}
        for part in self.parts:
            try:
                reader = GGUFReader(part)
            except Exception as e:  # noqa: BLE001 - a truncated or foreign file
                raise UserError(f"{part} is not a readable GGUF file ({str(e).splitlines()[0][:200]})") from e
            if part == self.parts[0]:
                field = reader.fields.get("general.architecture")
                self.architecture = bytes(field.parts[field.data[0]]).decode() if field else "?"
            for t in reader.tensors:
                qtype = t.tensor_type.name
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml lists ne0 first
                self.tensors[t.name] = (str(part), int(t.data_offset), int(t.n_bytes), qtype, shape)
            size = part.stat().st_size
            end = max((o + n for p, o, n, _, _ in self.tensors.values() if p == str(part)), default=0)
            if end > size:
                raise UserError(f"{part} is truncated: {size} of {end} bytes; download it again")
            del reader

    @property
    def nbytes(self) -> int:
        return sum(n for _, _, n, _, _ in self.tensors.values())

    def entry(self, name: str, hf_name: str, dtype: torch.dtype, at: int, heads: int = 0) -> Entry:
        """Tensor `name` as an entry at byte `at` of a layer buffer: raw when it is a float
        tensor to use as it is, else its blocks ("gguf", meta (type, heads))."""
        _, _, nbytes, qtype, shape = self.tensors[name]
        if qtype not in GGUF_TYPES:
            raise UserError(f"{self.parts[0]}: tensor {name} is {qtype}, which is not supported "
                            f"(supported: {', '.join(GGUF_TYPES)})")
        if qtype in _TORCH and not heads:
            return Entry(hf_name, shape, dtype, "raw", ((at, nbytes, _TORCH[qtype], shape),))
        block = GGUF_TYPES[qtype][0]
        if shape[-1] % block:
            raise UserError(f"{self.parts[0]}: tensor {name} has rows of {shape[-1]} values, not "
                            f"a multiple of {qtype}'s blocks of {block}")
        return Entry(hf_name, shape, dtype, "gguf", ((at, nbytes, torch.uint8, (nbytes,)),),
                     (qtype, heads))

    def layer(self, names: list[tuple[str, str, int]], dtype: torch.dtype) -> DiskLayer:
        """(GGUF name, HF name, heads) of a layer's tensors as one buffer laid out per tensor,
        with where each lies in the files."""
        entries, segments, at = [], [], 0
        for name, hf_name, heads in names:
            path, offset, nbytes, _, _ = self.tensors[name]
            entries.append(self.entry(name, hf_name, dtype, at, heads))
            segments.append((path, offset, nbytes, at))
            at += -(-nbytes // _ALIGN) * _ALIGN
        return DiskLayer(entries, at, tuple(segments))

    def read(self, name: str, hf_name: str, dtype: torch.dtype) -> torch.Tensor:
        """Tensor `name` dequantized on the CPU to `dtype` (embeddings, norm, head)."""
        layer = self.layer([(name, hf_name, 0)], dtype)
        buffer = host_buffer(layer.nbytes)
        layer.read_into(buffer)
        return materialize(layer.entries[0], buffer)


def name_map(model, architecture: str, config) -> tuple[dict[str, str], dict[str, int]]:
    """HF parameter name -> GGUF tensor name, through transformers' GGUF tables; and the heads
    of the Q/K matrices whose rows llama.cpp reordered (Llama's converter permutes them)."""
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, LlamaTensorProcessor,
                                                          TensorProcessor,
                                                          get_gguf_hf_weights_map)

    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    to_hf = get_gguf_hf_weights_map(model, processor)
    to_gguf = {hf: g for g, hf in to_hf.items()}
    heads = {}
    if isinstance(processor, LlamaTensorProcessor):
        for hf in to_gguf:
            if hf.endswith("self_attn.q_proj.weight"):
                heads[hf] = config.num_attention_heads
            elif hf.endswith("self_attn.k_proj.weight"):
                heads[hf] = config.num_key_value_heads
    return to_gguf, heads


def load_gguf(path: Path, config_dir: Path, device: torch.device, quant: int, offload: str,
              gpu_memory: int | None, reserve: int, dtype: torch.dtype,
              progress: Callable[[int, int], None] | None = None, ram_free: int | None = None,
              context: int = 0, tree_budget: int = 0) -> Offloaded:
    """The target from a GGUF file (or the first part of a split one, or an Ollama blob), with
    the config that `config_dir` holds (converted once from the file's metadata). Its decoder
    layers stay in their blocks: resident ones on the device, streamed ones in host RAM (read
    once) or on disk (`offload="disk"`: read from the GGUF file on every pass). A tensor the
    architecture needs and the files lack is a one-line error."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    if quant != 16:
        raise UserError(f"{path.name} is already quantized (GGUF); --quant {quant} does not apply "
                        "to it: leave --quant out to stream its blocks as they are")
    gguf = GGUFModel(path)
    config = AutoConfig.from_pretrained(config_dir, local_files_only=True)
    if gguf.architecture not in ARCHITECTURES and config.model_type not in ARCHITECTURES:
        raise UserError(f"{path.name} is a GGUF model of architecture {gguf.architecture}, which "
                        f"is not supported (supported: {', '.join(ARCHITECTURES)})")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    to_gguf, heads = name_map(model, gguf.architecture, config)
    tied = getattr(config, "tie_word_embeddings", False)
    names = [n for n, _ in model.named_parameters()]
    for name in names:  # every tensor the architecture needs, before anything is read
        if tied and name == "lm_head.weight":
            continue
        if to_gguf.get(name) not in gguf.tensors:
            raise UserError(f"{gguf.parts[0]} lacks the tensor {to_gguf.get(name, '?')} ({name}) "
                            f"that a {config.model_type} model of {config.num_hidden_layers} "
                            "layers needs; is the file complete?")
    n = config.num_hidden_layers

    def layer_names(i: int) -> list[tuple[str, str, int]]:
        prefix = f"model.layers.{i}."
        return [(to_gguf[k], k[len(prefix):], heads.get(k, 0)) for k in names if k.startswith(prefix)]

    disk_layers = [gguf.layer(layer_names(i), dtype) for i in range(n)]
    biggest = max(disk_layers, key=lambda d: d.nbytes)
    try:
        placement = plan_placement(model, device, 16, offload, gpu_memory, reserve, dtype=dtype,
                                   ram_free=ram_free, context=context, tree_budget=tree_budget,
                                   packed_layout=(biggest.entries, biggest.nbytes),
                                   weights="GGUF " + "/".join(sorted({e.meta[0] for d in disk_layers
                                                                       for e in d.entries if e.meta})))
    except MemoryError as e:
        raise UserError(str(e)) from e

    def read_packed(i: int, pin: bool) -> PackedLayer:
        buffer = host_buffer(disk_layers[i].nbytes, pin)
        disk_layers[i].read_into(buffer)
        return PackedLayer(buffer, disk_layers[i].entries)

    def fill(prefix: str | None) -> None:
        if prefix is not None:
            return
        for name in names:
            if not name.startswith("model.layers.") and not (tied and name == "lm_head.weight"):
                set_module_tensor_to_device(model, name, "cpu", value=gguf.read(to_gguf[name], name, dtype))

    return offload_model(model, device, placement, dtype, progress=progress, fill=fill,
                         read_packed=read_packed, disk_layer=disk_layers.__getitem__)
