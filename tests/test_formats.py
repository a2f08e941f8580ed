"""Checkpoints that come quantized stream as they are: GGUF (single, split, Ollama store),
bitsandbytes 4-bit, GPTQ, AWQ. Every dequantizer is bit-exact against its reference (the `gguf`
package's numpy code, bitsandbytes, the format's formula); a model streamed from its packed
blocks computes what the same model dequantized resident computes."""

import json

import numpy as np
import pytest
import torch

from specexec_app.core.kvcache import TokenCache
from specexec_app.core.lm import forward_tree
from specexec_app.errors import UserError
from test_offload import tree_batch

CPU = torch.device("cpu")
rng = np.random.default_rng(0)

# Byte offsets of the float16 scales in each GGUF block (the rest of a block may be any bytes).
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
              "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
              "IQ4_NL": [0], "IQ4_XS": [0]}


def random_blocks(qtype: str, rows: int, cols: int, scale: float = 1.0, rng=rng) -> np.ndarray:
    """Random GGUF blocks [rows, row bytes] with finite float16 scales."""
    from offload.quant import GGUF_TYPES

    block, size, _ = GGUF_TYPES[qtype]
    data = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        d = (np.abs(rng.standard_normal(len(data))) * scale).astype(np.float16)
        data[:, at:at + 2] = d.view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("qtype", list(F16_FIELDS) + ["F16", "BF16", "F32"])
def test_gguf_dequantizers_are_bit_exact_against_gguf(qtype):
    """Our torch dequantizer of every block type gives exactly the float32 values of
    `gguf.quants.dequantize` (numpy) for the same bytes: random blocks, and for the types the
    `gguf` package can quantize, real weights quantized by it."""
    from gguf import GGMLQuantizationType, quants

    from offload.quant import DEQUANTIZERS
    from offload.store import Entry

    rows, cols = 6, 512
    kind = GGMLQuantizationType[qtype]
    samples = []
    if qtype in F16_FIELDS:
        samples.append(random_blocks(qtype, rows, cols))
    weights = rng.standard_normal((rows, cols)).astype(np.float32)
    try:
        samples.append(quants.quantize(weights, kind))
    except (NotImplementedError, quants.QuantError):
        pass
    assert samples
    for data in samples:
        want = quants.dequantize(data, kind).astype(np.float32).reshape(rows, cols)
        data = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).reshape(rows, -1))
        entry = Entry("w", (rows, cols), torch.float32, "gguf", (), (qtype, 0))
        out = torch.empty(rows, cols)
        DEQUANTIZERS["gguf"]([data.reshape(-1)], entry, out)
        assert np.array_equal(out.numpy().view(np.uint32), want.view(np.uint32)), qtype


# --- a tiny random Llama written as GGUF, with the shipped model's tokenizer metadata ---

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS, VOCAB = 256, 512, 4, 2, 3, 1024


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's converter gives Llama's Q and K (what a reader must undo)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _type_of(gguf_name: str) -> str:
    """A mix of block types, as a Q4_K_M file mixes Q4_K and Q6_K."""
    if gguf_name.endswith(("norm.weight", ".bias")):
        return "F32"
    if gguf_name == "token_embd.weight":
        return "Q8_0"
    table = {"attn_q": "Q4_K", "attn_k": "Q5_0", "attn_v": "Q6_K", "attn_output": "Q4_1",
             "ffn_gate": "Q4_K", "ffn_up": "Q5_K", "ffn_down": "Q6_K"}
    blk = int(gguf_name.split(".")[1])
    kinds = [table[k] for k in table if f".{k}." in gguf_name]
    alternates = {"Q4_K": "Q3_K", "Q5_K": "Q2_K", "Q6_K": "IQ4_XS", "Q4_1": "Q8_0", "Q5_0": "Q4_0"}
    return alternates.get(kinds[0], kinds[0]) if blk % 2 else kinds[0]


