"""The offloaded target computes what the resident model computes (CPU as compute device)."""

import copy

import pytest
import torch

from drafts import NgramDrafter
from offload import offload_model, plan_placement
from offload.model import describe
from offload.store import pack_layer, roundtrip, unpack
from specexec_app.core import engine
from specexec_app.core.kvcache import TokenCache
from specexec_app.core.lm import Target, forward_tree
from specexec_app.loading.hf import stop_ids
from specexec_app.config.settings import DecodeSettings, parse_size
from specexec_app.core.tree import Tree

CPU = torch.device("cpu")


def tree_batch():
    """Two roots, depth 3 (ids below 2048: test_gpu's small model uses it too)."""
    tree = Tree()
    a = tree.add(100, -1, -0.1)
    b = tree.add(200, a, -0.2)
    tree.add(300, -1, -0.3)
    tree.add(400, b, -0.4)
    tree.add(500, a, -0.5)
    return tree


def logits_of(model, prompt):
    kv = TokenCache()
    return forward_tree(model, kv, prompt, tree_batch())


@pytest.mark.parametrize("quant", [16, 8, 4])
def test_pack_unpack_roundtrip(model, quant):
    layer = model.model.layers[0]
    packed = pack_layer(layer, quant, torch.float32)
    params = unpack(packed.entries, packed.buffer)
    for name, p in layer.named_parameters():
        got = params[name]
        assert got.shape == p.shape and got.dtype == torch.float32
        err = (got - p).abs().max() / p.abs().max()
        assert err < {16: 1e-7, 8: 1e-2, 4: 0.2}[quant], (name, float(err))
    full = sum(p.numel() * 4 for p in layer.parameters())
    if quant == 4:
        assert packed.nbytes < full / 6   # NF4 moves about an eighth of fp32 (a quarter of fp16)


@pytest.mark.parametrize("quant, resident", [(16, 0), (16, 11), (8, 0), (4, 0), (4, 7)])
def test_offloaded_logits_equal_resident(model, tokenizer, quant, resident):
    prompt = tokenizer("The offloaded model must agree with the resident one").input_ids
    reference = copy.deepcopy(model)
    if quant < 16:  # the same quantized model, resident
        for layer in reference.model.layers:
            roundtrip(layer, quant, torch.float32)
    want = logits_of(reference, prompt)

    off = copy.deepcopy(model)
    n = len(off.model.layers)
    placement = plan_placement(off, CPU, quant, offload="always")
    assert placement.resident_layers == 0 and placement.streamed_layers == n
    placement = placement.__class__(**{**placement.__dict__, "resident_layers": resident,
                                       "streamed_layers": n - resident})
    offload_model(off, CPU, placement)
    assert sum(p.device.type == "meta" for p in off.parameters()) > 0  # host copies were freed
    got = logits_of(off, prompt)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_greedy_with_offloaded_4bit_target_equals_its_own_greedy(model, tokenizer, chat_ids):
    off = copy.deepcopy(model)
    offloaded = offload_model(off, CPU, plan_placement(off, CPU, 4, offload="always"))
    ids, stops = chat_ids("Name three planets."), stop_ids(tokenizer, model)
    reference = copy.deepcopy(model)
    for layer in reference.model.layers:
        roundtrip(layer, 4, torch.float32)
    with torch.no_grad():
        ref = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    ref = ref[: next((i for i, t in enumerate(ref) if t in stops), len(ref))]
    done = list(engine.generate(Target(off, offloaded=offloaded), NgramDrafter(), ids,
                                DecodeSettings(budget=16, max_new_tokens=24), tokenizer, stops))[-1]
    assert done.token_ids == ref


