"""Turning a Hugging Face causal LM into an offloaded target: resident and streamed layers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from specexec_app.core.lm import PREFILL_CHUNK, model_context

from .quant import prepare, scratch_bytes
from .store import DiskLayer, Entry, PackedLayer, _view, layout, materialize, pack_layer
from .streamer import LayerStreamer


@dataclass(frozen=True)
class Placement:
    resident_layers: int
    streamed_layers: int
    quant: int
    layer_bytes: int        # one layer dense in the compute dtype
    packed_layer_bytes: int  # one layer as it crosses the bus
    fixed_bytes: int        # embeddings, final norm, LM head
    budget_bytes: int | None
    source: str = "ram"     # where streamed layers live between passes: "ram" or "disk"
    work_bytes: int = 0     # kept for the KV cache, a pass's activations (`work_bytes`) and
                            # the dequant workspace (`dequant_bytes`)
    context: int = 0        # the context and tree budget that `work_bytes` was sized for
    tree_budget: int = 0
    resident_layer_bytes: int = 0  # one resident layer: packed when quantized, else layer_bytes
    weights: str = ""       # the checkpoint's own format when it comes packed ("GGUF Q4_K/Q6_K")
    n_buffers: int = 2      # device buffers of streamed layers

    @property
    def device_bytes(self) -> int:
        """All the plan gives the compute device: embeddings, norm and head, resident layers,
        the streaming buffers, and `work_bytes` (KV cache, a pass's activations, logits, the
        dequant workspace)."""
        buffers = self.n_buffers * self.packed_layer_bytes if self.streamed_layers else 0
        return self.fixed_bytes + self.resident_layers * self.resident_layer_bytes + buffers \
            + self.work_bytes


class Workspace:
    """The one buffer that packed matrices are dequantized into, just before their matmul, reused
    by every matrix of every layer (kernels on one stream run in order, so a matrix is consumed
    before the next is written); sized once, for the largest matrix, and counted in the plan."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype, self.numel = device, dtype, 0
        self.buffer: torch.Tensor | None = None

    def reserve(self, numel: int) -> None:
        self.numel = max(self.numel, numel)

    def allocate(self) -> None:
        if self.numel:
            self.buffer = torch.empty(self.numel, dtype=self.dtype, device=self.device)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.finfo(self.dtype).bits // 8

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        return self.buffer[:n].view(shape)


class Slot:
    """Where a layer's packed bytes are now: its own device buffer when resident, the streamer's
    buffer for the layer while it computes when streamed."""
    buffer: torch.Tensor | None = None


class PackedLinear(nn.Module):
    """Stands in for an nn.Linear whose weight stays packed (quantized, or in the checkpoint's
    dtype): dequantizes it into the shared `Workspace` ([out, in]) just before F.linear, or uses
    it in place when it is already in the compute dtype."""

    def __init__(self, weight: Entry, bias: Entry | None, slot: Slot, workspace: Workspace):
        super().__init__()
        self.entry, self.bias_entry = weight, bias
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self._refs = [slot, workspace]  # a list, so nn.Module does not register them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slot, workspace = self._refs
        e = self.entry
        b = None if self.bias_entry is None else _loose(self.bias_entry, slot.buffer)
        if not e.needs_workspace():
            return F.linear(x, _view(slot.buffer, e.parts[0]), b)
        if e.numel <= workspace.numel:
            return F.linear(x, materialize(e, slot.buffer, workspace.take(e.shape)), b)
        # Larger than the workspace (a GGUF head: vocabulary x hidden): by blocks of rows.
        rows = workspace.numel // e.shape[1]
        out = x.new_empty(*x.shape[:-1], e.shape[0])
        for r0 in range(0, e.shape[0], rows):
            part = row_slice(e, r0, min(e.shape[0], r0 + rows))
            w = materialize(part, slot.buffer, workspace.take(part.shape))
            out[..., r0:r0 + part.shape[0]] = F.linear(x, w, None if b is None else b[r0:r0 + part.shape[0]])
        return out

    def extra_repr(self) -> str:
        return f"{self.entry.kind} {self.entry.meta} {tuple(self.entry.shape)}"


