"""The CPU lean forward's fused steps (`fused.c`), built with the machine's C compiler.

A one-token pass of a small model on a CPU spends much of its time in ~20 small torch operator
calls a layer around the kernels (RMSNorm alone is ~8); one C loop for each of those steps cut
a one-token pass of SmolLM2-135M from 8.7 to 7.2 ms on 2 cores (docs/BENCHMARKS.md, run 6).
The source is plain C with no torch headers: it builds in a fraction of a second (`cc -O3
-shared`, for the machine's architecture in general, no -march=native), once per version of
the source and compiler, into the cache folder (SPECEXEC_HOME, or the user's cache folder),
written under a temporary name and renamed into place; the library is loaded with ctypes.
Where no compiler works (or SPECEXEC_NATIVE=0), `library()` is None and the lean forward runs
torch's operators, with the same bits (offload/cpu_forward.py)."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

from specexec_app.paths import cache_dir

SOURCE = Path(__file__).with_name("fused.c")
# -ffp-contract=off: every product and sum rounds to float32 as torch's do (no fused multiply-add).
FLAGS = ["-O3", "-ffp-contract=off", "-fPIC", "-shared"]
P, I, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
SIGNATURES = {
    "specexec_rms_bf16": [P, P, P, I, I, F],
    "specexec_add_rms_bf16": [P, P, I, P, P, I, I, F],
    "specexec_rope_write": [P, I, P, P, P, P, P, I, I, I, I, I, I],
    "specexec_silu_mul_bf16": [P, I, P, I, I],
}

_loaded: dict[str, object] = {}  # "lib": the CDLL or None, "why": why it is None


class BuildError(Exception):
    """The compiler refused the source (its last line of errors)."""


def compiler() -> str | None:
    """The C compiler: $CC (a command, with arguments if any), else cc, gcc or clang on the PATH;
    None where there is none (`why()` then says which was looked for)."""
    try:
        named = shlex.split(os.environ.get("CC", ""))
    except ValueError:  # (an unclosed quote)
        return None
    if named:
        return " ".join(named) if shutil.which(named[0]) else None
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(cc: str, folder: Path) -> Path:
    """The library for this source, compiler and architecture in `folder`: the copy there when
    it is whole (its SHA-256 the one noted when it was built: a cut or damaged file is never
    loaded, which could kill the process), else built again. Leftovers go: temporary files of
    builds stopped over an hour ago, libraries of other sources or compilers."""
    version = subprocess.run([*shlex.split(cc), "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, platform.machine(),
                                    *FLAGS]).encode()).hexdigest()[:16]
    out, sums = folder / f"fused-{key}.so", folder / f"fused-{key}.sha256"
    try:
        if sums.read_text().strip() == _digest(out):
            return out
    except OSError:
        pass
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*fused-*"):
        stale = old.name.startswith(".") and time.time() - old.stat().st_mtime > 3600
        if stale or not (old.name.startswith(".") or key in old.name):
            old.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".fused-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([*shlex.split(cc), *FLAGS, "-o", tmp, str(SOURCE), "-lm"],
                              capture_output=True, text=True, timeout=120)
        if done.returncode:
            last = done.stderr.strip().splitlines() or [f"{cc} exited with {done.returncode}"]
            raise BuildError(last[-1])
        noted = Path(tmp).with_suffix(".sha256")
        noted.write_text(_digest(Path(tmp)) + "\n")
        os.replace(noted, sums)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
        Path(tmp).with_suffix(".sha256").unlink(missing_ok=True)
    return out


def _load(cc: str) -> ctypes.CDLL:
    """The library built with `cc` (or found built) in the cache folder; this process's own
    copy when the folder cannot be written (its file removed once loaded: a loaded library
    stays mapped)."""
    try:
        path = build(cc, cache_dir() / "native")
    except OSError:
        private = tempfile.mkdtemp(prefix="specexec-native-")
        try:
            return ctypes.CDLL(str(build(cc, Path(private))))
        finally:
            shutil.rmtree(private, ignore_errors=True)
    return ctypes.CDLL(str(path))


def library():
    """The fused steps as a ctypes library, or None (`why()` says why); built and loaded once
    a process."""
    if "lib" in _loaded:
        return _loaded["lib"]
    lib, why = None, ""
    switch = os.environ.get("SPECEXEC_NATIVE", "1")
    if switch.strip().lower() in ("0", "off", "false", "no"):
        why = f"SPECEXEC_NATIVE={switch}"
    elif (cc := compiler()) is None:
        why = (f"$CC ({os.environ['CC']}) is not a command here" if os.environ.get("CC", "").strip()
               else "no C compiler (cc, gcc or clang; or $CC)")
    else:
        try:
            lib = _load(cc)
            for name, args in SIGNATURES.items():
                getattr(lib, name).argtypes = args
                getattr(lib, name).restype = None
        except (BuildError, OSError, subprocess.SubprocessError, AttributeError) as e:
            lib, why = None, f"the C build failed: {e}"
    _loaded.update(lib=lib, why=why)
    return lib


def why() -> str:
    """Why `library()` is None ('' when it is not, or not asked yet)."""
    return str(_loaded.get("why", ""))


@contextlib.contextmanager
def off():
    """Inside: `library()` is None, so the lean forward runs torch's operators (comparisons)."""
    saved = dict(_loaded)
    _loaded.update(lib=None, why="switched off")
    try:
        yield
    finally:
        _loaded.clear()
        _loaded.update(saved)