def write_gguf(path, split_max_tensors: int = 0, drop: tuple[str, ...] = (), arch: str = "llama",
               type_of=_type_of):
    """A random 3-layer Llama (hidden 256) as GGUF, or a Qwen2 (`arch`: Llama's layers with
    biases on q, k and v): block types of `type_of`, K-quants as random blocks (the `gguf`
    package cannot quantize them), the others quantized from random weights (the same weights
    on every call); tokenizer and chat template copied from the shipped SmolLM2 GGUF."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (LlamaTensorProcessor, TensorProcessor,
                                                          get_gguf_hf_weights_map)

    from specexec_app.loading.sources import smollm2_gguf

    rng = np.random.default_rng(1)
    source = GGUFReader(smollm2_gguf())
    # The shipped tokenizer cut to its first VOCAB tokens and the merges among them: a real BPE
    # tokenizer that converts in a second (the full one takes ~10 s and a 49k-row embedding).
    tokens = source.fields["tokenizer.ggml.tokens"].contents()[:VOCAB]
    known = set(tokens)
    merges = [m for m in source.fields["tokenizer.ggml.merges"].contents()
              if m.replace(" ", "") in known and all(p in known for p in m.split(" "))]
    vocab = VOCAB
    Config, Model, Processor = ((Qwen2Config, Qwen2ForCausalLM, TensorProcessor) if arch == "qwen2"
                                else (LlamaConfig, LlamaForCausalLM, LlamaTensorProcessor))
    config = Config(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS,
                    num_key_value_heads=KV_HEADS, num_hidden_layers=LAYERS, vocab_size=vocab,
                    tie_word_embeddings=True)
    with torch.device("meta"):
        meta = Model(config)
    to_gguf = {hf: g for g, hf in get_gguf_hf_weights_map(
        meta, Processor(config=config.to_dict())).items()}
    writer = GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    for key, field in source.fields.items():
        if key.startswith(("GGUF.", "llama.", "split.")) or key == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        value = field.contents()
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "merges", "token_type")):
            value = {"tokens": tokens, "merges": merges}.get(key.rsplit(".", 1)[1], value[:VOCAB])
        writer.add_key_value(key, value, field.types[0], sub)
    writer.add_block_count(LAYERS)
    writer.add_context_length(2048)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    sizes = {}
    for hf, p in meta.named_parameters():
        name = to_gguf[hf]
        if name in drop or hf == "lm_head.weight":
            continue
        qtype = type_of(name)
        shape = tuple(p.shape)
        if name.endswith(".bias"):
            data = (0.5 * rng.standard_normal(shape)).astype(np.float32)
        elif len(shape) == 1:
            data = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif qtype in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"):
            data = random_blocks(qtype, shape[0], shape[1], 2e-4 if "K" in qtype else 2e-3, rng)
        else:
            w = (0.05 * rng.standard_normal(shape)).astype(np.float32)
            if arch == "llama" and hf.endswith(("q_proj.weight", "k_proj.weight")):
                w = _permute(w, HEADS if "q_proj" in hf else KV_HEADS)
            data = quants.quantize(w, GGMLQuantizationType[qtype]) if qtype != "F32" else w
        writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType[qtype])
        sizes[name] = data.nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sizes


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    sizes = write_gguf(folder / "tiny.gguf")
    return folder / "tiny.gguf", sizes


@pytest.fixture(autouse=True)
def own_cache(request, tmp_path_factory, monkeypatch):
    """The metadata of the test's own GGUF files is cached in a temporary folder (the shipped
    model's in the user's cache, as in use)."""
    if "shipped" not in request.node.name:
        monkeypatch.setenv("SPECEXEC_HOME", str(tmp_path_factory.getbasetemp() / "specexec-home"))


def _load(spec, offload="always", gpu_memory=None):
    from specexec_app.loading.session import _load_target
    from specexec_app.loading.sources import resolve

    return _load_target(resolve(spec), CPU, offload, None, gpu_memory, lambda _: None, None, 0,
                        False, 256, 8)


def _resident(path):
    """The same file loaded whole by transformers (the `gguf` package's numpy dequantizers)."""
    from specexec_app.loading.hf import load_model
    from specexec_app.loading.sources import ModelSource

    return load_model(ModelSource(str(path), str(path.parent), path.name), CPU)


PROMPT = list(range(300, 340))  # (tree_batch's ids are below 1024 too)


def logits(model):
    return forward_tree(model, TokenCache(), PROMPT, tree_batch())


@pytest.mark.parametrize("offload", ["always", "disk", "never"])
def test_gguf_streams_its_blocks_and_computes_the_resident_model(tiny_gguf, offload):
    """A GGUF model's decoder layers stay in their blocks (Q2_K..Q8_0, IQ4_XS, mixed per layer
    as in a Q4_K_M file), streamed from RAM or from the file itself, or resident and packed; the
    logits are those of the model transformers dequantizes whole; the bytes that cross per pass
    are the GGUF tensor bytes of the layers."""
    path, sizes = tiny_gguf
    model, offloaded = _load(str(path), offload)
    assert offloaded.placement.weights.startswith("GGUF")
    layer_bytes = sum(n for name, n in sizes.items() if name.startswith("blk."))
    if offload == "never":
        # Resident in a CPU's RAM: the blocks the packed kernels take compute there (bf16
        # activations: tests/test_cpu_kernels.py), the others go through the workspace.
        from offload.kernels import KernelLinear

        kinds = {type(m).__name__ for m in model.model.layers.modules()}
        assert {"KernelLinear", "PackedLinear"} <= kinds, kinds
        assert offloaded.streamer is None and offloaded.workspace is not None
        want = logits(_resident(path))
        torch.testing.assert_close(logits(model), want, rtol=0, atol=0.02 * want.abs().max().item())
        assert isinstance(model.lm_head, KernelLinear)
        return
    # Streamed layers dequantize to float32 (the subject here); the head computes on the CPU's
    # packed kernels, so the reference gets the same head module.
    reference = _resident(path)
    reference.lm_head = model.lm_head
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)
    assert offloaded.placement.streamed_layers == LAYERS
    before = offloaded.streamer.bytes_streamed
    logits(model)
    crossed = offloaded.streamer.bytes_streamed - before
    aligned = sum(-(-n // 64) * 64 for name, n in sizes.items() if name.startswith("blk."))
    # Every layer's GGUF tensors as they are (each at a 64-byte boundary), read again each pass
    # but for what a device buffer still holds from the last one (3 layers, 2 buffers).
    assert layer_bytes <= offloaded.streamed_bytes_per_pass == aligned < layer_bytes + 64 * 30
    assert (0 < crossed <= aligned) if offload == "disk" else crossed == 0  # a CPU reads RAM in place


def assert_drafted_greedy_is_its_own(model, prompt: list[int], new: int = 40) -> None:
    """Greedy SpecExec (n-gram trees of 4) over `prompt` gives the model's own one-token greedy,
    `new` tokens (no stop token), and the trees paid: fewer passes."""
    from drafts import NgramDrafter
    from drafts.chain import NoDraft
    from specexec_app.config.settings import DecodeSettings
    from specexec_app.core import engine
    from specexec_app.core.lm import Target

    class Tok:
        def decode(self, ids, **kw):
            return ""

    replies = []
    for drafter, budget in ((NoDraft(), 1), (NgramDrafter(min_ngram=1), 4)):
        done = list(engine.generate(Target(model), drafter, prompt,
                                    DecodeSettings(budget=budget, max_new_tokens=new), Tok(), set()))[-1]
        replies.append((done.token_ids, done.stats.target_passes))
    assert replies[1][0] == replies[0][0] and len(replies[0][0]) == new
    assert replies[1][1] < replies[0][1]  # drafted tokens were accepted


def test_a_qwen2_gguf_computes_on_the_kernels_with_its_biases_through_the_lean_forward(tmp_path):
    """A Qwen2 GGUF (Llama's layers with biases on q, k and v; Q4_0 matrices, a Q8_0 embedding)
    resident on a CPU: its matrices compute on the packed kernels, q, k and v fused with their
    biases, through the lean forward; its logits follow the model transformers dequantizes whole
    (within the rounding of bf16 activations); greedy SpecExec is its own one-token greedy."""
    path = tmp_path / "qwen2.gguf"
    write_gguf(path, arch="qwen2", type_of=lambda name: "F32" if name.endswith(
        ("norm.weight", ".bias")) else "Q8_0" if name == "token_embd.weight" else "Q4_0")
    model, _ = _load(str(path), "never")
    assert model.config.model_type == "qwen2" and getattr(model, "rows_alone", False)
    assert model.model.layers[0].self_attn.q_proj._refs[0].linear.bias is not None
    want = logits(_resident(path))
    torch.testing.assert_close(logits(model), want, rtol=0, atol=0.02 * want.abs().max().item())
    assert_drafted_greedy_is_its_own(model, [300, 301, 302, 303, 304] * 6)


def test_a_split_gguf_loads_from_any_part_or_its_folder_and_a_missing_part_is_named(tmp_path,
                                                                                    tiny_gguf):
    """`NAME-00001-of-0000N.gguf`: loaded as one model from its first part, another part, or the
    folder; a missing part is a one-line error naming it, never a model with random layers."""
    from specexec_app.loading.sources import resolve

    write_gguf(tmp_path / "split.gguf", split_max_tensors=12)
    parts = sorted(tmp_path.glob("split-*-of-*.gguf"))
    assert len(parts) >= 3
    want = logits(_load(str(tiny_gguf[0]))[0])
    for spec in (parts[0], parts[1], tmp_path):
        assert resolve(str(spec)).gguf_file == parts[0].name
    torch.testing.assert_close(logits(_load(str(tmp_path))[0]), want, rtol=0, atol=0)
    parts[-1].unlink()
    with pytest.raises(UserError, match=f"{parts[-1].name} is missing") as e:
        _load(str(parts[0]))
    assert "\n" not in str(e.value)


def test_a_gguf_lacking_a_tensor_is_refused(tmp_path, tiny_gguf):
    """Any tensor the architecture needs and the file lacks is a one-line error naming it."""
    write_gguf(tmp_path / "holed.gguf", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(UserError, match=r"lacks the tensor blk\.1\.ffn_up\.weight "
                                        r"\(model\.layers\.1\.mlp\.up_proj\.weight\)"):
        _load(str(tmp_path / "holed.gguf"))


def test_an_ollama_store_resolves_name_and_tag_and_blobs_load(tmp_path, tiny_gguf, monkeypatch):
    """`name:tag` goes through the Ollama store's manifest to its model blob (a GGUF file named
    sha256-...), which also loads when named directly; the config and tokenizer are read from
    the GGUF metadata once and cached."""
    import hashlib

    from specexec_app.loading.sources import gguf_meta_dir, list_ollama, resolve

    path, _ = tiny_gguf
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    store = tmp_path / "ollama"
    (store / "blobs").mkdir(parents=True)
    blob = store / "blobs" / f"sha256-{digest}"
    blob.symlink_to(path)
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "q4"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [
        {"mediaType": "application/vnd.ollama.image.license", "digest": "sha256:0"},
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}"}]}))
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    src = resolve("tiny:q4")
    assert src.gguf_path == blob
    assert list_ollama() == [("tiny:q4", blob)]
    assert resolve(str(blob)).gguf_path == blob
    with pytest.raises(UserError, match="model not found: tiny:q8"):
        resolve("tiny:q8")
    meta = gguf_meta_dir(src)
    assert (meta / "tokenizer_config.json").is_file()
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: pytest.fail("the cached tokenizer was built again"))
    assert gguf_meta_dir(src) == meta
    torch.testing.assert_close(logits(_load("tiny:q4")[0]), logits(_load(str(path))[0]))


def test_the_shipped_gguf_streams_exact_and_greedy_specexec_equals_its_greedy(tokenizer):
    """SmolLM2 Q4_1 straight from its GGUF with --offload always: the logits of the resident
    model (transformers' dequant), and greedy SpecExec gives the target's own greedy tokens."""
    from drafts import NgramDrafter
    from specexec_app.config.settings import DecodeSettings
    from specexec_app.core import engine
    from specexec_app.core.lm import Target
    from specexec_app.loading.sources import smollm2_gguf

    path = smollm2_gguf()
    model, offloaded = _load(str(path))
    assert offloaded.placement.streamed_layers == 30 and offloaded.placement.weights == "GGUF Q4_1"
    reference = _resident(path)
    reference.lm_head = model.lm_head  # the Q8_0 head on the CPU's packed kernels in both
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=0)
    ids = tokenizer("The capital of France is Paris. The capital of France is").input_ids
    with torch.no_grad():
        want = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    done = list(engine.generate(Target(model, offloaded=offloaded), NgramDrafter(min_ngram=1), ids,
                                DecodeSettings(budget=8, max_new_tokens=6), tokenizer, set()))[-1]
    assert done.token_ids == want


# --- Hugging Face checkpoints saved quantized: bitsandbytes 4-bit, GPTQ, AWQ ---

def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=2, vocab_size=512,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


TOKENS = list(range(10, 50))


def tiny_logits(model):
    return forward_tree(model, TokenCache(), TOKENS, tree_batch())


def _offloaded(folder, offload="always", quant=16):
    from offload.loader import load_offloaded

    return load_offloaded(folder, CPU, quant, offload, None, 0, torch.float32)


@pytest.mark.parametrize("quant_type, nested", [("nf4", True), ("fp4", False)])
def test_a_bitsandbytes_4bit_checkpoint_streams_its_packed_weights(tmp_path, quant_type, nested):
    """A `-bnb-4bit` checkpoint (made here by transformers + bitsandbytes on the CPU, saved with
    save_pretrained) streams its packed weights and quant state as they are: each matrix
    dequantizes bit-exact to bitsandbytes' own, and the logits are those of the model with the
    weights bitsandbytes dequantizes, resident (bitsandbytes' own CPU matmul rounds otherwise)."""
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = tiny_llama()
    model.save_pretrained(tmp_path / "fp32")
    bnb = AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp32", dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                               bnb_4bit_use_double_quant=nested,
                                               bnb_4bit_compute_dtype=torch.float32)).eval()
    bnb.save_pretrained(tmp_path / "bnb")
    reference = tiny_llama()
    for (name, module), (_, q) in zip(reference.named_modules(), bnb.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            module.weight.data = bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state)
    for offload in ("always", "disk"):
        offloaded = _offloaded(tmp_path / "bnb", offload)
        assert offloaded.placement.weights == f"bnb {quant_type}"
        layer = offloaded.model.model.layers[1]
        ours = layer.template.mlp.down_proj if hasattr(layer, "template") else layer.mlp.down_proj
        weight = bnb.model.layers[1].mlp.down_proj.weight
        want = bnbf.dequantize_4bit(weight.data, weight.quant_state)
        from offload.store import materialize

        got = materialize(ours.entry, offloaded.streamer.layers[1].buffer) if offload == "always" \
            else None
        if got is not None:
            assert torch.equal(got, want)
        torch.testing.assert_close(tiny_logits(offloaded.model), tiny_logits(reference),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match=r"already quantized \(bnb .*\); --quant 4 does not apply"):
        _offloaded(tmp_path / "bnb", quant=4)


