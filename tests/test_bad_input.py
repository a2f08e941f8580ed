"""Bad input, full disks and closed outputs: a one-line `error:` and exit 1, never a traceback, and
nothing lost or destroyed (each case was a traceback, a cut file or a silent acceptance once)."""

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from specexec_app.errors import UserError
from specexec_app.ui.cli import app

runner = CliRunner()


def one_line_error(result, needle):
    out = result.stderr.strip()
    assert result.exit_code == 1, result.output
    assert out.startswith("error:") and needle in out, out
    assert len(out.splitlines()) == 1 and "Traceback" not in result.output


def cli(*args, input=None, env=None, limit_bytes=None, timeout=300):
    """`specexec ARGS` in a subprocess; `limit_bytes` caps the size of any file it writes (as a
    full disk would: writes past it fail)."""
    def cap():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return subprocess.run([sys.executable, "-m", "specexec_app", *args], input=input,
                          capture_output=True, timeout=timeout, env=env,
                          preexec_fn=cap if limit_bytes is not None else None)


@pytest.mark.parametrize("args, needle", [
    (["run", "hi", "--temperature", "nan"], "--temperature must be a finite number"),
    (["run", "hi", "--temperature", "inf"], "--temperature must be a finite number"),
    (["run", "hi", "--temperature", "1e9"], "--temperature must be at most 100"),
    (["run", "hi", "--temperature", "1e-40"], "--temperature must be 0 (greedy) or at least 1e-05"),
    (["run", "hi", "--top-p", "nan"], "--top-p must be a finite number"),
    (["run", "hi", "--seed", str(2**63)], "--seed must be at most"),
    (["run", "hi", "--budget", "100000"], "--budget must be at most 16384"),
    (["run", "hi", "--device", "bogus"], "--device must be auto, cpu, cuda or cuda:N"),
    (["run", "hi", "--gpu-memory", "1e400"], "is not a size between 1 byte and 1 PiB"),
    (["run", "hi", "--context", "1"], "--context must be at least 2"),
    (["run", "hi", "--drafter", "tpu"], "--drafter must be auto, gpu or cpu"),
    (["run", "hi", "--stats-json", "/no/such/folder/s.json"], "the folder /no/such/folder does not exist"),
    (["run", "hi", "--stats-json", "/tmp"], "it is a folder"),
    (["run", "hi", "--stats-json", "/proc/version"], "no file can be made in /proc"),
    (["run", "hi", "--stats-json", __file__ + "/s.json"], "is a file, not a folder"),
    (["run", "hi", "--stats-json", "-"], "--stats-json takes a file: stdout holds the reply"),
    (["run", "hi", "--target", ""], "--target is empty"),
    (["run", "hi", "--raw", "--system", "Be brief."], "--system goes into the chat template"),
    (["chat", "--temperature", "inf"], "--temperature must be a finite number"),
    (["run", "hi", "--threads", "0"], "--threads must be at least 1"),
    (["run", "hi", "--threads", "100000"], "CPU threads of this machine"),
    (["run", "hi", "--target", "/dev/null/x.gguf"], "model not found"),
    (["serve", "--port", "70000"], "--port must be in 0..65535"),
    (["bench", "--out", "/dev/null"], "is a file, not a folder"),
    (["quantize", "--target", "default", "--out", "/dev/null"], "is a file, not a folder"),
    (["profile", "--show", "--reset"], "--show and --reset cannot go together"),
    (["quantize", "--target", "default", "--out", "/tmp/specexec-no-such-folder/x"], "is a GGUF model, already quantized"),
    (["distill", "--out", "/tmp/specexec-no-such-folder/x", "--lr", "-1"], "--lr must be in (0, 1]"),
    (["distill", "--out", "/tmp/specexec-no-such-folder/x", "--lr", "nan"], "--lr must be a finite number"),
    (["distill", "--out", "/tmp/specexec-no-such-folder/x", "--max-prompts", "-5"], "--max-prompts must be at least 1"),
    (["distill", "--out", "/tmp/specexec-no-such-folder/x", "--heldout", "0"], "--heldout must be at least 1"),
])
def test_bad_options_are_refused_before_anything_loads(args, needle):
    one_line_error(runner.invoke(app, args), needle)


