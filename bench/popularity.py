"""Adapter popularity: which adapter each request (or token) goes to.

One place for the distributions every benchmark and test draws from
(S-LoRA's and Punica's workloads):

- uniform:   every adapter alike;
- zipf:      adapter k with weight 1 / (k + 1) ** alpha (adapter 0 the hottest);
- skewed:    80 % of the picks to the hottest 20 % of the adapters;
- identical: every pick adapter 0;
- distinct:  pick i is adapter i mod n (no randomness).
"""
from __future__ import annotations

import random

POPULARITIES = ("uniform", "zipf", "skewed", "identical", "distinct")


def adapter_weights(popularity: str, n: int, zipf_alpha: float = 1.0) -> list[float]:
    """The probability of each of n adapters (adapter 0 the most popular)."""
    if popularity in ("uniform", "distinct"):
        return [1.0 / n] * n
    if popularity == "identical":
        return [1.0] + [0.0] * (n - 1)
    if popularity == "zipf":
        w = [1.0 / (i + 1) ** zipf_alpha for i in range(n)]
    elif popularity == "skewed":  # 80 % of the requests to the hottest 20 % of the adapters
        hot = max(1, round(0.2 * n))
        w = [0.8 / hot] * hot + ([0.2 / (n - hot)] * (n - hot) if n > hot else [])
    else:
        raise ValueError(f"popularity must be one of {POPULARITIES}, not {popularity!r}")
    total = sum(w)
    return [x / total for x in w]


def choose(popularity: str, n: int, count: int, rng: random.Random, zipf_alpha: float = 1.0) -> list[int]:
    """`count` adapter indexes in [0, n), drawn by `popularity` from `rng`
    (one rng.random() a pick; none for "distinct")."""
    if popularity == "distinct":
        return [i % n for i in range(count)]
    return rng.choices(range(n), adapter_weights(popularity, n, zipf_alpha), k=count)

