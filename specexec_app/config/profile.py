"""The saved hardware profile: typed sections, read from and written to TOML in the user's config
directory. Its choice goes through `settings.resolve` like the command line's values."""

import os
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import platformdirs

from specexec_app.errors import UserError
from specexec_app.files import write_atomic


@dataclass
class Machine:
    os: str = ""
    cpu: str = ""
    cpu_cores: int = 0
    cpu_threads: int = 0
    torch_threads: int = 0
    ram_total_gb: float = 0.0
    ram_free_gb: float = 0.0
    ram_copy_gb_s: float = 0.0
    gpu: str = "none"
    gpu_memory_gb: float = 0.0
    gpu_free_gb: float = 0.0
    h2d_pinned_gb_s: float | None = None
    h2d_pageable_gb_s: float | None = None
    weights_folder: str | None = None
    disk_read_gb_s: float | None = None
    disk_read_cold: bool = False


@dataclass
class Choice:
    """What `run` and `chat` use, unless an option says otherwise (values as on the command line)."""
    target: str = "default"
    draft: str | None = None
    quant: int | None = None
    offload: str | None = None
    drafter: str | None = None
    budget: int | None = None
    overlap: bool | None = None
    device: str = "auto"
    gpu_memory: str | None = None
    threads: int | None = None  # CPU threads for the model's math, timed by the profile


@dataclass
class TargetReport:
    name: str = ""
    parameters: int = 0
    quant_reason: str = ""
    placement: str = ""
    pass_ms: dict = field(default_factory=dict)  # tree nodes (as text) -> ms
    threads_pass_ms: dict = field(default_factory=dict)  # CPU threads (as text) -> ms of two passes


@dataclass
class DraftReport:
    name: str = ""
    parameters: int = 0
    speed: dict = field(default_factory=dict)  # where -> ms for a 64-node tree
    placement_reason: str = ""


@dataclass
class Profile:
    created: str = ""
    machine: Machine = field(default_factory=Machine)
    target: TargetReport = field(default_factory=TargetReport)
    draft: DraftReport = field(default_factory=DraftReport)
    calibration: list = field(default_factory=list)  # rows of the calibration table
    choice: Choice = field(default_factory=Choice)
    predicted_tokens_per_s: float = 0.0
    measured_tokens_per_s: float = 0.0
    measured_accepted_per_pass: float = 0.0

    @classmethod
    def from_dict(cls, data: dict, where: str = "the profile") -> "Profile":
        return _typed(cls, data, where)

    def to_dict(self) -> dict:
        return _drop_none(asdict(self))


def _drop_none(d):
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return [_drop_none(v) for v in d] if isinstance(d, list) else d


def _typed(cls, data, where: str):
    """An instance of the dataclass `cls` from TOML data, each value of its field's type (an int
    is taken where a float is wanted); anything else is a one-line error naming the key."""
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a table")
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value, kind, key = data[f.name], hints[f.name], f"{where}.{f.name}"
        if isinstance(kind, type) and hasattr(kind, "__dataclass_fields__"):
            out[f.name] = _typed(kind, value, key)
            continue
        allowed = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
        ok = any(value is None if t is type(None) else
                 isinstance(value, (int, float)) and not isinstance(value, bool) if t is float else
                 isinstance(value, int) and not isinstance(value, bool) if t is int else
                 isinstance(value, typing.get_origin(t) or t) for t in allowed)
        if not ok:
            names = " or ".join("nothing" if t is type(None) else getattr(t, "__name__", str(t))
                                for t in allowed)
            raise UserError(f"{key} must be {names} (got {value!r}); `specexec profile --reset` "
                            "forgets the profile")
        out[f.name] = float(value) if float in allowed and isinstance(value, int) else value
    return cls(**out)


def profile_path() -> Path:
    base = os.environ.get("SPECEXEC_CONFIG") or platformdirs.user_config_dir("specexec")
    return Path(base) / "profile.toml"


def load_profile(path: Path | None = None) -> Profile | None:
    path = path or profile_path()
    if not path.is_file():
        return None
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"cannot read the profile {path}: {e} (specexec profile --reset "
                        "forgets it)") from None
    return Profile.from_dict(data, str(path))


def save_profile(profile: Profile, path: Path | None = None) -> Path:
    import tomli_w

    path = path or profile_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {path.parent}: {e.strerror or e}") from None
    write_atomic(path, tomli_w.dumps(profile.to_dict()))
    return path


def forget_profile(path: Path | None = None) -> bool:
    path = path or profile_path()
    if path.is_file():
        try:
            path.unlink()
        except OSError as e:
            raise UserError(f"cannot remove {path}: {e.strerror or e}") from None
        return True
    return False