def test_placement_fits_the_budget(model):
    layer = sum(p.numel() for p in model.model.layers[0].parameters()) * 2
    p = plan_placement(model, torch.device("cuda"), 16, "auto", gpu_memory=10 * 2**30,
                       dtype=torch.float16)
    assert p.resident_layers == len(model.model.layers)          # everything fits: no streaming
    fixed = p.fixed_bytes
    budget = fixed + 2 * layer + 5 * layer + layer // 2
    p = plan_placement(model, torch.device("cuda"), 16, "auto", gpu_memory=budget, dtype=torch.float16)
    assert p.resident_layers == 5 and p.streamed_layers == len(model.model.layers) - 5
    with pytest.raises(MemoryError):
        plan_placement(model, torch.device("cuda"), 16, "auto", gpu_memory=fixed // 2, dtype=torch.float16)


def test_parse_size():
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("12 GB") == 12 * 10**9
    assert parse_size("512MiB") == 512 * 2**20


def test_a_tensor_over_2_gib_reads_whole(tmp_path):
    """One read returns at most ~2 GiB on Linux: a bigger tensor (a 70B-class model's embeddings
    in 16 bits, 152064 x 8192 x 2 bytes for Qwen2.5-72B) must still load, not be called cut."""
    import json

    from offload.shards import ShardReader

    n = 2**31 + 4096
    header = json.dumps({"big": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:  # sparse: the zeros cost no disk
        f.write(len(header).to_bytes(8, "little") + header)
        f.seek(8 + len(header) + n - 4)
        f.write(b"tail")
    assert bytes(ShardReader(tmp_path).get("big")[-4:].numpy()) == b"tail"


@pytest.mark.parametrize("quant, budget", [(16, None), (4, None), (8, "300MB")])
def test_loading_layer_by_layer_gives_the_same_model(model, source, tokenizer, quant, budget):
    """The shard-by-shard loader (meta model, one layer read, placed and freed at a time)
    computes what the model loaded whole computes, quantized the same way; with a budget some
    layers stay resident."""
    from pathlib import Path

    from offload.loader import load_offloaded

    prompt = tokenizer("Loaded layer by layer, the model must not change").input_ids
    reference = copy.deepcopy(model)
    if quant < 16:
        for layer in reference.model.layers:
            roundtrip(layer, quant, torch.float32)
    offloaded = load_offloaded(Path(source.path), CPU, quant, "always",
                               parse_size(budget) if budget else None, 0, torch.float32)
    loaded, placement = offloaded.model, offloaded.placement
    assert placement.streamed_layers > 0
    assert (placement.resident_layers > 0) == (budget is not None)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied, held once
    want = logits_of(reference, prompt)
    if quant == 8 and placement.resident_layers:
        # int8 layers resident in a CPU's RAM compute on its packed int8 kernel (bf16
        # activations, tests/test_cpu_kernels.py): the same weights, bf16 rounding
        from offload.kernels import KernelLinear

        assert isinstance(loaded.model.layers[0].mlp.down_proj, KernelLinear)
        torch.testing.assert_close(logits_of(loaded, prompt), want, rtol=0,
                                   atol=0.02 * want.abs().max().item())
        return
    torch.testing.assert_close(logits_of(loaded, prompt), want, rtol=1e-4, atol=1e-4)


def test_layer_by_layer_loading_never_holds_the_model_whole(source):
    """While the 4-bit streamed target loads, each decoder layer is read, packed and freed before
    the next is read: at every step no layer is held unpacked, and what stays in host memory is
    the packed layers (about an eighth of the fp32 weights)."""
    from pathlib import Path

    from offload.loader import load_offloaded

    seen = []
    holder = {}

    def progress(done, total):
        layers = holder["model"].model.layers
        unpacked = [i for i, layer in enumerate(layers)
                    if any(p.device.type != "meta" for p in layer.parameters())]
        seen.append((done, unpacked))

    import offload.loader as loader

    original = loader.offload_model

    def spy(model, *args, **kwargs):
        holder["model"] = model
        assert all(p.device.type == "meta" for p in model.parameters())  # nothing read yet
        return original(model, *args, **kwargs)

    loader.offload_model = spy
    try:
        offloaded = load_offloaded(Path(source.path), CPU, 4, "always", None, 0, torch.float32,
                                   progress=progress)
    finally:
        loader.offload_model = original
    assert [d for d, _ in seen] == list(range(1, 31))
    assert all(unpacked == [] for _, unpacked in seen), seen
    packed = offloaded.streamed_bytes_per_pass
    fp32 = sum(e.numel for e in offloaded.streamer.layers[0].entries) * 4 * 30
    assert packed < fp32 / 6


def test_a_packed_checkpoint_loads_without_quantizing(model, source, tokenizer, tmp_path):
    """`specexec quantize` writes the packed layers; loading them (streamed, or resident and
    still packed) gives the model that quantizing on load gives, and a damaged layer file is
    named."""
    from typer.testing import CliRunner

    from offload.loader import load_offloaded
    from specexec_app.ui.cli import app
    from specexec_app.errors import UserError

    out = tmp_path / "packed"
    result = CliRunner().invoke(app, ["quantize", "--target", source.path, "--out", str(out),
                                      "--quant", "4", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert sum(f.stat().st_size for f in (out / "layers").iterdir()) < 538e6 / 6
    prompt = tokenizer("Packed once, loaded many times").input_ids
    reference = copy.deepcopy(model)
    for layer in reference.model.layers:
        roundtrip(layer, 4, torch.float32)
    want = logits_of(reference, prompt)
    for offload, budget in (("always", None), ("always", parse_size("300MB"))):
        loaded = load_offloaded(out, CPU, 16, offload, budget, 0, torch.float32)
        assert loaded.placement.quant == 4
        torch.testing.assert_close(logits_of(loaded.model, prompt), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="packed in 4 bits; --quant 8"):
        load_offloaded(out, CPU, 8, "always", None, 0, torch.float32)
    layer_file = out / "layers" / "00007.bin"
    layer_file.write_bytes(layer_file.read_bytes()[:1000])
    with pytest.raises(UserError, match="00007.bin holds 1000 of"):
        load_offloaded(out, CPU, 16, "always", None, 0, torch.float32)


@pytest.mark.parametrize("packed_bits", [None, 4])
def test_streaming_from_disk_reads_each_pass_and_computes_the_same(model, source, tokenizer,
                                                                   tmp_path, packed_bits,
                                                                   monkeypatch):
    """`--offload disk`: streamed layers stay in their files (16-bit safetensors, or a folder
    from `specexec quantize`) and are read again on every pass, a layer ahead of compute, each
    in chunks read by several threads at once; the logits are those of the model in RAM, and
    greedy SpecExec gives the target's own tokens."""
    from pathlib import Path

    from offload import store
    from offload import streamer as streaming
    from offload.loader import load_offloaded
    from offload.store import DiskLayer

    monkeypatch.setattr(store, "READ_CHUNK", 1 << 16)  # many chunks per layer, read in parallel
    monkeypatch.setattr(streaming, "disk_readers", lambda device: 3)  # as on a GPU (1 on a CPU)

    folder, reference = Path(source.path), copy.deepcopy(model)
    if packed_bits:
        from offload.packed import save_packed

        folder = tmp_path / "packed"
        save_packed(Path(source.path), folder, packed_bits, torch.float32)
        for layer in reference.model.layers:
            roundtrip(layer, packed_bits, torch.float32)
    offloaded = load_offloaded(folder, CPU, 16, "disk", None, 0, torch.float32)
    loaded, placement, streamer = offloaded.model, offloaded.placement, offloaded.streamer
    assert placement.source == "disk" and placement.streamed_layers == 30
    assert all(isinstance(layer, DiskLayer) for layer in streamer.layers)
    assert streamer.chunk_readers is not None  # the layers are read in parallel chunks
    assert all(p.device.type == "meta" for p in loaded.model.layers[3].template.parameters())
    prompt = tokenizer("Read from the disk on every pass").input_ids
    read = []
    for _ in range(2):  # the second pass reads the files again
        torch.testing.assert_close(logits_of(loaded, prompt), logits_of(reference, prompt),
                                   rtol=1e-4, atol=1e-4)
        read.append(streamer.bytes_streamed)
    assert read[1] - read[0] == sum(layer.nbytes for layer in streamer.layers)
    if packed_bits:  # a layer file cut short while the model runs: a one-line error, not a crash
        from specexec_app.errors import UserError

        layer_file = folder / "layers" / "00007.bin"
        layer_file.write_bytes(layer_file.read_bytes()[:1000])
        with pytest.raises(UserError, match="00007.bin is truncated"):
            logits_of(loaded, prompt)
        return
    ids = tokenizer("The capital of France is").input_ids
    with torch.no_grad():
        want = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    done = list(engine.generate(Target(loaded, offloaded=offloaded), NgramDrafter(), ids,
                                DecodeSettings(budget=16, max_new_tokens=16), tokenizer, set()))[-1]
    assert done.token_ids == want


def test_placement_keeps_room_for_the_kv_cache_and_trees(model):
    """Before layers are made resident, GPU memory is kept for the KV cache of the context
    (--context) and for a pass over the largest tree (--budget); on a CPU, RAM is."""
    from transformers import LlamaConfig

    from offload.model import RAM_MARGIN, kv_cache_bytes, work_bytes

    llama3_70b = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                             num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)
    per_token = 80 * 2 * 8 * 128 * 2  # layers x (K, V) x KV heads x head dim x bf16 bytes
    assert kv_cache_bytes(llama3_70b, 1, torch.bfloat16) == per_token == 320 * 2**10
    cache_and_logits = per_token * (8192 + 2049) + 2049 * 128256 * 2
    assert cache_and_logits < work_bytes(llama3_70b, 2048, 8192, torch.bfloat16) \
        < cache_and_logits + 2**30  # and the activations of one layer over the tree
    assert work_bytes(llama3_70b, 2048, 0, torch.bfloat16) == 0  # nothing to plan for

    fp16, cuda = torch.float16, torch.device("cuda")  # arithmetic: no GPU is touched
    layer = sum(p.numel() for p in model.model.layers[0].parameters()) * 2
    work = work_bytes(model.config, 256, 1024, fp16)
    assert work > layer  # its cache and trees outweigh a layer
    plain = plan_placement(model, cuda, 16, "auto", gpu_memory=10 * 2**30, dtype=fp16)
    budget = plain.fixed_bytes + 2 * layer + 10 * layer + work + layer // 2
    without = plan_placement(model, cuda, 16, "auto", gpu_memory=budget, dtype=fp16)
    kept = plan_placement(model, cuda, 16, "auto", gpu_memory=budget, dtype=fp16,
                          context=1024, tree_budget=256)
    assert kept.resident_layers == 10 and kept.work_bytes == work
    assert without.resident_layers == 10 + (work + layer // 2) // layer
    assert "KV cache of 1024 tokens and 256-node trees" in describe(kept)
    # The context is the model's at most (8192 for SmolLM2).
    assert plan_placement(model, cuda, 16, "auto", gpu_memory=10 * 2**30, dtype=fp16,
                          context=10**6, tree_budget=256).context == 8192
    with pytest.raises(MemoryError, match="the KV cache of 1024 tokens and 256-node trees "
                                          r"\(--context, --budget\)"):
        plan_placement(model, cuda, 16, "auto", gpu_memory=plain.fixed_bytes + 2 * layer + work // 2,
                       dtype=fp16, context=1024, tree_budget=256)

    layer32, work32 = 2 * layer, work_bytes(model.config, 256, 1024, torch.float32)  # fp32 on a CPU
    ram = RAM_MARGIN + 2 * plain.fixed_bytes + 2 * layer32 + 5 * layer32 + work32 + layer32 // 2
    laptop = plan_placement(model, CPU, 16, "auto", ram_free=ram, context=1024, tree_budget=256)
    assert laptop.resident_layers == 5
    unplanned = plan_placement(model, CPU, 16, "auto", ram_free=ram)
    assert unplanned.resident_layers == 5 + (work32 + layer32 // 2) // layer32


def test_placement_streams_from_disk_when_ram_is_short(model):
    """`auto` keeps streamed layers in RAM while they fit, else reads them from disk; on a CPU
    it keeps the layers that fit RAM and streams the rest; bits that only quantizing on load
    gives cannot stream from disk, which is said."""
    gib = 2**30
    on_gpu = torch.device("cuda")  # placement is arithmetic: no GPU is touched with a budget
    roomy = plan_placement(model, on_gpu, 16, "auto", gpu_memory=gib // 4, ram_free=64 * gib)
    assert roomy.streamed_layers > 0 and roomy.source == "ram"
    short = plan_placement(model, on_gpu, 16, "auto", gpu_memory=gib // 4, ram_free=2 * gib + 10**6)
    assert short.streamed_layers == roomy.streamed_layers and short.source == "disk"
    with pytest.raises(MemoryError, match="specexec quantize"):  # (4-bit layers stay packed)
        plan_placement(model, on_gpu, 4, "auto", gpu_memory=150 * 2**20, ram_free=2 * gib + 10**6,
                       can_stream_from_disk=False)
    whole = plan_placement(model, CPU, 16, "auto", ram_free=64 * gib)
    assert whole.streamed_layers == 0
    laptop = plan_placement(model, CPU, 16, "auto", ram_free=2 * gib + 300 * 2**20)
    assert 0 < laptop.resident_layers < 30 and laptop.source == "disk"
    assert plan_placement(model, CPU, 16, "disk", ram_free=64 * gib).source == "disk"


def small_llama(layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=layers, vocab_size=512,
                      max_position_embeddings=512, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("quant", [16, 8, 4])
def test_the_plan_counts_the_packed_bytes_and_the_dequant_workspace(quant):
    """What the plan says a streamed layer takes is what its buffer takes, byte for byte (the
    bytes pinned on a GPU machine); the dequant workspace is counted in `work_bytes`; resident
    quantized layers stay packed (no dense weight kept)."""
    from offload.model import PackedLinear, dequant_bytes, work_bytes
    from offload.quant import scratch_bytes

    model = small_llama()
    placement = plan_placement(model, CPU, quant, "always", context=64, tree_budget=8)
    placement = placement.__class__(**{**placement.__dict__, "resident_layers": 1, "streamed_layers": 2})
    offloaded = offload_model(model, CPU, placement)
    assert [layer.nbytes for layer in offloaded.streamer.layers] == [placement.packed_layer_bytes] * 2
    assert placement.device_bytes == placement.fixed_bytes + placement.resident_layer_bytes + \
        2 * placement.packed_layer_bytes + placement.work_bytes
    assert offloaded.pinned_bytes == 0  # a CPU computes: nothing to pin
    entries = offloaded.streamer.layers[0].entries
    biggest = max(e.numel for e in entries if len(e.shape) == 2)
    assert placement.work_bytes == work_bytes(model.config, 8, 64, torch.float32) + \
        dequant_bytes(entries, torch.float32)
    if quant == 16:
        assert offloaded.workspace is None and dequant_bytes(entries, torch.float32) == 0
        return
    assert offloaded.workspace.nbytes == biggest * 4  # one matrix, not a layer
    assert dequant_bytes(entries, torch.float32) == biggest * 4 + scratch_bytes(biggest)
    resident = offloaded.model.model.layers[0]
    assert not any(p.dim() == 2 for p in resident.parameters())
    if quant == 8:  # resident in a CPU's RAM: int8 in the packed kernel's form, planned exactly
        from offload.kernels import KernelLinear

        assert isinstance(resident.mlp.down_proj, KernelLinear)
        held = sum(t.numel() * t.element_size() for t in [*resident.parameters(), *resident.buffers()])
        assert placement.resident_layer_bytes == held
        return
    assert isinstance(resident.mlp.down_proj, PackedLinear)
    assert placement.resident_layer_bytes == placement.packed_layer_bytes


def test_a_streamed_tree_pass_makes_no_host_round_trip_in_its_layers():
    """Under a counter of the ops that would make the host wait for a CUDA device (item,
    nonzero, device-to-host copies, tensors built from Python data), a tree pass through
    streamed 4-bit and 8-bit layers, resident packed layers and per-matrix dequant counts none
    inside the decoder layers; the counter itself sees an `.item()` placed in a layer."""
    from offload.roundtrips import RoundTrips

    for quant in (4, 8):
        model = small_llama()
        placement = plan_placement(model, CPU, quant, "always")
        placement = placement.__class__(**{**placement.__dict__, "resident_layers": 1,
                                           "streamed_layers": 2})
        offload_model(model, CPU, placement)
        logits_of(model, list(range(10, 30)))  # warm: lazy tables and caches
        with RoundTrips(model) as trips:
            logits_of(model, list(range(10, 30)))
        assert trips.total_inside == 0, trips.inside
    hook = model.model.layers[1].register_forward_pre_hook(
        lambda m, a, k: None if a[0].sum().item() else None, with_kwargs=True)
    with RoundTrips(model) as trips:
        logits_of(model, list(range(10, 30)))
    hook.remove()
    assert trips.inside == {"item": 1}


def test_on_a_cpu_auto_4bit_keeps_packed_layers_in_ram_before_refusing():
    """A Llama-3-70B with --quant 4 on a CPU machine with 51.1 GiB free (issue 17): `auto` keeps
    every layer packed in RAM (was: float32 layers first, then no room for the rest)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        meta = LlamaForCausalLM(cfg)
    p = plan_placement(meta, CPU, 4, "auto", ram_free=int(51.1 * 2**30), context=4096,
                       tree_budget=64, dtype=torch.float32)
    assert p.resident_layers == 80 and p.streamed_layers == 0
    assert p.fixed_bytes + 80 * p.resident_layer_bytes + p.work_bytes < 51.1 * 2**30 - 2 * 2**30


@pytest.mark.parametrize("quant,offload", [(16, "never"), (4, "never"), (8, "always")])
def test_the_plan_holds_what_a_pass_allocates(quant, offload):
    """`work_bytes` is at least what a pass really allocates, measured by the CPU allocator's own
    events (offload/memprobe.py: kernels' scratch included) on top of the KV cache already held:
    the prompt's prefill and a tree pass, at several contexts and budgets, for a float32 model,
    packed kernels with the lean forward, and streamed int8 layers with their dequant workspace."""
    from offload.memprobe import AllocationPeak
    from specexec_app.core.lm import Target

    for context, budget in ((100, 0), (100, 16), (300, 64), (300, 1)):
        model = small_llama()
        placement = plan_placement(model, CPU, quant, offload, context=context,
                                   tree_budget=budget, ram_free=2**40)
        offloaded = offload_model(model, CPU, placement)
        target = Target(offloaded.model, context=context, offloaded=offloaded)
        prompt = [(7 * i) % 500 + 1 for i in range(context - budget - 1)]
        tree = Tree()
        for i in range(budget):  # a bushy tree: node i under node i // 3
            tree.add(i % 500 + 1, i // 3 - 1 if i >= 3 else -1, -0.1 * i)
        with torch.inference_mode():
            with AllocationPeak() as prefill:
                target.verify(prompt, Tree())
            target.commit(Tree(), [])
            held = sum(t.untyped_storage().nbytes() for layer in target.kv.cache.layers
                       for t in (layer.room_k, layer.room_v))
            with AllocationPeak() as tree_pass:
                logits = target.verify(prompt, tree)
        assert logits.shape[0] == budget + 1 and prefill.peak > 0 and tree_pass.peak > 0
        assert prefill.peak <= placement.work_bytes, (context, budget, prefill.peak, placement.work_bytes)
        assert held + tree_pass.peak <= placement.work_bytes, \
            (context, budget, held, tree_pass.peak, placement.work_bytes)


def test_a_long_prompt_reads_each_streamed_layer_once(tmp_path, monkeypatch):
    """A prompt of several chunks goes through a disk-streamed target layer by layer: each layer
    is read once for all its chunks (then once more for the pass that ends the prompt), not once
    a chunk, and the logits and KV cache are those of a pass per chunk, bit for bit."""
    from offload.loader import load_offloaded
    from specexec_app.core import lm

    monkeypatch.setattr(lm, "PREFILL_CHUNK", 16)
    small_llama(layers=4).save_pretrained(tmp_path / "small")
    offloaded = load_offloaded(tmp_path / "small", CPU, 16, "disk", None, 0, torch.float32)
    model, streamer = offloaded.model, offloaded.streamer
    assert streamer.streaming and offloaded.placement.streamed_layers == 4
    model_bytes = sum(layer.nbytes for layer in streamer.layers)
    prompt = [(5 * i) % 500 + 1 for i in range(70)]  # 4 chunks of 16, then the pass with the tree
    results = []
    for layer_major in (True, False):
        kv = TokenCache()
        before = streamer.bytes_streamed
        with torch.inference_mode():
            logits = forward_tree(model, kv, prompt, tree_batch(),
                                  streamer if layer_major else None)
        results.append((logits, [layer.keys.clone() for layer in kv.cache.layers],
                        streamer.bytes_streamed - before))
    (got, keys, read), (want, want_keys, read_per_chunk) = results
    assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(keys, want_keys))
    assert read_per_chunk >= 5 * model_bytes - 2 * streamer.layers[0].nbytes  # 4 chunks + 1 pass
    # the chunks together, the pass, and the first layers fetched ahead for the next pass
    assert read <= 2 * model_bytes + streamer.n_buffers * streamer.layers[0].nbytes
