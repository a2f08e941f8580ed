"""Checks and counts on a safetensors checkpoint, from its headers alone (nothing is loaded)."""

from __future__ import annotations

import json
from pathlib import Path

from offload.shards import read_header
from specexec_app.errors import UserError


def check_checkpoint(folder: Path) -> None:
    """Refuse a missing, truncated or corrupt safetensors shard by name, before loading anything
    (reads only the headers)."""
    index = folder / "model.safetensors.index.json"
    files = sorted(folder.glob("*.safetensors"))
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index} is corrupt ({e})") from e
        missing = sorted(shards - {f.name for f in files})
        if missing:
            raise UserError(f"{folder} lacks the shard{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(missing)} that its index names")
    for f in files:
        read_header(f)


# Tensors of quantized checkpoints that hold no parameters of their own (quant state), and how
# many parameters one stored element of a packed tensor holds.
_STATE = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".qzeros", ".scales",
          ".g_idx", "quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4")


def count_params(folder: Path, gguf_file: str | None = None) -> int:
    """The model's parameters, from headers alone: a GGUF file's tensor shapes (`gguf_file` in
    `folder`, every part of a split one), or a safetensors folder's, where the packed weights
    of a bitsandbytes 4-bit checkpoint count two parameters a byte and GPTQ/AWQ `qweight` eight
    an int32, and quant state counts none."""
    if gguf_file:
        from offload.gguf import GGUFModel

        total = 0
        for _, _, _, _, shape in GGUFModel(Path(folder) / gguf_file).tensors.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        header = read_header(path)[0]
        for name, t in header.items():
            if name.endswith(_STATE):
                continue
            n = 1
            for d in t["shape"]:
                n *= d
            if name.endswith(".qweight"):
                n *= 8
            elif t["dtype"] == "U8" and f"{name}.absmax" in header:
                n *= 2
            total += n
    return total


def _config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}
