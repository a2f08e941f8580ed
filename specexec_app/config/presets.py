"""Named model pairs from configs/presets.toml."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from specexec_app.errors import UserError
from specexec_app.paths import CONFIGS

PRESETS_FILE = CONFIGS / "presets.toml"


@dataclass(frozen=True)
class Preset:
    name: str
    target: str
    draft: str
    budget: int
    description: str = ""
    cpu_budget: int | None = None  # the budget where the target computes on a CPU, if another

    def budget_on(self, device: str) -> int:
        """The budget for a target computing on `device` ("cpu" or "cuda")."""
        return self.cpu_budget if device == "cpu" and self.cpu_budget else self.budget


def load_presets(path: Path = PRESETS_FILE) -> dict[str, Preset]:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"cannot read presets {path}: {e}") from e
    try:
        return {name: Preset(name=name, **fields) for name, fields in raw.items()}
    except TypeError as e:
        raise UserError(f"bad preset in {path}: {e}") from e


def get_preset(name: str) -> Preset | None:
    return load_presets().get(name)
