"""`specexec run` as a user meets it: clean output, one-line errors, non-zero exits."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from specexec_app.ui.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["run", *args])


def assert_one_line_error(result, needle):
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert err.startswith("error:") and needle in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in result.output


@pytest.mark.parametrize("args, needle", [
    (["hi", "--target", "no-such-preset"], "model not found: no-such-preset"),
    (["hi", "--target", "/no/such/folder"], "model not found: /no/such/folder"),
    (["hi", "--draft", "/no/such/draft"], "model not found: /no/such/draft"),
    (["   "], "the prompt is empty"),
    (["hi", "--budget", "0"], "--budget must be at least 1"),
    (["hi", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["hi", "--temperature", "-1"], "--temperature must be 0 or more"),
    (["hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
])
def test_bad_input_is_one_line(args, needle):
    assert_one_line_error(invoke(*args), needle)


def test_prompt_longer_than_the_context():
    assert_one_line_error(invoke("hello " * 9000, "--raw"), "the context is 8192")
    assert_one_line_error(invoke("hello " * 40, "--raw", "--context", "32"),
                          "the prompt has 41 tokens; the context is 32 (--context raises it, "
                          "up to 8192)")
    # Asking for more than the model attends over: said, not silently lowered.
    result = invoke("hello " * 9000, "--raw", "--context", "20000")
    assert "note: --context 20000 is beyond what" in result.stderr and "using 8192 tokens" in result.stderr
    assert "the context is 8192" in result.stderr and result.exit_code == 1
    # A reply cut by the context says so (not only in --stats).
    result = invoke("hello " * 40, "--raw", "--context", "50", "-n", "100", "--temperature", "0")
    assert result.exit_code == 0, result.output
    assert ("note: the reply was cut where it filled the model's context of 50 tokens "
            "(--context raises it, up to 8192)") in result.stderr


def test_a_folder_without_a_tokenizer_says_what_it_lacks(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert_one_line_error(invoke("hi", "--target", str(tmp_path)),
                          "the folder has none of tokenizer.json, tokenizer.model")


def test_draft_with_another_tokenizer_is_refused(source, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(source.path)
    tok.save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = "hello", "world"  # swap two ids: same size, different meaning
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    assert_one_line_error(invoke("hi", "--draft", str(tmp_path)), "tokenizers differ")


def test_corrupt_weight_file(source, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(source.path, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: 1 << 20])  # truncated
    assert_one_line_error(invoke("hi", "--target", str(bad)), "model.safetensors is truncated")
    weights.write_bytes(data[:8] + b"{" * 40 + data[48:])  # a broken header
    assert_one_line_error(invoke("hi", "--target", str(bad)), "model.safetensors is corrupt")
    weights.write_bytes(data)
    (bad / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    assert_one_line_error(invoke("hi", "--target", str(bad)), "lacks the shard model-00002")


def test_run_stats_json(tmp_path):
    path = tmp_path / "stats.json"
    result = invoke("What is 2+2?", "--max-new-tokens", "12", "--stats", "--stats-json", str(path))
    assert result.exit_code == 0, result.output
    stats = json.loads(path.read_text())
    for key in ("new_tokens", "target_passes", "accepted_per_pass", "tokens_per_s", "draft_s",
                "target_s"):
        assert key in stats
    assert 1 <= stats["new_tokens"] <= 12
    produced = stats["new_tokens"] + (stats["stop_reason"] == "eos")  # the stop token was drawn too
    assert stats["accepted_per_pass"] == pytest.approx(produced / stats["target_passes"])
    assert "tok/s" in result.stderr and "accepted/pass" in result.stderr
    assert f"with draft {stats['draft']}, budget {stats['budget']}," in result.stderr  # what ran
    assert result.stdout.strip() and "note: the reply stopped" not in result.stderr  # -n was given


def test_run_with_no_draft_is_the_target_alone_and_the_same_text(tmp_path):
    """`--draft none`: one token a pass (every pass accepts one token), the reference that the
    default drafter's greedy text equals."""
    prompt = "Repeat exactly: red green blue, red green blue, red green blue."
    out = {}
    for draft in ("none", "ngram"):
        path = tmp_path / f"{draft}.json"
        result = invoke(prompt, "--draft", draft, "--max-new-tokens", "24", "--stats",
                        "--stats-json", str(path))
        assert result.exit_code == 0, result.output
        out[draft] = (result.stdout, json.loads(path.read_text()), result.stderr)
    text, stats, err = out["none"]
    assert stats["draft"] == "none" and stats["accepted_per_pass"] == 1.0
    assert "with no draft (one token a pass)," in " ".join(err.split())
    assert text.strip() and out["ngram"][0] == text
    assert out["ngram"][1]["target_passes"] < stats["target_passes"]  # the n-gram trees paid


