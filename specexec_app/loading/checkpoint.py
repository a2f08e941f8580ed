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


def count_params(folder: Path) -> int:
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        for t in read_header(path)[0].values():
            n = 1
            for d in t["shape"]:
                n *= d
            total += n
    return total


def _config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}
