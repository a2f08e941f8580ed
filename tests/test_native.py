"""The lean forward's fused C steps (offload/native): built with the machine's compiler, once,
into the cache folder; each step computes torch's arithmetic (RMSNorm within one bf16 unit);
no compiler, a failed build or SPECEXEC_NATIVE=0 leaves torch's operators, said why."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from offload import native

needs_cc = pytest.mark.skipif(native.compiler() is None, reason="no C compiler")


def built_or_skip():
    """The fused steps' library; the test skipped where no C compiler is, failed where one is
    and the build did not work."""
    got = native.library()
    if got is None:
        if native.compiler() is None:
            pytest.skip("no C compiler: the fused steps do not build here")
        pytest.fail(f"the fused steps did not build: {native.why()}")
    return got


@pytest.fixture
def lib():
    return built_or_skip()


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """`library()` asked again from scratch, building into an empty cache folder."""
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("SPECEXEC_HOME", str(tmp_path))
    return tmp_path


def _bf16_units(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 steps apart two bf16 tensors of the same sign are."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


def test_rms_norm_is_torchs_within_one_bf16_unit(lib):
    torch.manual_seed(0)
    x, w = torch.randn(64, 576) * 3, torch.rand(576) * 2
    want = torch.rms_norm(x, (576,), w, 1e-5).to(torch.bfloat16)
    got = torch.empty_like(want)
    lib.specexec_rms_bf16(x.data_ptr(), w.data_ptr(), got.data_ptr(), 64, 576, 1e-5)
    assert _bf16_units(got, want).max() <= 1
    assert (got != want).float().mean() < 1e-3  # a unit now and then, not a bias
    # x += y then the next norm; with no weight, the add alone.
    for y in (torch.randn(64, 576).to(torch.bfloat16), torch.randn(64, 576)):
        x2, want_x = x.clone(), x + y.float()
        lib.specexec_add_rms_bf16(x2.data_ptr(), y.data_ptr(), y.dtype == torch.bfloat16,
                                  w.data_ptr(), got.data_ptr(), 64, 576, 1e-5)
        assert torch.equal(x2, want_x)
        assert _bf16_units(got, torch.rms_norm(want_x, (576,), w, 1e-5).to(torch.bfloat16)).max() <= 1
        before = got.clone()
        lib.specexec_add_rms_bf16(x2.data_ptr(), y.data_ptr(), y.dtype == torch.bfloat16, None,
                                  got.data_ptr(), 64, 576, 0.0)
        assert torch.equal(x2, want_x + y.float()) and torch.equal(got, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotary_and_cache_writes_are_torchs_bit_for_bit(lib, dtype):
    """q and k rotated as the torch path rotates them (t * cos + rotate_half(t) * sin), into q
    [heads, n, d] and the cache's buffers at `past`, values widened there; nothing else moves."""
    torch.manual_seed(1)
    n, heads, kv, d, room, past = 3, 9, 3, 64, 16, 5
    y = torch.randn(n, (heads + 2 * kv) * d).to(dtype)
    cos, sin = torch.randn(n, d), torch.randn(n, d)
    t = y[:, :(heads + kv) * d].float().view(n, heads + kv, d).transpose(0, 1)
    rotated = t * cos + torch.cat((-t[..., d // 2:], t[..., :d // 2]), -1) * sin
    q = torch.empty(1, heads, n, d)
    k, v = torch.zeros(1, kv, room, d), torch.zeros(1, kv, room, d)
    lib.specexec_rope_write(y.data_ptr(), dtype == torch.bfloat16, cos.data_ptr(), sin.data_ptr(),
                            q.data_ptr(), k.data_ptr(), v.data_ptr(), n, heads, kv, d, room, past)
    assert torch.equal(q[0], rotated[:heads])
    assert torch.equal(k[0, :, past:past + n], rotated[heads:])
    assert torch.equal(v[0, :, past:past + n],
                       y[:, (heads + kv) * d:].float().view(n, kv, d).transpose(0, 1))
    assert not k[..., :past, :].any() and not k[..., past + n:, :].any() and not v[..., :past, :].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_times_up_is_torchs(lib, dtype):
    torch.manual_seed(2)
    n, inter = 8, 1536
    gu = (torch.randn(n, 2 * inter) * 4).to(dtype)
    want = torch.mul(F.silu(gu[:, :inter].float()), gu[:, inter:]).to(torch.bfloat16)
    got = torch.empty(n, inter, dtype=torch.bfloat16)
    lib.specexec_silu_mul_bf16(gu.data_ptr(), dtype == torch.bfloat16, got.data_ptr(), n, inter)
    assert _bf16_units(got, want).max() <= 1 and (got != want).float().mean() < 1e-3


@needs_cc
def test_built_once_into_the_cache_folder(fresh):
    lib = native.library()
    assert lib is not None, native.why()
    built = list((fresh / "native").glob("fused-*.so"))
    assert len(built) == 1 and not list((fresh / "native").glob(".*"))  # no temporary left
    stamp = built[0].stat().st_mtime_ns
    assert native.library() is lib  # once a process
    assert native.build(native.compiler(), fresh / "native") == built[0]  # found, not rebuilt
    assert built[0].stat().st_mtime_ns == stamp


@needs_cc
@pytest.mark.parametrize("damage", ["garbage", "cut", "other-build"])
def test_a_damaged_library_in_the_cache_is_built_again_never_loaded(fresh, damage):
    """A cut library would kill the process as it loads (SIGBUS), so a copy whose SHA-256 is
    not the one noted at its build is built again before anything loads it."""
    cc = native.compiler()
    built = native.build(cc, fresh / "native")  # (built, not loaded)
    whole = built.read_bytes()
    built.unlink()
    built.write_bytes({"garbage": b"not a shared library", "cut": whole[:len(whole) // 3],
                       "other-build": whole[:-1] + bytes([whole[-1] ^ 1])}[damage])
    assert native.library() is not None, native.why()
    assert built.read_bytes() == whole  # built again in its place


@needs_cc
def test_leftovers_of_stopped_builds_and_other_versions_are_cleared(fresh):
    import time

    folder = fresh / "native"
    folder.mkdir()
    stopped, recent, other = folder / ".fused-abc.so", folder / ".fused-def.so", folder / "fused-0123.so"
    for f in (stopped, recent, other):
        f.write_bytes(b"x")
    hour_ago = time.time() - 7200
    os.utime(stopped, (hour_ago, hour_ago))
    native.build(native.compiler(), folder)
    assert not stopped.exists() and not other.exists()
    assert recent.exists()  # (perhaps another process's build under way)


@needs_cc
def test_an_unwritable_cache_folder_builds_a_private_copy(fresh, monkeypatch):
    """(The private copy's folder is gone once the library is loaded.)"""
    import tempfile

    (fresh / "native").write_text("a file where the folder should be")
    private = fresh / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    assert native.library() is not None, native.why()
    assert not list(private.iterdir())


def test_no_compiler_a_failed_build_or_switched_off_leaves_torchs_operators(fresh, monkeypatch):
    monkeypatch.setenv("CC", "specexec-no-such-compiler")
    assert native.library() is None
    assert native.why() == "$CC (specexec-no-such-compiler) is not a command here"

    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails every build, silently
    assert native.library() is None and native.why() == "the C build failed: false exited with 1"
    assert not list((fresh / "native").iterdir())

    for value in ("0", "off", "False"):
        monkeypatch.setattr(native, "_loaded", {})
        monkeypatch.setenv("SPECEXEC_NATIVE", value)
        assert native.library() is None and native.why() == f"SPECEXEC_NATIVE={value}"
    monkeypatch.delenv("SPECEXEC_NATIVE")
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("CC", 'gcc "')  # an unclosed quote: named, not raised
    assert native.library() is None and native.why() == """$CC (gcc ") is not a command here"""
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("CC", " ")  # empty: as if unset
    assert native.library() is not None or native.compiler() is None, native.why()


def test_off_switches_the_steps_off_and_back(lib):
    with native.off():
        assert native.library() is None
    assert native.library() is lib