@pytest.mark.parametrize("args, needle", [
    (["run", "hi", "--budget", "abc"], "Invalid value for '--budget'"),
    (["run", "hi", "--seed", "nan"], "Invalid value for '--seed'"),
    (["run", "hi", "--bogus"], "No such option: --bogus"),
    (["run"], "Missing argument 'prompt'"),
    (["quantize", "--out", "/tmp/specexec-no-such-folder/x"], "Missing option '--target'"),
])
def test_usage_errors_are_one_line_too(args, needle):
    """What the command-line parser itself refuses (a word for a number, an unknown option)
    ends as the rest: one `error:` line and exit 1 (it was a box and exit 2)."""
    proc = cli(*args, timeout=60)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 1 and err.startswith("error:") and needle in err, err
    assert len(err.splitlines()) == 1


def test_a_read_only_output_file_is_refused_before_the_work(tmp_path):
    """A --stats-json file that cannot be replaced: refused before loading (was found after the
    whole reply). Read-only by its mode, or immutable where root ignores the mode."""
    from specexec_app.files import check_writable

    path = tmp_path / "stats.json"
    path.write_text("{}")
    path.chmod(0o444)
    immutable = os.access(path, os.W_OK)  # root: the mode does not bind; mark it immutable
    if immutable and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("root, and no chattr here to make a file read-only")
    try:
        with pytest.raises(UserError, match="cannot write --stats-json .*: the file is read-only"):
            check_writable(path, "--stats-json")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)])
    assert path.read_text() == "{}"


def test_prompt_that_is_not_utf8_is_one_line():
    for proc in (cli("run", "-", input=b"\xff\xfe binary \x00\x01"),
                 cli("run", os.fsdecode(b"caf\xe9"))):  # an argument in Latin-1 bytes
        err = proc.stderr.decode().strip()
        assert proc.returncode == 1 and err == "error: the prompt is not valid UTF-8 text", err


def test_closed_or_full_stdout_is_one_line(tmp_path):
    full = subprocess.run(f"{sys.executable} -m specexec_app run Hello -n 4 > /dev/full",
                          shell=True, capture_output=True, timeout=300)
    closed = subprocess.run(f"{sys.executable} -m specexec_app run Hello -n 4 >&-",
                            shell=True, capture_output=True, timeout=300)
    for proc in (full, closed):
        err = proc.stderr.decode().strip().splitlines()
        assert proc.returncode == 1 and err[-1].startswith("error: cannot write the reply to "
                                                           "stdout"), err
        assert "Traceback" not in proc.stderr.decode()


def test_written_files_have_the_usual_mode(tmp_path):
    """Atomic writes go through a private temporary file; what lands has the umask's mode (or
    keeps the mode of the file it replaced), not the temporary file's 0600."""
    from specexec_app.files import write_atomic

    fresh, kept = tmp_path / "a.json", tmp_path / "b.json"
    old = os.umask(0o022)
    try:
        write_atomic(fresh, "{}")
        kept.write_text("")
        kept.chmod(0o640)
        write_atomic(kept, "{}")
    finally:
        os.umask(old)
    assert fresh.stat().st_mode & 0o777 == 0o644 and kept.stat().st_mode & 0o777 == 0o640


def test_full_disk_keeps_the_old_file_whole(tmp_path):
    """--stats-json onto a full disk: a one-line error, and the file that was there stays whole
    (written to a temporary name, renamed only when complete)."""
    stats = tmp_path / "stats.json"
    stats.write_text('{"old": true}\n')
    proc = cli("run", "Hello", "-n", "4", "--stats-json", str(stats), limit_bytes=64)
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 1 and err[-1].startswith(f"error: cannot write {stats}"), err
    assert json.loads(stats.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]  # no temporary left behind


