"""A draft model that grows the tree best-first by cumulative log-probability (SpecExec)."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import torch

from specexec_app.core.kvcache import TokenCache
from specexec_app.core.lm import forward_tree, mask_dtype, model_device, run, use_fast_attention
from specexec_app.core.tree import GrowingTree, Tree, chain, likeliest_path, to_device

from .base import Drafter
from .ngram import NgramDrafter

# Host timing (benchmarks/draft_bench.py swaps in time.thread_time to be deaf to other load).
CLOCK = time.perf_counter
MIN_BATCH = 128     # nodes run per draft forward at least (or all that are left to run) ...
MIN_BATCH_CPU = 32  # ... on a CPU, where a forward's time grows with its rows


def expand_batch(budget: int, device_type: str = "cuda") -> int:
    """Nodes run per draft forward at budget `budget`: the bulk of a 2048-node tree in about 11
    forwards. On a GPU a forward of 128 rows costs about what one of 32 does; on a CPU it costs
    ~4x, and at small budgets most of the extra rows end outside the tree (measured with the
    distilled draft, 3 Spec-Bench prompts, budget 256: 13 forwards either way, 0.20 s in them
    with 128 a forward, 0.16 s with 32)."""
    return max(MIN_BATCH_CPU if device_type == "cpu" else MIN_BATCH, budget // 8)


HEAD_ROWS = 32  # rows of draft logits normalised at once
SEED_NGRAM = 2  # shortest suffix match that seeds a tree with the text's own continuation


def top_k(x: torch.Tensor, k: int, width: int = 64) -> torch.Tensor:
    """torch.topk(x, k) of each row of x [r, V], as (values, indices) [r, k], in two steps: the
    k columns blocks of `width` with the largest maxima hold the k largest values (each of those
    lies in a block whose maximum is at least the k-th largest), so one max over the row and a
    top-k over k * width values replace a top-k over the whole row (4x less time on a CPU)."""
    r, v = x.shape
    k = min(k, v)
    if v <= k * width:
        return x.topk(k)
    full = v // width * width
    maxima = x[:, :full].view(r, -1, width).amax(-1)  # [r, v // width]
    if full < v:
        maxima = torch.cat([maxima, x[:, full:].amax(-1, keepdim=True)], 1)
    blocks = maxima.topk(k).indices  # [r, k]
    cols = (blocks[..., None] * width + torch.arange(width, device=x.device)).flatten(1)
    vals = x.gather(1, cols.clamp(max=v - 1)).masked_fill(cols >= v, -math.inf)
    values, at = vals.topk(k)
    # A row with fewer than k finite values can pick a padded column: a valid id (score -inf).
    return values, cols.gather(1, at).clamp(max=v - 1)


def forward_cap(budget: int) -> int:
    """Most draft forwards per tree: 16 up to budget 2048, 4 more for each doubling past it.
    A tree grows one level per forward, so this caps its depth (at forwards - 1 levels below the
    root's children): without it a confident draft spends its last ~10 forwards taking a few
    chains one level deeper each (21 forwards for a 2048-node tree on a Spec-Bench prompt with
    the distilled draft, 5 or fewer nodes run in each of the last 6)."""
    return 16 + 4 * max(0, math.ceil(math.log2(budget / 2048))) if budget > 0 else 1


class ModelDrafter(Drafter):
    """Any small causal LM that shares the target's tokenizer.

    Each round ranks every node drafted so far, takes the best not-yet-run nodes among the best
    `budget` (up to `expand_batch(budget, device)` of them), runs the draft once over all of them
    with a tree mask on its KV cache, and adds each one's `top_k` children (one batched top-k).
    On a CPU, a head on the packed kernels gets a dense copy for these many-row forwards
    (`dense_head`). It stops when no node within the best `budget` is left to run (no new child
    could then enter the kept set: a child never scores above its parent), or after
    `max_forwards` forwards. The kept tree is the best `budget` nodes of all that were scored.
    The tree stays on the draft's device until it is final: a round's one host round trip is
    the count of nodes left to run. The KV entries of run nodes that the target accepts are
    kept for the next call.

    On CUDA the draft runs on a stream of its own, so that drafting on another thread
    (`--overlap`) does not queue behind the target's pass on the default stream; its forward
    time is taken with events on that stream, never by synchronising the device.

    A tree grows one level a forward, so the forward cap bounds its depth; text that repeats
    earlier text (extraction, quoting, code edits) can be predicted deeper than that. So when the
    context's last SEED_NGRAM+ tokens occurred before, what followed them (`seed_chain`) runs in
    the first forward with the root, as a chain of nodes scored by the draft like any other:
    where the draft agrees with it, growth goes on from its end, levels below what the cap
    allows; where it does not, the chain scores low and drops out of the kept set.

    Counters (cumulative, for the engine's stats): `forwards` (draft forwards; a prompt's
    prefill counts as one), `forward_s` (time inside them) and `propose_s` (time in `propose`);
    the host's share of drafting is propose_s - forward_s.
    """

    name = "model"

    def __init__(self, model, vocab_size: int, top_k: int = 8, expand_batch: int | None = None,
                 max_depth: int = 32, stop_ids: frozenset[int] = frozenset(),
                 max_forwards: int | None = None, threads: int | None = None,
                 seed: bool = True):
        use_fast_attention(model)
        dense_head(model)
        self.model = model
        self.vocab_size = vocab_size  # ids past the shared tokenizer's vocabulary are never drafted
        self.top_k = top_k
        self.expand_batch = expand_batch  # None: expand_batch(budget, device)
        self.max_depth = max_depth
        self.max_forwards = max_forwards  # None: forward_cap(budget)
        self.stop_ids = stop_ids
        self.seed = seed  # seed trees with the text's own continuation (`seed_chain`)
        self._stops = torch.tensor(sorted(stop_ids), dtype=torch.long).to(model_device(model))
        self.device = model_device(model)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if threads and self.device.type == "cpu":
            # Process-wide (set in one thread, every thread reads it back): see cpu_draft_threads.
            torch.set_num_threads(threads)
        self.kv = TokenCache()
        self._last: tuple[Tree, list[int]] | None = None  # last tree and its nodes' cache slots
        self.forwards, self.forward_s, self.propose_s = 0, 0.0, 0.0

    def reset(self) -> None:
        self.kv.reset()
        self._last = None

    def _reuse_last_tree(self, tokens: list[int]) -> None:
        """Keep the cache entries of the last tree's nodes that `tokens` went on to accept."""
        last, self._last = self._last, None
        base = len(self.kv.tokens)
        if last is None or tokens[:base] != self.kv.tokens:
            return
        tree, slots = last
        children = tree.children()
        node, kept_tokens, kept_slots = -1, [], []
        for tok in tokens[base:]:
            node = children.get(node, {}).get(tok, -1)
            if node < 0 or slots[node] < 0:
                break
            kept_tokens.append(tok)
            kept_slots.append(slots[node])
        self.kv.commit(kept_tokens, kept_slots)

    def _logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """[r, V] logits -> [r, vocab_size] float32 log-probabilities (one fused pass a row)."""
        return torch.log_softmax(logits[:, : self.vocab_size].float().contiguous(), -1)

    def _top(self, logits: torch.Tensor, picks: torch.Tensor | None = None):
        """[r, V] logits -> the top_k log-probabilities and token ids [r, k] of each row. With
        `picks` [m] (m <= r), also the log-probability of picks[i] in row i [m], and picks[i] is
        left out of row i's top_k (the chain of `seed_chain` holds it already)."""
        # In blocks of rows: on a CPU, one [256, 49152] log-softmax costs 3x eight [32, 49152]
        # ones (a fresh 50 MB output faults its pages in); on a GPU a block is one launch more.
        out, picked = [], []
        for start, block in zip(range(0, len(logits), HEAD_ROWS), logits.split(HEAD_ROWS)):
            lp = self._logprobs(block)
            if picks is not None and start < len(picks):
                cols = picks[start:start + HEAD_ROWS, None]
                picked.append(lp[:len(cols)].gather(1, cols)[:, 0])
                lp[:len(cols)].scatter_(1, cols, -math.inf)
            out.append(top_k(lp, self.top_k))
        values, ids = (torch.cat(x) for x in zip(*out))
        # Rounding must never lift a child above its parent: the kept set's closure rests on it.
        if picks is None:
            return values.clamp(max=0.0), ids
        return values.clamp(max=0.0), ids, torch.cat(picked).clamp(max=0.0)

    def seed_chain(self, tokens: list[int]) -> list[int]:
        """What followed the latest earlier occurrence of the context's last 2-4 tokens, up to
        max_depth - 1 tokens (up to a stop token, within the draft's vocabulary); [] if none."""
        if not self.seed or self.max_depth < 2:
            return []
        found = NgramDrafter(max_ngram=4, min_ngram=SEED_NGRAM, max_depth=self.max_depth - 1,
                             max_matches=4).propose(tokens, 16 * self.max_depth)
        out = []
        for node in likeliest_path(found):
            tok = found.tokens[node]
            if tok >= self.vocab_size or tok in self.stop_ids:
                break
            out.append(tok)
        return out

    def _timed(self, spans: list, forward):
        """Run `forward`, noting its span: events on the draft's stream, or host time on a CPU."""
        if self.stream is None:
            t0 = CLOCK()
            out = forward()
            spans.append(CLOCK() - t0)
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        out = forward()
        end.record(self.stream)
        spans.append((start, end))
        return out

    def propose(self, tokens: list[int], budget: int) -> Tree:
        t0 = CLOCK()
        spans: list = []
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            tree = self._grow(tokens, budget, spans)  # ends in a host copy: the stream is done
        self.forwards += len(spans)
        self.forward_s += sum(s if isinstance(s, float) else s[0].elapsed_time(s[1]) / 1e3
                              for s in spans)
        self.propose_s += CLOCK() - t0
        return tree

    def _grow(self, tokens: list[int], budget: int, spans: list) -> Tree:
        self._reuse_last_tree(tokens)
        # A token the draft's vocabulary lacks (a target's padded ids past a smaller draft's)
        # goes in as id 0: the draft only guesses from it, and the target verifies every guess.
        pending = [t if t < self.vocab_size else 0 for t in self.kv.sync(tokens)]
        guess = self.seed_chain(tokens) if budget > 0 else []
        m = len(guess)
        # Rows: the root, then each node of the guessed chain (cached after the pending tokens).
        root = self._timed(spans, lambda: forward_tree(self.model, self.kv, pending, chain(guess)))
        self.kv.tokens = list(tokens)  # the pending tokens are now cached
        past = len(tokens)

        grow = GrowingTree(self.device, self.max_depth, self._stops,
                           capacity=self.top_k * (budget + m + 1), runs=budget + MIN_BATCH + m)
        if m:
            picks = to_device([guess], self.device)[0]
            # Each chain node's parent's top-k children are the best tokens but the chain's own.
            values, ids, picked = self._top(root, picks)
            # Non-increasing down the chain by construction (a parallel scan on a GPU may round
            # a prefix sum up by an ulp, which would put a child above its parent).
            scores = picked.cumsum(0).cummin(0).values
            grow.seed(picks, scores, past)
            base = torch.cat([scores.new_zeros(1), scores])
        else:
            values, ids = self._top(root)
            base = values.new_zeros(1)
        k = ids.shape[1]
        grow.add(torch.arange(-1, m, device=self.device).repeat_interleave(k), ids.flatten(),
                 (base[:, None] + values).flatten())
        batch = self.expand_batch or expand_batch(budget, self.device.type)
        dtype = mask_dtype(self.model)
        cap = self.max_forwards or forward_cap(budget)
        while len(spans) < cap and budget > 0:
            best = grow.ranked(budget)
            todo = grow.open[best]
            left = int(todo.sum())  # the round's one host round trip
            if left == 0:
                break
            b = min(left, batch)
            # The best b of them (`best` is in rank order; a stable sort keeps it).
            nodes = best[torch.argsort((~todo).to(torch.uint8), stable=True)[:b]]
            ids, pos, mask = grow.pass_inputs(nodes, past, dtype)
            logits = self._timed(spans, lambda: run(self.model, self.kv, ids, pos, mask, b))
            values, top = self._top(logits)  # [b, k]
            grow.add(nodes.repeat_interleave(top.shape[1]), top.flatten(),
                     (grow.scores[nodes, None] + values).flatten())
        keep = grow.ranked(budget).sort().values
        final, slots = grow.to_host(keep)
        self._last = (final, slots)
        return final


DENSE_HEAD_MAX = 1 << 30  # bytes of a draft head's dense copy, at most (and 1/8 of free RAM)


def dense_head(model) -> bool:
    """Give a draft model whose head runs on the CPU's packed kernels a dense bf16 copy of it
    for calls of many rows (`offload.kernels.ManyRows`: 5x faster for a batch of 128 rows), when
    the copy fits DENSE_HEAD_MAX and an eighth of the free memory. Only the draft's reference
    changes: a head shared with the target (a distilled draft's) stays as it is for the
    target. Returns whether it did."""
    import psutil

    from offload.kernels import KernelLinear, ManyRows

    head = model.get_output_embeddings()
    if not isinstance(head, KernelLinear):
        return False
    size = 2 * head.out_features * head.in_features
    if size > min(DENSE_HEAD_MAX, psutil.virtual_memory().available // 8):
        return False
    model.set_output_embeddings(ManyRows(head))
    return True


def keep_freed_memory(limit: int = 512 << 20) -> bool:
    """On Linux with glibc, for a draft on the CPU: serve allocations of up to `limit` bytes from
    the heap and keep what is freed there for reuse, process-wide, instead of mapping each block
    over 32 MB fresh and unmapping it at free. A batch of 256 draft rows makes [256, 49152] logits
    (50 MB) every forward, and fresh pages fault in one by one: measured on the development
    machine (1 thread, distilled draft, 2048-node trees) draft forwards 2.72 -> 2.13 s a tree and
    host work 148 -> 108 ms, for ~300 MB more resident memory (the heap keeps its peak). Returns
    whether it took effect (elsewhere nothing changes)."""
    import ctypes

    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameters
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(m_mmap_threshold, limit)) and bool(libc.mallopt(m_trim_threshold, limit))
    except (OSError, AttributeError):
        return False


def cpu_draft_threads(cores: int | None = None) -> int:
    """Intra-op threads for a draft on the CPU beside a target on a GPU (`threads` of
    ModelDrafter): every core but two, one left to the thread that feeds the GPU (it launches
    every kernel of the pass: starved, the GPU waits) and one to the disk readers of a streamed
    target; at least one. torch.set_num_threads is process-wide, not per thread (measured with
    torch 2.13's OpenMP backend: set in a worker thread, the main thread and new threads read
    the new value back), so the split is one pool size for the whole process: the feeding
    thread's own ops are kernel launches that never use the pool, so shrinking the pool costs
    it nothing and keeps the drafter's OpenMP team from taking its core."""
    import os

    cores = cores or os.cpu_count() or 1
    return max(1, cores - 2)