def row_slice(e: Entry, r0: int, r1: int) -> Entry:
    """Rows r0..r1 of a matrix whose rows are stored one after the other (raw, GGUF blocks)."""
    if e.kind not in ("raw", "gguf") or (e.meta and e.meta[1]):
        raise ValueError(f"rows of a {e.kind} entry cannot be taken apart")
    off, nbytes, dtype, shape = e.parts[0]
    row = nbytes // e.shape[0]
    part_shape = (r1 - r0, *shape[1:]) if e.kind == "raw" else ((r1 - r0) * row,)
    return replace(e, shape=(r1 - r0, e.shape[1]),
                   parts=((off + r0 * row, (r1 - r0) * row, dtype, part_shape),))


class PackedEmbedding(nn.Module):
    """Stands in for an nn.Embedding whose table stays packed (GGUF blocks, one row after the
    other): dequantizes only the rows of the ids looked up ([..., hidden])."""

    def __init__(self, entry: Entry, slot: Slot):
        super().__init__()
        self.entry, self.num_embeddings, self.embedding_dim = entry, *entry.shape
        self._refs = [slot]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        (slot,) = self._refs
        e = self.entry
        off, nbytes, stored, _ = e.parts[0]
        if e.kind == "raw":
            table = slot.buffer[off:off + nbytes].view(stored).view(e.shape)
            return table.index_select(0, ids.reshape(-1)).to(e.dtype).view(*ids.shape, e.shape[1])
        table = slot.buffer[off:off + nbytes].view(e.shape[0], -1)
        rows = table.index_select(0, ids.reshape(-1))
        n = rows.shape[0]
        picked = replace(e, shape=(n, e.shape[1]), parts=((0, rows.numel(), torch.uint8, (rows.numel(),)),))
        return materialize(picked, rows.reshape(-1)).view(*ids.shape, e.shape[1])


def _loose(e: Entry, buffer: torch.Tensor) -> torch.Tensor:
    """A small tensor of the layer (a norm's weight, a bias): a view, cast if need be."""
    if e.kind == "raw":
        t = _view(buffer, e.parts[0])
        return t if t.dtype == e.dtype else t.to(e.dtype)
    return materialize(e, buffer)


def _install(layer: nn.Module, entries: list[Entry], slot: Slot, workspace: Workspace,
             packed_only: bool = False, kernels: bool = False) -> list[Entry]:
    """Replace `layer`'s nn.Linear modules by PackedLinear reading `entries` from `slot` (with
    `packed_only`, only those whose weight is not raw in the compute dtype), or, with `kernels`
    (a layer resident in a CPU's RAM), by a KernelLinear where the weight's format maps onto
    torch's packed CPU kernels (`offload.kernels`); return the entries left to the caller
    (norms, and the Linear weights kept as they are)."""
    by_name = {e.name: e for e in entries}
    used = set()
    for name, module in list(layer.named_modules()):
        if not isinstance(module, nn.Linear) or f"{name}.weight" not in by_name:
            continue
        weight, bias = by_name[f"{name}.weight"], by_name.get(f"{name}.bias")
        if packed_only and not weight.needs_workspace():
            continue
        parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
        linear = kernel_linear(weight, bias, slot.buffer) if kernels else None
        if linear is None:
            if weight.needs_workspace():
                workspace.reserve(weight.numel)
            linear = PackedLinear(weight, bias, slot, workspace)
        setattr(parent, name.rpartition(".")[2], linear)
        used |= {weight.name} | ({bias.name} if bias else set())
    if kernels:
        from .kernels import fuse_siblings

        fuse_siblings(layer)
    return [e for e in entries if e.name not in used]


def kernel_linear(weight: Entry, bias: Entry | None, buffer: torch.Tensor) -> nn.Module | None:
    """A KernelLinear for a matrix of a host `buffer`, or None when its format does not map."""
    from .kernels import kernel_weights

    linear = kernel_weights(weight, buffer) if weight.needs_workspace() else None
    if linear is not None and bias is not None:
        linear.bias = materialize(bias, buffer).float().clone()
    return linear


