"""Tokens accepted per target pass against the tree budget, for one target and draft.

Acceptance depends on the pair and the tree, not on the hardware, so this curve can be measured
on any machine (slowly on a CPU: large trees cost a model draft seconds there). It is the number
to set beside SpecExec's published curve (about 20 tokens per pass at budget 2048 for a
well-aligned pair at temperature 0.6). Every pass counts, the first (with the prefill) included.

    python benchmarks/acceptance_curve.py --draft self-int8 --budgets 16,64,256,1024,2048

`--growth old` grows the trees with the growth of cf67880 (benchmarks/draft_bench.py keeps a
copy), to set the two side by side on the same prompts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
from pathlib import Path

from specexec_app.tools.bench import ALL_CATEGORIES, MODES, ours
from specexec_app.loading.session import build_named
from specexec_app.config.settings import DecodeSettings
from specexec_app.tools.prompts import bench_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="default")
    ap.add_argument("--draft", default="self-int8")
    ap.add_argument("--budgets", default="16,64,256,1024,2048")
    ap.add_argument("--modes", default="t0.6", help="comma-separated: greedy, t0.6")
    ap.add_argument("--categories", default=",".join(ALL_CATEGORIES))
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--growth", choices=("new", "old"), default="new")
    ap.add_argument("--quant", type=int, default=None,
                    help="the target's --quant (16: a GGUF expanded to float32, as the 2026-11-23 table)")
    ap.add_argument("--no-seed", action="store_true",
                    help="no seeding of trees with the text's own continuation (drafts/model.py)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/acceptance.json"))
    args = ap.parse_args()

    pipe = build_named(args.target, args.draft, **({"quant": args.quant} if args.quant else {}))
    drafter = pipe.drafter
    if args.growth == "old":
        from draft_bench import OldDrafter

        drafter = OldDrafter(drafter.model, drafter.vocab_size, stop_ids=drafter.stop_ids)
    if args.no_seed:
        drafter.seed = False
    prompts = bench_prompts(args.categories.split(","))
    encoded = [(cat, pipe.encode(p)) for cat, p in prompts]
    rows = []
    for mode in args.modes.split(","):
        temperature, top_p = MODES[mode]
        for budget in [int(b) for b in args.budgets.split(",")]:
            runs, forwards = [], drafter.forwards
            for i, (cat, ids) in enumerate(encoded):
                settings = DecodeSettings(budget=budget, temperature=temperature, top_p=top_p,
                                          max_new_tokens=args.max_new_tokens, seed=i)
                _, r = ours(pipe, drafter, ids, settings)
                runs.append(r | {"category": cat})
            tokens = sum(r["new_tokens"] for r in runs)
            passes = sum(r["target_passes"] for r in runs)
            row = {"mode": mode, "budget": budget, "tokens": tokens, "passes": passes,
                   "accepted_per_pass": tokens / passes,
                   "median_prompt_accepted_per_pass": statistics.median(
                       r["new_tokens"] / r["target_passes"] for r in runs),
                   "draft_forwards_per_pass": (drafter.forwards - forwards) / passes,
                   "draft_s_per_pass": sum(r["draft_s"] for r in runs) / passes,
                   "target_s_per_pass": sum(r["target_s"] for r in runs) / passes, "runs": runs}
            rows.append(row)
            print(f"{mode:>6} budget {budget:>5}: {row['accepted_per_pass']:5.2f} accepted/pass "
                  f"({tokens} tokens, {passes} passes; per prompt median "
                  f"{row['median_prompt_accepted_per_pass']:.2f}); draft "
                  f"{row['draft_forwards_per_pass']:.1f} forwards, "
                  f"{row['draft_s_per_pass']:.2f} s, target {row['target_s_per_pass']:.2f} s "
                  "per pass", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "machine": platform.platform(terse=True),
        "target": pipe.target_name, "draft": pipe.draft_name, "growth": args.growth,
        "seed": not args.no_seed, "prompts": len(encoded),
        "categories": [c for c, _ in encoded], "max_new_tokens": args.max_new_tokens,
        "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
