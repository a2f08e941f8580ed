"""Cost of a target pass on a CPU as the context grows (the default model), side by side in one
run: transformers' "sdpa" attention against ours (`specexec_app.core.lm._attention`: grouped KV heads
shared by SDPA rather than copied to every query head), and the KV commit as it was (a copy of
the whole cache per pass) against ours (only the accepted entries move).

    python benchmarks/long_context_cpu.py [--contexts 256,2048,6144] [--repeats 9]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch

from specexec_app.core.kvcache import TokenCache
from specexec_app.core.lm import ATTENTION, Target, forward_tree
from specexec_app.loading.sources import DEFAULT_MODEL, resolve
from specexec_app.loading.hf import load_model
from specexec_app.core.tree import Tree


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def whole_cache_copy(kv: TokenCache) -> None:
    """The commit as it was: every layer's cache re-indexed, prefix included."""
    index = torch.arange(kv.cache.get_seq_length())
    for layer in kv.cache.layers:
        layer.keys = layer.keys.index_select(-2, index)
        layer.values = layer.values.index_select(-2, index)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="256,2048,6144")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    model = load_model(resolve(DEFAULT_MODEL), torch.device("cpu"))
    target = Target(model)  # switches the model to our attention
    tree = Tree()
    tree.add(9, tree.add(7, -1, -1.0), -2.0)  # a 2-node tree: a 3-row pass
    print(f"{datetime.date.today()}, {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; pass = 1 pending token + a 2-node tree; median ms")
    print("| context | sdpa pass | ours pass | ratio | commit, whole-cache copy | commit, ours |")
    print("|---|---|---|---|---|---|")
    for ctx in [int(c) for c in args.contexts.split(",")]:
        tokens = [int(t) for t in torch.randint(100, 40000, (ctx,), generator=torch.Generator().manual_seed(0))]
        target.kv.reset()
        target.verify(tokens, Tree())
        target.commit(Tree(), [])
        times = {"sdpa": [], ATTENTION: [], "copy": [], "ours": []}
        for r in range(args.repeats + 1):
            for attn in ("sdpa", ATTENTION):  # interleaved, so that drift hits both alike
                model.set_attn_implementation(attn)
                kv = target.kv
                t0 = time.perf_counter()
                forward_tree(model, kv, [5], tree)
                t1 = time.perf_counter()
                if attn == "sdpa":
                    whole_cache_copy(kv)
                    t2 = time.perf_counter()
                    times["copy"].append(t2 - t1)
                kv.commit([], [])  # drops the pass's entries (nothing accepted): in place
                t3 = time.perf_counter()
                if attn != "sdpa":
                    times["ours"].append(t3 - t1)
                if r:
                    times[attn].append(t1 - t0)
        a, b = median(times["sdpa"]) * 1e3, median(times[ATTENTION]) * 1e3
        print(f"| {ctx} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {median(times['copy']) * 1e3:.1f} | "
              f"{median(times['ours']) * 1e3:.2f} |", flush=True)


if __name__ == "__main__":
    main()
