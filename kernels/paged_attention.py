"""Triton paged decode attention: one query token per sequence against its
paged KV cache (vLLM's paged attention v1 layout; float32 reference in
kernels/reference.py). This module only checks shapes, allocates and launches.

Cache layout: k_cache and v_cache are [num_slots, KV, D]; token `t` of
sequence `b` lives in flat slot

    block_table[b, t // block_size] * block_size + t % block_size

Worked example, block_size 4: a sequence with block_table row [7, 2, 0, 0]
and ctx_len 6 has tokens 0..3 in slots 28..31 and tokens 4, 5 in slots 8, 9.
The two trailing 0s are never read (nor are slots 10, 11 of block 2).

Grid: one program per (sequence, kv head). It holds the G = H // KV query
heads that share that kv head as a [G, D] tile, so each K/V row is read once
per kv head, not once per query head (GQA). The program walks the context in
tiles of TILE_N tokens (one tile may span several pages, or part of one),
looking up each token's page in block_table, and keeps an online softmax in
float32 (running max m, running sum l, unnormalised output acc):

    s = q . k^T * scale        m' = max(m, max(s))
    acc = acc * exp(m - m') + exp(s - m') . v
    l   = l   * exp(m - m') + sum(exp(s - m'))       out = acc / l

Every load is masked to tokens < ctx_len, so cache rows past a sequence's
context, and block_table entries past its blocks, are never touched. Products
are broadcast-multiply-sums in float32 (G is 1..8 in practice, below tl.dot's
minimum of 16), which also runs under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
PRODUCTS_PER_TILE = 8192  # G x TILE_N x D products held per step (the [G, TILE_N, D] temporary)


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, block_table_ptr, ctx_lens_ptr,
    scale_log2, max_blocks, head_dim,
    stride_qb, stride_qh, stride_qd,
    stride_ks, stride_kh, stride_kd,
    stride_vs, stride_vh, stride_vd,
    stride_ob, stride_oh, stride_od,
    stride_bt_b, stride_bt_n,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
):
    # out[b, h] = softmax(q[b, h] . K_b^T * scale) . V_b, K_b/V_b: rows of kv head h // GROUP
    b = tl.program_id(0)
    kv = tl.program_id(1)
    # A table row addresses at most max_blocks * BLOCK_SIZE tokens; a longer
    # ctx_len is clamped so block_table is never read past its row.
    ctx_len = tl.minimum(tl.load(ctx_lens_ptr + b).to(tl.int32), max_blocks * BLOCK_SIZE)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < head_dim
    heads = kv * GROUP + offs_g  # [BLOCK_G] query heads of this kv head
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=g_mask[:, None] & d_mask[None, :], other=0.0,
    ).to(tl.float32)  # [BLOCK_G, BLOCK_D]
    q = q * scale_log2  # scores come out in log2 units: exp(x) = exp2(x * log2 e)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table_row = block_table_ptr + b.to(tl.int64) * stride_bt_b
    for start in range(0, ctx_len, TILE_N):
        tok = start + tl.arange(0, TILE_N)  # [TILE_N] token positions
        t_mask = tok < ctx_len
        block = tl.load(table_row + (tok // BLOCK_SIZE) * stride_bt_n, mask=t_mask, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + tok % BLOCK_SIZE  # [TILE_N]
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + slot[:, None] * stride_ks + kv * stride_kh + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0).to(tl.float32)  # [TILE_N, BLOCK_D]
        v = tl.load(v_ptr + slot[:, None] * stride_vs + kv * stride_vh + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0).to(tl.float32)  # [TILE_N, BLOCK_D]

        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [BLOCK_G, TILE_N]
        s = tl.where(t_mask[None, :], s, float("-inf"))
        # every tile holds >= 1 live token, so m_new is finite and exp2(-inf) = 0 drops the rest
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [BLOCK_G, TILE_N]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new

    o = acc / l_i[:, None]
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


def _token_tile(block_g: int, block_d: int) -> int:
    """Tokens per step: as many as keep G x TILE_N x D near PRODUCTS_PER_TILE, 8..128."""
    return max(8, min(128, triton.next_power_of_2(max(1, PRODUCTS_PER_TILE // (block_g * block_d)))))


def paged_decode_attention(q, k_cache, v_cache, block_table, ctx_lens, block_size: int, scale: float,
                           out=None) -> torch.Tensor:
    """out[b, h] = softmax(q[b, h] @ K[b, h // G].T * scale) @ V[b, h // G], G = H // KV,
    where K[b, j] = k_cache[slots_b, j] over slots_b = the first ctx_lens[b] slots of
    sequence b's pages (block_table[b]), likewise V; float32 accumulation and softmax.

    q: [B, H, D]; k_cache, v_cache: [num_slots, KV, D] in q's dtype (fp32, bf16, fp16);
    block_table: [B, max_blocks] int32/int64; ctx_lens: [B] int32/int64, each in
    1..max_blocks * block_size (not checked: that would sync with the device; longer
    ones are clamped to the table). out: [B, H, D] in q's dtype, or None to allocate.
    Any strides; no host sync, so the call can be captured in a CUDA graph.
    """
    if q.dim() != 3 or k_cache.dim() != 3 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q [B, H, D] and k/v caches [slots, KV, D] disagree: "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    if k_cache.shape[2] != head_dim or heads % kv_heads != 0:
        raise ValueError(f"caches must be [slots, KV, {head_dim}] with H={heads} a multiple of KV, "
                         f"got {tuple(k_cache.shape)}")
    if not (k_cache.dtype == v_cache.dtype == q.dtype):
        raise ValueError(f"q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    int_types = (torch.int32, torch.int64)
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.dtype not in int_types:
        raise ValueError(f"block_table must be int32/int64 [{batch}, max_blocks], "
                         f"got {block_table.dtype} {tuple(block_table.shape)}")
    if tuple(ctx_lens.shape) != (batch,) or ctx_lens.dtype not in int_types:
        raise ValueError(f"ctx_lens must be int32/int64 [{batch}], got {ctx_lens.dtype} {tuple(ctx_lens.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if not (q.device == k_cache.device == v_cache.device == block_table.device == ctx_lens.device):
        raise ValueError("q, caches, block_table and ctx_lens must be on one device")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    if batch == 0:
        return out

    group = heads // kv_heads
    block_g, block_d = triton.next_power_of_2(group), triton.next_power_of_2(head_dim)
    _paged_decode_kernel[(batch, kv_heads)](
        q, k_cache, v_cache, out, block_table, ctx_lens,
        scale * LOG2E, block_table.shape[1], head_dim,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), *block_table.stride(),
        GROUP=group, BLOCK_G=block_g, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, TILE_N=_token_tile(block_g, block_d),
    )
    return out