def test_run_says_when_the_default_length_cut_the_reply():
    result = invoke("Write a 2000-word essay about the history of Rome.")
    assert result.exit_code == 0, result.output
    assert "note: the reply stopped at 256 tokens (--max-new-tokens N for longer replies)" in result.stderr


def test_raw_greedy_stdout_is_exactly_the_continuation(model, tokenizer):
    prompt = "The three primary colors are"
    # --quant 16: the GGUF expanded to float32, the weights of the `model` fixture
    proc = subprocess.run([sys.executable, "-m", "specexec_app", "run", prompt, "--raw", "--quant", "16",
                           "--temperature", "0", "--max-new-tokens", "24", "--budget", "16"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no library warnings (transformers' renamed cache argument, ...)
    ids = tokenizer(prompt).input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    new = out[0, len(ids):].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    assert proc.stdout == tokenizer.decode(new, skip_special_tokens=True)


def test_offloaded_4bit_run_reports_its_placement(source):
    result = invoke("Say hello.", "--target", source.path, "--offload", "always", "--quant", "4",
                    "--max-new-tokens", "8")
    assert result.exit_code == 0, result.output
    assert "0 resident + 30 streamed layers, 4-bit" in result.stderr
    # RAM kept for the KV cache of the default context (8192) and the default budget (32).
    assert "kept for the KV cache of 8192 tokens and 32-node trees" in result.stderr
    assert result.stdout.strip()


@pytest.mark.parametrize("args, needle", [
    (["hi", "--quant", "3"], "--quant must be 16, 8 or 4"),
    (["hi", "--offload", "maybe"], "--offload must be auto, always, disk or never"),
    (["hi", "--offload", "disk", "--quant", "4"], "cannot stream from disk at 4 bits"),
    (["hi", "--gpu-memory", "lots"], "cannot read the size 'lots'"),
])
def test_bad_offload_options(args, needle, source):
    assert_one_line_error(invoke(*args, "--target", source.path), needle)


def test_quant_on_a_gguf_is_refused_or_expands_it():
    """The default model is a GGUF: --quant 4 or 8 would quantize a quantized model (refused);
    --quant 16 expands its blocks to float32 at load."""
    assert_one_line_error(invoke("hi", "--quant", "4"), "is already quantized (GGUF); --quant 4 "
                          "does not apply")
    result = invoke("Say hi.", "--quant", "16", "--max-new-tokens", "4")
    assert result.exit_code == 0 and result.stdout.strip(), result.output


def test_resolve_names_a_gguf_file_and_a_folder(source):
    from specexec_app.loading.sources import resolve, smollm2_gguf

    gguf = smollm2_gguf()
    src = resolve(str(gguf))
    assert src.path == str(gguf.parent) and src.gguf_file == gguf.name
    assert resolve(source.path).gguf_file is None


def test_repo_id_from_the_local_hf_cache(source, tmp_path):
    """`--target org/name` loads a model that sits in the local Hugging Face cache, offline."""
    import os

    repo = tmp_path / "hub" / "models--local--smollm2"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(source.path, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    env = os.environ | {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "specexec_app", "run", "Hello", "--raw",
                           "--target", "local/smollm2", "--max-new-tokens", "4"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout and proc.stderr == ""  # the packed kernels' lean forward warns of nothing
    proc = subprocess.run([sys.executable, "-m", "specexec_app", "run", "Hello",
                           "--target", "local/absent"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 1 and "model not found: local/absent" in proc.stderr


def test_pass_time_leaves_out_each_replys_first_pass():
    """ms/pass in the stats line is a decode pass's time: each reply's first pass (which holds
    the prompt's prefill) apart, as tokens/s; a session's sum of replies likewise."""
    from specexec_app.core.engine import Pass, Stats
    from specexec_app.ui.render import stats_line, total

    replies = []
    for prefill in (0.9, 0.5):
        s = Stats()
        for target_s, end in ((prefill, 1.0), (0.01, 1.1), (0.03, 1.2)):
            s.add(Pass(tree_size=8, accepted=2, draft_s=0.0, target_s=target_s, end_s=end))
        replies.append(s)
    assert replies[0].pass_s == pytest.approx(0.02)
    assert "20 ms/pass" in stats_line(replies[0])
    assert total(replies).pass_s == pytest.approx(0.02)
    one = Stats()
    one.add(Pass(tree_size=0, accepted=1, draft_s=0.0, target_s=0.4, end_s=0.5))
    assert one.pass_s == pytest.approx(0.4)  # a reply of one pass: that pass


def test_tokens_per_s_when_later_passes_only_drew_the_end_of_the_text():
    """A reply whose tokens all came in its first pass, later passes only drawing the end of the
    text, shows the reply's speed, not 0.00 tok/s; counts of one read in the singular."""
    from specexec_app.core.engine import Pass, Stats
    from specexec_app.ui.render import stats_line

    s = Stats(prompt_tokens=1)
    s.add(Pass(tree_size=8, accepted=4, draft_s=0.0, target_s=0.5, end_s=1.0))
    s.add(Pass(tree_size=8, accepted=0, draft_s=0.0, target_s=0.1, end_s=2.0))
    assert s.tokens_per_s == pytest.approx(2.0)
    one = Stats(prompt_tokens=1)
    one.add(Pass(tree_size=0, accepted=1, draft_s=0.0, target_s=0.4, end_s=0.5))
    line = stats_line(one)
    assert one.prompt_tokens_per_s == pytest.approx(2.5)  # over the target's 0.4 s
    drafted = Stats(prompt_tokens=100)
    drafted.add(Pass(tree_size=64, accepted=3, draft_s=1.0, target_s=0.5, end_s=1.5))
    assert drafted.prompt_tokens_per_s == pytest.approx(200)  # the first tree's drafting apart
    assert "prompt 1 token," in line and "generation 1 token," in line and "over 1 pass," in line
    s.prompt_tokens = 2
    assert "prompt 2 tokens," in stats_line(s) and "over 2 passes," in stats_line(s)


def test_run_stopped_by_ctrl_c_reports_what_it_did(tmp_path):
    """`run` stopped by Ctrl+C half way: exit 130 and still its stats line and --stats-json for
    the tokens it wrote (stop: interrupted)."""
    import signal

    out = tmp_path / "stats.json"
    proc = subprocess.Popen([sys.executable, "-m", "specexec_app", "run",
                             "Write a long story about a dragon who learns to paint.",
                             "--max-new-tokens", "400", "--stats", "--stats-json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        said = b""
        while len(said.split()) < 6:  # the reply has begun
            chunk = proc.stdout.read1(64)
            assert chunk, proc.stderr.read().decode()
            said += chunk
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 130, err
    assert "stop: interrupted" in err and "Traceback" not in err, err
    data = json.loads(out.read_text())
    assert data["stop_reason"] == "interrupted" and 0 < data["new_tokens"] < 400
    assert data["target_passes"] >= 1