def test_quantize_never_overwrites_its_source_and_cleans_a_failed_write(source, tmp_path):
    src = Path(source.path)
    before = {p.name: p.stat().st_size for p in src.iterdir()}
    r = runner.invoke(app, ["quantize", "--target", str(src), "--out", str(src)])
    one_line_error(r, "is the source model's folder")
    other = tmp_path / "holds-a-model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    one_line_error(runner.invoke(app, ["quantize", "--target", str(src), "--out", str(other)]),
                   "already holds a model; choose an empty folder, or add --force")
    # A folder of the user's own things (no model) is never replaced, --force or not; nor "".
    mine = tmp_path / "documents"
    (mine / "project").mkdir(parents=True)
    (mine / "project" / "config.json").write_text("{}")  # a model one level down is not one here
    (mine / "notes.txt").write_text("important")
    for force in ([], ["--force"]):
        one_line_error(runner.invoke(app, ["quantize", "--target", str(src), "--out", str(mine)] + force),
                       "is not empty and holds no model")
    assert (mine / "notes.txt").read_text() == "important" and (mine / "project" / "config.json").is_file()
    one_line_error(runner.invoke(app, ["quantize", "--target", str(src), "--out", ""]),
                   "--out must name a folder")
    one_line_error(runner.invoke(app, ["distill", "--out", "", "--steps", "1"]),
                   "--out must name a folder")
    # A full disk half way: nothing is left in the output's folder but what was there.
    out = tmp_path / "packed"
    proc = cli("quantize", "--target", str(src), "--out", str(out), limit_bytes=1 << 20)
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 1 and "nothing was written" in err[-1], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["documents", "holds-a-model"]
    assert {p.name: p.stat().st_size for p in src.iterdir()} == before


def test_distill_refuses_its_target_and_never_unpickles(source, gguf_source, tmp_path):
    one_line_error(runner.invoke(app, ["distill", "--out", gguf_source.path, "--steps", "1"]),
                   "is the source model's folder")
    one_line_error(runner.invoke(app, ["distill", "--target", source.path, "--out", source.path,
                                       "--steps", "1"]), "is the source model's folder")
    # A planted pickle where distill keeps its data: never loaded (the data are safetensors),
    # and a planted safetensors file that is not ours is a one-line error, not code run.
    from specexec_app.tools.distill import _load

    work = tmp_path / ".distill"
    work.mkdir()
    marker = tmp_path / "pwned"
    planted = work / "data.safetensors"
    planted.write_bytes(b"\x80\x04cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(Exception, match="cannot be read"):
        _load(planted)
    assert not marker.exists()


def test_rich_markup_in_user_strings_is_printed_as_is(tmp_path):
    odd = tmp_path / "a[/]b[bold]c"
    r = runner.invoke(app, ["run", "hi", "--target", str(odd)])
    one_line_error(r, f"model not found: {odd}")


def test_stale_conversion_folders_are_removed(tmp_path):
    from specexec_app.files import remove_orphans, temp_folder

    dead = tmp_path / ".convert-999999999-abc"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 10)
    live = temp_folder(tmp_path, ".convert-")  # this process's: alive
    assert remove_orphans(tmp_path, ".convert-") == 1
    assert not dead.exists() and live.exists()


def test_version_and_short_help():
    from specexec_app import __version__

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"specexec {__version__}"
    r = runner.invoke(app, ["run", "-h"])
    assert r.exit_code == 0 and "--max-new-tokens" in r.stdout and "-n" in r.stdout


