"""Pre-quantized checkpoints: a target's decoder layers saved as the packed buffers the streamer
moves (`specexec quantize`), so loading reads each layer straight into its (pinned) host buffer,
with no quantization and no full-precision copy.

A packed folder holds the target's config, generation config and tokenizer, `model.safetensors`
with everything outside the decoder layers (16-bit), `layers/NNNNN.bin` (one raw packed buffer
per layer) and `specexec_packed.json` (the quantization, the dtype and each layer's layout).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from specexec_app.errors import UserError

from .shards import ShardReader
from .store import DiskLayer, Entry, PackedLayer, host_buffer, pack_layer

META_FILE = "specexec_packed.json"
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.int8: "int8", torch.uint8: "uint8"}
_NAMED = {v: k for k, v in _DTYPE_NAMES.items()}


def is_packed(folder: str | Path) -> bool:
    return (Path(folder) / META_FILE).is_file()


def _entry_json(e: Entry) -> dict:
    return {"name": e.name, "shape": list(e.shape), "dtype": _DTYPE_NAMES[e.dtype], "kind": e.kind,
            "parts": [[off, nb, _DTYPE_NAMES[dt], list(sh)] for off, nb, dt, sh in e.parts],
            "meta": list(e.meta)}


def _entry(d: dict) -> Entry:
    return Entry(d["name"], tuple(d["shape"]), _NAMED[d["dtype"]], d["kind"],
                 tuple((off, nb, _NAMED[dt], tuple(sh)) for off, nb, dt, sh in d["parts"]),
                 tuple(d.get("meta", ())))


def save_packed(src: Path, out: Path, quant: int, dtype: torch.dtype,
                progress: Callable[[int, int], None] | None = None,
                trust_remote_code: bool = False) -> None:
    """Read the safetensors checkpoint in `src` layer by layer and write it packed to `out`."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM


    if quant not in (4, 8):
        raise UserError(f"--quant must be 8 or 4 for a packed checkpoint (got {quant})")
    if is_packed(src):
        raise UserError(f"{src} is already packed; quantize the original checkpoint")
    config = AutoConfig.from_pretrained(src, local_files_only=True,
                                        trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 trust_remote_code=trust_remote_code)
    reader = ShardReader(src)
    try:
        (out / "layers").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to {out}: {e.strerror}") from e
    layers_meta = []
    n = len(model.model.layers)
    try:
        for i, layer in enumerate(model.model.layers):
            for name, _ in layer.named_parameters():
                full = f"model.layers.{i}.{name}"
                if full not in reader:
                    raise UserError(f"{src} lacks the weight {full}")
                set_module_tensor_to_device(layer, name, "cpu", value=reader.get(full), dtype=dtype)
            packed = pack_layer(layer, quant, dtype)
            tmp = out / "layers" / f"{i:05d}.tmp"
            packed.buffer.numpy().tofile(tmp)
            os.replace(tmp, out / "layers" / f"{i:05d}.bin")
            layers_meta.append({"nbytes": packed.nbytes,
                                "entries": [_entry_json(e) for e in packed.entries]})
            layer.to_empty(device="meta")
            if progress:
                progress(i + 1, n)
        rest = {name: reader.get(name).to(dtype).contiguous() for name, _ in model.named_parameters()
                if not name.startswith("model.layers.") and name in reader}
    finally:
        reader.close()
    save_file(rest, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "tokenizer.model"):
        if (src / name).is_file():
            (out / name).write_bytes((src / name).read_bytes())
    meta = {"format": 1, "quant": quant, "dtype": _DTYPE_NAMES[dtype], "layers": layers_meta}
    (out / META_FILE).write_text(json.dumps(meta) + "\n")


class PackedReader:
    """The packed layers of a folder written by `save_packed`."""

    def __init__(self, folder: Path):
        self.folder = folder
        try:
            meta = json.loads((folder / META_FILE).read_text())
            self.quant = meta["quant"]
            self.dtype = _NAMED[meta["dtype"]]
            self.layers = [(m["nbytes"], [_entry(e) for e in m["entries"]]) for m in meta["layers"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{folder / META_FILE} is corrupt ({e})") from e
        for i, (nbytes, _) in enumerate(self.layers):
            path = self._path(i)
            size = path.stat().st_size if path.is_file() else -1
            if size != nbytes:
                what = "is missing" if size < 0 else f"holds {size} of {nbytes} bytes"
                raise UserError(f"{path} {what}; quantize the model again")

    def layout(self) -> tuple[list[Entry], int]:
        """The first layer's entries and the largest layer's bytes (for `plan_placement`)."""
        return self.layers[0][1], max(nbytes for nbytes, _ in self.layers)

    def _path(self, i: int) -> Path:
        return self.folder / "layers" / f"{i:05d}.bin"

    def read(self, i: int, pin: bool = False) -> PackedLayer:
        layer = self.disk_layer(i)
        buffer = host_buffer(layer.nbytes, pin)
        layer.read_into(buffer)
        return PackedLayer(buffer, layer.entries)

    def disk_layer(self, i: int) -> DiskLayer:
        nbytes, entries = self.layers[i]
        return DiskLayer(entries, nbytes, ((str(self._path(i)), 0, nbytes, 0),))
