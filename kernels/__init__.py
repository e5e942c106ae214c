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

if __name__ != "loramux.kernels":
    # This folder was found as a top-level `kernels`: `python -m` from the
    # checkout put the checkout on sys.path, and here it stands in for Hugging
    # Face's `kernels` package, which transformers imports.
    raise ImportError(
        f"{__file__} was imported as {__name__!r}, not as loramux.kernels: the loramux checkout is on sys.path "
        "(python -m from the repository root). Run Python with -P or PYTHONSAFEPATH=1 there (the Makefile does).")

from .segments import NO_ADAPTER, Segments, make_segments, segments_from_runs

__all__ = [
    "NO_ADAPTER",
    "Segments",
    "make_segments",
    "segments_from_runs",
]