class StreamedLayer(nn.Module):
    """Stands in for a decoder layer whose weights live in the streamer: its Linear modules are
    PackedLinear reading the streamer's buffer for the layer; its other parameters (norms) are
    views of that buffer, given to the original layer module (weights on the meta device)
    through functional_call."""

    def __init__(self, template: nn.Module, index: int, streamer: LayerStreamer, slot: Slot,
                 loose: list[Entry]):
        super().__init__()
        self.template = template
        self.index = index
        self._refs = [streamer, slot, loose]  # a list, so nn.Module does not register them

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("template"), name)

    def forward(self, *args, **kwargs):
        streamer, slot, loose = self._refs
        slot.buffer = streamer.acquire(self.index)
        try:
            params = {e.name: _loose(e, slot.buffer) for e in loose}
            return functional_call(self.template, params, args, kwargs)
        finally:
            slot.buffer = None
            streamer.release(self.index)


@dataclass
class Offloaded:
    """A model placed by `offload_model`: which layers stream and from where (`placement`), the
    streamer that moves them (None when none streams), the dequant workspace."""
    model: nn.Module
    placement: Placement
    streamer: LayerStreamer | None = None
    workspace: Workspace | None = None

    @property
    def streamed_bytes_per_pass(self) -> int:
        """Bytes that cross to the device in one pass: every streamed layer, once."""
        return sum(layer.nbytes for layer in self.streamer.layers) if self.streamer else 0

    @property
    def pinned_bytes(self) -> int:
        return self.streamer.pinned_bytes if self.streamer else 0


def _layers(model) -> nn.ModuleList:
    return model.model.layers


def _bytes(module: nn.Module, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in module.parameters()) * torch.finfo(dtype).bits // 8


