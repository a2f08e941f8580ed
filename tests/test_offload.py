"""The offloaded target computes what the resident model computes (CPU as compute device)."""

import copy

import pytest
import torch

from drafts import NgramDrafter
from offload import offload_model, plan_placement
from offload.store import pack_layer, roundtrip, unpack
from specexec_app import engine
from specexec_app.kvcache import TokenCache
from specexec_app.lm import Target, forward_tree
from specexec_app.models import stop_ids
from specexec_app.settings import DecodeSettings, parse_size
from specexec_app.tree import Tree

CPU = torch.device("cpu")


def tree_batch():
    tree = Tree()
    a = tree.add(1000, -1, -0.1)
    b = tree.add(2000, a, -0.2)
    tree.add(3000, -1, -0.3)
    tree.add(4000, b, -0.4)
    tree.add(5000, a, -0.5)
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
    offload_model(off, CPU, plan_placement(off, CPU, 4, offload="always"))
    ids, stops = chat_ids("Name three planets."), stop_ids(tokenizer, model)
    reference = copy.deepcopy(model)
    for layer in reference.model.layers:
        roundtrip(layer, 4, torch.float32)
    with torch.no_grad():
        ref = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    ref = ref[: next((i for i, t in enumerate(ref) if t in stops), len(ref))]
    done = list(engine.generate(Target(off), NgramDrafter(), ids,
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
