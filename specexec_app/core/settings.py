"""The decoding settings and the checks every setting goes through (`config.settings` resolves
command line, profile and presets into these)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from specexec_app.errors import UserError

MAX_BUDGET = 16384          # draft tree nodes: SpecExec's trees stay within a few thousand
MAX_TEMPERATURE = 100.0
MIN_TEMPERATURE = 1e-5      # below it (vLLM's sampling epsilon) logits / T overflow float32
MAX_NEW_TOKENS = 1 << 20
MAX_CONTEXT = 1 << 22
SEED_LIMIT = 1 << 63        # torch's generator takes a signed 64-bit seed
DEFAULT_BUDGET = 32


def _number(value, name: str, kind: type = int) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (kind is int and not float(value).is_integer()):
        raise UserError(f"{name} takes a {'whole ' if kind is int else ''}number (got {value!r})")
    if not math.isfinite(value):
        raise UserError(f"{name} must be a finite number (got {value})")
    return int(value) if kind is int else float(value)


def check_range(value, name: str, low, high, kind: type = int, open_low: bool = False):
    """`value` as `kind`, within [low, high] ((low, high] with `open_low`), else a one-line error."""
    v = _number(value, name, kind)
    fmt = (lambda x: f"{x:g}") if kind is float else str
    if open_low and not low < v <= high:
        raise UserError(f"{name} must be in ({fmt(low)}, {fmt(high)}] (got {value})")
    if v < low:
        more = "0 or more" if low == 0 else f"at least {fmt(low)}"
        raise UserError(f"{name} must be {more} (got {value})")
    if v > high:
        raise UserError(f"{name} must be at most {fmt(high)} (got {value})")
    return v


def check_choice(value, name: str, choices: tuple):
    if value not in choices:
        raise UserError(f"{name} must be {', '.join(map(str, choices[:-1]))} or {choices[-1]} "
                        f"(got {value!r})")
    return value


@dataclass(frozen=True)
class DecodeSettings:
    budget: int = DEFAULT_BUDGET  # draft tree nodes verified per target pass
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None
    overlap: bool = False         # draft the next tree while the target verifies this one

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen: normalise once
        set_("budget", check_range(self.budget, "--budget", 1, MAX_BUDGET))
        set_("temperature", check_range(self.temperature, "--temperature", 0, MAX_TEMPERATURE,
                                        float))
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise UserError(f"--temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g} "
                            f"(got {self.temperature})")
        set_("top_p", check_range(self.top_p, "--top-p", 0, 1, float, open_low=True))
        set_("max_new_tokens", check_range(self.max_new_tokens, "--max-new-tokens", 1,
                                           MAX_NEW_TOKENS))
        if self.seed is not None:
            set_("seed", check_range(self.seed, "--seed", 0, SEED_LIMIT - 1))
        if not isinstance(self.overlap, bool):
            raise UserError(f"overlap must be true or false (got {self.overlap!r})")
