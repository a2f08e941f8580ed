"""Drafting ahead: while the target verifies a tree, a thread drafts the next one below the draft's
likeliest outcome; only the part below what was really accepted is kept (`tree.regraft`)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, wait

from .drafter import Drafter
from .tree import Tree, likeliest_path, regraft


class Lookahead:
    """`start` drafts the next tree on a thread, `take` returns what of it applies (or None), and
    `close` leaves no thread behind. Inert when not `enabled`: `take` is always None. The drafter
    is never used by two threads at once: the main thread takes the result before it drafts."""

    def __init__(self, drafter: Drafter, enabled: bool):
        self.drafter = drafter
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="specexec-draft") if enabled else None
        self.ahead: tuple[list[int], Future] | None = None
        self.last: Future | None = None  # the latest draft submitted (taken or not)
        self.reused = 0  # trees taken from a draft made ahead

    def start(self, tokens: list[int], tree: Tree, budget: int, context: int) -> None:
        if self.pool is None:
            return
        guess = tokens + [tree.tokens[n] for n in likeliest_path(tree)]
        if len(guess) < context:
            # Twice the budget: the tree that will be kept hangs one level below the guessed
            # leaf (under the token the target draws there), not at its root.
            self.last = self.pool.submit(self.drafter.propose, guess, 2 * budget)
            self.ahead = (guess, self.last)

    def take(self, tokens: list[int], budget: int) -> Tree | None:
        """The tree drafted ahead, regrafted below `tokens` and cut to `budget` nodes; None when
        nothing of it applies. A failure of the draft thread is raised here."""
        if self.ahead is None:
            return None
        (guess, future), self.ahead = self.ahead, None
        tree = regraft(guess, future.result(), tokens)
        if len(tree) == 0:
            return None
        self.reused += 1
        return tree.select(tree.best_nodes(budget))

    def close(self) -> None:
        """A stopped reply (Ctrl+C, error, close) leaves no thread: a draft in flight is waited
        for even through more Ctrl+C (left running, it would share the draft's cache with the
        next reply's drafting); a Ctrl+C that came meanwhile is raised once it is done."""
        interrupted = False
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            while self.last is not None and not self.last.done():
                try:
                    wait([self.last])
                except KeyboardInterrupt:
                    interrupted = True
            self.pool.shutdown(wait=True)
        self.ahead = None
        if interrupted:
            raise KeyboardInterrupt

    def __enter__(self) -> Lookahead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
