"""Files the app writes: to a temporary name, then renamed into place, so that a full disk, a
signal or a crash never leaves a cut file where a good one stood; and the checks that run before
the work whose result they will hold."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

from .errors import UserError

MODEL_MARKERS = ("config.json", "model.safetensors", "model.safetensors.index.json",
                 "specexec_packed.json", "specexec_draft.json")


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def check_writable(path: Path, what: str = "") -> None:
    """Refuse, before any work, an output file that could not be written: a folder, a parent
    that is missing or not a folder, a folder where no file can be made (tried: a permission
    check says nothing to root, nor of /proc), a file that cannot be replaced. (A full disk
    shows only when writing.)"""
    path = Path(path)
    label = f"{what} {path}".strip()
    if path.is_dir():
        raise UserError(f"cannot write {label}: it is a folder")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise UserError(f"cannot write {label}: the folder {parent} does not exist")
    if not parent.is_dir():
        raise UserError(f"cannot write {label}: {parent} is a file, not a folder")
    if path.exists() and not _is_regular(path):  # a device or a pipe: written directly
        if not os.access(path, os.W_OK):
            raise UserError(f"cannot write {label}: permission denied")
        return
    if path.exists() and not os.access(path, os.W_OK):  # read-only, or immutable (even to root)
        raise UserError(f"cannot write {label}: the file is read-only")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write {label}: no file can be made in {parent} "
                        f"({_reason(e)})") from None


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return True


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename: the old
    file stays whole until the new one is. A device or pipe (/dev/stdout) is written directly."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    try:
        if path.exists() and not _is_regular(path):
            with open(path, "wb") as f:
                f.write(raw)
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
        try:
            # mkstemp makes it 0600: give it the mode of the file it replaces, or the umask's.
            os.fchmod(fd, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise UserError(f"cannot write {path}: {_reason(e)}") from None


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def holds_model(folder: Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and (any((folder / m).exists() for m in MODEL_MARKERS)
                                or any(folder.glob("*.safetensors")) or any(folder.glob("*.gguf")))


def check_out_folder(out: Path, sources: list[Path], force: bool, own: str | None = None,
                     replaces: bool = False) -> None:
    """Refuse an output folder that is (or lies inside, or holds) one of the `sources` being
    read, and, unless `force`, one that already holds a model (a folder holding `own`, the
    marker of this command's own earlier output, may be written again: a rerun resumes). A
    command that `replaces` the whole folder never takes one holding other things and no model
    (`--out ~/Documents` must not empty it), `force` or not; a command that writes a model
    (`replaces` or with an `own` marker) does not take the current folder (`--out ""`)."""
    if (replaces or own) and str(out) in ("", "."):
        raise UserError(f"--out must name a folder (got {str(out)!r})")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if replaces and out.is_dir() and any(out.iterdir()) and not holds_model(out) \
            and not (own and (out / own).is_file()):
        raise UserError(f"--out {out} is not empty and holds no model: the whole folder would be "
                        "replaced; choose a new or empty folder")
    real = out.resolve()
    for src in sources:
        src = Path(src).expanduser().resolve()
        if real == src or src in real.parents or real in src.parents:
            raise UserError(f"--out {out} is the source model's folder ({src}); choose "
                            "another folder: writing there would destroy the model")
    if force or not holds_model(out) or (own and (out / own).is_file()):
        return
    raise UserError(f"--out {out} already holds a model; choose an empty folder, or add "
                    "--force to replace what is there")


def replace_folder(tmp: Path, out: Path) -> None:
    """Move a finished folder `tmp` into place at `out` (whatever stood there is removed only
    once the new one is complete)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def temp_folder(parent: Path, prefix: str) -> Path:
    """A new folder in `parent` named after this process, so that `remove_orphans` can tell a
    killed run's leftovers from a live run's work."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


def remove_orphans(parent: Path, prefix: str) -> int:
    """Remove the `temp_folder`s of runs that are no longer alive (a SIGTERM or a power cut in
    the middle of a conversion leaves one behind). Returns how many went."""
    gone = 0
    for p in Path(parent).glob(f"{prefix}*") if Path(parent).is_dir() else []:
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or _alive(int(pid))):
            continue  # this run's own, or a live run's
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        gone += 1
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
