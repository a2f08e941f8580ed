"""Typed settings: the one place where command-line values, the saved profile and the presets
become validated values. Precedence: command line > profile > preset > default."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from specexec_app.core.settings import (DEFAULT_BUDGET, MAX_BUDGET, MAX_CONTEXT, DecodeSettings,
                                       check_choice, check_range)
from specexec_app.errors import UserError

__all__ = ["DecodeSettings", "LoadSpec", "RunConfig", "check_threads", "parse_size", "resolve"]
QUANTS = (16, 8, 4)
OFFLOADS = ("auto", "always", "disk", "never")
DRAFTERS = ("auto", "gpu", "cpu")


def check_device(name: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", name):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N (got {name!r})")
    return name


def device_kind(name: str) -> str:
    """"cuda" or "cpu": where `--device name` (checked) computes; auto means CUDA where available."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name.startswith("cuda") else "cpu"


def check_threads(threads: int) -> None:
    """CPU threads for the model's math: at least 1, at most twice the machine's (more only slow
    it down)."""
    most = 2 * (os.cpu_count() or 1)
    check_range(threads, "--threads", 1, 1 << 20)
    if threads > most:
        raise UserError(f"--threads {threads} is more than twice the {most // 2} CPU "
                        f"threads of this machine (at most {most})")


@dataclass(frozen=True)
class LoadSpec:
    """What to load and where: the target and draft (after presets) and their placement."""
    target: str = "default"
    draft: str = "ngram"
    device: str = "auto"
    quant: int | None = None       # None: as the checkpoint stores them (GGUF blocks, 16-bit)
    offload: str = "auto"
    gpu_memory: int | None = None  # bytes the target may take; None: what is free
    drafter: str = "auto"
    context: int | None = None     # None: the default context, at most the model's
    budget: int = DEFAULT_BUDGET   # the largest tree the placement keeps memory for
    threads: int | None = None     # CPU threads for the model's math; None: torch's default
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        for name in ("target", "draft"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"--{name} must name a model (got {value!r})")
        check_device(self.device)
        if self.quant is not None:
            check_choice(self.quant, "--quant", QUANTS)
        check_choice(self.offload, "--offload", OFFLOADS)
        check_choice(self.drafter, "--drafter", DRAFTERS)
        check_range(self.budget, "--budget", 1, MAX_BUDGET)
        if self.context is not None:
            check_range(self.context, "--context", 2, MAX_CONTEXT)
        if self.gpu_memory is not None:
            check_range(self.gpu_memory, "--gpu-memory", 1, 1 << 50)
        if self.threads is not None:
            check_threads(self.threads)


@dataclass(frozen=True)
class RunConfig:
    load: LoadSpec
    decode: DecodeSettings
    from_profile: bool = False  # the saved profile's choice filled some values
    sources: dict = field(default_factory=dict)  # setting -> "option", "profile", "preset", "default"


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
          "tib": 2**40}


def parse_size(text: str, name: str = "--gpu-memory") -> int:
    """'24GiB', '12 GB', '512MiB', '1e9' -> bytes (at least 1 byte, at most 1 PiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"cannot read the size {text!r}; write it like 24GiB or 12GB")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not 1 <= value <= 1 << 50:
        raise UserError(f"{name} {text} is not a size between 1 byte and 1 PiB")
    return int(value)


def resolve(given: dict, choice=None, preset_of=None) -> RunConfig:
    """The settings of a run: `given` holds the command line's values (None where an option was
    not given); `choice` the saved profile's choice (a `profile.Choice`, used when it was tuned
    for the same target or none was named); `preset_of(name)` finds a preset. Every value is
    checked here, whichever of them it came from."""
    from .presets import get_preset

    preset_of = preset_of or get_preset
    for key in ("target", "draft"):
        if given.get(key) is not None and not str(given[key]).strip():
            raise UserError(f"--{key} is empty: name a preset, a model folder or a .gguf file")
    if choice is not None and given.get("target") not in (None, choice.target):
        choice = None  # tuned for another target
    sources: dict[str, str] = {}
    name = given.get("target") or (choice.target if choice else None) or "default"
    preset = preset_of(name)
    device = check_device(given.get("device") or "auto")
    if preset:  # the budget for where the target will compute
        preset_values = {"draft": preset.draft, "budget": preset.budget_on(device_kind(device))}
    else:
        preset_values = {}

    def pick(key: str, default):
        for where, value in (("option", given.get(key)),
                             ("profile", getattr(choice, key, None) if choice else None),
                             ("preset", preset_values.get(key))):
            if value is not None:
                sources[key] = where
                return value
        sources[key] = "default"
        return default

    draft = pick("draft", "ngram")
    draft_preset = preset_of(draft)
    gpu_memory = pick("gpu_memory", None)
    budget = pick("budget", DEFAULT_BUDGET)
    load = LoadSpec(target=preset.target if preset else name,
                    draft=draft_preset.draft if draft_preset else draft,
                    device=device,
                    quant=pick("quant", None), offload=pick("offload", "auto"),
                    gpu_memory=parse_size(gpu_memory) if isinstance(gpu_memory, str) else gpu_memory,
                    drafter=pick("drafter", "auto"), context=given.get("context"),
                    budget=budget, threads=pick("threads", None),
                    trust_remote_code=bool(given.get("trust_remote_code")))
    decode = DecodeSettings(budget=budget, temperature=pick("temperature", 0.0),
                            top_p=pick("top_p", 1.0), max_new_tokens=pick("max_new_tokens", 256),
                            seed=given.get("seed"), overlap=pick("overlap", False))
    return RunConfig(load, decode, any(v == "profile" for v in sources.values()), sources)
