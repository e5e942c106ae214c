"""The LoRA ops over segments, with no server knowledge.

Semantics (see kernels/reference.py for the pool layout):

    h[s, t, :r]            = x[t] @ A_s(slot(t)).T                 (shrink)
    out[t, cols(s)]       += scale_s(slot(t)) * h[s, t, :r] @ B_s(slot(t)).T   (expand)

Implementations, each a module: `reference` (the float32 definitions every
other one is tested against), `cpu` (the torch path), `sgmv` (the Triton
kernels; importing it imports triton). Which one serves is chosen once, by
the model runner's LoRA backend (server/model/lora_backend.py), not here.
"""
from __future__ import annotations

from .segments import NO_ADAPTER, Segments, make_segments, segments_from_runs

__all__ = [
    "NO_ADAPTER",
    "Segments",
    "make_segments",
    "segments_from_runs",
]
