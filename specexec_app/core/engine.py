"""The SpecExec decode loop: grow a draft tree, verify it in one target pass, accept, commit.

The engine yields events; it never prints. Callers render `Text` and `Notice`, and read `Pass`
and `Done`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch

from specexec_app.core.drafter import Drafter
from specexec_app.errors import UserError
from specexec_app.core.lm import Target
from specexec_app.core.sampling import Sampler, accept
from specexec_app.core.settings import DecodeSettings
from specexec_app.core.text import Detokenizer
from specexec_app.core.lookahead import Lookahead
from specexec_app.core.tree import Tree


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
    end_s: float = 0.0  # when the pass ended, in seconds since the reply began
    draft_forwards: int = 0  # forwards of the draft model that grew this pass's tree


@dataclass
class Notice:
    """Something the user should know about this reply (e.g. a budget shrunk to fit memory)."""
    message: str


@dataclass
class Stats:
    """A reply's counts and times, summed from its passes (`add`): a reply stopped half way
    (Ctrl+C) still has the stats of what it did. The first pass holds the prompt's prefill."""
    prompt_tokens: int = 0
    reused_prompt_tokens: int = 0  # of the prompt, already in the target's KV cache
    new_tokens: int = 0
    accepted_tokens: int = 0  # tokens the passes produced: the new ones plus a final stop token
    target_passes: int = 0
    draft_s: float = 0.0
    target_s: float = 0.0
    wall_s: float = 0.0
    prefill_s: float = 0.0      # the first pass: the prompt (less what was cached) and a tree
    first_token_s: float = 0.0  # from the start to the first token
    first_pass_tokens: int = 0
    first_pass_target_s: float = 0.0  # the target's time in the first pass (with the prefill)
    first_passes: int = 0  # 1 a reply (sums count the replies' first passes)
    tree_nodes: int = 0
    reused_trees: int = 0  # passes whose tree was drafted during the previous verification
    streamed_bytes: int = 0
    draft_forwards: int = 0
    load_s: float = 0.0    # loading the models (set by the caller; one per session)
    stop_reason: str = ""

    def add(self, p: Pass) -> None:
        if self.target_passes == 0:
            self.prefill_s, self.first_pass_tokens = p.end_s, p.accepted
            self.first_pass_target_s, self.first_passes = p.target_s, 1
        if p.accepted and not self.new_tokens:
            self.first_token_s = p.end_s
        self.target_passes += 1
        self.new_tokens += p.accepted
        self.accepted_tokens += p.accepted
        self.tree_nodes += p.tree_size
        self.draft_s += p.draft_s
        self.target_s += p.target_s
        self.streamed_bytes += p.streamed_bytes
        self.draft_forwards += p.draft_forwards
        self.wall_s = p.end_s

    @property
    def accepted_per_pass(self) -> float:
        return self.accepted_tokens / self.target_passes if self.target_passes else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generation speed: the tokens after the first pass over the time after it (the
        prefill apart, as llama.cpp and Ollama report it); the whole reply if no token came after
        the first pass (one pass, or later passes that only drew the end of the text)."""
        if self.new_tokens > self.first_pass_tokens and self.wall_s > self.prefill_s:
            return (self.new_tokens - self.first_pass_tokens) / (self.wall_s - self.prefill_s)
        return self.overall_tokens_per_s

    @property
    def overall_tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def prompt_tokens_per_s(self) -> float:
        """The prompt (less what was cached) over the target's time in the first pass: the
        drafting of the first tree apart (a model draft's can be most of that pass)."""
        done = self.prompt_tokens - self.reused_prompt_tokens
        seconds = self.first_pass_target_s or self.prefill_s
        return done / seconds if seconds > 0 else 0.0

    @property
    def pass_s(self) -> float:
        """A target pass's time, the passes after each reply's first (which holds the prompt's
        prefill) apart, as tokens_per_s; all passes if there are no others."""
        later = self.target_passes - self.first_passes
        if later > 0:
            return (self.target_s - self.first_pass_target_s) / later
        return self.target_s / self.target_passes if self.target_passes else 0.0

    @property
    def streamed_gb_per_s(self) -> float:
        """Weight bytes streamed to the device per second of target time."""
        return self.streamed_bytes / self.target_s / 1e9 if self.target_s > 0 else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {k: getattr(self, k) for k in (
            "accepted_per_pass", "tokens_per_s", "overall_tokens_per_s", "prompt_tokens_per_s",
            "pass_s", "streamed_gb_per_s")}


@dataclass
class Done:
    stats: Stats
    token_ids: list[int] = field(default_factory=list)


class Stopwatch:
    """Laps of a pass. On CUDA the marks are events on the current stream, read once the pass's
    last one has completed: no synchronisation of the whole device between the laps."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def laps(self) -> list[float]:
        """Seconds between consecutive marks; starts afresh."""
        marks, self.marks = self.marks, []
        if self.cuda:
            marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:])]
        return [b - a for a, b in zip(marks, marks[1:])]


def _cut(tokens: list[int], stop_ids: set[int], room_new: int, room_ctx: int) -> tuple[list[int], str]:
    """Tokens to emit from one pass, and why generation stops ('' if it goes on)."""
    room = min(room_new, room_ctx)
    for i, t in enumerate(tokens[:room]):
        if t in stop_ids:
            return tokens[:i], "eos"
    if len(tokens) >= room:
        return tokens[:room], "length" if room_new <= room_ctx else "context"
    return tokens, ""


def _shrink(budget: int, tree: Tree | None, device: torch.device) -> tuple[int, str]:
    """After the device ran out of memory while drafting (`tree` None) or verifying `tree`: the
    budget to retry with, and what to tell the user; a one-line error where nothing is left to
    shrink."""
    if tree is None and budget == 1:
        raise UserError("out of GPU memory in the draft model even at budget 1: use --drafter "
                        "cpu or a smaller draft")
    if tree is not None and len(tree) == 0:
        raise UserError("out of GPU memory even without a draft tree: lower --gpu-memory or use "
                        "--quant 4")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if tree is None:
        budget = max(1, budget // 2)
        return budget, f"out of GPU memory while drafting: retrying with budget {budget}"
    budget = max(1, min(budget, len(tree)) // 2)
    return budget, f"out of GPU memory with a {len(tree)}-node tree: retrying with budget {budget}"


def check_prompt(target: Target, prompt_ids: list[int]) -> None:
    if not prompt_ids:
        raise UserError("the prompt is empty")
    if len(prompt_ids) >= target.context_length:
        raise UserError(f"the prompt has {len(prompt_ids)} tokens; the context is "
                        f"{target.context_length}{target.context_hint()}")


def generate(target: Target, drafter: Drafter, prompt_ids: list[int], settings: DecodeSettings,
             tokenizer, stop_ids: set[int]) -> Iterator[Text | Pass | Notice | Done]:
    """Exact speculative generation after `prompt_ids`: Text, Pass and Notice events, then Done.
    Each iteration: grow a tree, verify it in one target pass, accept, commit, cut, record."""
    check_prompt(target, prompt_ids)
    sample, detok, clock = Sampler(settings.temperature, settings.top_p, settings.seed), \
        Detokenizer(tokenizer), Stopwatch(target.device)
    stats = Stats(prompt_tokens=len(prompt_ids), reused_prompt_tokens=target.cached(prompt_ids))
    tokens, new, reason, budget, start = list(prompt_ids), [], "", settings.budget, time.perf_counter()
    with Lookahead(drafter, settings.overlap) as ahead:
        while not reason:
            room_new, room_ctx = settings.max_new_tokens - len(new), target.context_length - len(tokens)
            tree, streamed, forwards = None, target.bytes_streamed, drafter.forwards
            try:
                clock.mark()
                tree = ahead.take(tokens, budget) or drafter.propose(tokens, budget)
                # Nodes past the room left would be wasted work, or positions outside the context
                # (or past a 'longrope' model's switch while the sequence is short).
                tree = tree.within_depth(min(room_new, room_ctx, target.rope_room(len(tokens))) - 1)
                clock.mark()
                ahead.start(tokens, tree, budget, target.context_length)
                logits = target.verify(tokens, tree, reply_from=len(prompt_ids))
            except torch.OutOfMemoryError:
                budget, message = _shrink(budget, tree, target.device)
                clock.laps()
                yield Notice(message)
                continue
            path, drawn = accept(tree, logits, sample)
            target.commit(tree, path)
            clock.mark()
            out, reason = _cut(drawn, stop_ids, room_new, room_ctx)
            tokens += out
            new += out
            draft_s, target_s = clock.laps()
            step = Pass(len(tree), len(out), draft_s, target_s, target.bytes_streamed - streamed,
                        time.perf_counter() - start, drafter.forwards - forwards)
            stats.add(step)
            yield step
            if out:
                yield Text(detok.push(out), out)
    target.settle(tokens)
    stats.reused_trees, stats.stop_reason = ahead.reused, reason
    stats.accepted_tokens += reason == "eos"  # the stop token was drawn too
    yield Done(stats, new)
