"""GGUF files (llama.cpp, Ollama) as a streamed source: each decoder layer's tensors stay in their
GGUF block format (Q4_K, Q6_K, Q8_0...), read per tensor from the file(s), cross the bus as they
are and are dequantized on the compute device per matrix (`offload.quant`). Nothing is expanded
to 16 bits in RAM but the embeddings, the final norm and the head.

The tensor names and the config come from transformers' own GGUF integration and the `gguf`
package (`transformers.modeling_gguf_pytorch_utils`: its architecture names and tensor
processors, including the Q/K row order that llama.cpp's converter gives Llama, undone here on
the packed rows; `gguf.get_tensor_name_map`). The headers are read by `read_header`.
Supported: the architectures whose decoder layers are Llama's (llama, mistral, qwen2).
"""

from __future__ import annotations

import re
from dataclasses import replace
from collections.abc import Callable
from pathlib import Path

import torch

from specexec_app.errors import UserError

from .kernels import kernel_nbytes
from .model import (Offloaded, PackedEmbedding, PackedLinear, Slot, Workspace, kernel_linear,
                    offload_model, plan_placement)
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


_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_header(path: Path) -> tuple[dict[str, object], list[tuple[str, tuple[int, ...], int, int]], int]:
    """The metadata (strings and scalars; arrays are skipped) and the tensor infos (name, ggml
    shape, type number, offset) of a GGUF file, and where its data starts. A plain sequential
    read: the `gguf` package's reader builds every field, token lists included (seconds for a
    large vocabulary on every start)."""
    import os
    import struct

    with open(path, "rb", buffering=1 << 20) as f:
        file_size = os.fstat(f.fileno()).st_size

        def take(fmt: str):
            size = struct.calcsize(fmt)
            raw = f.read(size)
            if len(raw) != size:
                raise ValueError("the header is cut short")
            return struct.unpack("<" + fmt, raw)[0]

        def ahead(n: int, what: str) -> int:
            """`n`, if the file has `n` more bytes (a damaged count must not read or loop for ever)."""
            if n > file_size - f.tell():
                raise ValueError(f"the header is damaged: {what} would run past the end of the file")
            return n

        def string() -> bytes:
            return f.read(ahead(take("Q"), "a string"))

        def text() -> str:
            try:
                return string().decode()
            except UnicodeDecodeError:
                raise ValueError("the header is damaged: a name is not UTF-8 text") from None

        def skip(kind: int) -> object:
            if kind == 8:
                return string()
            if kind == 9:
                item, count = take("I"), take("Q")
                if item == 8:
                    for _ in range(ahead(count * 8, "an array") // 8):
                        f.seek(ahead(take("Q"), "a string"), 1)
                elif item in _SCALAR:
                    f.seek(ahead(count * struct.calcsize(_SCALAR[item]), "an array"), 1)
                elif item == 9:
                    for _ in range(ahead(count * 12, "an array") // 12):
                        skip(item)
                else:
                    raise ValueError(f"the header is damaged: an array of unknown type {item}")
                return None
            if kind not in _SCALAR:
                raise ValueError(f"the header is damaged: a value of unknown type {kind}")
            return take(_SCALAR[kind])

        if f.read(4) != b"GGUF":
            raise ValueError("no GGUF magic")
        version = take("I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        # Each metadata entry takes at least 12 bytes, each tensor info at least 24.
        n_tensors, n_kv = take("Q"), take("Q")
        ahead(n_kv * 12 + n_tensors * 24, "its count of entries")
        meta = {}
        for _ in range(n_kv):
            key = text()
            value = skip(take("I"))
            if value is not None:
                meta[key] = value.decode(errors="replace") if isinstance(value, bytes) else value
        infos = []
        for _ in range(n_tensors):
            name = text()
            dims = take("I")
            if dims > 8:
                raise ValueError(f"the header is damaged: tensor {name} has {dims} dimensions")
            shape = tuple(take("Q") for _ in range(dims))
            infos.append((name, shape, take("I"), take("Q")))
        align = int(meta.get("general.alignment", 32))
        start = -(-f.tell() // align) * align
    return meta, infos, start


class GGUFModel:
    """The tensors of a GGUF model (one file, or the parts of a split one), by GGUF name: the
    file, the byte offset and size of each, and its block type. Reads only the headers."""

    def __init__(self, path: Path):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.parts = split_parts(path)
        self.tensors: dict[str, tuple[str, int, int, str, tuple[int, ...]]] = {}
        for part in self.parts:
            try:
                meta, infos, start = read_header(part)
            except (OSError, ValueError, UnicodeDecodeError, OverflowError, MemoryError) as e:
                raise UserError(f"{part} is not a readable GGUF file: {e}") from e
            if part == self.parts[0]:
                self.architecture = str(meta.get("general.architecture", "?"))
            for name, ggml_shape, kind, offset in infos:
                try:
                    qtype = GGMLQuantizationType(kind)
                except ValueError:
                    raise UserError(f"{part}: tensor {name} has the unknown GGML type {kind}") from None
                block, size = GGML_QUANT_SIZES[qtype]
                n = 1
                for d in ggml_shape[1:]:
                    n *= d
                nbytes = ggml_shape[0] // block * size * n
                shape = tuple(reversed(ggml_shape))  # ggml lists ne0 (a row's length) first
                self.tensors[name] = (str(part), start + offset, nbytes, qtype.name, shape)
            size = part.stat().st_size
            end = max((o + n for p, o, n, _, _ in self.tensors.values() if p == str(part)), default=0)
            if end > size:
                raise UserError(f"{part} is truncated: {size} of {end} bytes; download it again")

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

    def read(self, name: str, hf_name: str, dtype: torch.dtype, heads: int = 0) -> torch.Tensor:
        """Tensor `name` dequantized on the CPU to `dtype` (embeddings, norm, head; every tensor
        when the blocks are expanded at load)."""
        layer = self.layer([(name, hf_name, heads)], dtype)
        buffer = host_buffer(layer.nbytes)
        layer.read_into(buffer)
        return materialize(layer.entries[0], buffer)


def name_map(model, architecture: str, config) -> tuple[dict[str, str], dict[str, int]]:
    """HF parameter name -> GGUF tensor name, through the `gguf` package's tensor name map (built
    once: transformers' get_gguf_hf_weights_map rebuilds it for every submodule, seconds for a
    small model and minutes for 80 layers); and the heads of the Q/K matrices whose rows
    llama.cpp reordered (transformers' LlamaTensorProcessor says which architectures)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, LlamaTensorProcessor

    arch = next((k for k, v in MODEL_ARCH_NAMES.items() if v == architecture), None)
    if arch is None:
        raise UserError(f"the gguf package does not know the architecture {architecture}")
    names = get_tensor_name_map(arch, config.num_hidden_layers)
    to_gguf = {}
    for hf, _ in model.named_parameters():
        base, _, suffix = hf.rpartition(".")
        gguf_name = names.get_name(base)
        if gguf_name is not None:
            to_gguf[hf] = f"{gguf_name}.{suffix}"
    heads = {}
    if TENSOR_PROCESSORS.get(architecture) is LlamaTensorProcessor:
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
    once) or on disk (`offload="disk"`: read from the GGUF file on every pass). On a CPU the
    resident matrices whose blocks map onto torch's packed kernels compute from them
    (`offload.kernels`), the head too. `quant` None keeps the blocks; 16 expands them once, at
    load, to dense `dtype` weights (the float reference; resident, or streamed from RAM). A
    tensor the architecture needs and the files lack is a one-line error."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    if quant not in (None, 16):
        raise UserError(f"{path.name} is already quantized (GGUF); --quant {quant} does not apply "
                        "to it: leave --quant out to use its blocks as they are (or --quant 16 to "
                        "expand them at load)")
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

    if quant == 16:
        return _load_dense(gguf, model, to_gguf, heads, device, offload, gpu_memory, reserve,
                           dtype, progress, ram_free, context, tree_budget)
    disk_layers = [gguf.layer(layer_names(i), dtype) for i in range(n)]
    biggest = max(disk_layers, key=lambda d: d.nbytes)
    # Embeddings and head stay in their blocks too, resident on the device: the embedding
    # dequantizes the rows it looks up, the head goes through the workspace by blocks of rows.
    ends = [("model.embed_tokens.weight", "embed")] + ([] if tied else [("lm_head.weight", "head")])
    ends_layer = gguf.layer([(to_gguf[k], k, 0) for k, _ in ends], dtype)
    dense = sum(p.numel() for k, p in model.named_parameters()
                if not k.startswith("model.layers.") and k not in dict(ends)) * \
        torch.finfo(dtype).bits // 8
    head = ends_layer.entries[-1]
    on_cpu = device.type == "cpu" and kernel_nbytes(head) is not None  # the head in kernel form
    dense += kernel_nbytes(head) if on_cpu else 0
    try:
        placement = plan_placement(model, device, 16, offload, gpu_memory, reserve, dtype=dtype,
                                   ram_free=ram_free, context=context, tree_budget=tree_budget,
                                   packed_layout=(biggest.entries, biggest.nbytes),
                                   weights="GGUF " + "/".join(sorted({e.meta[0] for d in disk_layers
                                                                       for e in d.entries if e.meta})),
                                   fixed_bytes=ends_layer.nbytes + dense)
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
            if not name.startswith("model.layers.") and name not in dict(ends) \
                    and not (tied and name == "lm_head.weight"):
                set_module_tensor_to_device(model, name, "cpu", value=gguf.read(to_gguf[name], name, dtype))

    workspace = Workspace(device, dtype)
    ends_buffer = host_buffer(ends_layer.nbytes)
    ends_layer.read_into(ends_buffer)
    slot = Slot()
    slot.buffer = ends_buffer.to(device)
    del ends_buffer
    embed = ends_layer.entries[0]
    model.model.embed_tokens = PackedEmbedding(embed, slot)
    head = replace(head, name="lm_head.weight")
    model.lm_head = kernel_linear(head, None, slot.buffer) if on_cpu else None
    if model.lm_head is None:
        model.lm_head = PackedLinear(head, None, slot, workspace)
        workspace.reserve(min(head.numel, max(e.numel for e in biggest.entries)))
    return offload_model(model, device, placement, dtype, progress=progress, fill=fill,
                         read_packed=read_packed, disk_layer=disk_layers.__getitem__,
                         workspace=workspace)


def _load_dense(gguf: GGUFModel, model, to_gguf: dict[str, str], heads: dict[str, int],
                device: torch.device, offload: str, gpu_memory: int | None, reserve: int,
                dtype: torch.dtype, progress, ram_free: int | None, context: int,
                tree_budget: int) -> Offloaded:
    """The GGUF's blocks expanded once to dense `dtype` weights, read layer by layer as placed."""
    from accelerate.utils import set_module_tensor_to_device

    tied = getattr(model.config, "tie_word_embeddings", False)
    try:
        placement = plan_placement(model, device, 16, offload, gpu_memory, reserve, dtype=dtype,
                                   ram_free=ram_free, can_stream_from_disk=False, context=context,
                                   tree_budget=tree_budget, weights="GGUF expanded to dense")
    except MemoryError as e:
        if offload == "disk" or "cannot stream from disk" in str(e):
            raise UserError("a GGUF expanded to 16 bits (--quant 16) cannot stream from disk: "
                            "leave --quant out to stream its blocks from the file") from e
        raise UserError(str(e)) from e

    def fill(prefix: str | None) -> None:
        for name, p in model.named_parameters():
            inside = name.startswith("model.layers.")
            if (prefix is None and not inside and not (tied and name == "lm_head.weight")) or \
                    (prefix is not None and name.startswith(prefix)):
                set_module_tensor_to_device(model, name, "cpu",
                                            value=gguf.read(to_gguf[name], name, dtype,
                                                            heads.get(name, 0)))

    return offload_model(model, device, placement, dtype, progress=progress, fill=fill)
