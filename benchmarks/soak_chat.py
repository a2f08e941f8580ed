"""Soak test of the chat REPL (not part of the suite): TURNS turns on the default model through
`ChatREPL` itself (the line reader is scripted), `/clear` every 10 turns, RSS and thread count
printed every 100 turns. Goal: RSS at the last turn within 5 % of turn 100, threads constant.

    python benchmarks/soak_chat.py [--turns 1000] [--max-new-tokens 8] [--overlap]
"""

from __future__ import annotations

import argparse
import io
import threading
import time

import psutil
from rich.console import Console

from specexec_app.core.settings import DecodeSettings
from specexec_app.loading.session import build_named
from specexec_app.ui.chat import ChatREPL

QUESTIONS = ["What is the capital of France?", "Name a colour.", "Count to three.",
             "Say hello in Spanish.", "What is two plus two?", "Name a planet.",
             "Give me a word that rhymes with cat.", "What day comes after Monday?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=1000)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--overlap", action="store_true")
    args = ap.parse_args()

    pipe = build_named("default")
    lines = []
    for turn in range(1, args.turns + 1):
        lines.append(QUESTIONS[turn % len(QUESTIONS)])
        if turn % 10 == 0:
            lines.append("/clear")
    proc, rows, start = psutil.Process(), [], time.perf_counter()
    feed = iter(lines)
    done = 0

    def read(prompt: str) -> str:
        nonlocal done
        line = next(feed, None)
        if line is None:
            raise EOFError
        if not line.startswith("/"):
            done += 1
            if done % 100 == 1 and done > 1:  # after turn done-1 has finished
                rss = proc.memory_info().rss / 2**20
                rows.append((done - 1, rss, threading.active_count()))
                print(f"turn {done - 1:5d}: RSS {rss:8.1f} MiB, threads {threading.active_count()}, "
                      f"{time.perf_counter() - start:6.1f} s", flush=True)
        return line

    console = Console(file=io.StringIO(), width=120)
    repl = ChatREPL(pipe, DecodeSettings(budget=8, max_new_tokens=args.max_new_tokens,
                                         overlap=args.overlap), console, footer=True, read=read)
    repl.loop()
    rss = proc.memory_info().rss / 2**20
    rows.append((done, rss, threading.active_count()))
    print(f"turn {done:5d}: RSS {rss:8.1f} MiB, threads {threading.active_count()}, "
          f"{time.perf_counter() - start:6.1f} s")
    first = next(r for r in rows if r[0] >= 100)
    growth = (rows[-1][1] - first[1]) / first[1] * 100
    print(f"RSS from turn {first[0]} to {rows[-1][0]}: {growth:+.1f} % (goal within 5 %); threads "
          f"{'constant' if len({r[2] for r in rows}) == 1 else 'CHANGED: ' + str([r[2] for r in rows])}")


if __name__ == "__main__":
    main()
