"""Shared pieces of the benchmarks: timing. (Synthetic models and adapters:
bench/synthetic.py; adapter popularity: bench/popularity.py.)"""
from __future__ import annotations

import statistics
import time


def interleaved_medians(fns: dict, repeats: int = 7, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each callable, run round-robin so that machine
    noise falls on all of them alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
