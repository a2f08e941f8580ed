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


def test_an_offloaded_target_meets_the_accelerate_baseline_in_its_own_process(source, tmp_path):
    """With the target's layers streamed, transformers' generate runs with accelerate's offload
    in a process of its own, after ours has released its models; its rows come back, and every
    method's greedy text is still generate's. (A small random Llama with the default model's
    tokenizer: the default model streamed takes minutes here; weights drawn wide, so that its
    next tokens are not numerical ties.)"""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = tmp_path / "small"
    tok = AutoTokenizer.from_pretrained(source.path)
    tok.save_pretrained(target)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                      initializer_range=0.5, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(target)
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--quick", "--budgets", "4", "--chains", "2",
                                      "--greedy-only", "--offload", "always", "--target",
                                      str(target), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "baseline failed" not in result.output
    data = json.loads((out / "results.json").read_text())
    assert "streamed" in data["placement"]
    overall = {r["method"]: r for r in data["summary"] if r["category"] == "all"}
    assert overall["hf-generate"]["tokens"] > 0
    assert all(r["exact"] is True for r in overall.values()), {m: r["exact"] for m, r in overall.items()}
    hf = [r for r in data["runs"] if r["method"] == "hf-generate"]
    assert len(hf) == 3 and all(r["new_tokens"] > 0 for r in hf)


def test_the_transformers_baseline_ignores_the_checkpoints_generation_config():
    """hf_generate is the model's own greedy decoding even when the checkpoint's generation
    config sets a repetition penalty (Qwen2.5-Instruct's: 1.05), which transformers applies to
    greedy decoding too, and leaves that config in place."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from specexec_app.config.settings import DecodeSettings
    from specexec_app.tools.bench import hf_generate

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()
    ids = [1, 2, 3, 4]
    argmax = list(ids)
    with torch.no_grad():
        for _ in range(20):
            argmax.append(int(model(torch.tensor([argmax])).logits[0, -1].argmax()))
    model.generation_config.repetition_penalty = 5.0
    out, _ = hf_generate(model, ids, DecodeSettings(max_new_tokens=20), {63})
    new = argmax[len(ids):]
    assert out == new[: new.index(63)] if 63 in new else out == new
    assert model.generation_config.repetition_penalty == 5.0
