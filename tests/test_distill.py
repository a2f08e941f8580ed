"""`specexec distill` on the real default target (a tiny run: a few prompts, a few steps): it
learns, resumes, writes a draft that shares the target's embedding and head, and that draft
decodes exactly and refuses another target."""

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from drafts import ModelDrafter
from drafts.distilled import META_FILE, load_draft
from specexec_app.ui.cli import app
from specexec_app.tools.distill import DistillSettings, Finished, Note, Step, distill
from specexec_app.errors import UserError
from specexec_app.loading.hf import stop_ids

from test_exactness import PROMPTS, assert_same_greedy, reference, run

TRAIN = ["Name a colour.", "Count to five.", "Say hello in French.", "What is two plus two?",
         "Name a fruit.", "Name a planet.", "Write a haiku about rain.", "Name a sea."]
SETTINGS = dict(layers=1, batch=4, max_new_tokens=12, save_every=3, lr=2e-3)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(TRAIN) + "\n")
    return path


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, model, tokenizer, prompts_file):
    out = tmp_path_factory.mktemp("draft")
    events = list(distill(model, tokenizer, stop_ids(tokenizer, model), "smollm2", out,
                          DistillSettings(steps=6, **SETTINGS), prompts_file))
    return out, events


def test_distill_learns_and_writes_a_small_draft(distilled, model):
    out, events = distilled
    losses = [e.loss for e in events if isinstance(e, Step) and e.stage == "training"]
    assert len(losses) == 6
    assert losses[-1] < losses[0]  # running mean of the loss falls as it trains
    report = events[-1].report
    assert isinstance(events[-1], Finished) and report["steps"] == 6
    assert report["train_answers"] == len(TRAIN) - 1  # the last tenth (one prompt) is held out
    assert report["heldout_prompts"] == 1
    for name in ("config.json", "model.safetensors", META_FILE, "tokenizer.json", "report.json"):
        assert (out / name).is_file(), name
    # Only the draft's own layer and norm are stored: the embedding and head are the target's.
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys and not any("embed" in k or "lm_head" in k for k in keys)
    assert all(k.startswith(("model.layers.0.", "model.norm.")) for k in keys)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    layer_bytes = sum(p.numel() for p in model.model.layers[0].parameters()) * 2
    assert (out / "model.safetensors").stat().st_size < 1.1 * layer_bytes


def test_distill_resumes_from_its_checkpoint(distilled, model, tokenizer, prompts_file):
    out, _ = distilled
    events = list(distill(model, tokenizer, stop_ids(tokenizer, model), "smollm2", out,
                          DistillSettings(steps=8, **SETTINGS), prompts_file))
    assert any(isinstance(e, Note) and "resuming from step 6" in e.message for e in events)
    stages = {e.stage for e in events if isinstance(e, Step)}
    assert "generating" not in stages  # the target's answers were kept
    trained = [e.done for e in events if isinstance(e, Step) and e.stage == "training"]
    assert trained == [7, 8]
    assert events[-1].report["steps"] == 8


def test_distilled_draft_decodes_exactly(distilled, model, tokenizer, chat_ids):
    out, _ = distilled
    draft = load_draft(out, model, torch.device("cpu"))
    assert draft.get_input_embeddings().weight is model.get_input_embeddings().weight  # shared
    ids, stops = chat_ids(PROMPTS[1]), stop_ids(tokenizer, model)
    drafter = ModelDrafter(draft, model.config.vocab_size, stop_ids=frozenset(stops))
    done = run(model, drafter, ids, stops, tokenizer, budget=4)
    assert_same_greedy(model, ids, done.token_ids, reference(model, ids, stops))


def test_distilled_draft_refuses_another_target(distilled):
    from transformers import LlamaConfig, LlamaForCausalLM

    out, _ = distilled
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3)
    other = LlamaForCausalLM(cfg)
    with pytest.raises(UserError, match="distilled for smollm2, not for this target"):
        load_draft(out, other, torch.device("cpu"))


def test_distill_command_then_run_with_its_draft(tmp_path, prompts_file):
    runner = CliRunner()
    out = tmp_path / "draft"
    result = runner.invoke(app, ["distill", "--out", str(out), "--prompts", str(prompts_file),
                                 "--layers", "1", "--steps", "2", "--max-new-tokens", "8",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "top1_agreement" in result.stdout and f"--draft {out}" in result.stdout
    ask = ["run", "What is two plus two?", "--max-new-tokens", "24", "--device", "cpu"]
    with_draft = runner.invoke(app, ask + ["--draft", str(out)])
    alone = runner.invoke(app, ask + ["--draft", "ngram"])
    assert with_draft.exit_code == 0 and alone.exit_code == 0, with_draft.output
    assert with_draft.stdout == alone.stdout  # both are the target's own greedy reply


def test_distill_bad_input_is_one_line(tmp_path):
    runner = CliRunner()
    (tmp_path / "few.txt").write_text("one\ntwo\n")
    for args, needle in [(["--mode", "fast"], "--mode must be greedy or sampling"),
                         (["--prompts", str(tmp_path / "few.txt")], "give at least 4"),
                         (["--prompts", str(tmp_path / "none.txt")], "cannot read"),
                         (["--layers", "30"], "--layers must be between 1 and 29")]:
        result = runner.invoke(app, ["distill", "--out", str(tmp_path / "d"), "--device", "cpu",
                                     "--steps", "1", *args])
        assert result.exit_code == 1, result.output
        assert result.stderr.strip().startswith("error:") and needle in result.stderr, result.stderr
        assert "Traceback" not in result.output
