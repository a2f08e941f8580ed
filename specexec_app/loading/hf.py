"""Hugging Face models and tokenizers, loaded offline, and the checks that pair a draft with a target."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from specexec_app.errors import UserError

from .checkpoint import _config, check_checkpoint, count_params
from .sources import ModelSource, Status, _quiet, gguf_meta_dir


# Files a tokenizer is read from (one is enough): transformers' fast and slow formats.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json",
                   "spiece.model", "spm.model", "sentencepiece.bpe.model", "tekken.json",
                   "tokenizer.tiktoken", "qwen.tiktoken")


WEIGHTLESS = ("ngram", "none")  # drafts with no model: prompt lookup, and none (one token a pass)

def _first_line(e: BaseException) -> str:
    """An exception's message on one line: its first, and the lines a first ending in ':'
    announces (transformers lists what it looked for there)."""
    lines = [line.strip() for line in (str(e).strip() or type(e).__name__).splitlines()]
    text = lines[0]
    if text.endswith(":"):
        text += " " + " ".join(line for line in lines[1:] if line)
    return text[:300]


def load_tokenizer(src: ModelSource, trust_remote_code: bool = False, status: Status = _quiet):
    """The tokenizer of a model; a GGUF file's from the folder its metadata was converted to once
    (`sources.gguf_meta_dir`: building it from the GGUF takes seconds on every start)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a GGUF's tokenizer draws a bar that fights our spinner
    folder = gguf_meta_dir(src, status) if src.gguf_file else src.path
    if not any((Path(folder) / name).exists() for name in TOKENIZER_FILES):
        raise UserError(f"cannot load the tokenizer of {src.name}: the folder has none of "
                        f"{', '.join(TOKENIZER_FILES)}")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                             trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot load the tokenizer of {src.name}: {_first_line(e)}") from e



def draft_gpu_bytes(draft: str, src: ModelSource, dsrc: ModelSource | None, tokens: int = 0) -> int:
    """The device memory a draft will take, from checkpoint headers, before anything loads:
    a self-draft is the target's weights at 8 or 4 bits with its embedding and head kept at 16
    bits (as bitsandbytes leaves them); a model draft its own weights at 16 bits (a distilled
    one stores only its layers and shares the target's embedding and head); and, in 16 bits,
    its KV cache over `tokens` positions (the context and the trees it grows)."""
    from types import SimpleNamespace

    from offload.model import kv_cache_bytes

    if draft in WEIGHTLESS:
        return 0
    cfg = _config(Path((dsrc or src).path))
    try:
        kv = kv_cache_bytes(SimpleNamespace(**cfg), tokens, torch.bfloat16)
    except (AttributeError, TypeError):  # no config.json (a GGUF file): its weights alone
        kv = 0
    if dsrc is not None:
        return 2 * count_params(Path(dsrc.path), dsrc.gguf_file) + kv
    params = count_params(Path(src.path), src.gguf_file)
    try:
        embed = cfg["vocab_size"] * cfg["hidden_size"] * (1 if cfg.get("tie_word_embeddings") else 2)
    except KeyError:
        embed = 0
    bits = 8 if draft == "self-int8" else 4
    return int(max(0, params - embed) * bits / 8 * 1.05 + embed * 2) + kv


def load_model(src: ModelSource, device: torch.device, dtype: torch.dtype | None = None,
               quant: str | None = None, trust_remote_code: bool = False):
    """A causal LM in eval mode; `quant` "int8" or "nf4" quantizes it with bitsandbytes."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    kwargs: dict = dict(dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code,
                        attn_implementation="sdpa")
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    if quant:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True) if quant == "int8" else
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=dtype))
        kwargs["device_map"] = {"": device}
    if not src.gguf_file and Path(src.path).is_dir():
        from offload.packed import is_packed

        if is_packed(src.path):
            raise UserError(f"{src.name} is a packed checkpoint (specexec quantize): it loads only "
                            "as a target; a self-draft or draft needs the original checkpoint")
        check_checkpoint(Path(src.path))
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
    except Exception as e:  # noqa: BLE001 - corrupt files, wrong formats, missing pieces
        raise UserError(f"cannot load model {src.name}: {_first_line(e)}") from e
    if not quant:
        model.to(device)
    return model.eval()


def truncated_copy(model, n_layers: int):
    """A draft made of the model's first `n_layers` decoder layers (shares no storage)."""
    draft = copy.deepcopy(model)
    draft.model.layers = draft.model.layers[:n_layers]
    draft.config.num_hidden_layers = n_layers
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = draft.config.layer_types[:n_layers]
    return draft


def check_same_tokenizer(target_tok, draft_tok) -> None:
    """Refuse a draft whose token ids mean something else than the target's."""
    tv, dv = target_tok.get_vocab(), draft_tok.get_vocab()
    if tv == dv:
        return
    differ = sum(1 for tok, i in tv.items() if dv.get(tok) != i) + len(dv.keys() - tv.keys())
    raise UserError(f"the draft and target tokenizers differ ({differ} of {len(tv)} tokens do "
                    "not match): the draft must share the target's tokenizer")


def stop_ids(tokenizer, model) -> set[int]:
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids
