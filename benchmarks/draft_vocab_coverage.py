"""Would a draft vocabulary trimmed to its frequent tokens (FR-Spec) hold the target's tokens?

A tree holds only tokens its draft can propose, so a draft whose head covers only the N most
frequent tokens ends every accepted run at the first target token outside them. This measures
that share for the default target, with frequencies from text the target samples freely (it
writes the user's turn and its reply itself, T = 1: no corpus, no benchmark text), against the
target's own replies to Spec-Bench prompts at T = 0.6; token-id order (a BPE tokenizer's merge
rank) is the data-free alternative.

    python benchmarks/draft_vocab_coverage.py --rounds 8
"""

from __future__ import annotations

import argparse
import collections

import numpy as np
import torch

from specexec_app.loading.session import build_named
from specexec_app.tools.prompts import bench_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="default")
    ap.add_argument("--rounds", type=int, default=8, help="batches of 16 x 512 sampled tokens")
    ap.add_argument("--per-category", type=int, default=2)
    args = ap.parse_args()

    torch.manual_seed(0)
    pipe = build_named(args.target, "none")
    tok, model = pipe.tokenizer, pipe.target.model
    vocab = pipe.vocab_size()
    start = tok("<|im_start|>user\n", return_tensors="pt").input_ids
    counts = np.zeros(vocab, np.int64)
    for _ in range(args.rounds):
        out = model.generate(start.repeat(16, 1), do_sample=True, temperature=1.0, top_p=1.0,
                             top_k=0, max_new_tokens=512, pad_token_id=tok.eos_token_id)
        for row in out[:, start.shape[1]:].tolist():
            np.add.at(counts, [t for t in row if t < vocab], 1)
    replies = []
    for _, prompt in bench_prompts(None, 0, args.per_category):
        ids = pipe.encode(prompt)
        out = model.generate(torch.tensor([ids]), do_sample=True, temperature=0.6, top_p=1.0,
                             top_k=0, max_new_tokens=96, pad_token_id=tok.eos_token_id)
        replies.append(out[0, len(ids):].tolist())
    tokens = np.array([t for r in replies for t in r])
    print(f"{counts.sum()} tokens sampled freely ({(counts > 0).sum()} distinct); "
          f"{len(tokens)} reply tokens in {len(replies)} replies")
    by_freq = np.argsort(-counts, kind="stable")
    for n in (8192, 16384, 24576, 32768):
        kept = np.zeros(vocab, bool)
        kept[by_freq[:n]] = True
        print(f"top {n:>5}: by sampled frequency {kept[tokens].mean():.1%}, "
              f"by token id {(tokens < n).mean():.1%} of the reply tokens")
    rare = collections.Counter(int(t) for t in tokens if not kept[t])
    print("outside the top", n, ":", [(tok.convert_ids_to_tokens(t), c) for t, c in rare.most_common(12)])


if __name__ == "__main__":
    main()
