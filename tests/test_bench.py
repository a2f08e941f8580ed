"""`specexec bench --quick` as a user runs it: every method measured, files written, greedy exact."""

import json

from typer.testing import CliRunner

from specexec_app.ui.cli import app


def test_bench_quick_writes_json_table_and_plots(tmp_path):
    out = tmp_path / "bench"
    # Greedy only, to keep the suite short; the sampled mode runs the same code with do_sample.
    result = CliRunner().invoke(app, ["bench", "--quick", "--budgets", "4", "--chains", "2",
                                      "--greedy-only", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    overall = {(r["mode"], r["method"]): r for r in data["summary"] if r["category"] == "all"}
    methods = {"hf-generate", "ours-ar", "chain-2", "specexec-4", "specexec-4-overlap"}
    assert {m for _, m in overall} == methods and {m for m, _ in overall} == {"greedy"}
    for (mode, method), r in overall.items():
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0, (mode, method)
        if mode == "greedy":
            assert r["exact"] is True, method  # every method's greedy text is generate's
    assert overall[("greedy", "ours-ar")]["accepted_per_pass"] == 1.0  # no draft, one token a pass
    assert overall[("greedy", "hf-generate")]["speedup_vs_hf-generate"] == 1.0
    assert {r["category"] for r in data["runs"]} == {"coding", "extraction", "summarization"}
    table = (out / "results.md").read_text()
    assert "| greedy | specexec-4 |" in table and "tokens/s per category" in table
    for png in ("accepted_per_pass.png", "tokens_per_s.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_bad_budgets_are_one_line_errors(tmp_path):
    r = CliRunner().invoke(app, ["bench", "--budgets", "4,x", "--out", str(tmp_path)])
    assert r.exit_code == 1 and r.stderr.startswith("error: --budgets and --chains")
