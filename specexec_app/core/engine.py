"""The SpecExec decode loop: grow a draft tree, verify it in one target pass, accept, commit.

The engine yields events; it never prints. Callers render `Text` and `Notice`, and read `Pass`
and `Done`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import torch

from drafts.base import Drafter

from specexec_app.errors import UserError
from specexec_app.core.lm import Target
from specexec_app.core.sampling import Sampler, accept
from specexec_app.config.settings import DecodeSettings
from specexec_app.core.text import Detokenizer
from specexec_app.core.tree import Tree, likeliest_path, regraft


@dataclass
class Text:
    """Newly accepted text (may be empty while a multi-byte character is incomplete)."""
    text: str
    token_ids: list[int]


@dataclass
class Pass:
    """One draft + target iteration."""
    tree_size: int
    accepted: int  # tokens emitted by this pass (accepted tree nodes + the one drawn after them)
    draft_s: float
    target_s: float
    streamed_bytes: int = 0


@dataclass
class Notice:
    """Something the user should know about this reply (e.g. a budget shrunk to fit memory)."""
    message: str


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    accepted_tokens: int = 0  # tokens the passes produced: the new ones plus a final stop token
    target_passes: int = 0
    draft_s: float = 0.0
    target_s: float = 0.0
    wall_s: float = 0.0
    tree_nodes: int = 0
    reused_trees: int = 0  # passes whose tree was drafted during the previous verification
    streamed_bytes: int = 0
    stop_reason: str = ""

    @property
    def accepted_per_pass(self) -> float:
        return self.accepted_tokens / self.target_passes if self.target_passes else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def pass_s(self) -> float:
        return self.target_s / self.target_passes if self.target_passes else 0.0

    @property
    def streamed_gb_per_s(self) -> float:
        """Weight bytes streamed to the device per second of target time."""
        return self.streamed_bytes / self.target_s / 1e9 if self.target_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(accepted_per_pass=self.accepted_per_pass, tokens_per_s=self.tokens_per_s,
                 pass_s=self.pass_s, streamed_gb_per_s=self.streamed_gb_per_s)
        return d


@dataclass
class Done:
    stats: Stats
    token_ids: list[int] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _cut(tokens: list[int], stop_ids: set[int], room_new: int, room_ctx: int) -> tuple[list[int], str]:
    """Tokens to emit from one pass, and why generation stops ('' if it goes on)."""
    room = min(room_new, room_ctx)
    for i, t in enumerate(tokens[:room]):
        if t in stop_ids:
            return tokens[:i], "eos"
    if len(tokens) >= room:
        return tokens[:room], "length" if room_new <= room_ctx else "context"
    return tokens, ""


def generate(target: Target, drafter: Drafter, prompt_ids: list[int], settings: DecodeSettings,
             tokenizer, stop_ids: set[int]) -> Iterator[Text | Pass | Notice | Done]:
    """Exact speculative generation after `prompt_ids`: Text, Pass and Notice events, then Done."""
    if not prompt_ids:
        raise UserError("the prompt is empty")
    context = target.context_length
    if len(prompt_ids) >= context:
        raise UserError(f"the prompt has {len(prompt_ids)} tokens; the context is {context}"
                        f"{target.context_hint()}")
    sample = Sampler(settings.temperature, settings.top_p, settings.seed)
    detok = Detokenizer(tokenizer)
    stats = Stats(prompt_tokens=len(prompt_ids))
    tokens = list(prompt_ids)
    new: list[int] = []
    start = time.perf_counter()
    reason = ""
    budget = settings.budget
    # Overlap: while the target verifies a tree, a thread drafts the next one below the draft's
    # likeliest outcome; only the part below what was really accepted is kept. The drafter is
    # never used by two threads at once: the main thread takes the result before drafting.
    pool = ThreadPoolExecutor(1, thread_name_prefix="specexec-draft") if settings.overlap else None
    ahead: tuple[list[int], Future] | None = None
    try:
        while not reason:
            room_new, room_ctx = settings.max_new_tokens - len(new), context - len(tokens)
            t0 = time.perf_counter()
            tree = Tree()
            try:
                if ahead is not None:
                    guess, future = ahead
                    ahead = None
                    tree = regraft(guess, future.result(), tokens)
                    tree = tree.select(tree.best_nodes(budget))
                    stats.reused_trees += len(tree) > 0
                if len(tree) == 0:
                    tree = drafter.propose(tokens, budget)
            except torch.OutOfMemoryError:
                if budget == 1:
                    raise UserError("out of GPU memory in the draft model even at budget 1: "
                                    "use --drafter cpu or a smaller draft") from None
                _free(target.device)
                budget = max(1, budget // 2)
                yield Notice(f"out of GPU memory while drafting: retrying with budget {budget}")
                continue
            # Nodes past the room left would be wasted work, or positions outside the context.
            tree = tree.within_depth(min(room_new, room_ctx) - 1)
            _sync(target.device)
            t1 = time.perf_counter()
            if pool is not None:
                guess = tokens + [tree.tokens[n] for n in likeliest_path(tree)]
                if len(guess) < context:
                    # Twice the budget: the tree that will be kept hangs one level below the
                    # guessed leaf (under the token the target draws there), not at its root.
                    ahead = (guess, pool.submit(drafter.propose, guess, 2 * budget))
            streamed = target.bytes_streamed
            try:
                logits = target.verify(tokens, tree)
            except torch.OutOfMemoryError:
                if len(tree) == 0:
                    raise UserError("out of GPU memory even without a draft tree: lower "
                                    "--gpu-memory or use --quant 4") from None
                _free(target.device)
                budget = max(1, min(budget, len(tree)) // 2)
                yield Notice(f"out of GPU memory with a {len(tree)}-node tree: retrying with "
                             f"budget {budget}")
                continue
            path, drawn = accept(tree, logits, sample)
            target.commit(tree, path)
            _sync(target.device)
            t2 = time.perf_counter()
            out, reason = _cut(drawn, stop_ids, room_new, room_ctx)
            tokens += out
            new += out
            stats.target_passes += 1
            stats.tree_nodes += len(tree)
            stats.draft_s += t1 - t0
            stats.target_s += t2 - t1
            streamed = target.bytes_streamed - streamed
            stats.streamed_bytes += streamed
            yield Pass(tree_size=len(tree), accepted=len(out), draft_s=t1 - t0, target_s=t2 - t1,
                       streamed_bytes=streamed)
            if out:
                yield Text(detok.push(out), out)
    finally:
        if pool is not None:  # a stopped reply (Ctrl+C, error, close) leaves no thread behind
            pool.shutdown(wait=True, cancel_futures=True)
    stats.new_tokens = len(new)
    stats.accepted_tokens = len(new) + (reason == "eos")
    stats.wall_s = time.perf_counter() - start
    stats.stop_reason = reason
    yield Done(stats, new)