def test_header_without_dtype_is_one_line(source, tmp_path):
    import shutil
    import struct

    bad = tmp_path / "bad"
    shutil.copytree(source.path, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    del header[name]["dtype"]
    text = json.dumps(header).encode().ljust(n)
    weights.write_bytes(data[:8] + text + data[8 + n:])
    one_line_error(runner.invoke(app, ["run", "hi", "--target", str(bad)]),
                   "model.safetensors is corrupt: its header cannot be read")


@pytest.mark.parametrize("cut, needle", [(3_000_000, "is truncated: 3000000 of"),
                                         (4, "not a readable GGUF file: the header is cut short"),
                                         (0, "not a readable GGUF file: no GGUF magic")])
def test_a_damaged_gguf_is_named_before_its_metadata_is_read(tmp_path, monkeypatch, cut, needle):
    """A GGUF file cut short (a download stopped) or empty: our one-line error naming the file,
    not the message of the library that reads its metadata."""
    from specexec_app.loading.sources import smollm2_gguf

    monkeypatch.setenv("SPECEXEC_HOME", str(tmp_path / "home"))
    with open(smollm2_gguf(), "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(cut))
    one_line_error(runner.invoke(app, ["run", "hi", "--target", str(tmp_path / "cut.gguf")]), needle)


@pytest.mark.parametrize("at, width", [(8, 64), (16, 64), (24, 64), (200, 64), (5000, 64), (32, 4)])
def test_a_gguf_with_a_damaged_header_is_a_one_line_error(tmp_path, monkeypatch, at, width):
    """Bytes overwritten in a GGUF's header (its counts, a type, a string's length): a one-line
    error naming the file, never a KeyError or OverflowError from reading it (a count of 2^64
    must not be read, allocated or looped over)."""
    from specexec_app.loading.sources import smollm2_gguf

    monkeypatch.setenv("SPECEXEC_HOME", str(tmp_path / "home"))
    with open(smollm2_gguf(), "rb") as f:
        data = bytearray(f.read(4_000_000))  # the header and the start of the weights
    data[at:at + width] = b"\xff" * width  # (32, 4: inside the first key's text, not UTF-8)
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    result = runner.invoke(app, ["run", "hi", "--target", str(tmp_path / "bad.gguf")])
    one_line_error(result, "bad.gguf is not a readable GGUF file: the header is")
    assert "codec" not in result.stderr and "((" not in result.stderr and "))" not in result.stderr


@pytest.mark.parametrize("temperature", ["0", "0.7"])
def test_damaged_weights_that_give_nan_are_an_error_not_a_reply(tmp_path, monkeypatch, temperature):
    """Bytes of a GGUF's weight blocks overwritten with 0xFF (NaN scales): the reply stops with a
    one-line error saying so, where greedy decoding printed nothing and exited 0 (a NaN is its own
    argmax) and sampling raised torch's RuntimeError."""
    from specexec_app.loading.sources import smollm2_gguf

    monkeypatch.setenv("SPECEXEC_HOME", str(tmp_path / "home"))
    data = bytearray(smollm2_gguf().read_bytes())
    data[60_000_000:60_004_096] = b"\xff" * 4096
    (tmp_path / "nan.gguf").write_bytes(bytes(data))
    one_line_error(runner.invoke(app, ["run", "hi", "--target", str(tmp_path / "nan.gguf"),
                                       "--temperature", temperature, "--max-new-tokens", "4"]),
                   "the model's output is not a number (NaN or inf): its weights are likely damaged")


def test_a_prompt_from_stdin_loses_only_its_final_newlines(monkeypatch):
    """`echo "..." | specexec run -` gives the prompt `specexec run "..."` gives (the newline
    that ends a file or an echo is not part of it); lines inside it stay."""
    import io

    from specexec_app.ui import cli as cli_module

    for sent, want in ((b"Write a haiku about rain.\n", "Write a haiku about rain."),
                       (b"line one\nline two\r\n\n", "line one\nline two"),
                       (b"  indented\n", "  indented")):
        monkeypatch.setattr(cli_module.sys, "stdin", io.TextIOWrapper(io.BytesIO(sent)))
        assert cli_module.read_prompt("-") == want
