"""Public LoRA ops: `lora_shrink` and `lora_expand` over segments.

Semantics (see kernels/reference.py for the pool layout):

    h[s, t, :r]            = x[t] @ A_s(slot(t)).T                 (shrink)
    out[t, cols(s)]       += scale_s(slot(t)) * h[s, t, :r] @ B_s(slot(t)).T   (expand)

Dispatch: the Triton kernels (kernels/sgmv.py) for CUDA tensors, the torch
path (kernels/cpu.py) elsewhere. LORAMUX_TRITON=1 forces the Triton path on
any device, which with TRITON_INTERPRET=1 runs the kernels on the CPU: the
tests use it to check the model end to end on the Triton path.
"""
from __future__ import annotations

import os

import torch

from . import cpu
from .segments import NO_ADAPTER, Segments, make_segments, segments_from_runs

__all__ = [
    "NO_ADAPTER",
    "Segments",
    "lora_expand",
    "lora_shrink",
    "make_segments",
    "segments_from_runs",
    "use_triton",
]


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("LORAMUX_TRITON") == "1"


def lora_shrink(x, a_pool, page_table, ranks, seg: Segments) -> torch.Tensor:
    """x: [T, in], a_pool: [n, P, in], page_table: [slots, R], ranks: [n, slots] -> h: [n, T, R]."""
    if use_triton(x):
        from . import sgmv

        return sgmv.lora_shrink(x, a_pool, page_table, ranks, seg)
    return cpu.lora_shrink(x, a_pool, page_table, ranks, seg)


def lora_expand(h, b_pool, page_table, ranks, scales, seg: Segments, out, slice_offsets,
                dora_scale=None) -> None:
    """h: [n, T, R], b_pool: [P, out_total]; out: [T, out_total] += per-slice deltas, in place,
    then (DoRA) adapter rows *= dora_scale[slot] ([slots, out_total]), see kernels/reference.py."""
    if use_triton(h):
        from . import sgmv

        return sgmv.lora_expand(h, b_pool, page_table, ranks, scales, seg, out, slice_offsets, dora_scale)
    return cpu.lora_expand(h, b_pool, page_table, ranks, scales, seg, out, slice_offsets, dora_scale)
