"""Turning a Hugging Face causal LM into an offloaded target: resident and streamed layers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from specexec_app.core.lm import PREFILL_CHUNK, model_context

from .store import DiskLayer, PackedLayer, pack_layer, roundtrip, unpack
from .streamer import LayerStreamer


@dataclass(frozen=True)
class Placement:
    resident_layers: int
    streamed_layers: int
    quant: int
    layer_bytes: int        # one layer in 16-bit, as it sits on the device when resident
    packed_layer_bytes: int  # one layer as it crosses the bus
    fixed_bytes: int        # embeddings, final norm, LM head
    budget_bytes: int | None
    source: str = "ram"     # where streamed layers live between passes: "ram" or "disk"
    work_bytes: int = 0     # kept for the KV cache and a pass's activations (see `work_bytes`)
    context: int = 0        # the context and tree budget that `work_bytes` was sized for
    tree_budget: int = 0


class StreamedLayer(nn.Module):
    """Stands in for a decoder layer whose weights live in the streamer: runs the original layer
    module (weights on the meta device) with the streamed tensors, through functional_call."""

    def __init__(self, template: nn.Module, index: int, streamer: LayerStreamer):
        super().__init__()
        self.template = template
        self.index = index
        self._streamer = [streamer]  # a list, so nn.Module does not register it

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("template"), name)

    def forward(self, *args, **kwargs):
        streamer = self._streamer[0]
        params = streamer.acquire(self.index)
        try:
            return functional_call(self.template, params, args, kwargs)
        finally:
            streamer.release(self.index)


def _layers(model) -> nn.ModuleList:
    return model.model.layers


def _bytes(module: nn.Module, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in module.parameters()) * torch.finfo(dtype).bits // 8


def _packed_bytes(layer: nn.Module, quant: int, dtype: torch.dtype) -> int:
    if quant == 16:
        return _bytes(layer, dtype)
    total = 0
    for name, p in layer.named_parameters():
        if p.dim() == 2 and name.endswith("weight"):
            total += p.numel() // 2 + p.numel() // 64 * 4 if quant == 4 else p.numel() + p.shape[0] * 4
        else:
            total += p.numel() * torch.finfo(dtype).bits // 8
    return total


RAM_MARGIN = 2 * 2**30  # host RAM left to the OS and the draft


def _heads(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of a model with this config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def kv_cache_bytes(config, tokens: int, dtype: torch.dtype) -> int:
    """The keys and values of `tokens` positions in every layer of a model with this config."""
    _, kv_heads, head_dim = _heads(config)
    return config.num_hidden_layers * 2 * kv_heads * head_dim * tokens * torch.finfo(dtype).bits // 8


def work_bytes(config, tree_budget: int, context: int, dtype: torch.dtype) -> int:
    """Memory that a target pass needs beside the weights, in a `context`-token conversation with
    trees of `tree_budget` nodes: the KV cache of every layer (the tree's entries included), and
    the peak of one pass: a layer's activations over its rows (the tree's, or a chunk of a
    prompt: `PREFILL_CHUNK`), that is the MLP's three intermediates, the mask, keys and values
    expanded to every query head; and the logits of every node. For a Llama-3-70B in bf16, an
    8192-token context and 2048-node trees: 3.4 GB of KV cache, 0.5 GB of logits, 0.9 GB of
    activations. 0 when `context` is 0 (nothing to plan for)."""
    if not context:
        return 0
    size = torch.finfo(dtype).bits // 8
    heads, _, head_dim = _heads(config)
    nodes, keys = tree_budget + 1, context + tree_budget + 1
    rows = max(nodes, min(context, PREFILL_CHUNK))
    kv_cache = kv_cache_bytes(config, keys, dtype)
    layer = rows * (4 * config.hidden_size + 3 * config.intermediate_size) * size \
        + rows * keys * size + 2 * heads * head_dim * keys * size
    logits = nodes * config.vocab_size * size
    return kv_cache + layer + logits


def plan_placement(model, device: torch.device, quant: int = 16, offload: str = "auto",
                   gpu_memory: int | None = None, reserve: int = 0, n_buffers: int = 2,
                   dtype: torch.dtype | None = None, ram_free: int | None = None,
                   can_stream_from_disk: bool = True, context: int = 0,
                   tree_budget: int = 0) -> Placement:
    """How many decoder layers stay resident within `gpu_memory` (default: the device's free
    memory), after the embeddings, norm and head, the target's KV cache and pass activations
    for a `context`-token conversation and `tree_budget`-node trees (`work_bytes`), `reserve`
    bytes (the draft, its cache) and the streaming buffers; and where the streamed ones live: in
    host RAM, or (`offload="disk"`, or "auto" when they do not fit `ram_free`) on disk, read on
    every pass. On a CPU the device is the host: "auto" keeps what fits RAM and streams the rest
    from disk; the KV cache and activations are then the host's to hold."""
    dtype = dtype or model.dtype
    layers = _layers(model)
    n = len(layers)
    layer_bytes = _bytes(layers[0], dtype)
    packed = _packed_bytes(layers[0], quant, dtype)
    fixed = _bytes(model, dtype) - layer_bytes * n
    if context:
        context = min(context, model_context(model.config))
    work = work_bytes(model.config, tree_budget, context, dtype)
    if ram_free is None:
        import psutil

        ram_free = psutil.virtual_memory().available
    ram_room = ram_free - RAM_MARGIN - (work if device.type == "cpu" else 0)
    if gpu_memory is None and device.type == "cuda":
        gpu_memory = torch.cuda.mem_get_info(device)[0]
    if offload == "never":
        resident = n
    elif gpu_memory is None:  # CPU compute: the layers "resident" are those held in RAM
        if offload in ("always", "disk"):
            resident = 0
        elif fixed + n * layer_bytes <= ram_room:
            resident = n
        else:
            resident = max(0, min(n - 1, (ram_room - fixed - n_buffers * packed) // layer_bytes))
    else:
        reserve += work
        room = gpu_memory - fixed - reserve - n_buffers * packed
        if room < 0:
            need = (fixed + reserve + n_buffers * packed) / 2**30
            what = (f", the KV cache of {context} tokens and {tree_budget}-node trees "
                    "(--context, --budget)" if work else " and reserve")
            raise MemoryError(f"the GPU memory budget ({gpu_memory / 2**30:.1f} GiB) is below the "
                              f"{need:.1f} GiB that embeddings, head, buffers{what} need")
        resident = n if fixed + reserve + n * layer_bytes <= gpu_memory else min(n, room // layer_bytes)
        if offload in ("always", "disk"):
            resident = min(resident, n - 1)
    resident = max(0, min(n, int(resident)))
    streamed = n - resident
    in_ram = fixed + resident * layer_bytes if device.type == "cpu" else 0  # the host's own share
    source = "ram"
    if offload == "disk" or (offload == "auto" and streamed and
                             in_ram + streamed * packed > ram_room):
        source = "disk"
    if source == "disk" and not can_stream_from_disk:
        if offload == "disk":
            raise MemoryError(f"this checkpoint cannot stream from disk at {quant} bits: save it "
                              f"with `specexec quantize --quant {quant}` and stream that folder, "
                              "or use 16 bits from a safetensors folder")
        raise MemoryError(f"the {streamed} streamed layers need {streamed * packed / 2**30:.1f} GiB "
                          f"of RAM and {max(0, ram_room) / 2**30:.1f} GiB are free, and this "
                          "checkpoint cannot stream from disk at these bits: save it with "
                          "`specexec quantize` (or use 16 bits from a safetensors folder)")
    return Placement(resident, streamed, quant, layer_bytes, packed, fixed, gpu_memory, source,
                     work, context, tree_budget)


def offload_model(model, device: torch.device, placement: Placement,
                  dtype: torch.dtype | None = None, n_buffers: int = 2,
                  progress: Callable[[int, int], None] | None = None,
                  fill: Callable[[str | None], None] | None = None,
                  read_packed: Callable[[int, bool], PackedLayer] | None = None,
                  disk_layer: Callable[[int], DiskLayer] | None = None):
    """Rebuild `model` in place: the first `placement.resident_layers` decoder layers and
    everything outside them move to `device`; the rest are packed into host buffers and streamed.
    With quantization, resident layers get the same decoded weights, so the whole model computes
    one function. `progress(done, total)` is called per decoder layer placed.

    The model is either loaded on the CPU, or (`fill` given) on the meta device: then
    `fill(prefix)` reads the weights under `prefix` ("model.layers.3.") into CPU memory just
    before that layer is placed, and `fill(None)` everything outside the decoder layers; one
    layer at a time is held unpacked, so the model is never held twice. With `read_packed(i,
    pin)` (a pre-quantized checkpoint) layer i comes already packed: streamed as it is, or
    decoded onto the device when resident. When `placement.source` is "disk", `disk_layer(i)`
    says where streamed layer i lies on disk; it is not read now (its parameters stay on the meta
    device) but on every pass. Returns the streamer (None when nothing streams)."""
    dtype = dtype or model.dtype
    layers = _layers(model)
    first = placement.resident_layers
    if placement.source == "disk" and disk_layer is None:
        raise ValueError("streaming from disk needs disk_layer")
    packed = []
    for i in range(len(layers)):
        if i >= first and placement.source == "disk":
            packed.append(disk_layer(i))
            layers[i].to_empty(device="meta")
            if progress:
                progress(i + 1, len(layers))
            continue
        if read_packed:
            layer_packed = read_packed(i, i >= first and device.type == "cuda")
            if i >= first:
                packed.append(layer_packed)
            else:
                from accelerate.utils import set_module_tensor_to_device

                for name, t in unpack(layer_packed.entries, layer_packed.buffer).items():
                    set_module_tensor_to_device(layers[i], name, device, value=t.clone())
            if progress:
                progress(i + 1, len(layers))
            continue
        if fill:
            fill(f"model.layers.{i}.")
        if i < first:
            if placement.quant < 16:
                roundtrip(layers[i], placement.quant, dtype)
            layers[i].to(device, dtype)  # now, so that resident layers never pile up on the host
        else:
            packed.append(pack_layer(layers[i], placement.quant, dtype, pin=device.type == "cuda"))
            for module in layers[i].modules():  # free the host copy as we go
                for name, p in list(module._parameters.items()):
                    if p is not None:
                        module._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"),
                                                                requires_grad=False)
        if progress:
            progress(i + 1, len(layers))
    if fill:
        fill(None)
    streamer = LayerStreamer(packed, device, n_buffers) if packed else None
    for k, i in enumerate(range(first, len(layers))):
        layers[i] = StreamedLayer(layers[i], k, streamer)
    # Everything else (embeddings, norm, head, rotary tables) to the device.
    for name, module in model.named_modules():
        if isinstance(module, StreamedLayer):
            continue
        for pname, p in list(module._parameters.items()):
            if p is not None and p.device.type != "meta":
                module._parameters[pname] = nn.Parameter(p.data.to(device, dtype), requires_grad=False)
        for bname, b in list(module._buffers.items()):
            if b is not None and b.device.type != "meta":
                module._buffers[bname] = b.to(device)
    if getattr(model.config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model._specexec_streamer = streamer
    model._specexec_placement = placement
    return streamer


def describe(p: Placement) -> str:
    gib = 2**30
    budget = f"{p.budget_bytes / gib:.1f} GiB budget, " if p.budget_bytes else ""
    source = " from disk" if p.source == "disk" and p.streamed_layers else ""
    work = (f"; {p.work_bytes / gib:.1f} GiB kept for the KV cache of {p.context} tokens and "
            f"{p.tree_budget}-node trees" if p.work_bytes else "")
    return (f"{p.resident_layers} resident + {p.streamed_layers} streamed layers{source}, "
            f"{p.quant}-bit ({budget}{p.packed_layer_bytes / gib * 1024:.0f} MiB per streamed "
            f"layer{work})")
