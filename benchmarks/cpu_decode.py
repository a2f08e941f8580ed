"""The default model's decode speed on this CPU, side by side in one run (issue: the CPU as a
compute device): specexec on the packed kernels one token per pass and with the default drafter
(what `specexec run` does), each with the fused C steps between the kernels (`offload.native`,
where a C compiler builds them) and with torch's operators there, specexec on the float32 weights (`--quant 16`, the path
before the kernels), transformers' `generate` on the same GGUF (dequantized to float32 by
transformers), and llama.cpp on the same GGUF file (when `llama_cpp` imports: `pip install
llama-cpp-python` builds it). Greedy, the same chat-templated token ids for all, Spec-Bench
prompts (one per category), `--new` tokens each.

Decode tokens/s leaves the prompt's prefill out for every system: specexec's own figure (time
after the first pass), transformers' generate timed to `--new` tokens minus its time to one
token, llama.cpp's own eval counters (`llama_perf_context`: its decode time, no Python).

The rows on the packed kernels and llama.cpp run interleaved: prompt by prompt, each system in turn (the
order rotating), for `--rounds` rounds, so that a virtual machine whose speed drifts by 20-30 %
within minutes (ours does) moves them all alike. The other rows run once, after them.

    python benchmarks/cpu_decode.py [--prompts 6] [--new 128] [--rounds 3] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time

import torch


class Tally:
    """Decode tokens, seconds and passes summed over prompts (and rounds), with each prompt's
    output as its first round gave it."""

    def __init__(self, passes: bool = True):
        self.tokens = self.seconds = self.passes = 0
        self.counts_passes = passes
        self.outputs: dict[int, list[int]] = {}

    def add(self, i: int, tokens: int, seconds: float, passes: int, out: list[int]) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.passes += passes
        self.outputs.setdefault(i, out)

    def result(self) -> dict:
        r = {"tokens_per_s": self.tokens / self.seconds,
             "outputs": [self.outputs[i] for i in sorted(self.outputs)]}
        if self.counts_passes:
            r |= {"accepted_per_pass": self.tokens / max(1, self.passes),
                  "ms_per_pass": 1000 * self.seconds / max(1, self.passes)}
        return r


def specexec_one(pipe, drafter, ids, new: int, budget: int, tally: Tally, i: int) -> None:
    from specexec_app.config.settings import DecodeSettings

    pipe.drafter = drafter
    done = list(pipe.generate(ids, DecodeSettings(budget=budget, max_new_tokens=new)))[-1]
    s = done.stats
    tally.add(i, s.new_tokens - s.first_pass_tokens, s.wall_s - s.prefill_s, s.target_passes - 1,
              done.token_ids)


def specexec_rate(pipe, drafter, prompts, new: int, budget: int) -> dict:
    tally = Tally()
    for i, ids in enumerate(prompts):
        specexec_one(pipe, drafter, ids, new, budget, tally, i)
    return tally.result()


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


def llama_model(path: str, threads: int):
    """llama.cpp on the GGUF, or None where `llama_cpp` does not import."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=4096,
                           verbose=False)


def llama_one(llm, ids, new: int, tally: Tally, i: int) -> None:
    import llama_cpp

    llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    out = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if llm.token_eos() == tok or len(out) >= new:
            break
        out.append(tok)
    perf = llama_cpp.llama_perf_context(llm.ctx)
    tally.add(i, perf.n_eval, perf.t_eval_ms / 1000, 0, out)


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
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the interleaved rows")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if min(args.prompts, args.new, args.rounds, args.threads) < 1:
        ap.error("--prompts, --new, --rounds and --threads must be at least 1")
    torch.set_num_threads(args.threads)

    from drafts import NgramDrafter
    from offload import native
    from specexec_app.config.settings import resolve
    from specexec_app.loading.hf import load_model
    from specexec_app.loading.session import build
    from specexec_app.loading.sources import smollm2_gguf
    from specexec_app.tools.prompts import CATEGORIES, bench_prompts

    config = resolve({})  # what `specexec run` uses with no options (no saved profile)
    pipe = build(config.load)
    texts = [p for _, p in bench_prompts(CATEGORIES)][: args.prompts]
    prompts = [pipe.encode(t) for t in texts]
    default = config.decode.budget
    print(f"{len(prompts)} Spec-Bench prompts, {args.new} new tokens, greedy, {args.threads} threads")

    none, ngram = NgramDrafter(min_ngram=10**6), pipe.drafter  # none proposes: one token a pass
    specexec_rate(pipe, none, prompts[:1], 8, 1)  # warm-up
    llm = llama_model(smollm2_gguf(), args.threads)
    # name -> (drafter, budget, with the fused C steps) or None for llama.cpp
    drafted = f"default drafter ({config.load.draft}, budget {default})"
    systems = {}
    if native.library() is None:
        print(f"the fused C steps left out: {native.why()}")
    else:
        systems.update({"specexec, packed kernels + fused C steps, one token per pass": (none, 1, True),
                        f"specexec, packed kernels + fused C steps, {drafted}": (ngram, default, True)})
    systems.update({"specexec, packed kernels + torch operators, one token per pass": (none, 1, False),
                    f"specexec, packed kernels + torch operators, {drafted}": (ngram, default, False)})
    if llm is None:
        print("llama.cpp left out: llama_cpp does not import (`pip install llama-cpp-python` builds it)")
    else:
        import llama_cpp

        systems[f"llama.cpp {getattr(llama_cpp, '__version__', '?')} (llama-cpp-python)"] = None
    tallies = {name: Tally(passes=spec is not None) for name, spec in systems.items()}
    names = list(systems)
    for r in range(args.rounds):
        for i, ids in enumerate(prompts):
            turn = (r * len(prompts) + i) % len(names)
            for name in names[turn:] + names[:turn]:
                spec = systems[name]
                time.sleep(0.2)  # the last system's spinning threads go idle
                if spec is None:
                    llama_one(llm, ids, args.new, tallies[name], i)
                    continue
                with contextlib.nullcontext() if spec[2] else native.off():
                    specexec_one(pipe, spec[0], ids, args.new, spec[1], tallies[name], i)
        print(f"round {r + 1} of {args.rounds} done", flush=True)
    results = {name: t.result() for name, t in tallies.items()}
    llama = results.pop(names[-1]) if llm is not None else None
    del llm
    del pipe
    dense = build(config.load.__class__(**{**config.load.__dict__, "quant": 16}))
    results["specexec, float32 weights (--quant 16), one token per pass"] = \
        specexec_rate(dense, none, prompts, args.new, 1)
    model, stops = dense.target.model, dense.stop_ids
    del dense
    src = __import__("specexec_app.loading.sources", fromlist=["resolve"]).resolve("smollm2")
    hf = load_model(src, torch.device("cpu"))
    del model
    results["transformers generate (float32 from the GGUF)"] = transformers_rate(hf, prompts, args.new, stops)
    del hf
    if llama:
        results[names[-1]] = llama

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
                       "threads": args.threads, "new": args.new, "rounds": args.rounds,
                       "prompts": texts,
                       "results": {k: {x: y for x, y in v.items() if x != "outputs"}
                                   for k, v in results.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
