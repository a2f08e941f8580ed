"""Loading an offloaded target shard by shard: the model is built on the meta device and each
decoder layer is read from the safetensors files, placed (moved to the device, or packed and
quantized for streaming) and freed before the next is read. Host memory holds the packed
streamed layers plus one layer in full precision, never the whole model: a 70B checkpoint
placed in 4 bits needs about 40 GB of RAM, not 140."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from specexec_app.errors import UserError

from .model import offload_model, plan_placement
from .packed import PackedReader, is_packed
from .shards import ShardReader
from .prequant import PreQuantized
from .store import DiskLayer, PackedLayer, host_buffer


def load_offloaded(folder: Path, device: torch.device, quant: int, offload: str,
                   gpu_memory: int | None, reserve: int, dtype: torch.dtype,
                   progress: Callable[[int, int], None] | None = None,
                   trust_remote_code: bool = False, ram_free: int | None = None,
                   context: int = 0, tree_budget: int = 0):
    """The target from a safetensors folder, placed within `gpu_memory` and `ram_free` (see
    `plan_placement`, with room for a `context`-token KV cache and `tree_budget`-node trees)
    layer by layer as it is read. Layers streamed from disk are read in place
    on every pass: 16-bit ones from the safetensors files, quantized ones from a folder that
    `specexec quantize` wrote. Returns the `Offloaded` model (eval mode)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    packed = PackedReader(folder) if is_packed(folder) else None
    if packed:  # quantized by `specexec quantize`: its bits and dtype hold
        if quant not in (16, packed.quant):
            raise UserError(f"{folder} is packed in {packed.quant} bits; --quant {quant} cannot "
                            "apply (leave --quant out)")
        quant, dtype = packed.quant, packed.dtype
    reader = ShardReader(folder)
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
    names = [n for n, _ in model.named_parameters()]
    prequant = None
    qc = getattr(config, "quantization_config", None)
    if qc is not None and not packed:  # saved quantized (bitsandbytes, GPTQ, AWQ): streamed as is
        prequant = PreQuantized(folder, reader, qc, dtype)
        if quant != 16:
            raise UserError(f"{folder} is already quantized ({prequant.describe}); --quant {quant} "
                            "does not apply to it: leave --quant out to stream it as it is")
        layers = model.model.layers
        linears = {k: (m.out_features, m.in_features) for k, m in layers[0].named_modules()
                   if isinstance(m, torch.nn.Linear)}
        params = [(k, tuple(p.shape)) for k, p in layers[0].named_parameters()]
        prequant_layers = [prequant.layer(f"model.layers.{i}.", params, linears)
                           for i in range(len(layers))]
        biggest = max(prequant_layers, key=lambda d: d.nbytes)
    try:
        placement = plan_placement(model, device, quant, offload, gpu_memory, reserve, dtype=dtype,
                                   ram_free=ram_free, context=context, tree_budget=tree_budget,
                                   can_stream_from_disk=bool(packed or prequant) or quant == 16,
                                   packed_layout=packed.layout() if packed else
                                   (biggest.entries, biggest.nbytes) if prequant else None,
                                   weights=prequant.describe if prequant else "")
    except MemoryError as e:
        reader.close()
        raise UserError(str(e)) from e
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

    def read_prequant(i: int, pin: bool) -> PackedLayer:
        buffer = host_buffer(prequant_layers[i].nbytes, pin)
        prequant_layers[i].read_into(buffer)
        return PackedLayer(buffer, prequant_layers[i].entries)

    def disk_layer(i: int) -> DiskLayer:
        if prequant:
            return prequant_layers[i]
        if packed:
            return packed.disk_layer(i)
        prefix = f"model.layers.{i}."
        return reader.disk_layer(prefix, [n[len(prefix):] for n in present(prefix)], dtype)

    try:
        return offload_model(model, device, placement, dtype, progress=progress, fill=fill,
                             read_packed=packed.read if packed else read_prequant if prequant else None,
                             disk_layer=disk_layer)
    finally:
        reader.close()
