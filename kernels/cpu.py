"""The CPU path of the LoRA ops: the reference semantics in the input dtype.

A loop over segments with one matmul each is the fastest torch form on a
CPU for the batch shapes a server sees (bench/kernels.py compares the
alternatives): every other form either pads ranks and segments (gather +
bmm) or multiplies every token by every adapter (one dense GEMM).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

from .segments import Segments


def _pages(page_table: torch.Tensor, slot: int, r: int):
    """Index of the slot's first r pages: a slice when they are contiguous
    (the usual case: the pool allocates runs), else an index tensor."""
    idx = page_table[slot, :r]
    first = int(idx[0])
    if int(idx[-1]) - first == r - 1 and (r < 3 or bool((idx.diff() == 1).all())):
        return slice(first, first + r)
    return idx.long()


def lora_shrink(x, a_pool, page_table, ranks, seg: Segments) -> torch.Tensor:
    # x: [T, in], a_pool: [n, P, in] -> h: [n, T, R]
    n = a_pool.shape[0]
    h = x.new_empty(n, x.shape[0], page_table.shape[1])
    for start, length, slot in seg.with_adapter():
        xs = x[start : start + length]
        for s in range(n):
            r = int(ranks[s, slot])
            if r:
                a = a_pool[s, _pages(page_table, slot, r)]  # [r, in]
                torch.matmul(xs, a.T, out=h[s, start : start + length, :r])
    return h


def lora_expand(
    h, b_pool, page_table, ranks, scales, seg: Segments, out, slice_offsets: Sequence[int], dora_scale=None
) -> None:
    # h: [n, T, R], b_pool: [P, out_total], out: [T, out_total] (in place); dora_scale: [slots, out_total]
    # Columns of slices of rank 0 are not touched, by the delta or by dora_scale (kernels/reference.py).
    n = h.shape[0]
    for start, length, slot in seg.with_adapter():
        for s in range(n):
            r = int(ranks[s, slot])
            if r:
                lo, hi = slice_offsets[s], slice_offsets[s + 1]
                b = b_pool[_pages(page_table, slot, r), lo:hi]  # [r, out_s]
                rows = out[start : start + length, lo:hi]
                rows.addmm_(h[s, start : start + length, :r], b, alpha=float(scales[s, slot]))
                if dora_scale is not None:
                    rows.mul_(dora_scale[slot, lo:hi].to(out.dtype))


def apply_lora(x, out, work, dora=()) -> None:
    """The CPU path of one projection group, shrink and expand together:

        out[i:j] += (x[i:j] @ a_t) @ b_block     for each (i, j, a_t, b_block) in work
        out[i:j] *= scale                        then for each (i, j, scale) in dora

    a_t: [in, r*n] holds the adapter's A rows of all n slices; b_block:
    [r*n, out_total] holds each slice's scaled B rows in that slice's columns
    (adapters_store/device_pool.py builds both once per adapter; float32, or
    bf16 where the compiled op serves a bf16 model). Math in float32
    whatever the model dtype: tiny bf16 matmuls cost several times more than
    fp32 ones on a CPU. Batching the segments into one torch.bmm over pool
    views was measured slower than this loop for decode shapes (torch's CPU
    bmm of many small matrices does not beat separate matmuls).
    dora: the segments of DoRA adapters, scale: [out_total] float32, m /
    ||W0 + s·B·A||_row (1.0 in columns of plain modules); it scales the base
    output as well, so in a reduced-precision batch with DoRA rows the rows
    are summed and scaled in float32 and rounded once.
    x: [T, in], out: [T, out_total] updated in place.
    """
    if not work:
        return
    if out.dtype != torch.float32 and not dora:
        return _add_rounded_once(x, out, work)
    xf = x.float()
    if out.dtype == torch.float32:
        acc = out
    else:
        acc = out.float()  # exact copy; rows without an adapter come back unchanged
    for start, end, a_t, b_block in work:  # .float(): a bf16 pool's views (no copy for a float32 pool)
        acc[start:end].addmm_(xf[start:end] @ a_t.float(), b_block.float())
    for start, end, scale in dora:
        acc[start:end].mul_(scale)
    if acc is not out:
        out.copy_(acc)


COMPILED_DTYPES = (torch.float32, torch.bfloat16)  # the activation dtypes cpu_ops.cpp's lora_apply takes


@dataclass(frozen=True)
class CompiledWork:
    """apply_lora's work for one layer and group, split for the compiled ops:
    the segments shorter than the long-segment length as lora_apply's
    argument lists (A as rows [r*n, in], the storage a_t views), the longer
    ones likewise for lora_apply_long where brgemm serves the pool (then from
    BRGEMM_SEGMENT tokens), else as work items for torch's GEMMs (from
    LONG_SEGMENT), both faster than lora_apply's vector loops at that size.
    Built once per batch composition (CpuLoraBackend keeps them across
    decode steps)."""

    work: tuple  # every (start, end, a_t, b_block)
    short: tuple  # (starts, ends, a_rows, b_rows) of the short segments
    long_args: tuple  # the same of the long ones
    long: tuple  # the work items of long segments
    long_by_brgemm: bool  # the long segments go to ops.lora_apply_long

    @classmethod
    def of(cls, work, ops=None) -> "CompiledWork":
        """ops: the compiled ops that will run it (None: long segments take torch's GEMMs)."""
        # brgemm multiplies pairs of input columns: an odd input width stays on torch's GEMMs
        brgemm = bool(work) and brgemm_serves(ops, work[0][2].dtype) and work[0][2].shape[0] % 2 == 0
        long_segment = BRGEMM_SEGMENT if brgemm else LONG_SEGMENT

        def args(items) -> tuple:
            return [w[0] for w in items], [w[1] for w in items], [w[2].T for w in items], [w[3] for w in items]

        long = tuple(w for w in work if w[1] - w[0] >= long_segment)
        return cls(tuple(work), args([w for w in work if w[1] - w[0] < long_segment]), args(long), long,
                   brgemm and bool(long))


def apply_lora_compiled(ops, x, out, cw: CompiledWork, dora, num_slices: int, slice_offsets) -> None:
    """apply_lora through the compiled ops (kernels/csrc/cpu_ops.cpp), same
    result: one call covers every short segment (float32 math, each output
    rounded once), which in a decode step is all of them, and one the long
    bf16 segments where brgemm serves them. num_slices, slice_offsets: the
    group's slices and their column boundaries in `out` (b_block's row k
    belongs to slice k % num_slices, so the ops skip the zero blocks). dora:
    None, or (lo, hi, table, rows): tokens lo..hi-1 scaled by the rows
    `rows` ([hi - lo] long) of table ([slots + 1, out_total] float32, the
    pool's dora_scale), which the ops read in place."""
    if not cw.work:
        return
    long_by_brgemm = cw.long_by_brgemm and x.dtype == torch.bfloat16
    if x.dtype not in COMPILED_DTYPES or (cw.long and dora is not None and not long_by_brgemm):
        # a DoRA scale must follow every delta of its rows: with long segments one path does both
        gathered = () if dora is None else [(dora[0], dora[1], dora[2].index_select(0, dora[3]))]
        return apply_lora(x, out, cw.work, gathered)
    x = x.contiguous()
    lo, _, table, rows = dora if dora is not None else (0, 0, None, None)
    if long_by_brgemm:
        ops.lora_apply_long(x, out, *cw.long_args, num_slices, slice_offsets, table, rows, lo)
    elif cw.long:
        apply_lora(x, out, cw.long)
    if cw.short[0]:
        ops.lora_apply(x, out, *cw.short, num_slices, slice_offsets, table, rows, lo)


@functools.cache
def brgemm_serves(ops, pool_dtype: torch.dtype) -> bool:
    """Whether `ops` run lora_apply_long over a pool of `pool_dtype` on this
    CPU (a bf16 pool, a bf16 matrix unit: AMX); elsewhere torch's GEMMs
    serve long segments. brgemm beats lora_apply's vector loops from about
    BRGEMM_SEGMENT tokens (32 tokens of 8 adapters over SmolLM2's 30 layers:
    21.5 against 27.1 ms; 16: 36.2 against 32.7), torch's GEMMs only from
    about LONG_SEGMENT."""
    available = getattr(ops, "brgemm_bf16_available", None)
    return pool_dtype == torch.bfloat16 and available is not None and bool(available())


BRGEMM_SEGMENT = 24

# A segment this long is multiplied in the model's dtype (large enough for
# the CPU's bf16 matmul units: lora_apply_long's brgemm where it runs, else
# torch's GEMMs); shorter ones share one float32 buffer over the rows they
# span, so a decode step converts once.
LONG_SEGMENT = 64


def _add_rounded_once(x, out, work) -> None:
    """apply_lora for a reduced-precision `out` without DoRA rows."""
    short = []
    for start, end, a_t, b_block in work:
        if end - start >= LONG_SEGMENT:
            out[start:end].addmm_(x[start:end] @ a_t.to(out.dtype), b_block.to(out.dtype))
        else:
            short.append((start, end, a_t, b_block))
    if not short:
        return
    lo, hi = min(w[0] for w in short), max(w[1] for w in short)
    xf = x[lo:hi].float()
    acc = torch.zeros(hi - lo, out.shape[1], dtype=torch.float32)
    for start, end, a_t, b_block in short:
        acc[start - lo : end - lo].addmm_(xf[start - lo : end - lo] @ a_t.float(), b_block.float())
    out[lo:hi].add_(acc.to(out.dtype))  # a mixed-dtype add_ is ~40% slower on a CPU
