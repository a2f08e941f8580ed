"""The default model's decode speed on this CPU, side by side in one run (issue: the CPU as a
compute device): specexec on the packed kernels one token per pass, specexec with the default
drafter (what `specexec run` does), both again with float32 attention (the lean forward's
attention is float64 for schedule-invariant greedy output; this measures its cost), specexec on
the float32 weights (`--quant 16`, the path
before the kernels), transformers' `generate` on the same GGUF (dequantized to float32 by
transformers), and llama.cpp on the same GGUF file (when `llama_cpp` imports: `pip install
llama-cpp-python` builds it). Greedy, the same chat-templated token ids for all, Spec-Bench
prompts (one per category), `--new` tokens each.

Decode tokens/s leaves the prompt's prefill out for every system: specexec's own figure (time
after the first pass), transformers' generate timed to `--new` tokens minus its time to one
token, llama.cpp's own eval counters (`llama_perf_context`: its decode time, no Python).

    python benchmarks/cpu_decode.py [--prompts 6] [--new 128] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def specexec_rate(pipe, prompts, new: int, budget: int) -> dict:
    from specexec_app.config.settings import DecodeSettings

    tokens = seconds = passes = 0
    outs = []
    for ids in prompts:
        done = list(pipe.generate(ids, DecodeSettings(budget=budget, max_new_tokens=new)))[-1]
        s = done.stats
        decode_s = s.wall_s - s.prefill_s
        tokens += s.new_tokens - s.first_pass_tokens
        seconds += decode_s
        passes += s.target_passes - 1
        outs.append(done.token_ids)
    return {"tokens_per_s": tokens / seconds, "accepted_per_pass": tokens / max(1, passes),
            "ms_per_pass": 1000 * seconds / max(1, passes), "outputs": outs}


def transformers_rate(model, prompts, new: int, stops) -> dict:
    tokens = seconds = 0.0
    outs = []
    for ids in prompts:
        x = torch.tensor([ids])
        mask = torch.ones_like(x)
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(x, attention_mask=mask, max_new_tokens=1, do_sample=False)
            t1 = time.perf_counter()
            out = model.generate(x, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                 eos_token_id=sorted(stops))[0, len(ids):].tolist()
            t2 = time.perf_counter()
        tokens += len(out) - 1
        seconds += (t2 - t1) - (t1 - t0)
        outs.append(out)
    return {"tokens_per_s": tokens / seconds, "outputs": outs}


def llama_rate(path: str, prompts, new: int, threads: int) -> dict | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=4096,
                          verbose=False)
    tokens = seconds = 0.0
    outs = []
    for ids in prompts:
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm.ctx)
        out = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if llm.token_eos() == tok or len(out) >= new:
                break
            out.append(tok)
        perf = llama_cpp.llama_perf_context(llm.ctx)
        tokens += perf.n_eval
        seconds += perf.t_eval_ms / 1000
        outs.append(out)
    return {"tokens_per_s": tokens / seconds, "outputs": outs,
            "version": getattr(llama_cpp, "__version__", "?")}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """The share of tokens before the first difference, over all prompts."""
    same = total = 0
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        same += n
        total += max(len(x), len(y))
    return same / max(1, total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=6, help="Spec-Bench prompts, one per category")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from drafts import NgramDrafter
    from specexec_app.config.settings import resolve
    from specexec_app.loading.hf import load_model
    from specexec_app.loading.session import build
    from specexec_app.loading.sources import smollm2_gguf
    from specexec_app.tools.prompts import CATEGORIES, bench_prompts

    config = resolve({})  # what `specexec run` uses with no options (no saved profile)
    pipe = build(config.load)
    texts = [p for _, p in bench_prompts(CATEGORIES)][: args.prompts]
    prompts = [pipe.encode(t) for t in texts]
    results = {}
    default = config.decode.budget
    print(f"{len(prompts)} Spec-Bench prompts, {args.new} new tokens, greedy, {args.threads} threads")

    one = pipe.drafter
    pipe.drafter = NgramDrafter(min_ngram=10**6)  # proposes nothing: one token per pass
    specexec_rate(pipe, prompts[:1], 8, 1)  # warm-up
    results["specexec, packed kernels, one token per pass"] = specexec_rate(pipe, prompts, args.new, 1)
    pipe.drafter = one
    results[f"specexec, packed kernels, default drafter ({config.load.draft}, budget {default})"] = \
        specexec_rate(pipe, prompts, args.new, default)
    # The same with float32 attention (before: faster, but greedy output moved with the draft at
    # bf16 near-ties; offload/cpu_forward.py): what float64 attention costs, side by side.
    import offload.cpu_forward as lean
    from specexec_app.core.kvcache import TokenCache

    lean.ATTENTION_DTYPE, pipe.target.kv = torch.float32, TokenCache()
    pipe.drafter = NgramDrafter(min_ngram=10**6)
    results["  the same, float32 attention, one token per pass"] = specexec_rate(pipe, prompts, args.new, 1)
    pipe.drafter = one
    results[f"  the same, float32 attention, default drafter (budget {default})"] = \
        specexec_rate(pipe, prompts, args.new, default)
    lean.ATTENTION_DTYPE = torch.float64
    del pipe
    dense = build(config.load.__class__(**{**config.load.__dict__, "quant": 16}))
    dense.drafter = NgramDrafter(min_ngram=10**6)
    results["specexec, float32 weights (--quant 16), one token per pass"] = \
        specexec_rate(dense, prompts, args.new, 1)
    model, stops = dense.target.model, dense.stop_ids
    del dense
    src = __import__("specexec_app.loading.sources", fromlist=["resolve"]).resolve("smollm2")
    hf = load_model(src, torch.device("cpu"))
    del model
    results["transformers generate (float32 from the GGUF)"] = transformers_rate(hf, prompts, args.new, stops)
    del hf
    llama = llama_rate(smollm2_gguf(), prompts, args.new, args.threads)
    if llama:
        results[f"llama.cpp {llama.pop('version')} (llama-cpp-python)"] = llama

    base = llama["tokens_per_s"] if llama else None
    ref = next(iter(results.values()))["outputs"]
    for name, r in results.items():
        ratio = f"  {r['tokens_per_s'] / base:.2f}x llama.cpp" if base else ""
        extra = (f"  ({r['accepted_per_pass']:.2f} tokens/pass, {r['ms_per_pass']:.1f} ms/pass)"
                 if "accepted_per_pass" in r else "")
        print(f"{r['tokens_per_s']:8.1f} tok/s  {name}{ratio}{extra}  "
              f"[same greedy tokens as the first row: {agreement(r['outputs'], ref):.0%}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(),
                       "threads": args.threads, "new": args.new, "prompts": texts,
                       "results": {k: {x: y for x, y in v.items() if x != "outputs"}
                                   for k, v in results.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