def dequant_bytes(entries: list[Entry], dtype: torch.dtype) -> int:
    """Device memory that per-matrix dequantization takes: the workspace (the largest matrix that
    needs it, in `dtype`) and the temporaries of one dequant."""
    numel = max((e.numel for e in entries if len(e.shape) == 2 and e.needs_workspace()), default=0)
    if not numel:
        return 0
    return numel * torch.finfo(dtype).bits // 8 + scratch_bytes(numel)


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
    activations, 0.1 GB for a long prompt's hidden states (prefilled layer by layer). 0 when
    `context` is 0 (nothing to plan for)."""
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
    # A prompt longer than a chunk goes layer by layer (`core.lm`): its hidden states and rotary
    # embedding are held whole between layers.
    prompt = context * (config.hidden_size + 2 * head_dim) * size if context > PREFILL_CHUNK else 0
    return kv_cache + layer + logits + prompt


def plan_placement(model, device: torch.device, quant: int = 16, offload: str = "auto",
                   gpu_memory: int | None = None, reserve: int = 0, n_buffers: int = 2,
                   dtype: torch.dtype | None = None, ram_free: int | None = None,
                   can_stream_from_disk: bool = True, context: int = 0,
                   tree_budget: int = 0,
                   packed_layout: tuple[list[Entry], int] | None = None,
                   weights: str = "", fixed_bytes: int | None = None,
                   kernels: bool = True) -> Placement:
    """How many decoder layers stay resident within `gpu_memory` (default: the device's free
    memory), after the embeddings, norm and head, the target's KV cache and pass activations
    for a `context`-token conversation and `tree_budget`-node trees (`work_bytes`), `reserve`
    bytes (the draft, its cache) and the streaming buffers; and where the streamed ones live: in
    host RAM, or (`offload="disk"`, or "auto" when they do not fit `ram_free`) on disk, read on
    every pass. On a CPU the device is the host: "auto" keeps what fits RAM and streams the rest
    from disk; the KV cache and activations are then the host's to hold.

    A layer's packed bytes are exact: `layout` of its parameters at `quant` bits, or
    `packed_layout` (entries, the largest layer's bytes) for a checkpoint that comes packed
    (`specexec quantize`, GGUF, bitsandbytes, GPTQ, AWQ). Quantized resident layers stay packed,
    so they cost their packed bytes; the dequant workspace counts in `work_bytes`."""
    dtype = dtype or model.dtype
    layers = _layers(model)
    n = len(layers)
    layer_bytes = _bytes(layers[0], dtype)
    if packed_layout is None:
        packed_layout = layout([(k, tuple(p.shape)) for k, p in layers[0].named_parameters()],
                               quant, dtype)
    entries, packed = packed_layout
    comes_packed = quant < 16 or any(e.needs_workspace() for e in entries)
    kept = packed if comes_packed else layer_bytes  # a resident layer's bytes
    if comes_packed and device.type == "cpu" and kernels:
        kept = kernel_layer_bytes(entries, packed)
    fixed = _bytes(model, dtype) - layer_bytes * n if fixed_bytes is None else fixed_bytes
    if context:
        context = min(context, model_context(model.config))
    work = work_bytes(model.config, tree_budget, context, dtype) + dequant_bytes(entries, dtype)
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
        elif fixed + n * kept <= ram_room:
            resident = n
        else:
            resident = max(0, min(n - 1, (ram_room - fixed - n_buffers * packed) // kept))
    else:
        reserve += work
        room = gpu_memory - fixed - reserve - n_buffers * packed
        if room < 0:
            need = (fixed + reserve + n_buffers * packed) / 2**30
            what = (f", the KV cache of {context} tokens and {tree_budget}-node trees "
                    "(--context, --budget)" if work else " and reserve")
            raise MemoryError(f"the GPU memory budget ({gpu_memory / 2**30:.1f} GiB) is below the "
                              f"{need:.1f} GiB that embeddings, head, buffers{what} need")
        resident = n if fixed + reserve + n * kept <= gpu_memory else min(n, room // kept)
        if offload in ("always", "disk"):
            resident = min(resident, n - 1)
    resident = max(0, min(n, int(resident)))
    streamed = n - resident
    in_ram = fixed + resident * kept if device.type == "cpu" else 0  # the host's own share
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
                     work, context, tree_budget, kept, weights, n_buffers)


def kernel_layer_bytes(entries: list[Entry], packed: int) -> int:
    """A layer's bytes resident in a CPU's RAM with its matrices in kernel form (`offload.kernels`):
    those bytes, the norms, and the packed buffer too when a matrix stays with the dequantizer."""
    from .kernels import kernel_nbytes

    total = 0
    for e in entries:
        if len(e.shape) == 2 and e.needs_workspace():
            size = kernel_nbytes(e)
            if size is None:
                return packed + sum(kernel_nbytes(x) or 0 for x in entries)
            total += size
        else:  # a norm, or a matrix already in the compute dtype: a tensor of its own
            total += e.numel * torch.finfo(e.dtype).bits // 8
    return total


def offload_model(model, device: torch.device, placement: Placement,
                  dtype: torch.dtype | None = None, n_buffers: int = 2,
                  progress: Callable[[int, int], None] | None = None,
                  fill: Callable[[str | None], None] | None = None,
                  read_packed: Callable[[int, bool], PackedLayer] | None = None,
                  disk_layer: Callable[[int], DiskLayer] | None = None,
                  workspace: Workspace | None = None, kernels: bool = True) -> Offloaded:
    """Rebuild `model` in place: the first `placement.resident_layers` decoder layers and
    everything outside them move to `device`; the rest are packed into host buffers and streamed.
    Quantized layers stay packed, resident ones too: their nn.Linear modules become PackedLinear,
    which dequantize one matrix at a time into a shared workspace just before its matmul, so
    resident and streamed layers compute one function. `progress(done, total)` is called per
    decoder layer placed.

    The model is either loaded on the CPU, or (`fill` given) on the meta device: then
    `fill(prefix)` reads the weights under `prefix` ("model.layers.3.") into CPU memory just
    before that layer is placed, and `fill(None)` everything outside the decoder layers; one
    layer at a time is held unpacked, so the model is never held twice. With `read_packed(i,
    pin)` (a checkpoint that comes packed: `specexec quantize`, GGUF, bitsandbytes, GPTQ, AWQ)
    layer i comes already packed, and is streamed or kept resident as it is. When
    `placement.source` is "disk", `disk_layer(i)` says where streamed layer i lies on disk; it is
    not read now (its parameters stay on the meta device) but on every pass. `workspace` is
    given when modules outside the layers share it (a packed head). On a CPU, with `kernels`,
    resident matrices whose format maps onto torch's packed CPU kernels compute from them
    (`offload.kernels`: bf16 activations) and drop their packed bytes. Returns the `Offloaded`
    model: placement, streamer (None when nothing streams) and workspace."""
    dtype = dtype or model.dtype
    layers = _layers(model)
    first = placement.resident_layers
    kernels = kernels and device.type == "cpu"
    if placement.source == "disk" and disk_layer is None:
        raise ValueError("streaming from disk needs disk_layer")
    prepare(device)  # lookup tables on the device now, not during a pass
    workspace = workspace or Workspace(device, dtype)
    packed, streamed_slots = [], []
    for i in range(len(layers)):
        layer_packed = None
        if i >= first and placement.source == "disk":
            layer_packed = disk_layer(i)
        elif read_packed:
            layer_packed = read_packed(i, i >= first and device.type == "cuda")
        else:
            if fill:
                fill(f"model.layers.{i}.")
            if i < first and placement.quant == 16:
                layers[i].to(device, dtype)  # now, so that resident layers never pile up on the host
            else:
                layer_packed = pack_layer(layers[i], placement.quant, dtype,
                                          pin=i >= first and device.type == "cuda",
                                          compute=device if device.type == "cuda" else None)
        if layer_packed is not None:
            _free(layers[i])
            slot = Slot()
            if i < first:  # resident, packed: its buffer moves to the device once
                slot.buffer = layer_packed.buffer.to(device)
                loose = _install(layers[i], layer_packed.entries, slot, workspace, packed_only=True,
                                 kernels=kernels)
                for e in loose:
                    _set_param(layers[i], e.name, materialize(e, slot.buffer).clone())
                if not any(isinstance(m, PackedLinear) for m in layers[i].modules()):
                    slot.buffer = None  # all in kernel form now: the packed bytes can go
            else:
                loose = _install(layers[i], layer_packed.entries, slot, workspace)
                packed.append(layer_packed)
                streamed_slots.append((i, slot, loose))
        if progress:
            progress(i + 1, len(layers))
    if fill:
        fill(None)
    workspace.allocate()
    streamer = LayerStreamer(packed, device, n_buffers) if packed else None
    for k, (i, slot, loose) in enumerate(streamed_slots):
        layers[i] = StreamedLayer(layers[i], k, streamer, slot, loose)
    # Everything else (embeddings, norm, head, rotary tables) to the device.
    for name, module in model.named_modules():
        if isinstance(module, StreamedLayer):
            continue
        for pname, p in list(module._parameters.items()):
            if p is not None and p.device.type != "meta" and (p.device != device or p.dtype != dtype):
                module._parameters[pname] = nn.Parameter(p.data.to(device, dtype), requires_grad=False)
        for bname, b in list(module._buffers.items()):
            if b is not None and b.device.type != "meta":
                module._buffers[bname] = b.to(device)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and isinstance(head, nn.Linear) \
            and isinstance(embed, nn.Embedding):
        head.weight = embed.weight
    if kernels and streamer is None:  # every layer in RAM: the lean forward where it applies
        from .cpu_forward import install

        install(model)
    return Offloaded(model, placement, streamer, workspace if workspace.buffer is not None else None)


def _free(layer: nn.Module) -> None:
    """Drop the host copy of a layer's parameters (they are packed now): meta tensors remain."""
    for module in layer.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.device.type != "meta":
                module._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"),
                                                        requires_grad=False)


def _set_param(layer: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = layer.get_submodule(owner) if owner else layer
    module._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def describe(p: Placement) -> str:
    gib = 2**30
    budget = f"{p.budget_bytes / gib:.1f} GiB budget, " if p.budget_bytes else ""
    source = " from disk" if p.source == "disk" and p.streamed_layers else ""
    work = (f"; {p.work_bytes / gib:.1f} GiB kept for the KV cache of {p.context} tokens and "
            f"{p.tree_budget}-node trees" if p.work_bytes else "")
    return (f"{p.resident_layers} resident + {p.streamed_layers} streamed layers{source}, "
            f"{p.weights or f'{p.quant}-bit'} ({budget}{p.packed_layer_bytes / gib * 1024:.0f} MiB per streamed "
            f"layer{work})")
