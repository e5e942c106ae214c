"""Shared pieces of the benchmarks: the default model, synthetic adapters, timing."""
from __future__ import annotations

import hashlib
import statistics
import time

import torch

from loramux.server.config import LORA_MODULES, ModelConfig
from loramux.adapters_store.peft_format import LoraAdapter, ModuleLora


def random_adapter(cfg: ModelConfig, name: str, rank: int = 16, seed: int = 0,
                   modules: tuple[str, ...] = LORA_MODULES, alpha: float = 32.0) -> LoraAdapter:
    """An adapter of random weights (what a benchmark needs: the right shapes)."""
    gen = torch.Generator().manual_seed(seed)
    mods = {}
    for layer in range(cfg.num_layers):
        for m in modules:
            out_f, in_f = cfg.module_shape(m)
            mods[(layer, m)] = ModuleLora(
                a=torch.randn(rank, in_f, generator=gen) * 0.02,
                b=torch.randn(out_f, rank, generator=gen) * 0.02,
                scale=alpha / rank,
            )
    digest = hashlib.sha256(f"{name}:{rank}:{seed}".encode()).hexdigest()
    nbytes = sum((m.a.numel() + m.b.numel()) * 4 for m in mods.values())
    return LoraAdapter(name, rank, alpha, tuple(modules), mods, {"r": rank}, digest, nbytes)


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
