"""Triton SGMV kernels: `lora_shrink` and `lora_expand` over segments.

Same signatures and semantics as kernels/reference.py (which also documents
the rank-row page layout); this module only checks shapes, allocates and
launches.

Grid: one program per (segment, tile of its tokens, tile of its output), so
ranks 4..64 and every slice of a fused projection run in ONE launch:

    shrink  (segment, token tile, slice * rank block)   h tile [BLOCK_M, BLOCK_R]
    expand  (segment, token tile, column block)         out tile [BLOCK_M, BLOCK_N]

A program whose segment has slot -1, whose token tile lies past the segment's
length (length-0 segments included), or whose rank block lies past the slot's
rank returns before touching memory: base-only tokens cost a few scalar loads
and their rows of `out` are never read or written. Rank rows are read through
page_table one page (= one rank row) at a time, so no weight is padded to a
maximum rank and rows past a slot's rank are masked out of every load.

Two tile shapes, picked per launch from the longest segment with an adapter:

    prefill (a segment >= 16 tokens): tl.dot tiles of 16..64 tokens, GEMM-like
        (in a mixed batch the decode segments ride along in masked tiles);
    decode  (segments of 1..15 tokens): BGMV-style broadcast-multiply-sum over
        wide K (shrink) or wide N (expand) tiles, tokens padded only to the
        next power of two, not to 16.

Rank blocks are 16 rows (tl.dot's minimum), so a rank-64 adapter spreads its
shrink over 4 programs per slice and a rank-4 one masks 12 rows of one.

Products are taken in fp32 from tiles loaded in the input dtype (fp16/bf16
values are exact in tf32, so the tensor-core dot loses nothing; fp32 inputs
use an IEEE dot), and accumulate in fp32.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .segments import NO_ADAPTER, Segments

MAX_SLICES = 4  # fused projections have 1..3 slices; expand takes offsets as scalars


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, h_ptr, page_table_ptr, ranks_ptr,
    seg_starts_ptr, seg_lens_ptr, seg_slots_ptr,
    in_features, max_rank,
    stride_xt, stride_xk,
    stride_as, stride_ap, stride_ak,
    stride_hs, stride_ht, stride_hr,
    stride_pt_slot, stride_pt_r, stride_rk_s, stride_rk_slot,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    # h[s, start + m, r0 + j] = x[start + m] . a_pool[s, pages[r0 + j]]
    seg = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    rank_blocks = tl.cdiv(max_rank, BLOCK_R)
    s = tl.program_id(2) // rank_blocks
    r0 = (tl.program_id(2) % rank_blocks) * BLOCK_R

    slot = tl.load(seg_slots_ptr + seg)
    seg_len = tl.load(seg_lens_ptr + seg)
    rank = tl.load(ranks_ptr + s * stride_rk_s + tl.maximum(slot, 0) * stride_rk_slot)
    if (slot < 0) | (m0 >= seg_len) | (r0 >= rank):
        return
    start = tl.load(seg_starts_ptr + seg)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    m_mask = offs_m < seg_len
    r_mask = offs_r < rank
    pages = tl.load(page_table_ptr + slot * stride_pt_slot + offs_r * stride_pt_r, mask=r_mask, other=0)
    x_rows = x_ptr + (start + offs_m).to(tl.int64)[:, None] * stride_xt  # [BLOCK_M, 1]
    a_rows = a_ptr + s.to(tl.int64) * stride_as + pages.to(tl.int64)[None, :] * stride_ap  # [1, BLOCK_R]

    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < in_features
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        a_t = tl.load(a_rows + offs_k[:, None] * stride_ak, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        x, a_t = x.to(tl.float32), a_t.to(tl.float32)  # [BLOCK_M, BLOCK_K], [BLOCK_K, BLOCK_R]
        if USE_DOT:
            acc += tl.dot(x, a_t, input_precision=PRECISION)
        else:
            acc += tl.sum(x[:, :, None] * a_t[None, :, :], axis=1)

    h_ptrs = h_ptr + s * stride_hs + (start + offs_m).to(tl.int64)[:, None] * stride_ht + offs_r[None, :] * stride_hr
    tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_kernel(
    h_ptr, b_ptr, out_ptr, page_table_ptr, ranks_ptr, scales_ptr, dora_ptr,
    seg_starts_ptr, seg_lens_ptr, seg_slots_ptr,
    off0, off1, off2, off3, off4,
    stride_hs, stride_ht, stride_hr,
    stride_bp, stride_bn,
    stride_ot, stride_on,
    stride_pt_slot, stride_pt_r, stride_rk_s, stride_rk_slot, stride_sc_s, stride_sc_slot,
    stride_dora_slot, stride_dora_n,
    N_SLICES: tl.constexpr, HAS_DORA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    # out[start + m, c] += scale_s * h[s, start + m, :r] . b_pool[pages[:r], c], s = slice of column c
    # HAS_DORA: then out[start + m, c] *= dora[slot, c] (DoRA's row scale, 1.0 for plain modules)
    seg = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    c0 = off0 + tl.program_id(2) * BLOCK_N

    slot = tl.load(seg_slots_ptr + seg)
    seg_len = tl.load(seg_lens_ptr + seg)
    if (slot < 0) | (m0 >= seg_len):
        return
    start = tl.load(seg_starts_ptr + seg)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = c0 + tl.arange(0, BLOCK_N)
    m_mask = offs_m < seg_len
    rows = (start + offs_m).to(tl.int64)

    # A column tile may straddle slices (unequal widths): each slice adds to
    # its own columns; columns of slices with rank 0 stay out of the store.
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    written = tl.zeros([BLOCK_N], dtype=tl.int1)
    for s in tl.static_range(N_SLICES):
        if s == 0:  # columns [lo, hi) of slice s; offsets arrive as scalars
            lo, hi = off0, off1
        elif s == 1:
            lo, hi = off1, off2
        elif s == 2:
            lo, hi = off2, off3
        else:
            lo, hi = off3, off4
        rank = tl.load(ranks_ptr + s * stride_rk_s + slot * stride_rk_slot)
        in_slice = (offs_n >= lo) & (offs_n < hi)
        written = written | (in_slice & (rank > 0))
        if (rank > 0) & (lo < c0 + BLOCK_N) & (hi > c0):
            scale = tl.load(scales_ptr + s * stride_sc_s + slot * stride_sc_slot)
            delta = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, rank, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < rank
                pages = tl.load(page_table_ptr + slot * stride_pt_slot + offs_k * stride_pt_r, mask=k_mask, other=0)
                h = tl.load(
                    h_ptr + s * stride_hs + rows[:, None] * stride_ht + offs_k[None, :] * stride_hr,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0,
                )
                b = tl.load(
                    b_ptr + pages.to(tl.int64)[:, None] * stride_bp + offs_n[None, :] * stride_bn,
                    mask=k_mask[:, None] & in_slice[None, :], other=0.0,
                )
                h, b = h.to(tl.float32), b.to(tl.float32)  # [BLOCK_M, BLOCK_K], [BLOCK_K, BLOCK_N]
                if USE_DOT:
                    delta += tl.dot(h, b, input_precision=PRECISION)
                else:
                    delta += tl.sum(h[:, :, None] * b[None, :, :], axis=1)
            acc += delta * scale

    mask = m_mask[:, None] & written[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_ot + offs_n[None, :] * stride_on
    old = tl.load(out_ptrs, mask=mask, other=0.0)
    new = old.to(tl.float32) + acc
    if HAS_DORA:  # the epilogue: one [BLOCK_N] load per program
        dora = tl.load(dora_ptr + slot * stride_dora_slot + offs_n * stride_dora_n, mask=written, other=1.0)
        new = new * dora[None, :]
    tl.store(out_ptrs, new.to(out_ptr.dtype.element_ty), mask=mask)


def _longest_adapter_run(seg: Segments) -> int:
    return max((n for n, a in zip(seg.lens_host, seg.slots_host) if a != NO_ADAPTER), default=0)


def _token_tile(longest: int) -> tuple[bool, int]:
    """(use tl.dot, BLOCK_M): dot tiles of 16..64 tokens for prefill, 1..16 for decode."""
    if longest >= 16:
        return True, min(64, triton.next_power_of_2(longest))
    return False, triton.next_power_of_2(longest)


def _precision(*dtypes: torch.dtype) -> str:
    """tf32 is exact for fp16/bf16 values upcast to fp32; fp32 inputs need IEEE."""
    return "ieee" if torch.float32 in dtypes else "tf32"


def _check_tables(page_table, ranks, n, device):
    if page_table.dim() != 2 or page_table.dtype != torch.int32:
        raise ValueError(f"page_table must be int32 [slots, R], got {page_table.dtype} {tuple(page_table.shape)}")
    if tuple(ranks.shape) != (n, page_table.shape[0]):
        raise ValueError(f"ranks must be [{n}, {page_table.shape[0]}], got {tuple(ranks.shape)}")
    if page_table.device != device or ranks.device != device:
        raise ValueError("page_table and ranks must be on the device of the activations")


def lora_shrink(x, a_pool, page_table, ranks, seg: Segments) -> torch.Tensor:
    """h[s, t, :r] = x[t] @ a_pool[s, page_table[slot(t), :r]].T, r = ranks[s, slot(t)].

    x: [T, in], a_pool: [n, P, in] -> h: [n, T, R] in x.dtype; entries past a
    token's rank and rows of tokens with no adapter are left unspecified.
    """
    if x.dim() != 2 or a_pool.dim() != 3 or a_pool.shape[2] != x.shape[1]:
        raise ValueError(f"x [T, in] and a_pool [n, P, in] disagree: {tuple(x.shape)}, {tuple(a_pool.shape)}")
    if a_pool.dtype != x.dtype or a_pool.device != x.device:
        raise ValueError(f"a_pool ({a_pool.dtype}, {a_pool.device}) must match x ({x.dtype}, {x.device})")
    if seg.num_tokens != x.shape[0]:
        raise ValueError(f"segments cover {seg.num_tokens} tokens, x has {x.shape[0]}")
    _check_tables(page_table, ranks, a_pool.shape[0], x.device)
    n, max_rank = a_pool.shape[0], page_table.shape[1]

    h = x.new_empty(n, x.shape[0], max_rank)
    longest = _longest_adapter_run(seg)
    if longest == 0 or max_rank == 0:
        return h
    use_dot, block_m = _token_tile(longest)
    # decode: wide K tiles, [BLOCK_M, BLOCK_K, 16] = 16K products, so each
    # program keeps 32 KB of A in flight per step (the shrink is memory-bound)
    block_r, block_k = 16, (64 if use_dot else max(16, 1024 // block_m))
    grid = (seg.num_segments, triton.cdiv(longest, block_m), n * triton.cdiv(max_rank, block_r))
    _shrink_kernel[grid](
        x, a_pool, h, page_table, ranks,
        seg.starts, seg.lens, seg.slots,
        x.shape[1], max_rank,
        *x.stride(), *a_pool.stride(), *h.stride(), *page_table.stride(), *ranks.stride(),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
        USE_DOT=use_dot, PRECISION=_precision(x.dtype), num_warps=4 if use_dot else 8,
    )
    return h


def lora_expand(
    h, b_pool, page_table, ranks, scales, seg: Segments, out, slice_offsets: Sequence[int], dora_scale=None
) -> None:
    """out[t, off[s]:off[s+1]] += scales[s, slot] * h[s, t, :r] @ b_pool[pages[:r], off[s]:off[s+1]].

    h: [n, T, R], b_pool: [P, out_total], out: [T, out_total] updated in place;
    rows of tokens with no adapter, and columns of slices of rank 0, are not touched.
    dora_scale: [>= slots, out_total] float32 or None; written columns are then
    multiplied by dora_scale[slot(t)] in the same pass (DoRA, kernels/reference.py).
    """
    n = h.shape[0]
    offs = [int(o) for o in slice_offsets]
    if h.dim() != 3 or b_pool.dim() != 2 or out.dim() != 2 or h.shape[1] != out.shape[0]:
        raise ValueError(f"h [n, T, R], b_pool [P, out], out [T, out] disagree: "
                         f"{tuple(h.shape)}, {tuple(b_pool.shape)}, {tuple(out.shape)}")
    if len(offs) != n + 1 or n > MAX_SLICES or offs != sorted(offs) or offs[0] < 0 \
            or offs[-1] > min(out.shape[1], b_pool.shape[1]):
        raise ValueError(f"slice_offsets {offs} must be {n + 1} ascending columns of out and b_pool "
                         f"(n <= {MAX_SLICES})")
    _check_tables(page_table, ranks, n, out.device)
    if h.shape[2] < page_table.shape[1] or seg.num_tokens != out.shape[0]:
        raise ValueError(f"h holds {h.shape[2]} rank columns for R={page_table.shape[1]}; "
                         f"segments cover {seg.num_tokens} tokens, out has {out.shape[0]}")
    if tuple(scales.shape) != tuple(ranks.shape) or not (h.device == b_pool.device == out.device == scales.device):
        raise ValueError("scales must be shaped like ranks, and all tensors on one device")
    if dora_scale is not None and (dora_scale.dim() != 2 or dora_scale.shape[0] < page_table.shape[0]
                                   or dora_scale.shape[1] < offs[-1] or dora_scale.device != out.device):
        raise ValueError(f"dora_scale must be [{page_table.shape[0]}, >= {offs[-1]}] on the device of out, "
                         f"got {tuple(dora_scale.shape)}")

    longest = _longest_adapter_run(seg)
    if longest == 0 or offs[-1] == offs[0]:
        return
    use_dot, block_m = _token_tile(longest)
    # decode: [BLOCK_M, 16, BLOCK_N] products, 4K per program
    block_n = 64 if use_dot else max(16, 256 // block_m)
    grid = (seg.num_segments, triton.cdiv(longest, block_m), triton.cdiv(offs[-1] - offs[0], block_n))
    padded = offs + [offs[-1]] * (MAX_SLICES + 1 - len(offs))
    dora = scales if dora_scale is None else dora_scale  # any pointer when unused
    _expand_kernel[grid](
        h, b_pool, out, page_table, ranks, scales, dora,
        seg.starts, seg.lens, seg.slots,
        *padded,
        *h.stride(), *b_pool.stride(), *out.stride(),
        *page_table.stride(), *ranks.stride(), *scales.stride(), *dora.stride(),
        N_SLICES=n, HAS_DORA=dora_scale is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=16,
        USE_DOT=use_dot, PRECISION=_precision(h.dtype, b_pool.dtype),
    )