def _pack_rows(q: torch.Tensor) -> torch.Tensor:
    """[8 k, n] values 0..15 -> [k, n] int32, value 8 r + j in bits 4 j of word r."""
    q = q.to(torch.int64).view(-1, 8, q.shape[1])
    words = sum(q[:, j] << (4 * j) for j in range(8))
    return torch.from_numpy(words.numpy().astype(np.uint32).view(np.int32))


def _pack_cols(q: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """[n, 8 k] values -> [n, k] int32: bits 4 p of word c hold column 8 c + order[p]."""
    q = q.to(torch.int64).view(q.shape[0], -1, 8)
    words = sum(q[:, :, order[p]] << (4 * p) for p in range(8))
    return torch.from_numpy(words.numpy().astype(np.uint32).view(np.int32))


def write_int4(folder, method: str, group: int = 32):
    """A tiny Llama whose Linear weights are GPTQ (act-order g_idx, asymmetric zeros stored minus
    one, as auto-gptq v1 writes them) or AWQ GEMM (AWQ's nibble order) tensors built from known
    integers; returns the same model with the weights the format's formula gives, dense."""
    from safetensors.torch import save_file

    model = tiny_llama(1)
    gen = torch.Generator().manual_seed(2)
    tensors = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        out_f, in_f = module.weight.shape
        groups = in_f // group
        q = torch.randint(0, 16, (out_f, in_f), generator=gen)
        z = torch.randint(1, 16, (groups, out_f), generator=gen)
        s = (torch.rand(groups, out_f, generator=gen) * 0.02 + 0.001).half()
        if method == "gptq":
            g_idx = (torch.randperm(in_f, generator=gen) // group).int()  # act-order
            w = (q - z[g_idx.long()].t()).float() * s.float()[g_idx.long()].t()
            tensors.update({f"{name}.qweight": _pack_rows(q.t()), f"{name}.g_idx": g_idx,
                            f"{name}.qzeros": _pack_cols(z - 1), f"{name}.scales": s})
        else:
            g = torch.arange(in_f) // group
            w = (q - z[g].t()).float() * s.float()[g].t()
            order = (0, 2, 4, 6, 1, 3, 5, 7)
            tensors.update({f"{name}.qweight": _pack_cols(q.t(), order),
                            f"{name}.qzeros": _pack_cols(z, order), f"{name}.scales": s})
        module.weight.data = w
    tensors.update({k: v.contiguous() for k, v in model.state_dict().items()
                    if not any(k == f"{n}.weight" for n, m in model.named_modules()
                               if isinstance(m, torch.nn.Linear) and n != "lm_head")})
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = (
        {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": True, "sym": False,
         "checkpoint_format": "gptq"} if method == "gptq" else
        {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"})
    (folder / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_and_awq_checkpoints_stream_packed_and_follow_the_formula(tmp_path, method):
    """GPTQ (act-order, asymmetric, v1 zeros) and AWQ (GEMM) checkpoints written from known
    integers load (no optimum/auto-gptq/autoawq), stream qweight/qzeros/scales as they are, from
    RAM or disk, and compute the model whose weights are the format's formula; another layout is
    a one-line error naming it."""
    want_model = write_int4(tmp_path / method, method)
    want = tiny_logits(want_model)
    for offload in ("always", "disk"):
        offloaded = _offloaded(tmp_path / method, offload)
        assert offloaded.placement.weights == f"{method.upper()} 4-bit"
        entries = offloaded.streamer.layers[0].entries
        assert {e.kind for e in entries if e.name.endswith("proj.weight")} == {method}
        torch.testing.assert_close(tiny_logits(offloaded.model), want, rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / method / "config.json").read_text())
    config["quantization_config"].update(bits=3) if method == "gptq" else \
        config["quantization_config"].update(version="gemv")
    (tmp_path / method / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="not supported \\(supported: bitsandbytes 4-bit"):
        _offloaded(tmp_path / method)


def test_parameters_are_counted_from_the_checkpoint_whatever_its_format(tmp_path, tiny_gguf):
    """The profile and the draft sizing count a GGUF model's parameters from its header (was 0),
    and a bitsandbytes or GPTQ checkpoint's as the model has them (not its packed bytes)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from specexec_app.loading.checkpoint import count_params

    path, _ = tiny_gguf
    embed = VOCAB * HIDDEN
    layer = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * HIDDEN // HEADS * KV_HEADS + 3 * HIDDEN * INTER + 2 * HIDDEN
    assert count_params(path.parent, path.name) == embed + LAYERS * layer + HIDDEN
    model = tiny_llama()
    want = sum(p.numel() for p in model.parameters())
    write_int4(tmp_path / "gptq", "gptq")
    assert count_params(tmp_path / "gptq") == want
    model.save_pretrained(tmp_path / "fp32")
    AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp32", dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True)
    ).save_pretrained(tmp_path / "bnb")
    assert count_params(tmp_path / "bnb") == want
