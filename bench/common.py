"""Shared pieces of the benchmarks: timing, the command of a server they
start. (Synthetic models and adapters: bench/synthetic.py; adapter
popularity: bench/popularity.py.)"""
from __future__ import annotations

import statistics
import sys
import time


def serve_argv(*args: str) -> list[str]:
    """`loramux serve ARGS` in this interpreter. -P: without it the working
    directory, a checkout, goes first on sys.path, and its kernels/ shadows
    the `kernels` package transformers imports (the server dies at start)."""
    return [sys.executable, "-P", "-m", "loramux.server", "serve", *args]


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
