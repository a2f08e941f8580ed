"""Typed settings: the one place where options and config files become validated values."""

from __future__ import annotations

import re
from dataclasses import dataclass

from specexec_app.errors import UserError


@dataclass
class DecodeSettings:
    budget: int = 32             # draft tree nodes verified per target pass
    temperature: float = 0.0     # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None
    overlap: bool = False        # draft the next tree while the target verifies this one

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise UserError(f"--budget must be at least 1 (got {self.budget})")
        if self.temperature < 0:
            raise UserError(f"--temperature must be 0 or more (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
          "tib": 2**40}


def parse_size(text: str) -> int:
    """'24GiB', '12 GB', '512MiB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"cannot read the size {text!r}; write it like 24GiB or 12GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
