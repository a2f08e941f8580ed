"""The drafters for one target side by side, in one run (issue 7): the n-gram drafter, quantized
self-drafts (int8, NF4), the distilled draft, and the undistilled start of that draft (the
target's first layers) as a control.

On held-out Spec-Bench prompts (the first of each category: `specexec distill` never trains on
them), per drafter: agreement with the target (teacher-forced on the target's greedy answers:
how often the draft's argmax is the target's, how often the target's argmax is in the draft's
top 8), and decoding (greedy, and temperature 0.6 / top-p 0.9): tokens accepted per target pass,
decode tokens/s, and the speedup over the target alone (our engine, one token per pass, same
prompts). Greedy outputs are checked against the target alone.

    python benchmarks/drafts_compare.py --out bench-out [--draft DIR] [--budgets 4,16]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import psutil
import torch

from drafts import ModelDrafter, NgramDrafter
from drafts.chain import NoDraft
from drafts.distilled import load_draft, make_draft
from specexec_app.tools.distill import _answer_hidden, answer
from specexec_app.loading.sources import DEFAULT_MODEL, SHIPPED_DRAFTS
from specexec_app.loading.session import self_draft_model
from specexec_app.loading.hf import load_model, load_tokenizer, stop_ids
from specexec_app.loading.sources import resolve
from specexec_app.loading.session import Pipeline
from specexec_app.core.lm import Target
from specexec_app.config.settings import DecodeSettings
from specexec_app.tools.prompts import bench_prompts
from specexec_app.tools.tune import decode


def agreement(draft, target, held: list[dict]) -> dict:
    n = top1 = top8 = 0
    with torch.inference_mode():
        for r in held:
            want = target.lm_head(_answer_hidden(target, [r])).argmax(-1)
            logits = draft.lm_head(_answer_hidden(draft, [r]))
            top1 += int((logits.argmax(-1) == want).sum())
            top8 += int((logits.topk(8, -1).indices == want[:, None]).any(-1).sum())
            n += len(want)
    return {"top1": top1 / n, "top8": top8 / n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--draft", default=str(SHIPPED_DRAFTS["smollm2-distilled"]),
                    help="the distilled draft folder")
    ap.add_argument("--budgets", default="4,16")
    ap.add_argument("--drafts", default="ngram,distilled,first-layers,self-int8,self-nf4",
                    help="which drafters to run (the target alone always runs, as the baseline)")
    ap.add_argument("--modes", default="greedy,t0.6")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    cpu = torch.device("cpu")

    src = resolve(DEFAULT_MODEL)
    tok = load_tokenizer(src)
    model = load_model(src, cpu)
    stops = stop_ids(tok, model)
    vocab = model.config.vocab_size
    prompts = [p for _, p in bench_prompts(first=0, count=1)]
    pipe = Pipeline(Target(model, DEFAULT_MODEL), NoDraft(), tok, stops, DEFAULT_MODEL, "none", 1)
    held = answer(model, [pipe.encode(p) for p in prompts], args.max_new_tokens,
                  tok.pad_token_id, stops, None, None)

    wanted = args.drafts.split(",")
    distilled = load_draft(args.draft, model, cpu)
    n_layers = distilled.config.num_hidden_layers
    makers = {"ngram": lambda: None, "distilled": lambda: distilled,
              "first-layers": lambda: make_draft(model, n_layers, cpu)[0],
              "self-int8": lambda: self_draft_model(src, cpu, "int8"),
              "self-nf4": lambda: self_draft_model(src, cpu, "nf4")}
    drafts = {(f"first-{n_layers}-layers" if k == "first-layers" else k): makers[k]()
              for k in makers if k in wanted}
    modes = {k: v for k, v in {"greedy": dict(temperature=0.0),
                               "t0.6": dict(temperature=0.6, top_p=0.9, seed=0)}.items()
             if k in args.modes.split(",")}

    rows = []
    base = {}
    decode(pipe, prompts[:1], DecodeSettings(budget=1, max_new_tokens=8))  # warm-up, untimed
    for mode, kw in modes.items():
        pipe.drafter = NoDraft()
        run = decode(pipe, prompts, DecodeSettings(budget=1, max_new_tokens=args.max_new_tokens, **kw))
        base[mode] = run.tokens_per_s
        rows.append({"draft": "none (target alone)", "mode": mode, "budget": 1,
                     "accepted_per_pass": run.accepted_per_pass, "tokens_per_s": run.tokens_per_s,
                     "speedup": 1.0})
        print(rows[-1], flush=True)
    for name, dmodel in drafts.items():
        agree = agreement(dmodel, model, held) if dmodel is not None else {}
        for mode, kw in modes.items():
            for b in budgets:
                pipe.drafter = (NgramDrafter(min_ngram=3) if dmodel is None else
                                ModelDrafter(dmodel, vocab, stop_ids=frozenset(stops)))
                run = decode(pipe, prompts, DecodeSettings(budget=b, max_new_tokens=args.max_new_tokens, **kw))
                rows.append({"draft": name, "mode": mode, "budget": b} | agree |
                            {"accepted_per_pass": run.accepted_per_pass,
                             "tokens_per_s": run.tokens_per_s,
                             "speedup": run.tokens_per_s / base[mode]})
                print(rows[-1], flush=True)

    head = (f"Machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; {datetime.date.today()}; target {DEFAULT_MODEL} "
            f"(fp32, CPU); {len(prompts)} held-out Spec-Bench prompts (the first of each category), "
            f"{args.max_new_tokens} new tokens max; decode speed (prefill pass left out).")
    lines = [head, "", "| draft | top-1 agreement | top-8 coverage | mode | budget | accepted/pass "
             "| tok/s | vs target alone |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a1 = f"{r['top1']:.1%}" if "top1" in r else "-"
        a8 = f"{r['top8']:.1%}" if "top8" in r else "-"
        lines.append(f"| {r['draft']} | {a1} | {a8} | {r['mode']} | {r['budget']} | "
                     f"{r['accepted_per_pass']:.2f} | {r['tokens_per_s']:.2f} | {r['speedup']:.2f}x |")
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drafts_compare.md").write_text(text)
    (args.out / "drafts_compare.json").write_text(json.dumps(rows, indent=1))
    print(text)


if __name__ == "__main__":
    main()
