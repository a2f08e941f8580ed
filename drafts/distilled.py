"""A distilled draft: a few decoder layers of the target's own shape that share the target's
embedding and LM head (so only the layers are stored: a 2-layer draft of SmolLM2-135M is 14 MB).

On disk a distilled draft is a folder with `config.json` (the target's config, fewer layers),
`model.safetensors` (its own weights only), the tokenizer, and `specexec_draft.json` naming the
shared tensors and a probe of the target's embedding, so that it is never paired with another
target by mistake.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from specexec_app.errors import UserError

META_FILE = "specexec_draft.json"
PROBE_ROWS, PROBE_COLS = 16, 8


def is_distilled(folder: str | Path) -> bool:
    return (Path(folder) / META_FILE).is_file()


def made_for(folder: str | Path, model) -> bool:
    """Whether the distilled draft in `folder` was made for `model` (by its embedding probe)."""
    try:
        return probe_matches(model, json.loads((Path(folder) / META_FILE).read_text())["target_probe"])
    except (OSError, ValueError, KeyError):
        return False


def _embedding(model) -> nn.Embedding:
    return model.get_input_embeddings()


def _rows(model, rows: list[int]) -> torch.Tensor:
    """Rows of the input embedding (float32, on the CPU), looked up as the model does (a packed
    table, GGUF blocks, dequantizes the rows asked for)."""
    embed = _embedding(model)
    if isinstance(embed, nn.Embedding):
        return embed.weight.detach()[rows].float().cpu()
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    with torch.inference_mode():
        return embed(torch.tensor(rows, device=device)).float().cpu()


def _shape(model) -> list[int]:
    embed = _embedding(model)
    return [embed.num_embeddings, embed.embedding_dim]


def embedding_probe(model) -> dict:
    """A few values of the target's input embedding, spread over the vocabulary."""
    n = _shape(model)[0]
    rows = [round(i * (n - 1) / (PROBE_ROWS - 1)) for i in range(PROBE_ROWS)]
    return {"shape": _shape(model), "rows": rows,
            "values": _rows(model, rows)[:, :PROBE_COLS].tolist()}


def probe_matches(model, probe: dict) -> bool:
    if _shape(model) != probe["shape"]:
        return False
    got = _rows(model, probe["rows"])[:, :PROBE_COLS]
    return torch.allclose(got, torch.tensor(probe["values"]), rtol=1e-2, atol=1e-3)


def _plain(module: nn.Module) -> bool:
    """A layer whose weights are real tensors here (not streamed, not quantized, not in the CPU
    kernels' packed form)."""
    return all(p.device.type != "meta" and p.dtype.is_floating_point for p in module.parameters()) \
        and set(module.state_dict()) == {name for name, _ in module.named_parameters()}


def check_layers(target, n_layers: int) -> None:
    n_target = target.config.num_hidden_layers
    if not 1 <= n_layers < n_target:
        raise UserError(f"--layers must be between 1 and {n_target - 1} for this target "
                        f"(got {n_layers})")


def make_draft(target, n_layers: int, device: torch.device, dtype: torch.dtype = torch.float32):
    """A draft of `n_layers` decoder layers initialized from the target's first layers (random
    where a target layer is streamed or quantized), with the target's final norm, sharing
    the target's embedding and LM head. Returns (draft, the target layers it started from)."""
    from transformers import AutoModelForCausalLM

    check_layers(target, n_layers)
    cfg = copy.deepcopy(target.config)
    cfg.num_hidden_layers = n_layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:n_layers]
    cfg.use_cache = True
    vocab, cfg.vocab_size = cfg.vocab_size, 8  # built with a stub vocabulary: the target's is shared
    draft = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device)
    draft.config.vocab_size = vocab
    # The first layers start best: on SmolLM2-135M a copy of layers 0-1 agrees with the target on
    # 4 % of held-out tokens, layers 0 and 29 on none (the last layer expects 28 layers before it).
    init = list(range(n_layers))
    started_from = []
    for layer, i in zip(draft.model.layers, init):
        source = target.model.layers[i]
        if _plain(source):
            layer.load_state_dict({k: v.to(device, dtype) for k, v in source.state_dict().items()})
            started_from.append(i)
    draft.model.norm.load_state_dict({k: v.to(device, dtype)
                                      for k, v in target.model.norm.state_dict().items()})
    share(draft, target, device, dtype)
    return draft, started_from


