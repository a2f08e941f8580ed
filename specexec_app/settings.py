"""Typed settings: the one place where options and config files become validated values."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError


@dataclass
class DecodeSettings:
    budget: int = 32             # draft tree nodes verified per target pass
    temperature: float = 0.0     # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise UserError(f"--budget must be at least 1 (got {self.budget})")
        if self.temperature < 0:
            raise UserError(f"--temperature must be 0 or more (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
