"""The saved hardware profile (TOML in the user's config directory) and how options override it."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from specexec_app.errors import UserError


def profile_path() -> Path:
    base = os.environ.get("SPECEXEC_CONFIG") or platformdirs.user_config_dir("specexec")
    return Path(base) / "profile.toml"


def load_profile(path: Path | None = None) -> dict | None:
    path = path or profile_path()
    if not path.is_file():
        return None
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"cannot read the profile {path}: {e} (specexec profile --reset "
                        "forgets it)") from e


def save_profile(data: dict, path: Path | None = None) -> Path:
    import tomli_w

    path = path or profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(tomli_w.dumps(data))
    os.replace(tmp, path)
    return path


def forget_profile(path: Path | None = None) -> bool:
    path = path or profile_path()
    if path.is_file():
        path.unlink()
        return True
    return False


@dataclass
class Options:
    """What `run` and `chat` decode with, after options, the profile and defaults."""
    target: str = "default"
    draft: str | None = None
    budget: int | None = None      # None: the preset's
    quant: int = 16
    offload: str = "auto"
    gpu_memory: str | None = None  # None: what is free
    drafter: str = "auto"
    overlap: bool = False
    from_profile: bool = False


def choose(target: str | None, draft: str | None, budget: int | None, quant: int | None,
           offload: str | None, gpu_memory: str | None, drafter: str | None,
           profile: dict | None, overlap: bool | None = None) -> Options:
    """Options given on the command line win; the saved profile fills the rest when it was tuned
    for the same target (or no target was named); then the defaults."""
    choice = (profile or {}).get("choice") or {}
    applies = bool(choice) and (target is None or target == choice.get("target"))
    if not applies:
        choice = {}
    pick = lambda given, key, default: given if given is not None else choice.get(key, default)  # noqa: E731
    return Options(target=pick(target, "target", "default"),
                   draft=pick(draft, "draft", None),
                   budget=pick(budget, "budget", None),
                   quant=int(pick(quant, "quant", 16)),
                   offload=pick(offload, "offload", "auto"),
                   gpu_memory=pick(gpu_memory, "gpu_memory", None),
                   drafter=pick(drafter, "drafter", "auto"),
                   overlap=bool(pick(overlap, "overlap", False)),
                   from_profile=applies)