def share(draft, target, device: torch.device, dtype: torch.dtype) -> None:
    """Give `draft` the target's embedding and LM head: the same tensors when device and dtype
    agree, else a copy; a packed one (GGUF blocks, the CPU's packed kernels) is the same module,
    on the target's device only. They are never trained."""
    for get, set_ in ((lambda m: m.get_input_embeddings(), lambda m, x: m.set_input_embeddings(x)),
                      (lambda m: m.get_output_embeddings(), lambda m, x: m.set_output_embeddings(x))):
        module = get(target)
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point:
            on = {b.device for b in module.buffers()} | {p.device for p in module.parameters()}
            if on and on != {torch.device(device)}:
                raise UserError("a distilled draft shares the target's packed embedding and head, "
                                f"so it runs where the target does ({next(iter(on))}), not on {device}")
            module.requires_grad_(False)
            set_(draft, module)
            continue
        if w.device != device or w.dtype != dtype:
            module = copy.deepcopy(module).to(device, dtype)
        module.requires_grad_(False)
        set_(draft, module)
    draft.config.tie_word_embeddings = False  # the head is shared by reference, not tied


def own_state(draft) -> dict[str, torch.Tensor]:
    """The draft's own weights: everything but the shared embedding and head."""
    shared = {id(draft.get_input_embeddings().weight), id(draft.get_output_embeddings().weight)}
    return {name: p for name, p in draft.named_parameters() if id(p) not in shared}


def save_draft(draft, folder: Path, target_model, target_name: str, tokenizer,
               extra: dict | None = None) -> None:
    """Write the draft's own weights (fp16), config, tokenizer and the sharing metadata."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(draft.config)
    cfg.tie_word_embeddings = getattr(target_model.config, "tie_word_embeddings", False)
    cfg.dtype = "float16"
    cfg.save_pretrained(folder)
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in own_state(draft).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    meta = {"format": 1, "kind": "distilled", "target": target_name,
            "shared": ["input embedding", "LM head"], "target_probe": embedding_probe(target_model)}
    (folder / META_FILE).write_text(json.dumps(meta | (extra or {}), indent=1) + "\n")


def load_draft(folder: str | Path, target_model, device: torch.device,
               dtype: torch.dtype | None = None):
    """A distilled draft from `folder`, sharing `target_model`'s embedding and head."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    try:
        meta = json.loads((folder / META_FILE).read_text())
        probe = meta["target_probe"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{folder / META_FILE} is corrupt ({e})") from e
    if not probe_matches(target_model, probe):
        raise UserError(f"the draft in {folder} was distilled for {meta.get('target', 'another model')}, "
                        "not for this target: their embeddings differ")
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    try:
        cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
        cfg.tie_word_embeddings = False
        weights = load_file(str(folder / "model.safetensors"))
    except Exception as e:  # noqa: BLE001 - truncated or corrupt files
        raise UserError(f"cannot load the draft in {folder}: {str(e).splitlines()[0][:300]}") from e
    with torch.device("meta"):
        draft = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    # Embedding and head come from the target; the rest from the file (rotary tables rebuilt).
    draft.model.embed_tokens = nn.Embedding(1, 1, device="meta")
    draft.lm_head = nn.Linear(1, 1, bias=False, device="meta")
    own = {k for k, _ in draft.named_parameters()} - {"model.embed_tokens.weight", "lm_head.weight"}
    if set(weights) != own:
        missing, extra = sorted(own - set(weights)), sorted(set(weights) - own)
        raise UserError(f"the draft in {folder} does not match its config.json "
                        f"(missing {missing[:3]}, unexpected {extra[:3]})")
    draft.load_state_dict({k: v.to(device, dtype) for k, v in weights.items()}, strict=False,
                          assign=True)
    draft.model.rotary_emb = type(draft.model.rotary_emb)(config=cfg).to(device)
    share(draft, target_model, device, dtype)
    return draft.eval()
