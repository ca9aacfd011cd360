"""Dynamic NTK at long context: a decoding step past the original length against the same step unscaled.

    python benchmarks/bench_dynamic.py

head_dim 128, 32 query and 8 key heads, L0 = 4096, one token at each offset; the unscaled module holds a
table long enough for the offset. Every call of the dynamic module computes the angles of the rows it reads
(its frequencies depend on the length), so its cost must not grow with the offset.
"""

import platform

import harness
import torch

from flexrope import RotaryEmbedding


def main() -> None:
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}")
    q, k = torch.randn(1, 32, 1, 128), torch.randn(1, 8, 1, 128)
    scaling = {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 4096}
    dynamic = RotaryEmbedding(128, context_length=4096, scaling=scaling)
    print(f"{'offset':>8} {'dynamic us':>11} {'unscaled us':>12} {'ratio':>6}")
    for offset in (2_000, 20_000, 100_000):
        plain = RotaryEmbedding(128, context_length=offset + 1)
        with torch.no_grad():
            t_dynamic, t_plain = harness.compare(lambda: dynamic(q, k, offset=offset),
                                                 lambda: plain(q, k, offset=offset), rounds=7, number=200)
            t_dynamic, t_plain = t_dynamic * 1e6, t_plain * 1e6
        print(f"{offset:>8} {t_dynamic:>11.1f} {t_plain:>12.1f} {t_dynamic / t_plain:>6.2f}")


if __name__ == "__main__":
    main()
