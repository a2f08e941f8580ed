"""Budget sweep of the default pair on this machine, side by side with plain `model.generate`.

For every Spec-Bench category (first turn, chat template), greedy decoding of the same prompts by:
the target alone (`generate`), SpecExec with the n-gram drafter at budgets 1..256 (all matches, and
matches of 3+ tokens only, the CPU default), and SpecExec with
model drafters made from the target (a truncated 3-layer copy; an int8 copy) on a subset. Prints
Markdown tables and writes them with a JSON file to --out. Greedy output is checked against
`generate` on every run (a mismatch is reported, not hidden).

    python benchmarks/cpu_default_pair.py --per-category 1 --out bench-out
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import psutil
import torch

from drafts import ModelDrafter, NgramDrafter
from specexec_app.core import engine
from specexec_app.core.lm import Target
from specexec_app.loading.sources import DEFAULT_MODEL, resolve
from specexec_app.loading.session import self_draft_model
from specexec_app.loading.hf import load_model, load_tokenizer, stop_ids, truncated_copy
from specexec_app.config.settings import DecodeSettings
from specexec_app.tools.prompts import bench_prompts

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--budgets", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--model-draft-prompts", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]

    src = resolve(DEFAULT_MODEL)
    tok = load_tokenizer(src)
    model = load_model(src, torch.device("cpu"))
    stops = stop_ids(tok, model)
    prompts = bench_prompts(count=args.per_category)
    encoded = []
    for cat, text in prompts:
        rendered = tok.apply_chat_template([{"role": "user", "content": text}],
                                           add_generation_prompt=True, tokenize=False)
        encoded.append((cat, tok(rendered, add_special_tokens=False).input_ids))
    new = args.max_new_tokens

    rows: list[dict] = []
    refs = {}
    with torch.inference_mode():  # warm-up, untimed: the first call pays one-time costs
        model.generate(torch.tensor([encoded[0][1]]), max_new_tokens=8, do_sample=False,
                       attention_mask=torch.ones(1, len(encoded[0][1]), dtype=torch.long))
    for i, (cat, ids) in enumerate(encoded):  # the baseline: the target alone
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=new, do_sample=False)[0, len(ids):].tolist()
        wall = time.perf_counter() - t
        cut = next((k for k, x in enumerate(out) if x in stops), len(out))
        refs[i] = out[:cut]
        rows.append(dict(method="generate", budget=0, category=cat, new_tokens=len(out),
                         passes=len(out), wall_s=wall, draft_s=0.0, target_s=wall, exact=True))

    def sweep(name, drafter, budget, subset):
        for i in subset:
            cat, ids = encoded[i]
            drafter.reset()
            events = list(engine.generate(Target(model), drafter, ids,
                                          DecodeSettings(budget=budget, max_new_tokens=new), tok, stops))
            s = events[-1].stats
            rows.append(dict(method=name, budget=budget, category=cat, new_tokens=s.new_tokens,
                             passes=s.target_passes, wall_s=s.wall_s, draft_s=s.draft_s,
                             target_s=s.target_s, exact=events[-1].token_ids == refs[i]))
        agg = summarize([r for r in rows if r["method"] == name and r["budget"] == budget])
        print(f"{name:>18} budget {budget:>4}: {agg['acc']:.2f} tokens/pass, {agg['tps']:.2f} tok/s", flush=True)

    everything = range(len(encoded))
    for b in budgets:
        sweep("ngram", NgramDrafter(), b, everything)
    for b in (4, 8, 16, 64):  # the CPU default: matches of 3+ tokens only
        sweep("ngram-min3", NgramDrafter(min_ngram=3), b, everything)
    subset = range(0, len(encoded), max(1, len(encoded) // max(1, args.model_draft_prompts)))
    drafts = {"truncated-3-layer": lambda: truncated_copy(model, 3)}
    try:
        import bitsandbytes  # noqa: F401
        drafts["self-int8"] = lambda: self_draft_model(src, torch.device("cpu"), "int8")
    except ImportError:
        pass
    drafts = drafts if args.model_draft_prompts else {}
    for name, make in drafts.items():
        dmodel = make()
        for b in (4, 16):
            sweep(name, ModelDrafter(dmodel, model.config.vocab_size, stop_ids=frozenset(stops)), b, subset)
        # the baseline on the same subset, for a fair ratio
    write_report(rows, args, budgets, len(encoded), list(subset))


def summarize(rs: list[dict]) -> dict:
    toks = sum(r["new_tokens"] for r in rs)
    return dict(acc=toks / max(1, sum(r["passes"] for r in rs)),
                tps=toks / max(1e-9, sum(r["wall_s"] for r in rs)),
                pass_ms=1000 * sum(r["target_s"] for r in rs) / max(1, sum(r["passes"] for r in rs)),
                draft_s=sum(r["draft_s"] for r in rs), exact=sum(r["exact"] for r in rs), n=len(rs))


def write_report(rows, args, budgets, n_prompts, subset) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    head = (f"Machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; {datetime.date.today()}; "
            f"{n_prompts} Spec-Bench prompts ({args.per_category} per category), greedy, "
            f"{args.max_new_tokens} new tokens max.")
    lines = [head, "", "| method | budget | prompts | tokens/pass | tok/s | vs generate (same prompts) | ms/pass | draft s | exact |",
             "|---|---|---|---|---|---|---|---|---|"]
    combos = []
    for r in rows:
        if (r["method"], r["budget"]) not in combos:
            combos.append((r["method"], r["budget"]))
    for method, budget in combos:
        rs = [r for r in rows if r["method"] == method and r["budget"] == budget]
        cats = [r["category"] for r in rs]
        base = summarize([r for r in rows if r["method"] == "generate" and r["category"] in cats])
        a = summarize(rs)
        lines.append(f"| {method} | {budget or '-'} | {a['n']} | {a['acc']:.2f} | {a['tps']:.2f} | "
                     f"{a['tps'] / base['tps']:.2f}x | {a['pass_ms']:.0f} | {a['draft_s']:.1f} | {a['exact']}/{a['n']} |")
    best_method, best = max({(r["method"], r["budget"]) for r in rows if r["method"].startswith("ngram")},
                            key=lambda mb: summarize([r for r in rows if (r["method"], r["budget"]) == mb])["tps"])
    lines += ["", f"Per category, the fastest n-gram setting ({best_method}, budget {best}):", "",
              "| category | tokens/pass | tok/s | generate tok/s | speedup |", "|---|---|---|---|---|"]
    for cat in dict.fromkeys(r["category"] for r in rows):
        a = summarize([r for r in rows if r["method"] == best_method and r["budget"] == best and r["category"] == cat])
        g = summarize([r for r in rows if r["method"] == "generate" and r["category"] == cat])
        lines.append(f"| {cat} | {a['acc']:.2f} | {a['tps']:.2f} | {g['tps']:.2f} | {a['tps'] / g['tps']:.2f}x |")
    text = "\n".join(lines) + "\n"
    (args.out / "cpu_default_pair.md").write_text(text)
    (args.out / "cpu_default_pair.json").write_text(json.dumps(rows, indent=1))
    print(text)


if __name__ == "__main__":
    main()
