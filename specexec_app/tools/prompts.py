"""The Spec-Bench prompts (configs/spec_bench_question.jsonl): one source for the profile, the
benchmarks and distillation."""

from __future__ import annotations

import json

from specexec_app.paths import CONFIGS

BENCH_FILE = CONFIGS / "spec_bench_question.jsonl"
# One prompt per category for calibration, another of the same categories for the check run.
CATEGORIES = ["writing", "coding", "extraction", "qa", "summarization", "reasoning"]


def bench_prompts(categories: list[str] | None = None, first: int = 0,
                  count: int = 1) -> list[tuple[str, str]]:
    """(category, first turn) of prompts first..first+count-1 of each category (every category
    when None), in the file's order."""
    seen: dict[str, int] = {}
    out = []
    with open(BENCH_FILE) as f:
        for line in f:
            row = json.loads(line)
            cat = row["category"]
            if categories is None or cat in categories:
                if first <= seen.get(cat, 0) < first + count:
                    out.append((cat, row["turns"][0]))
                seen[cat] = seen.get(cat, 0) + 1
    return out
