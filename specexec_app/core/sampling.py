"""Drawing tokens from the target's distribution, and the SpecExec acceptance walk."""

from __future__ import annotations

import math

import torch

from specexec_app.core.tree import Tree
from specexec_app.errors import UserError

NOT_A_NUMBER = ("the model's output is not a number (NaN or inf): its weights are likely damaged "
                "(download the model again)")


class Sampler:
    """Greedy at temperature 0; otherwise temperature then nucleus (top-p), as `generate` does."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        self.temperature = temperature
        self.top_p = top_p
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V] logits -> [..., V] float32 probabilities of the distribution sampled from."""
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # Drop a token when the mass before it already reaches top_p; the best one always stays.
            drop = (sorted_p.cumsum(-1) - sorted_p) >= self.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def __call__(self, logits: torch.Tensor) -> int:
        """[V] logits -> one token id. Logits that are not numbers (damaged weights) are an error,
        not a token: a NaN is its own argmax, and sampling would fail in torch."""
        if self.greedy:
            top = logits.max(-1)  # value and index read back together: one host round trip
            value, token = torch.stack([top.values.float(), top.indices.float()]).tolist()
            if not math.isfinite(value):
                raise UserError(NOT_A_NUMBER)
            return int(token)
        probs = self.probs(logits).cpu()
        if not bool(probs.isfinite().all()):
            raise UserError(NOT_A_NUMBER)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def accept(tree: Tree, logits: torch.Tensor, sample: Sampler) -> tuple[list[int], list[int]]:
    """Walk the tree from the root, drawing each token from the target.

    logits: [1 + len(tree), V]; row 0 is the target at the root, row 1 + i at node i.
    Returns (path, tokens): the tree nodes followed, and the tokens drawn (len(path) + 1 of them;
    the last one is not in the tree). Each token is a draw from the target itself, so the output
    follows the target's distribution whatever the tree holds.
    """
    children = tree.children()
    path: list[int] = []
    tokens: list[int] = []
    node = -1
    while True:
        token = sample(logits[node + 1])
        tokens.append(token)
        child = children.get(node, {}).get(token)
        if child is None:
            return path, tokens
        path.append(child)
        node = child
