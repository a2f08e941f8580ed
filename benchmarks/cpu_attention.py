"""What exact attention cost on a CPU: one query row's attention in float64 over the float32
cache (how the lean forward, offload/cpu_forward.py, attended every row before its rows attended
alone; now only a prompt's rows attend in float64), against float32, for SmolLM2-135M's heads
(9 query heads, 3 key/value heads, head_dim 64), at a few context lengths; microseconds a layer.

    python benchmarks/cpu_attention.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def per_call_us(f, reps: int = 3000) -> float:
    for _ in range(100):
        f()
    start = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - start) / reps * 1e6


def main() -> None:
    torch.set_num_threads(2)
    group = HEADS // KV_HEADS
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; us per layer, one query row")
    for length in (200, 400, 800):
        q = torch.randn(1, HEADS, 1, HEAD_DIM)
        k, v = torch.randn(1, KV_HEADS, length, HEAD_DIM), torch.randn(1, KV_HEADS, length, HEAD_DIM)
        q64, k64, v64 = q.double(), k.double(), v.double()

        def by_hand():  # matmul, softmax, matmul in float64
            s = torch.matmul(q64.view(1, KV_HEADS, group, HEAD_DIM), k64.transpose(-1, -2))
            return torch.matmul(torch.softmax(s.mul_(0.125), -1), v64)

        rows = {
            "convert k and v to float64": per_call_us(lambda: (k.double(), v.double())),
            "SDPA float64": per_call_us(lambda: F.scaled_dot_product_attention(
                q64, k64, v64, scale=0.125, enable_gqa=True)),
            "by hand float64": per_call_us(by_hand),
            "SDPA float32": per_call_us(lambda: F.scaled_dot_product_attention(
                q, k, v, scale=0.125, enable_gqa=True)),
        }
        print(f"{length:5d} tokens: " + ", ".join(f"{name} {us:.1f}" for name, us in rows.items()))


if __name__ == "__main__":
    main()
