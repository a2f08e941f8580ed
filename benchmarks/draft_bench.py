"""Tree growth before and after issue 19, side by side in one run: draft forwards per tree, time
inside the draft model's forwards, and host work (the rest of `propose`), per budget.

"Before" is a copy of the growth of cf67880 (kept here for this comparison only): 32 nodes per
forward, a top-k and two `.tolist()` per node, the ancestor mask filled element by element in
Python and the whole tree re-sorted every round. "After" is drafts.model.ModelDrafter. Both start
from an empty draft cache for every tree (no reuse), on the same prompts and model.

    python benchmarks/draft_bench.py --budgets 256,1024,2048 --prompts 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from functools import wraps
from pathlib import Path

import numpy as np
import torch

import drafts.model as dm
from drafts.model import ModelDrafter
from offload.kernels import ManyRows
from specexec_app.core.kvcache import CACHE_ARG
from specexec_app.core.lm import forward_tree, model_device
from specexec_app.core.tree import Tree
from specexec_app.loading.session import build_named
from specexec_app.tools.prompts import bench_prompts


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


class OldDrafter(ModelDrafter):
    """The growth of cf67880, timed the same way (forwards and the time inside them)."""

    def propose(self, tokens: list[int], budget: int) -> Tree:
        t0 = dm.CLOCK()
        self._reuse_last_tree(tokens)
        pending = self.kv.sync(tokens)
        root = self._forward(lambda: forward_tree(self.model, self.kv, pending, Tree()))
        root_lp = self._logprobs(root)[-1]
        self.kv.tokens = list(tokens)
        tree, depths, slots = Tree(), [], []
        self._add_children(tree, depths, slots, -1, 0.0, root_lp)
        while True:
            batch = self._next_batch(tree, depths, slots, budget)
            if not batch:
                break
            logprobs = self._expand(tree, slots, batch, depths)
            for node, lp in zip(batch, logprobs):
                self._add_children(tree, depths, slots, node, tree.scores[node], lp)
        keep = tree.best_nodes(budget)
        final = tree.select(keep)
        self._last = (final, [slots[i] for i in keep])
        self.propose_s += dm.CLOCK() - t0
        return final

    def _forward(self, fn):
        t0 = dm.CLOCK()
        out = fn()
        self.forward_s += dm.CLOCK() - t0
        self.forwards += 1
        return out

    def _logprobs(self, logits):
        return torch.log_softmax(logits[:, : self.vocab_size].float(), dim=-1)

    def _add_children(self, tree, depths, slots, parent, score, logprobs):
        values, ids = logprobs.topk(min(self.top_k, logprobs.shape[-1]))
        depth = depths[parent] + 1 if parent >= 0 else 1
        for v, t in zip(values.tolist(), ids.tolist()):
            tree.add(t, parent, score + v)
            depths.append(depth)
            slots.append(-1)

    def _next_batch(self, tree, depths, slots, budget):
        scores = np.asarray(tree.scores)
        order = np.argsort(-scores, kind="stable")[:budget]
        batch = [int(i) for i in order
                 if slots[i] < 0 and depths[i] < self.max_depth
                 and tree.tokens[i] not in self.stop_ids and np.isfinite(scores[i])]
        return batch[:32]

    def _expand(self, tree, slots, batch, depths):
        past, cached, q = len(self.kv.tokens), self.kv.cache.get_seq_length(), len(batch)
        allowed = torch.zeros(q, cached + q, dtype=torch.bool)
        allowed[:, :past] = True
        for row, node in enumerate(batch):
            parent = tree.parents[node]
            while parent >= 0:
                allowed[row, slots[parent]] = True
                parent = tree.parents[parent]
            allowed[row, cached + row] = True
            slots[node] = cached + row
        device, dtype = model_device(self.model), self.model.dtype
        ids = torch.tensor([[tree.tokens[i] for i in batch]], device=device)
        pos = torch.tensor([[past - 1 + depths[i] for i in batch]], device=device)
        mask = _additive_mask(allowed, dtype).to(device)
        with torch.inference_mode():
            out = self._forward(lambda: self.model(input_ids=ids, position_ids=pos,
                                                   attention_mask=mask,
                                                   use_cache=True, **{CACHE_ARG: self.kv.cache}))
        return self._logprobs(out.logits[0])


def paths(tree: Tree) -> set[tuple[int, ...]]:
    """Every node as its token path from the root: trees compared by content, not numbering."""
    out, memo = set(), {}
    for i, (t, p) in enumerate(zip(tree.tokens, tree.parents)):
        memo[i] = memo.get(p, ()) + (t,)
        out.add(memo[i])
    return out


def time_head(drafter: ModelDrafter, method: str) -> None:
    """Count the time in `drafter`'s vocabulary-wide log-softmax of a forward's rows in
    drafter.head_s: one batched op per forward in both growths (the draft's output layer: on a
    GPU it runs on the device like the forward). Top-k stays in the host share: per node in
    the old growth, batched in the new."""
    inner = getattr(drafter, method)
    drafter.head_s = 0.0

    @wraps(inner)
    def timed(*a, **kw):
        t0 = dm.CLOCK()
        out = inner(*a, **kw)
        drafter.head_s += dm.CLOCK() - t0
        return out
    setattr(drafter, method, timed)


def measure(drafter: ModelDrafter, encoded: list[list[int]], budget: int):
    """Per-tree means over the prompts: forwards, forward_s, host_s (propose outside the model's
    forwards), head_s (its log-softmax share), bookkeeping_s (the rest); the trees."""
    before = (drafter.forwards, drafter.forward_s, drafter.propose_s, drafter.head_s)
    trees = []
    for ids in encoded:
        drafter.reset()
        trees.append(drafter.propose(ids, budget))
    n = len(encoded)
    forwards = (drafter.forwards - before[0]) / n
    forward_s = (drafter.forward_s - before[1]) / n
    propose_s = (drafter.propose_s - before[2]) / n
    head_s = (drafter.head_s - before[3]) / n
    return {"forwards": forwards, "forward_s": forward_s, "host_s": propose_s - forward_s,
            "head_s": head_s, "bookkeeping_s": propose_s - forward_s - head_s,
            "propose_s": propose_s, "nodes": sum(map(len, trees)) / n}, trees


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="default")
    ap.add_argument("--draft", default="smollm2-distilled")
    ap.add_argument("--budgets", default="256,1024,2048")
    ap.add_argument("--prompts", type=int, default=3, help="Spec-Bench prompts (one a category)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; at 1, times are the thread's CPU time (deaf to other load)")
    ap.add_argument("--head", choices=("dense", "packed"), default="dense",
                    help="a head on the CPU's packed kernels as the app runs it for a draft (with a "
                         "dense copy for many rows, drafts.model.dense_head), or the kernels alone")
    ap.add_argument("--out", type=Path, default=Path("bench-out/draft_bench.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if args.threads == 1:
        dm.CLOCK = time.thread_time
    pipe = build_named(args.target, args.draft)
    d = pipe.drafter
    stops = d.stop_ids
    new = ModelDrafter(d.model, d.vocab_size, stop_ids=stops)
    old = OldDrafter(d.model, d.vocab_size, stop_ids=stops)
    if args.head == "packed" and isinstance(d.model.lm_head, ManyRows):
        d.model.lm_head = d.model.lm_head.linear  # the draft's head as it was before the copy
    time_head(new, "_logprobs")  # both: one batched log-softmax per forward
    time_head(old, "_logprobs")
    encoded = [pipe.encode(p) for _, p in bench_prompts()[: args.prompts]]
    new.propose(encoded[0], 16)  # warm-up: first-call costs belong to neither
    old.propose(encoded[0], 16)
    rows = []
    for budget in [int(b) for b in args.budgets.split(",")]:
        for _ in range(args.repeats):
            r_old, t_old = measure(old, encoded, budget)
            r_new, t_new = measure(new, encoded, budget)
            same = np.mean([len(paths(a) & paths(b)) / max(1, len(a)) for a, b in zip(t_old, t_new)])
            row = {"budget": budget, "old": r_old, "new": r_new, "same_nodes": same,
                   "host_speedup": r_old["host_s"] / max(r_new["host_s"], 1e-9),
                   "bookkeeping_speedup": r_old["bookkeeping_s"] / max(r_new["bookkeeping_s"], 1e-9)}
            rows.append(row)
            print(f"budget {budget:>5}: forwards {r_old['forwards']:5.1f} -> {r_new['forwards']:4.1f};"
                  f" in forwards {r_old['forward_s']:6.2f} -> {r_new['forward_s']:6.2f} s;"
                  f" host {r_old['host_s']:6.3f} -> {r_new['host_s']:6.3f} s"
                  f" ({row['host_speedup']:.1f}x less), of which outside log-softmax"
                  f" {r_old['bookkeeping_s']:6.3f} -> {r_new['bookkeeping_s']:6.3f} s"
                  f" ({row['bookkeeping_speedup']:.1f}x less); nodes {r_old['nodes']:.0f} ->"
                  f" {r_new['nodes']:.0f}, {100 * same:.1f} % the same", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "machine": platform.platform(terse=True),
        "threads": torch.get_num_threads(), "head": type(d.model.lm_head).__name__,
        "clock": "thread CPU time" if args.threads == 1 else "wall", "target": pipe.target_name, "draft": pipe.draft_name,
        "prompts": len(encoded), "rows": rows}, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
